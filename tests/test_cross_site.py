"""Cross-site evaluation (issue #22, item 5): after the last round every client's model (the
local baseline's, or a personalized one) on every client's test split, and the report's
matrix; and the personalized-vs-global paired test a client computes on its own split."""

import json

import pytest
import torch
from flwr.app import ArrayRecord

from fl_sim.evaluation import evaluate
from fl_sim.report import write_report
from fl_sim.server.baselines import client_state
from fl_sim.server.run_log import read_metrics
from fl_sim.task import build_model, load_data
from tests.test_baselines import make_study, run_one
from tests.test_strategies import run_study


def cross_site_rows(run_dir):
    return {(r["site_model"], r["client"]): r for r in read_metrics(run_dir)
            if r["scope"] == "cross_site"}


def test_a_local_run_s_matrix_is_each_saved_model_on_each_client_s_test_split(tmp_path):
    study = make_study(tmp_path, strategy={"name": "local"}, cross_site_eval=True)
    run, run_dir = run_one(study)
    summary = json.loads((run_dir / "summary.json").read_text())
    best = summary["best"]["round"]
    assert summary["cross_site"] == {"round": best, "models": ["local_0", "local_1", "local_2"]}
    got = cross_site_rows(run_dir)
    assert set(got) == {(f"local_{i}", j) for i in range(3) for j in range(3)}
    # By hand: each client's model from best.pt on each client's test split.
    data = load_data(study.data.model_dump_json())
    model, preprocess = build_model(run.config, data.class_names, 32)
    saved = ArrayRecord(torch.load(run_dir / "checkpoints/best.pt",
                                   weights_only=False)["state_dict"])
    for i in range(3):
        model.load_state_dict(client_state(saved, i))
        for j in range(3):
            rows = data.indices(j, "test")
            want = evaluate(model, data.images, data.labels, rows, preprocess, 128, data.classes)
            row = got[f"local_{i}", j]
            assert row["round"] == best and row["split"] == "test" and row["n"] == len(rows)
            for k in ("acc", "bacc", "loss", "auroc"):
                assert row[k] == pytest.approx(want[k], abs=1e-6), (i, j, k)
            assert row["bacc_lo"] <= row["bacc"] <= row["bacc_hi"]
    # The diagonal is each client's own test row at the best round.
    own = {r["client"]: r for r in read_metrics(run_dir)
           if r["scope"] == "client" and r["split"] == "test" and r["round"] == best}
    assert all(got[f"local_{c}", c]["bacc"] == own[c]["bacc"] for c in range(3))
    report = write_report(run_dir.parent).read_text()
    section = report[report.index("## Cross-site evaluation"):]
    assert "| local_2 |" in section and "| global |" not in section
    cell = f"{got['local_0', 1]['bacc']:.3f} [{got['local_0', 1]['bacc_lo']:.3f}, "
    assert cell in section


def test_without_cross_site_eval_nothing_is_exchanged_or_written(tmp_path):
    study = make_study(tmp_path, strategy={"name": "local"}, rounds=1)
    _, run_dir = run_one(study)
    assert not cross_site_rows(run_dir)
    assert "cross_site" not in json.loads((run_dir / "summary.json").read_text())
    assert "## Cross-site evaluation" not in write_report(run_dir.parent).read_text()


@pytest.mark.slow
def test_personalized_models_travel_to_every_client_and_the_paired_test_is_reported(tmp_path):
    """Through the Simulation Engine: each client's personalized best model reaches every
    other client; its own client's score of it equals the personalized row."""
    run_dir = run_study(tmp_path, "test_convnext", [{"name": "fedavg"}], images=210,
                        grid={"personalize": [{"fine_tune_epochs": 2}],
                              "cross_site_eval": [True]}, rounds=2)["fedavg"]
    summary = json.loads((run_dir / "summary.json").read_text())
    best = summary["best"]["round"]
    assert summary["cross_site"]["models"] == ["global", *(f"personalized_{c}" for c in range(3))]
    got = cross_site_rows(run_dir)
    assert set(got) == {(f"personalized_{i}", j) for i in range(3) for j in range(3)}
    rows = read_metrics(run_dir)
    tuned = {r["client"]: r for r in rows if r["scope"] == "personalized"
             and r["split"] == "test" and r["round"] == best}
    for c in range(3):
        assert got[f"personalized_{c}", c]["bacc"] == pytest.approx(tuned[c]["bacc"])
        assert got[f"personalized_{c}", c]["loss"] == pytest.approx(tuned[c]["loss"], rel=1e-5)
        assert tuned[c]["bacc_delta_lo"] <= tuned[c]["bacc_delta_hi"]
        assert 0 < tuned[c]["bacc_delta_p"] <= 1
    report = write_report(run_dir.parent).read_text()
    section = report[report.index("## Cross-site evaluation"):]
    assert "| global |" in section and "| personalized_2 |" in section
    personalization = report[report.index("## Personalization"):]
    assert "Holm-adjusted p" in personalization and "(p " in personalization
