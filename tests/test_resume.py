"""Studies that survive: a run killed mid-way resumes and ends where an uninterrupted one
ends; one `fl-sim run` per study at a time; TensorBoard's loader sees HParams and scalars."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fl_sim.cli import main

pytestmark = pytest.mark.slow

RUN = "fedadam_test_convnext_adamw_s0"
ROUNDS = 6


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    config = {
        "study": "resume",
        "data": {"dataset": "synthetic", "image_size": 32, "synthetic": {"num_images": 600},
                 "cache_dir": str(tmp / "cache")},
        # FedAdam keeps server-side moments: resuming must restore them, not restart them.
        "defaults": {"rounds": ROUNDS, "model": {"name": "test_convnext"},
                     "optimizer": {"name": "adamw"},
                     "strategy": {"name": "fedadam", "params": {"eta": 0.01, "eta_l": 0.01}}},
    }
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fl_sim(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fl_sim.cli", *args], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_killed_run_resumes_to_the_same_final_metrics(study, tmp_path):
    assert main(["run", str(study), "--out", str(tmp_path / "whole")]) == 0
    whole = tmp_path / "whole" / "resume" / RUN

    proc = fl_sim("run", str(study), "--out", str(tmp_path / "cut"))
    cut = tmp_path / "cut" / "resume" / RUN
    last = cut / "checkpoints" / "last.pt"
    try:
        deadline = time.monotonic() + 240
        while not (last.exists() and torch.load(last, weights_only=False)["round"] >= 2):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "round 2 never finished"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a real kill: no handler, no cleanup
        proc.wait()
    killed_at = torch.load(last, weights_only=False)["round"]
    assert killed_at < ROUNDS
    assert json.loads((cut / "summary.json").read_text())["complete"] is False

    assert main(["run", str(study), "--out", str(tmp_path / "cut")]) == 0
    a = json.loads((whole / "summary.json").read_text())
    b = json.loads((cut / "summary.json").read_text())
    assert b["complete"] and b["final"]["round"] == ROUNDS
    # Same seed on CPU: exact equality, not a bound (clients draw randomness per round).
    assert b["final"]["global_test"] == a["final"]["global_test"]
    assert b["final"]["federated_val"] == a["final"]["federated_val"]
    assert b["best"]["round"] == a["best"]["round"]
    # No round was lost or logged twice.
    keys = [(r["round"], r["scope"], r["client"], r["split"]) for r in rows(cut)]
    assert len(keys) == len(set(keys)) == len(rows(whole))


def test_a_second_run_on_the_same_study_is_refused(study, tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the data was prepared before the lock was checked")

    monkeypatch.setattr("fl_sim.simulation.prepare_data", never)  # issue #25, item 4
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from fl_sim.simulation import study_lock\n"
         "with study_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)",
         str(tmp_path / "out" / "resume")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["run", str(study), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert f"another fl-sim run (pid {holder.pid})" in err
    finally:
        holder.kill()
        holder.wait()


def test_tensorboard_sees_hparams_and_scalars(study, tmp_path):
    assert main(["run", str(study), "--out", str(tmp_path)]) == 0
    acc = EventAccumulator(str(tmp_path / "resume" / RUN)).Reload()
    assert "global/test/bacc" in acc.Tags()["scalars"]
    assert "hparams/best_global_test_avg" in acc.Tags()["scalars"]
    assert "global/test/confusion" in acc.Tags()["images"]
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = session.session_start_info.hparams
    assert hp["strategy"].string_value == "fedadam" and hp["model"].string_value == "test_convnext"
