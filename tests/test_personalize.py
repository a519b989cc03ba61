"""Personalization (issue #14, item 3): each client fine-tunes the final and the best global
model on its own train split and reports the personalized model beside the global one."""

import json

import pytest

from fl_sim.config import RunConfig
from fl_sim.server.run_log import read_metrics
from tests.test_strategies import run_study


def test_personalize_is_for_federated_runs():
    with pytest.raises(ValueError, match="'local' has no global model to personalize"):
        RunConfig.model_validate({"strategy": {"name": "local"},
                                  "personalize": {"fine_tune_epochs": 1}})


@pytest.mark.slow
def test_each_client_reports_its_personalized_final_and_best_models(tmp_path):
    from fl_sim.report import write_report

    run_dir = run_study(tmp_path, "test_convnext", [{"name": "fedavg"}], images=210,
                        grid={"personalize": [{"fine_tune_epochs": 3}]},
                        rounds=3)["fedavg"]
    summary = json.loads((run_dir / "summary.json").read_text())
    personalized = summary["personalized"]
    assert personalized["fine_tune_epochs"] == 3
    assert personalized["final"]["round"] == 3
    assert personalized["best"]["round"] == summary["best"]["round"]
    rows = read_metrics(run_dir)
    for which in ("final", "best"):
        r = personalized[which]["round"]
        assert set(personalized[which]["clients"]) == {"0", "1", "2"}
        tuned = {(x["client"], x["split"]): x for x in rows
                 if x["scope"] == "personalized" and x["round"] == r}
        own = {(x["client"], x["split"]): x for x in rows
               if x["scope"] == "client" and x["round"] == r and x["split"] != "train"}
        assert tuned.keys() == own.keys()  # every client's val and test
        assert all(tuned[k]["n"] == own[k]["n"] for k in own)  # the same images...
        assert any(tuned[k]["loss"] != own[k]["loss"] for k in own)  # ...another model
    report = write_report(run_dir.parent).read_text()
    assert "## Personalization" in report and "bacc personalized" in report
