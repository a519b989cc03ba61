"""`fl-sim probe`: classifiers on a finished run's features, beside the network's head.

The runs are pooled / local baselines (in this process, no Ray) on synthetic data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from flwr.app import ArrayRecord
from rich.console import Console
from test_baselines import make_study, rows_of, run_one
from threadpoolctl import threadpool_limits

from fl_sim.cli import main
from fl_sim.errors import FlSimError
from fl_sim.evaluation import autocast
from fl_sim.probe import fits, probe_run
from fl_sim.probe.features import Split
from fl_sim.report import write_report
from fl_sim.server.baselines import client_state
from fl_sim.task import build_model, load_data

QUIET = Console(quiet=True)
CLASSIFIERS = ("svm", "knn", "logreg")
HEAD_KEYS = ("n", "acc", "bacc", "precision", "recall", "f1", "avg")


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """The fits here are tiny: BLAS threads would only contend for the CI's cores."""
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def pooled(tmp_path_factory) -> tuple:
    """A finished 2-round pooled run: (study, run, run_dir)."""
    study = make_study(tmp_path_factory.mktemp("pooled"), strategy={"name": "pooled"})
    return (study, *run_one(study))


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> tuple:
    """A finished 1-round local run: one model per client."""
    study = make_study(tmp_path_factory.mktemp("local"), strategy={"name": "local"}, rounds=1)
    return (study, *run_one(study))


@pytest.fixture(scope="module")
def probed(pooled) -> tuple[int, dict, Path]:
    """`fl-sim probe` on the pooled run: exit code, probe.json, run_dir."""
    run_dir = pooled[2]
    code = main(["probe", str(run_dir), "--classifiers", ",".join(CLASSIFIERS)])
    return code, json.loads((run_dir / "probe" / "probe.json").read_text()), run_dir


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / run_dir.name))


def logged_at(run_dir: Path, server_round: int) -> dict:
    """metrics.jsonl rows of one round by (scope, client, split)."""
    return {(r["scope"], r["client"], r["split"]): r for r in rows_of(run_dir)
            if r["round"] == server_round}


def features_of(run, state: dict, rows: np.ndarray, data) -> np.ndarray:
    """timm's pre-logits features of images[rows], computed here without the probe's code
    (under evaluation's autocast: bf16 where a GPU runs the tests)."""
    model, pre = build_model(run.config, data.class_names, data.images.shape[1])
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad(), autocast(pre.device):
        x = model.forward_features(pre(data.images[rows]))
        return model.forward_head(x, pre_logits=True).float().cpu().numpy()


def recording_select(monkeypatch) -> list[tuple[Split, Split]]:
    """Every (train, val) that a classifier is fitted and selected on."""
    calls, real = [], fits.select

    def record(name, train, val, *args):
        calls.append((train, val))
        return real(name, train, val, *args)

    monkeypatch.setattr(fits, "select", record)
    return calls


# ----------------------------------------------------------------------------- end to end


def test_probe_writes_svm_knn_logreg_rows_for_every_client_and_the_global_test_set(pooled, probed):
    study, run, _ = pooled
    code, probe, run_dir = probed
    assert code == 0
    data = load_data(study.data.model_dump_json())
    for name in CLASSIFIERS:
        own = [r for r in probe["rows"] if (r["fit"], r["classifier"]) == ("per_client", name)]
        assert sorted((r["client"], r["split"]) for r in own) == [
            (c, s) for c in range(3) for s in ("global_test", "test", "val")]
        for r in own:
            expected = (data.indices("global", "test") if r["split"] == "global_test"
                        else data.indices(r["client"], r["split"]))
            assert r["n"] == len(expected) and 0 <= r["bacc"] <= 1
        shared = [r for r in probe["rows"] if (r["fit"], r["classifier"]) == ("pooled", name)]
        assert {(r["client"], r["split"]) for r in shared} == {
            *((c, s) for c in range(3) for s in ("val", "test")), (None, "global_test")}
    assert {(c["fit"], c["classifier"]) for c in probe["chosen"]} == {
        (f, n) for f in ("per_client", "pooled") for n in CLASSIFIERS}
    assert probe["selection_metric"] == run.config.selection_metric
    assert (run_dir / "probe" / "probe.csv").exists()
    assert "| per_client | svm | global test |" in (run_dir / "probe" / "probe.md").read_text()


def test_the_head_rows_are_the_runs_own_metrics_at_the_checkpoints_round(probed):
    _, probe, run_dir = probed
    best = json.loads((run_dir / "summary.json").read_text())["best"]["round"]
    assert probe["round"] == best and probe["checkpoint"] == "best"
    logged = logged_at(run_dir, best)
    head = [r for r in probe["rows"] if r["fit"] == "head"]
    assert len(head) == 3 * 2 + 1
    for r in head:
        shared = r["client"] is None
        key = ("global", None, "test") if shared else ("client", r["client"], r["split"])
        for k in HEAD_KEYS:
            assert r[k] == pytest.approx(logged[key][k], abs=1e-9), (key, k)


def test_summary_means_the_clients_rows(probed):
    _, probe, _ = probed
    rows = [r for r in probe["rows"] if r["fit"] == "per_client" and r["classifier"] == "knn"]
    summary = {s["on"]: s for s in probe["summary"]
               if s["fit"] == "per_client" and s["classifier"] == "knn"}
    for on, split in (("global test", "global_test"), ("mean client test", "test")):
        assert summary[on]["bacc"] == pytest.approx(
            np.mean([r["bacc"] for r in rows if r["split"] == split]))
    [pooled_global] = [r for r in probe["rows"] if r["fit"] == "pooled"
                       and r["classifier"] == "knn" and r["split"] == "global_test"]
    assert next(s for s in probe["summary"] if s["fit"] == "pooled" and s["classifier"] == "knn"
                and s["on"] == "global test")["avg"] == pytest.approx(pooled_global["avg"])


def test_report_compares_the_probe_with_the_head(probed):
    _, probe, run_dir = probed
    text = write_report(run_dir.parent).read_text()
    section = text.split("## Feature probes")[1].split("\n## ")[0]
    assert f"### {run_dir.name}" in section
    head = next(s for s in probe["summary"] if s["fit"] == "head" and s["on"] == "global test")
    svm = next(s for s in probe["summary"] if s["fit"] == "per_client" and s["classifier"] == "svm"
               and s["on"] == "global test")
    delta = f"{svm['bacc'] - head['bacc']:+.3f}".replace("-", "−")
    assert f"| per_client | svm | global test | {svm['acc']:.3f} |" in section
    assert delta in section.split("| per_client | svm | global test |")[1].splitlines()[0]


# ----------------------------------------------------------------------------- privacy


def test_per_client_fits_see_only_their_own_clients_features(pooled, tmp_path, monkeypatch):
    study, run, run_dir = pooled
    run_dir = copy_run(run_dir, tmp_path)
    calls = recording_select(monkeypatch)
    probe_run(run_dir, classifiers=["knn"], console=QUIET)
    data = load_data(study.data.model_dump_json())
    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=False)["state_dict"]
    assert len(calls) == 3 + 1  # a fit per client, then the pooled one
    for c, (train, val) in enumerate(calls[:3]):
        assert np.array_equal(train.rows, data.indices(c, "train"))
        assert np.array_equal(val.rows, data.indices(c, "val"))  # selection: own val only
        assert np.array_equal(train.y, data.labels[data.indices(c, "train")])
        np.testing.assert_allclose(train.x, features_of(run, state, train.rows, data),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(val.x, features_of(run, state, val.rows, data),
                                   rtol=1e-4, atol=1e-5)
    train, val = calls[3]
    for split, got in (("train", train), ("val", val)):
        assert sorted(got.rows) == sorted(np.concatenate([data.indices(c, split) for c in range(3)]))


def test_a_local_run_probes_each_client_with_its_own_model_and_pools_nothing(
        local, tmp_path, monkeypatch):
    study, run, run_dir = local
    run_dir = copy_run(run_dir, tmp_path)
    calls = recording_select(monkeypatch)
    probe = probe_run(run_dir, classifiers=["knn"], console=QUIET)
    assert len(calls) == 3 and "pooled" in probe["skipped"]
    assert not any(r["fit"] == "pooled" for r in probe["rows"])
    data = load_data(study.data.model_dump_json())
    saved = ArrayRecord(torch.load(run_dir / "checkpoints" / "best.pt",
                                   weights_only=False)["state_dict"])
    own = features_of(run, client_state(saved, 1), calls[1][0].rows, data)
    other = features_of(run, client_state(saved, 0), calls[1][0].rows, data)
    np.testing.assert_allclose(calls[1][0].x, own, rtol=1e-4, atol=1e-5)
    assert not np.allclose(calls[1][0].x, other, rtol=1e-4, atol=1e-5)
    # The head on the global test set is each client's model, as the run logged it.
    logged = logged_at(run_dir, probe["round"])
    for r in (r for r in probe["rows"] if r["fit"] == "head" and r["split"] == "global_test"):
        for k in HEAD_KEYS:
            assert r[k] == pytest.approx(logged[("client", r["client"], "global_test")][k])


def test_select_keeps_the_grid_point_best_on_validation(monkeypatch):
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    x = rng.normal(size=(60, 4)) + y[:, None]
    train, val = (Split(x[s], y[s], np.arange(60)[s], y[s]) for s in (slice(0, 40), slice(40, 60)))
    fit = fits.select("knn", train, val, "bacc", 3, seed=0)
    scores = [fits.classification_metrics(val.y, p.fit(train.x, train.y).predict(val.x), 3)["bacc"]
              for _, p in fits.candidates("knn", len(train.y), 0)]
    assert fit.val_score == max(scores)
    assert fit.params["n_neighbors"] <= len(train.y)


# ----------------------------------------------------------------------------- CLIP


def test_a_clip_run_is_probed_on_its_image_features_in_the_text_space(tmp_path):
    tower = tmp_path / "tiny-clip"
    tower.mkdir()
    (tower / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }}))
    study = make_study(tmp_path, strategy={"name": "pooled"}, rounds=1, training="clip",
                       clip={"text_model": f"local-dir:{tower}", "text_pretrained": None})
    _, run_dir = run_one(study)
    probe = probe_run(run_dir, classifiers=["knn"], console=QUIET)
    assert probe["feature_dim"] == 24 and "CLIP" in probe["features"]
    logged = logged_at(run_dir, probe["round"])
    [head] = [r for r in probe["rows"] if r["fit"] == "head" and r["client"] is None]
    assert head["bacc"] == pytest.approx(logged[("global", None, "test")]["bacc"])


# ----------------------------------------------------------------------------- errors


def test_a_missing_run_folder_exits_2_naming_it(tmp_path, capsys):
    assert main(["probe", str(tmp_path / "nope")]) == 2
    assert f"run folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def test_an_unknown_classifier_exits_2_naming_it(pooled, capsys):
    assert main(["probe", str(pooled[2]), "--classifiers", "svm,xgboost"]) == 2
    err = capsys.readouterr().err
    assert "xgboost" in err and "svm, knn, logreg, rf" in err


def test_a_missing_checkpoint_is_named(pooled, tmp_path):
    run_dir = copy_run(pooled[2], tmp_path)
    (run_dir / "checkpoints" / "last.pt").unlink()
    with pytest.raises(FlSimError, match=r"checkpoints/last\.pt not found"):
        probe_run(run_dir, checkpoint="last", console=QUIET)
    (run_dir / "checkpoints" / "best.pt").unlink()
    (run_dir / "checkpoints" / "best.pt").write_bytes(b"cut off")
    with pytest.raises(FlSimError, match=r"checkpoints/best\.pt cannot be read"):
        probe_run(run_dir, console=QUIET)


def test_missing_data_is_named(pooled, tmp_path):
    run_dir = copy_run(pooled[2], tmp_path)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["data"].update(dataset="ham10000", root=str(tmp_path / "gone"))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(FlSimError, match="HAM10000 metadata not found"):
        probe_run(run_dir, console=QUIET)
    with pytest.raises(FlSimError, match=str(tmp_path / "elsewhere")):
        probe_run(run_dir, data_root=tmp_path / "elsewhere", console=QUIET)


def test_data_that_splits_otherwise_than_partition_csv_is_refused(pooled, tmp_path):
    run_dir = copy_run(pooled[2], tmp_path)
    manifest = pd.read_csv(run_dir / "partition.csv", dtype=str, keep_default_na=False)
    manifest.loc[0, "client"] = "1" if manifest.loc[0, "client"] == "0" else "0"
    manifest.to_csv(run_dir / "partition.csv", index=False)
    with pytest.raises(FlSimError, match=r"partition\.csv \(1 of \d+ images differ\)"):
        probe_run(run_dir, console=QUIET)


def test_a_client_whose_train_split_holds_one_class_is_skipped_and_named():
    one = Split(np.zeros((4, 2)), np.zeros(4, dtype=int), np.arange(4), np.zeros(4, dtype=int))
    two = Split(np.eye(4)[:, :2], np.array([0, 1, 0, 1]), np.arange(4), np.zeros(4, dtype=int))
    features = {(c, s): (one if c == 1 and s == "train" else two)
                for c in range(2) for s in ("train", "val", "test", "global_test")}
    rows, chosen, skipped = fits.per_client_fits(features, range(2), ["knn"], "bacc", 2, seed=0)
    assert skipped == {"per_client client 1": "no fit: its train split holds a single class"}
    assert {r["client"] for r in rows} == {0} and [c["client"] for c in chosen] == [0]


def test_an_unfinished_run_is_refused_unless_allowed_and_probe_json_says_so(pooled, tmp_path):
    """Issue #25, item 2: not round 1 probed as if it were the final model."""
    run_dir = copy_run(pooled[2], tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.update(complete=False, rounds_done=1)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(FlSimError, match=r"not complete \(1 of 2 rounds finished\).*"
                                         r"--allow-unfinished"):
        probe_run(run_dir, console=QUIET)
    probe = probe_run(run_dir, classifiers=["knn"], console=QUIET, allow_unfinished=True)
    assert probe["unfinished"] == "the run is not complete (1 of 2 rounds finished)"
    saved = json.loads((run_dir / "probe/probe.json").read_text())
    assert saved["unfinished"] == probe["unfinished"]
    assert probe_run(pooled[2], classifiers=["knn"], console=QUIET)["unfinished"] is None
