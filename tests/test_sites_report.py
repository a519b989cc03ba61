"""The sites' own test splits: each client keeps its split's per-image predictions where it
is, and the report compares runs on them, paired on images and seeds (fl_sim.report.sites)."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from fl_sim.config import StudyConfig, expand_grid
from fl_sim.metrics import classification_metrics
from fl_sim.predictions import (
    CLIENTS, PERSONAL, Predictions, clear_predictions, client_folder, load_predictions,
    save_predictions,
)
from fl_sim.report import load_study, write_report
from fl_sim.report.sites import SiteSplits, _differences
from fl_sim.simulation import run_study

ROUNDS = 2
DATA = {"dataset": "synthetic", "image_size": 32, "synthetic": {"num_images": 480},
        "partition": {"num_clients": 2}, "global_test": {"source": "holdout", "fraction": 0.15}}


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """Pooled and FedAvg + fine-tuning, two seeds each: the sites study in miniature."""
    tmp = tmp_path_factory.mktemp("sites")
    study = StudyConfig.model_validate({
        "study": "sites", "out": str(tmp / "runs"), "data": {**DATA, "cache_dir": str(tmp / "c")},
        "defaults": {"rounds": ROUNDS, "model": {"name": "test_convnext"}, "augment": False,
                     "optimizer": {"name": "adamw"}},
        "grid": [{"seed": [0, 1], "strategy": [{"name": "pooled"}]},
                 {"seed": [0, 1], "strategy": [{"name": "fedavg"}],
                  "personalize": [{"steps": 5, "lr": 1e-3}]}],
    })
    dirs = run_study(study, expand_grid(study), console=Console(quiet=True))
    return dirs[0].parent


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _sites_tables(report):
    section = report.read_text().split("## The sites' own test splits")[1].split("\n## ")[0]
    tables = [block for block in section.split("\n\n") if block.startswith("|")]
    return [[[c.strip() for c in line.strip("|").split("|")] for line in t.splitlines()[2:]]
            for t in tables]


@pytest.mark.parametrize("strategy", ["pooled", "fedavg"])
def test_each_client_keeps_its_test_splits_predictions_that_its_rows_were_made_from(
        study_dir, strategy):
    [run_dir] = [d for d in study_dir.iterdir() if d.name.startswith(strategy) and
                 d.name.endswith("_s0")]
    rows = _rows(run_dir)
    partition = pd.read_csv(run_dir / "partition.csv")
    assert sorted(p.name for p in (run_dir / CLIENTS).iterdir()) == ["0", "1"]
    for client in (0, 1):
        split = partition[(partition["client"] == str(client)) & (partition["split"] == "test")]
        tested = [(r["round"], r["scope"]) for r in rows if r["client"] == client
                  and r["split"] == "test" and r["scope"] in ("client", "personalized")]
        assert {s for _, s in tested} == ({"client"} if strategy == "pooled"
                                          else {"client", "personalized"})
        for server_round, scope in tested:
            found = load_predictions(client_folder(run_dir, client), server_round,
                                     PERSONAL if scope == "personalized" else "")
            assert sorted(found.image_ids) == sorted(split["image_id"])
            [row] = [r for r in rows if (r["round"], r["scope"], r["client"], r["split"]) ==
                     (server_round, scope, client, "test")]
            bacc = classification_metrics(found.labels, found.decisions[0],
                                          found.probs.shape[2])["bacc"]
            assert bacc == pytest.approx(row["bacc"], abs=1e-9)


def test_the_sites_tables_score_every_model_and_test_it_against_pooled(study_dir, tmp_path):
    folder = tmp_path / "sites"
    shutil.copytree(study_dir, folder)
    values, paired = _sites_tables(write_report(folder))
    assert (folder / "report" / "sites_vs_pooled.png").stat().st_size > 10_000
    study = load_study(folder)
    runs = study.runs.set_index("run")
    tuned = [r for r in values if r[1] == "fine-tuned"]
    assert [r[2] for r in tuned] == ["2"]  # both seeds in one row
    expected = []
    for run, info in runs[runs["strategy_name"] == "fedavg"].iterrows():
        best = study.rows[(study.rows["run"] == run) & (study.rows["round"] == info["best_round"])
                          & (study.rows["scope"] == "personalized")
                          & (study.rows["split"] == "test")]
        expected.append(best.sort_values("client")["bacc"].to_numpy())
    assert tuned[0][3] == "—"  # a fine-tuned model has no global test score
    assert [float(v) for v in tuned[0][4:6]] == pytest.approx(np.mean(expected, 0), abs=5e-4)
    # fedavg's global model and its fine-tuned copy against pooled; pooled not against itself.
    assert [r[0].split(" (")[1].split(")")[0] for r in paired] == ["global model", "fine-tuned"]
    def delta(cell):
        return float(cell.strip("*").split(" [")[0].replace("−", "-"))

    for row in paired:
        assert delta(row[4]) == pytest.approx(np.mean([delta(c) for c in row[2:4]]), abs=1e-3)
    # The global model's global test column is the paired test of the report's other tables.
    assert paired[0][1] != "—" and paired[1][1] == "—"
    [glob] = [r for r in values if r[1] == "global model"]
    [pooled] = [r for r in values if r[1] == "pooled model"]
    assert delta(paired[0][1]) == pytest.approx(float(glob[3]) - float(pooled[3]), abs=1e-3)


def test_a_model_against_itself_differs_by_nothing_and_a_perfect_one_by_everything(study_dir):
    study = load_study(study_dir)
    splits = SiteSplits(study)
    pooled = tuple(study.runs[study.runs["strategy_name"] == "pooled"].iloc[0][
        ["strategy", "model", "optimizer"]])
    seeds, per = splits.per_seed(pooled, "")
    assert seeds == [0, 1]
    for d in _differences((seeds, per), (seeds, per), (pooled, pooled), [0, 1]):
        assert (d.value, d.lo, d.hi, d.distinguishable) == (0, 0, 0, False)
    # A model right on every image of client 0's split against one always wrong.
    found = load_predictions(client_folder(study_dir / study.runs["run"].iloc[0], 0), 1)
    classes = found.probs.shape[2]

    def scored(decisions):
        probs = np.eye(classes, dtype=np.float32)[decisions]
        return splits._resample(0, Predictions(found.image_ids, found.labels, decisions[None],
                                               probs[None]))

    right, wrong = scored(found.labels), scored((found.labels + 1) % classes)
    [d, mean] = _differences(([0], {0: right}), ([0], {0: wrong}), (pooled, pooled), [0])
    assert (d.value, d.lo, d.hi, d.distinguishable) == (1, 1, 1, True)
    assert mean.value == 1


def test_runs_without_their_clients_predictions_leave_the_sites_tables(study_dir, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(study_dir, folder)
    for run_dir in folder.glob("fedavg*"):
        shutil.rmtree(run_dir / CLIENTS)
    values, = _sites_tables(write_report(folder))  # pooled alone: nothing to pair
    assert {r[0].split(" ")[0] for r in values} == {"pooled"}
    for run_dir in folder.glob("pooled*"):
        shutil.rmtree(run_dir / CLIENTS)
    assert "## The sites' own test splits" not in write_report(folder).read_text()


def test_a_fresh_start_clears_the_clients_predictions_too(tmp_path):
    probs = [np.full((3, 2), 0.5, dtype=np.float32)]
    for folder in (tmp_path, client_folder(tmp_path, 0)):
        save_predictions(folder, 1, np.array(["a", "b", "c"]), np.array([0, 1, 0]), probs)
        save_predictions(folder, 1, np.array(["a", "b", "c"]), np.array([0, 1, 0]), probs,
                         PERSONAL)
    clear_predictions(tmp_path)
    assert not list(tmp_path.rglob("*.npz"))
