"""A run that diverges, a disk that fills or refuses, a crash between two writes: one
paragraph and exit 2, nothing half-written left behind, summary.json strict JSON and true to
the files, and a rerun that carries on (or, for a diverged run, says why it does not).

The runs are the in-process baselines (no Ray): the same FederatedRun loop, files and resume."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import ArrayRecord
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from processes import left_in_group

from fl_sim.cli import main
from fl_sim.config import StudyConfig, expand_grid
from fl_sim.errors import FlSimError
from fl_sim.server.baselines import BASELINE_RUNS
from fl_sim.server.failures import RunFailed, check_finite
from fl_sim.server.run_log import RunLog, write_json_atomic
from fl_sim.simulation import run_study


class Crash(BaseException):
    """A kill at an exact point: nothing of fl-sim handles it."""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def study_file(tmp_path: Path, cache: Path, **defaults) -> Path:
    config = {
        "study": "hard", "out": str(tmp_path / "runs"),
        "data": {"dataset": "synthetic", "image_size": 32, "synthetic": {"num_images": 280},
                 "cache_dir": str(cache), "partition": {"num_clients": 3}},
        "defaults": {"rounds": 3, "model": {"name": "test_convnext"}, "augment": False,
                     "optimizer": {"name": "adamw"}, "strategy": {"name": "pooled"}, **defaults},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def the_run(path: Path):
    study = StudyConfig.model_validate(yaml.safe_load(path.read_text()))
    [run] = expand_grid(study)
    return study, run, run.dir(study)


def strict(path: Path) -> dict:
    """A JSON file that Python's lenient parser would not need to be lenient about."""
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}: not strict JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def rows(run_dir: Path) -> list[dict]:
    return [strict_line(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def strict_line(line: str) -> dict:
    return json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))


def leftovers(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob("*.tmp"))


def one_paragraph(err: str) -> str:
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    return err


# ---------------------------------------------------------------------------- divergence

def test_a_diverged_run_stops_naming_client_and_round_and_is_never_resumed(tmp_path, cache, capsys):
    path = study_file(tmp_path, cache, strategy={"name": "local"},
                      optimizer={"name": "sgd", "lr": 1e30})
    study, run, run_dir = the_run(path)
    assert main(["run", str(path)]) == 2
    out, err = capsys.readouterr()
    one_paragraph(err)
    assert f"1 of 1 runs failed: training diverged, so each is marked failed in its summary.json, " \
           f"not resumed and never ranked: {run.name}: round 1, client 0's training loss is nan " \
           "(also client 1, 2)." in err
    assert "change the settings that made it fail" in err and "delete its folder" in err
    assert "round 1: client 0's training loss is nan" in out

    summary = strict(run_dir / "summary.json")
    assert summary["complete"] is False and summary["rounds_done"] == 0
    assert summary["failed"]["round"] == 1 and summary["failed"]["client"] == 0
    assert summary["failed"]["reason"].startswith("client 0's training loss is nan")
    assert summary["best"] == {} and summary["final"] == {}
    assert not (run_dir / "checkpoints" / "last.pt").exists()
    assert not (run_dir / "checkpoints" / "best.pt").exists()
    # No round was saved: only round 0's rows (the initial model), none of the cut round.
    assert {r["round"] for r in rows(run_dir)} == {0}
    assert leftovers(run_dir) == []

    # Run again: skipped, saying why and what to do; nothing changes on disk.
    before = (run_dir / "metrics.jsonl").read_text(), (run_dir / "summary.json").read_text()
    assert main(["run", str(path)]) == 2
    out, err = capsys.readouterr()
    one_paragraph(err)
    assert "failed before, in round 1 (client 0's training loss is nan" in out
    assert before == ((run_dir / "metrics.jsonl").read_text(), (run_dir / "summary.json").read_text())
    # The ServerApp's own path (deployment) refuses it as well.
    with pytest.raises(FlSimError, match="failed in round 1 .* and is not resumed"):
        BASELINE_RUNS["local"](study, run, run_dir).execute()


def test_a_diverged_round_after_good_ones_keeps_them_and_names_the_round(tmp_path, cache, monkeypatch):
    path = study_file(tmp_path, cache)
    study, run, run_dir = the_run(path)
    real = BASELINE_RUNS["pooled"]._train_on

    def train_on(self, indices, rng_client, server_round):
        row = real(self, indices, rng_client, server_round)
        return {**row, "loss": math.inf} if server_round == 3 else row

    monkeypatch.setattr(BASELINE_RUNS["pooled"], "_train_on", train_on)
    with pytest.raises(FlSimError, match="1 of 1 runs failed: .*: round 3, the pooled "
                                         "model's training loss is inf. To run one again"):
        run_study(study, [run], console=Console(quiet=True))
    summary = strict(run_dir / "summary.json")
    assert summary["failed"] == {"round": 3, "client": None,
                                 "reason": "the pooled model's training loss is inf"}
    assert summary["complete"] is False and summary["rounds_done"] == 2
    assert summary["best"]["round"] in (1, 2) and summary["final"]["round"] == 2
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=False)
    assert best["round"] == summary["best"]["round"]
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["round"] == 2
    assert max(r["round"] for r in rows(run_dir)) == 2


def test_non_finite_weights_stop_the_run_and_a_client_loss_names_every_client():
    weights = ArrayRecord({"w": torch.tensor([1.0, float("nan")]), "steps": torch.tensor([3])})
    with pytest.raises(RunFailed, match=r"round 4: the weights after training hold non-finite "
                                        r"values \(first in w\): training diverged \(lr 0.5\)"):
        check_finite(4, {0: {"loss": 1.0}, 1: {"loss": 2.0}}, weights, lr=0.5)
    finite = ArrayRecord({"w": torch.tensor([1.0, 2.0])})
    with pytest.raises(RunFailed) as info:
        check_finite(2, {0: {"loss": 1.0}, 1: {"loss": float("nan")}, 2: {"loss": float("inf")}},
                     finite, lr=0.1)
    assert info.value.failed == {"round": 2, "client": 1,
                                 "reason": "client 1's training loss is nan (also client 2)"}
    check_finite(2, {0: {"loss": 1.0}}, finite, lr=0.1)  # finite: carries on


def test_non_finite_metrics_are_null_in_the_files_never_bare_nan(tmp_path):
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "x.json", {"a": float("nan")})
    assert not (tmp_path / "x.json.tmp").exists()
    log = RunLog(tmp_path)
    log.row(1, "client", 0, "val", {"n": 3, "loss": float("inf"), "acc": float("nan"), "f1": 0.5})
    log.close()
    [row] = rows(tmp_path)
    assert (row["loss"], row["acc"], row["f1"]) == (None, None, 0.5)
    scalars = EventAccumulator(str(tmp_path)).Reload().Scalars("client_0/val/acc")
    assert math.isnan(scalars[0].value)  # TensorBoard keeps the NaN


# ---------------------------------------------------------------------------- full disk

def final_rows(run_dir: Path, rounds: int) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows(run_dir) if r["round"] == rounds]


@pytest.fixture(scope="module")
def whole(tmp_path_factory, cache):
    """The uninterrupted run that the interrupted ones must end like."""
    path = study_file(tmp_path_factory.mktemp("whole"), cache)
    assert main(["run", str(path)]) == 0
    return the_run(path)[2]


def full_disk_at_round_2_in(target: str, monkeypatch):
    """`target` (last.pt or summary.json) fails with ENOSPC in round 2, after writing part
    of its temporary file, as a filling disk does."""
    if target == "last.pt":
        real = torch.save

        def save(obj, f, *args, **kwargs):
            if obj["round"] == 2:
                with open(f, "ab") if isinstance(f, (str, Path)) else f as out:
                    out.write(b"partial checkpoint")
                    out.flush()
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    else:
        real = Path.write_text

        def write_text(self, data, *args, **kwargs):
            if self.name == "summary.json.tmp" and json.loads(data)["rounds_done"] == 2:
                real(self, data[:10])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(self, data, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)


@pytest.mark.parametrize("target", ["last.pt", "summary.json"])
def test_a_full_disk_says_what_was_saved_leaves_no_tmp_and_the_rerun_resumes(
        tmp_path, cache, whole, capsys, monkeypatch, target):
    path = study_file(tmp_path, cache)
    _, _, run_dir = the_run(path)
    with monkeypatch.context() as patch:
        full_disk_at_round_2_in(target, patch)
        assert main(["run", str(path)]) == 2
    err = one_paragraph(capsys.readouterr().err)
    assert leftovers(run_dir) == []
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    if target == "last.pt":
        assert err == (f"error: no space left on device while writing {run_dir}/checkpoints/last.pt; "
                       "round 2 was not saved; round 1 is intact. Free some space and run the "
                       "same command again: it resumes from round 2.\n")
        assert last["round"] == 1 and strict(run_dir / "summary.json")["rounds_done"] == 1
        assert max(r["round"] for r in rows(run_dir)) == 1  # round 2's rows are taken back
    else:
        assert err == (f"error: no space left on device while writing {run_dir}/summary.json; "
                       "rounds 1..2 are intact (checkpoints/last.pt), but not every record after "
                       "round 2: free some space and run the same command again, it completes "
                       "them.\n")
        assert last["round"] == 2 and strict(run_dir / "summary.json")["rounds_done"] == 1
        assert max(r["round"] for r in rows(run_dir)) == 2

    assert main(["run", str(path)]) == 0
    assert final_rows(run_dir, 3) == final_rows(whole, 3) and len(final_rows(whole, 3)) > 3
    keys = [(r["round"], r["scope"], r["client"], r["split"]) for r in rows(run_dir)]
    assert len(keys) == len(set(keys)) == len(rows(whole))
    a, b = strict(whole / "summary.json"), strict(run_dir / "summary.json")
    assert b["complete"] and (b["best"], b["final"]) == (a["best"], a["final"])


def test_a_folder_that_refuses_writes_names_the_file(tmp_path, cache, capsys, monkeypatch):
    path = study_file(tmp_path, cache)
    _, _, run_dir = the_run(path)
    real = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == "config.yaml":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    assert main(["run", str(path)]) == 2
    assert one_paragraph(capsys.readouterr().err) == (
        f"error: permission denied while writing {run_dir}/config.yaml; round 1 was not saved; "
        "no round had finished before. Fix its permissions and run the same command again: it "
        "resumes from round 1.\n")


def test_a_row_that_cannot_be_written_whole_leaves_no_torn_line(tmp_path):
    log = RunLog(tmp_path)
    log.row(1, "global", None, "test", {"n": 3, "acc": 0.5})
    real = log._jsonl

    class FillingDisk:
        """Takes the first 7 bytes of a write, then the disk is full."""

        def __getattr__(self, name):
            return getattr(real, name)

        def write(self, data):
            real.write(data[:7])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    log._jsonl = FillingDisk()
    with pytest.raises(OSError) as info:
        log.row(2, "global", None, "test", {"n": 3, "acc": 0.75})
    assert info.value.filename == str(tmp_path / "metrics.jsonl")
    log._jsonl = real
    log.close()
    assert [r["round"] for r in rows(tmp_path)] == [1]


# ---------------------------------------------------------------------------- crash windows

def test_a_crash_between_last_pt_and_best_pt_leaves_summary_true_to_the_files(
        tmp_path, cache, monkeypatch):
    study, run, run_dir = the_run(study_file(tmp_path, cache, rounds=1))
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == "best.pt":
            raise Crash
        real(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", replace)
        with pytest.raises(Crash):
            BASELINE_RUNS["pooled"](study, run, run_dir).execute()
    ckpt = run_dir / "checkpoints"
    assert torch.load(ckpt / "last.pt", weights_only=False)["state"]["best_round"] == 1
    assert not (run_dir / "summary.json").exists()  # it names no round before its files are in

    run_study(study, [run], console=Console(quiet=True))
    summary = strict(run_dir / "summary.json")
    assert summary["complete"] and summary["best"]["round"] == 1
    assert torch.load(ckpt / "best.pt", weights_only=False)["round"] == 1
    assert (ckpt / "best.pt").samefile(ckpt / "last.pt") and leftovers(run_dir) == []


def test_a_fresh_restart_after_a_crash_in_round_1_logs_each_round_once(tmp_path, cache, monkeypatch):
    study, run, run_dir = the_run(study_file(tmp_path, cache, rounds=2))

    def save(obj, f, *args, **kwargs):
        raise Crash  # round 1's events are written, its checkpoint never is

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", save)
        with pytest.raises(Crash):
            BASELINE_RUNS["pooled"](study, run, run_dir).execute()
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert not (run_dir / "checkpoints" / "last.pt").exists()

    run_study(study, [run], console=Console(quiet=True))
    acc = EventAccumulator(str(run_dir)).Reload()
    for tag in ("global/test/acc", "federated/val/avg", "federated/train/loss", "train/lr"):
        steps = [event.step for event in acc.Scalars(tag)]
        assert steps == sorted(set(steps)) and steps[-1] == 2, (tag, steps)
    assert [event.step for event in acc.Scalars("global/test/acc")] == [0, 1, 2]
    assert len(rows(run_dir)) == len({(r["round"], r["scope"], r["client"], r["split"])
                                      for r in rows(run_dir)})


# ---------------------------------------------------------------------------- signals

def start(path: Path) -> tuple[subprocess.Popen, Path]:
    """`fl-sim run` in its own process group; returns once round 1 is done."""
    log = path.parent / "fl-sim.log"
    proc = subprocess.Popen([sys.executable, "-m", "fl_sim.cli", "run", str(path)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while "round 1/" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    return proc, log


def stop_and_check(proc: subprocess.Popen, log: Path, run_dir: Path, signum: int,
                   group: bool = False) -> None:
    (os.killpg if group else os.kill)(proc.pid, signum)
    t0 = time.monotonic()
    try:
        status = proc.wait(30)
        seconds = time.monotonic() - t0
        # Ray's processes are in fl-sim's process group: none may outlive it by more than
        # the few seconds a loaded machine takes to reap an actor.
        deadline = time.monotonic() + 5
        while (left := left_in_group(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert status == 128 + signum and seconds < 15 and not left, (status, seconds, left, text)
    word = "interrupted" if signum == signal.SIGINT else "terminated"
    assert f"{word}: finished rounds and runs are kept on disk" in text and "Traceback" not in text
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["round"]
    assert max(r["round"] for r in rows(run_dir)) == saved  # no row of the cut round
    assert leftovers(run_dir) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_a_run_at_once_and_the_rerun_resumes(tmp_path, cache, whole, signum):
    path = study_file(tmp_path, cache)
    run_dir = the_run(path)[2]
    proc, log = start(path)
    stop_and_check(proc, log, run_dir, signum)
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["round"] < 3
    assert main(["run", str(path)]) == 0
    assert final_rows(run_dir, 3) == final_rows(whole, 3)


@pytest.mark.slow
@pytest.mark.parametrize("signum, group", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_a_simulation_stops_with_ray_and_its_clients(tmp_path, cache, signum, group):
    """SIGTERM to fl-sim alone (what `timeout` sends) and Ctrl-C (SIGINT to the terminal's
    process group, Ray's processes too): the ServerApp thread and Ray stop within seconds."""
    path = study_file(tmp_path, cache, strategy={"name": "fedavg"}, rounds=6, local_epochs=3)
    run_dir = the_run(path)[2]
    proc, log = start(path)
    stop_and_check(proc, log, run_dir, signum, group)


def test_a_finished_run_whose_settings_changed_is_refused_naming_them(tmp_path, cache, capsys):
    """Issue #25, item 2: not "finished before, skipped" with the old results kept."""
    assert main(["run", str(study_file(tmp_path, cache, rounds=1))]) == 0
    summary = (tmp_path / "runs/hard").glob("*/summary.json")
    before = [p.read_text() for p in summary]
    capsys.readouterr()
    assert main(["run", str(study_file(tmp_path, cache, rounds=2))]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "holds a run with other settings" in err and "changed: run_config.rounds)" in err
    assert [p.read_text() for p in (tmp_path / "runs/hard").glob("*/summary.json")] == before
    # Only scheduling changed: still the same run, still skipped.
    assert main(["run", str(study_file(tmp_path, cache, rounds=1,
                                       resources={"num_cpus": 1}))]) == 0
    assert "finished before, skipped" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["out", "cache"])
def test_folders_that_cannot_be_made_are_named_without_a_traceback(tmp_path, cache, capsys,
                                                                   monkeypatch, where):
    """Issue #25, item 3: FileExistsError / FileNotFoundError from the lock or the cache."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    if where == "cache":
        monkeypatch.setenv("FL_SIM_CACHE", str(blocker))
        config = yaml.safe_load(study_file(tmp_path, cache, rounds=1).read_text())
        del config["data"]["cache_dir"]
        path = tmp_path / "study.yaml"
        path.write_text(yaml.safe_dump(config))
        args = ["run", str(path)]
    else:
        args = ["run", str(study_file(tmp_path, cache, rounds=1)), "--out", "/proc/fl-sim"]
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    expected = {"out": "cannot write the study folder /proc/fl-sim/hard",
                "cache": f"cannot write the image cache in {blocker}"}[where]
    assert expected in err and "Traceback" not in err



def test_an_image_size_the_model_cannot_take_is_refused_with_the_smallest_it_takes(
        tmp_path, capsys):
    """Issue #25, item 3: not a RuntimeError from the round-0 evaluation."""
    config = yaml.safe_load(study_file(tmp_path, tmp_path / "cache", rounds=1).read_text())
    config["data"]["image_size"] = 8
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "model test_convnext cannot take 8 px images" in err
    assert "the smallest it takes is 32 px" in err and "Traceback" not in err
    config["data"]["image_size"] = 32  # and that size does run
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
