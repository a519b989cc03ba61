"""The pooled and local baselines: runs of the grid trained in this process, with the rows,
checkpoints, resume and schedule of a federated run."""

import json
import re

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from rich.console import Console

from fl_sim.client.train import train_local
from fl_sim.config import StudyConfig, expand_grid
from fl_sim.server.baselines import BASELINE_RUNS, client_state
from fl_sim.simulation import run_study
from fl_sim.task import build_model, client_rng, load_data


def make_study(tmp_path, **defaults) -> StudyConfig:
    return StudyConfig.model_validate({
        "study": "baselines", "out": str(tmp_path / "runs"),
        "data": {"dataset": "synthetic", "image_size": 32, "synthetic": {"num_images": 280},
                 "cache_dir": str(tmp_path / "cache"), "partition": {"num_clients": 3}},
        "defaults": {"rounds": 2, "model": {"name": "test_convnext"}, "augment": False,
                     "optimizer": {"name": "adamw"}, **defaults},
    })


def rows_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def last_weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["state_dict"]


def run_one(study):
    [run] = expand_grid(study)
    return run, run_study(study, [run], console=Console(quiet=True))[0]


def test_pooled_trains_on_every_clients_train_split_and_writes_federated_rows(tmp_path):
    study = make_study(tmp_path, strategy={"name": "pooled"})
    run, run_dir = run_one(study)
    data = load_data(study.data.model_dump_json())
    rows = rows_of(run_dir)
    train = [r for r in rows if r["split"] == "train"]
    assert [(r["round"], r["scope"]) for r in train] == [(1, "federated"), (2, "federated")]
    assert train[0]["n"] == sum(len(data.indices(c, "train")) for c in range(3))
    for rnd in (1, 2):
        clients = {(r["client"], r["split"]) for r in rows if r["round"] == rnd and r["scope"] == "client"}
        assert clients == {(c, s) for c in range(3) for s in ("val", "test")}
        assert any(r["round"] == rnd and r["scope"] == "federated" and r["split"] == "val" for r in rows)
    assert [r["round"] for r in rows if r["scope"] == "global"] == [0, 1, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["rounds_done"] == 2 and summary["stopped"] is None
    assert (run_dir / "checkpoints" / "best.pt").exists()


def test_local_clients_train_alone_and_the_global_row_is_the_mean_of_their_models(tmp_path):
    study = make_study(tmp_path, strategy={"name": "local"}, rounds=1)
    run, run_dir = run_one(study)
    rows = rows_of(run_dir)
    own = [r for r in rows if r["round"] == 1 and r["split"] == "global_test"]
    assert [r["client"] for r in own] == [0, 1, 2]
    trained = [r for r in rows if r["scope"] == "client" and r["split"] == "train"]
    assert [(r["cuda_device"], r["gpu_peak_mb"]) for r in trained] == [(-1, 0.0)] * 3  # the CPU
    [mean] = [r for r in rows if r["round"] == 1 and r["scope"] == "global"]
    for key in ("acc", "bacc", "f1", "loss"):
        assert mean[key] == pytest.approx(np.mean([r[key] for r in own]))
    # Client 0's model is exactly what training on client 0's train split alone gives.
    data = load_data(study.data.model_dump_json())
    model, pre = build_model(run.config, data.class_names, 32)
    train_local(model, data.images, data.labels, data.indices(0, "train"), pre, run.config,
                rng=client_rng(0, 0, 1, stream=0), lr=1e-3)
    saved = ArrayRecord(last_weights(run_dir))
    client0 = client_state(saved, 0)
    for k, v in model.state_dict().items():
        assert torch.equal(client0[k], v), k
    assert not torch.equal(client_state(saved, 1)["head.fc.weight"],
                           client0["head.fc.weight"])


@pytest.mark.parametrize("strategy", ["pooled", "local"])
def test_an_interrupted_baseline_resumes_to_the_same_final_metrics(tmp_path, strategy):
    whole = make_study(tmp_path / "whole", strategy={"name": strategy}, rounds=3)
    _, whole_dir = run_one(whole)
    cut = make_study(tmp_path / "cut", strategy={"name": strategy}, rounds=3)
    [run] = expand_grid(cut)

    def crash(report):
        if report.server_round == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        BASELINE_RUNS[strategy](cut, run, run.dir(cut), on_round=crash).execute()
    _, cut_dir = run_one(cut)
    final = [[{k: v for k, v in r.items() if k != "time_s"} for r in rows_of(d) if r["round"] == 3]
             for d in (whole_dir, cut_dir)]
    assert final[0] == final[1] and len(final[0]) > 3


def test_cosine_sends_each_round_its_rate_and_changes_training(tmp_path):
    constant = make_study(tmp_path / "c", strategy={"name": "pooled"}, rounds=3)
    cosine = make_study(tmp_path / "s", strategy={"name": "pooled"}, rounds=3,
                        lr_schedule={"name": "cosine"})
    dirs = [run_one(s)[1] for s in (constant, cosine)]
    lrs = [[r["lr"] for r in rows_of(d) if r["split"] == "train"] for d in dirs]
    assert lrs[0] == [1e-3] * 3
    assert lrs[1] == pytest.approx([1e-3, 1e-3 * 0.75, 1e-3 * 0.25])
    weights = [last_weights(d) for d in dirs]
    assert not torch.equal(weights[0]["head.fc.weight"], weights[1]["head.fc.weight"])


def test_plateau_stops_a_run_that_no_longer_learns(tmp_path):
    # lr 1e-30 leaves every weight as it is: train accuracy never improves after round 1.
    study = make_study(tmp_path, strategy={"name": "pooled"}, rounds=6,
                       optimizer={"name": "sgd", "lr": 1e-30},
                       lr_schedule={"name": "plateau", "patience": 1, "max_reductions": 1})
    run, run_dir = run_one(study)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["rounds_done"] == 3
    assert summary["stopped"]["round"] == 3
    assert "train accuracy did not improve for 1 rounds after 1 learning-rate reductions" in \
        summary["stopped"]["reason"]
    assert [r["lr"] for r in rows_of(run_dir) if r["split"] == "train"] == [1e-30, 1e-30, 5e-31]
    run_study(study, [run], console=Console(quiet=True))  # complete: not resumed
    assert json.loads((run_dir / "summary.json").read_text()) == summary


@pytest.mark.slow
def test_pooled_local_and_fedavg_on_the_real_ham10000_and_their_report(ham_root, ham_cache_dir,
                                                                       tmp_path):
    """The grid of the issue on a subset of the real HAM10000, pretrained EfficientNet-Lite0
    from the embedded weights, and the report's federated vs pooled vs local table."""
    study = StudyConfig.model_validate({
        "study": "ham", "out": str(tmp_path),
        "data": {"dataset": "ham10000", "root": str(ham_root), "image_size": 32,
                 "max_images": 300, "cache_dir": str(ham_cache_dir)},
        "defaults": {"rounds": 2, "model": {"name": "tf_efficientnet_lite0", "pretrained": True},
                     "optimizer": {"name": "adamw"}, "loss": {"name": "weighted_ce"}},
        "grid": {"strategy": ["pooled", "local", "fedavg"]},
    })
    dirs = run_study(study, expand_grid(study), console=Console(quiet=True))
    assert [json.loads((d / "summary.json").read_text())["complete"] for d in dirs] == [True] * 3
    from fl_sim.report import write_report

    text = write_report(tmp_path / "ham").read_text()
    section = text.split("## Federated vs pooled vs local")[1].split("\n## ")[0]
    rows = [line.split(" | ")[0].strip("| ") for line in section.splitlines()
            if line.startswith("| ") and "---" not in line]
    assert rows[1:4] == ["pooled", "fedavg", "local"]  # after the header row
    pooled = json.loads((dirs[0] / "summary.json").read_text())["best"]["global_test"]["acc"]
    fedavg = json.loads((dirs[2] / "summary.json").read_text())["best"]["global_test"]["acc"]
    # ACC with its bootstrap interval, then its gap to pooled.
    gap = f"{fedavg - pooled:+.3f}".replace("-", "−")
    assert re.search(rf"\| fedavg \| 1 \| {fedavg:.3f} \[[0-9.]+, [0-9.]+\] \| {gap} \|", section)
    assert "| fedavg − pooled |" in section and "| fedavg − local |" in section  # paired tests


def test_kept_optimizer_state_changes_training_and_a_resume_says_it_starts_afresh(
        tmp_path, caplog):
    fresh = make_study(tmp_path / "f", strategy={"name": "pooled"}, rounds=3)
    kept = make_study(tmp_path / "k", strategy={"name": "pooled"}, rounds=3,
                      client_state="keep")
    weights = [last_weights(run_one(s)[1]) for s in (fresh, kept)]
    assert not torch.equal(weights[0]["head.fc.weight"], weights[1]["head.fc.weight"])
    cut = make_study(tmp_path / "cut", strategy={"name": "pooled"}, rounds=3,
                     client_state="keep")
    [run] = expand_grid(cut)

    def crash(report):
        if report.server_round == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        BASELINE_RUNS["pooled"](cut, run, run.dir(cut), on_round=crash).execute()
    run_one(cut)
    assert "resumes after round 2 with fresh client optimizers" in caplog.text
