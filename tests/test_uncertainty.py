"""Intervals and paired tests end to end: real (pooled, in-process) runs keep their global
test predictions, the report resamples them, and a client sends numbers, not predictions."""

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from rich.console import Console

from fl_sim.client.client_app import evaluate_global
from fl_sim.config import StudyConfig, expand_grid
from fl_sim.data_partition import prepare_data
from fl_sim.metrics import classification_metrics
from fl_sim.predictions import load_predictions
from fl_sim.report import load_study, write_report
from fl_sim.report.uncertainty import Bootstrap
from fl_sim.simulation import run_study
from fl_sim.stats import METRICS
from fl_sim.task import build_model

ROUNDS = 2
DATA = {"dataset": "synthetic", "image_size": 32, "synthetic": {"num_images": 560},
        "partition": {"num_clients": 3}, "global_test": {"source": "holdout", "fraction": 0.15}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three pooled runs: two seeds of one recipe (told apart in the report only by an
    evaluation batch size, which changes no result), and one that barely trains."""
    tmp = tmp_path_factory.mktemp("uncertainty")
    study = StudyConfig.model_validate({
        "study": "all", "out": str(tmp / "runs"), "data": {**DATA, "cache_dir": str(tmp / "cache")},
        "defaults": {"rounds": ROUNDS, "model": {"name": "test_convnext"}, "augment": False,
                     "optimizer": {"name": "adamw"}, "strategy": {"name": "pooled"}},
        "grid": [{"seed": [0], "eval_batch_size": [64]}, {"seed": [1], "eval_batch_size": [32]},
                 {"seed": [0], "optimizer": [{"name": "adamw", "lr": 1e-7}]}],
    })
    dirs = run_study(study, expand_grid(study), console=Console(quiet=True))
    return dict(zip(("seed0", "seed1", "untrained"), dirs))


def study_of(tmp_path, runs, *names):
    folder = tmp_path / "-".join(names)
    for name in names:
        shutil.copytree(runs[name], folder / runs[name].name)
    return folder


def winner_lines(report):
    text = report.read_text()
    section = text.split("## Winners on the global test set")[1].split("\n## ")[0]
    return {line.split("**")[1]: line for line in section.splitlines() if line.startswith("- ")}


def test_every_round_keeps_the_global_test_predictions_metrics_jsonl_was_made_from(runs):
    run_dir = runs["seed0"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    partition = pd.read_csv(run_dir / "partition.csv")
    held_out = partition[partition["client"] == "global"]
    for r in range(ROUNDS + 1):
        found = load_predictions(run_dir, r)
        assert found.models == 1 and found.probs.dtype == np.float32
        assert sorted(found.image_ids) == sorted(held_out["image_id"])
        [row] = [x for x in rows if x["round"] == r and x["scope"] == "global"]
        again = classification_metrics(found.labels, found.decisions[0], 7)
        assert row["n"] == len(found.labels)
        for metric in ("acc", "bacc", "f1"):
            assert again[metric] == pytest.approx(row[metric], abs=1e-12)
        assert np.allclose(found.probs[0].sum(1), 1, atol=0.01)
        assert (run_dir / "predictions" / f"round_{r:04d}.npz").stat().st_size < 20_000


def test_two_seeds_of_one_recipe_are_not_distinguishable(runs, tmp_path):
    report = write_report(study_of(tmp_path, runs, "seed0", "seed1"))
    n = len(load_predictions(runs["seed0"], 0).labels)
    lines = winner_lines(report)
    assert lines["BACC"].startswith("- **BACC**: no winner")
    assert f"not distinguishable on {n} test images (paired 95 % interval [" in lines["BACC"]
    text = report.read_text()
    assert "Holm" in lines["BACC"] and "## Clinical metrics on the global test set" in text
    # Every global test number carries its interval, which holds the point.
    table = pd.read_csv(report.parent / "test_metrics.csv")
    glob = table[table["test_set"] == "global"]
    for metric in METRICS:
        assert (glob[f"{metric}_lo"] <= glob[f"{metric}_mean"] + 1e-9).all(), metric
        assert (glob[f"{metric}_mean"] <= glob[f"{metric}_hi"] + 1e-9).all(), metric
    clients = table[table["test_set"] != "global"]  # the intervals the clients sent
    assert clients["bacc_lo"].notna().all()
    assert ((clients["bacc_lo"] <= clients["bacc_mean"]) & (clients["bacc_mean"] <= clients["bacc_hi"])).all()


def test_a_trained_model_against_an_untrained_one_is_named_the_winner(runs, tmp_path):
    folder = study_of(tmp_path, runs, "seed0", "untrained")
    report = write_report(folder)
    lines = winner_lines(report)
    assert "wins against" in lines["BACC"] and "distinguishable (paired 95 % interval" in lines["BACC"]
    assert "lr1e-07" not in lines["BACC"].split("wins against")[0]  # the trained one wins
    study = load_study(folder)
    boot = Bootstrap(study)
    trained, untrained = (tuple(r[k] for k in ("strategy", "model", "optimizer"))
                          for _, r in study.runs.sort_values("optimizer").iterrows())
    d = boot.difference(trained, untrained, "bacc", 0.0)
    assert d.lo > 0 and d.p < 0.01


def test_the_same_report_twice_is_the_same_byte_for_byte(runs, tmp_path):
    folder = study_of(tmp_path, runs, "seed0", "seed1", "untrained")
    first = write_report(folder)
    texts = (first.read_bytes(), (first.parent / "test_metrics.csv").read_bytes())
    second = write_report(folder)
    assert (second.read_bytes(), (second.parent / "test_metrics.csv").read_bytes()) == texts
    assert "[" in first.read_text().split("## Global test set")[1].split("\n## ")[0]


def test_a_run_without_predictions_is_reported_as_before(runs, tmp_path):
    folder = study_of(tmp_path, runs, "seed0", "seed1")
    for run_dir in folder.iterdir():
        shutil.rmtree(run_dir / "predictions")
    lines = winner_lines(write_report(folder))
    assert "seed spread" in lines["BACC"] and "distinguishable" not in lines["BACC"]


def test_a_client_replies_with_numbers_about_its_split_never_per_image_output(tmp_path, monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    study = StudyConfig.model_validate({"study": "x", "data": {**DATA, "cache_dir": str(tmp_path)},
                                        "defaults": {"model": {"name": "test_convnext"}}})
    [run] = expand_grid(study)
    data = prepare_data(study.data, progress=False)
    model, _ = build_model(run.config, data.class_names, 32)
    msg = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({
        "data-config": study.data.model_dump_json(), "run-config": run.config.model_dump_json(),
        "server-round": 1, "partition-digest": data.digest})}), dst_node_id=0, message_type="evaluate")
    replies = [evaluate_global(msg, Context(run_id=1, node_id=0, node_config={"partition-id": c},
                                            state=RecordDict(), run_config={})) for c in (0, 1)]
    for reply in replies:
        assert list(reply.content.keys()) == ["metrics"]  # no arrays: no predictions, no weights
        assert all(isinstance(v, (int, float)) for v in reply.content["metrics"].values())
    # The same fixed set of numbers whatever the split's size: nothing per image.
    sizes = [len(data.indices(c, "test")) for c in (0, 1)]
    assert [r.content["metrics"]["test_n"] for r in replies] == sizes and sizes[0] != sizes[1]
    assert set(replies[0].content["metrics"]) == set(replies[1].content["metrics"])
    metrics = replies[1].content["metrics"]
    for metric in METRICS:
        assert metrics[f"test_{metric}_lo"] <= metrics[f"test_{metric}"] <= metrics[f"test_{metric}_hi"]
    assert not any(k.startswith("val_") and k.endswith(("_lo", "_hi")) for k in metrics)
    assert math.isfinite(metrics["test_ece"])
    assert not list(tmp_path.rglob("*round_*.npz"))  # no simulation's folder: it keeps none
