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


def test_fine_tuning_takes_its_own_steps_rate_and_optimizer(tmp_path, monkeypatch):
    """Issue #23 item 1 (FLamby's fine-tuning): K steps at a rate of its own, not the last
    round's cosine-decayed one."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fl_sim.client import client_app
    from fl_sim.config import DataConfig
    from fl_sim.data_partition import prepare_data
    from fl_sim.task import build_model

    for key, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, key, value)
    data = DataConfig.model_validate({"dataset": "synthetic", "image_size": 32,
                                      "synthetic": {"num_images": 210}, "cache_dir": str(tmp_path),
                                      "partition": {"num_clients": 3}})
    run = RunConfig.model_validate({"model": {"name": "test_convnext"}, "augment": False,
                                    "personalize": {"steps": 5, "lr": 0.003,
                                                    "optimizer": {"name": "sgd"}}})
    model, _ = build_model(run, prepare_data(data, progress=False).class_names, 32)
    seen, real = [], client_app.train_local

    def recording(*args, **kwargs):
        result = real(*args, **kwargs)
        seen.append((args[5].optimizer.name, kwargs["lr"], result["steps"]))
        return result

    monkeypatch.setattr(client_app, "train_local", recording)
    config = ConfigRecord({"data-config": data.model_dump_json(), "run-config": run.model_dump_json(),
                           "server-round": 3, "lr": 1e-7})  # the last round's, near zero
    client_app.personalize(Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                               "config": config}), dst_node_id=0,
                                   message_type="query.personalize"),
                           Context(run_id=1, node_id=0, node_config={"partition-id": 0},
                                   state=RecordDict(), run_config={}))
    assert seen == [("sgd", 0.003, 5)]
    with pytest.raises(ValueError, match="personalize.steps replaces fine_tune_epochs"):
        RunConfig.model_validate({"personalize": {"steps": 5, "fine_tune_epochs": 2}})
