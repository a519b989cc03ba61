"""Simulation on an existing Ray cluster: `ray start --head` on 127.0.0.1, FL_SIM_RAY_ADDRESS.

`ray stop` would end every Ray process of this user on the machine (other simulations too),
so the test stops only the cluster it started: the `ray start --block` process tree and any
process whose command line names this cluster's own temp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from processes import free_port, processes_naming

from fl_sim.deploy.processes import stop_process

RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture
def ray_cluster():
    """A one-node Ray cluster (2 CPUs) on free loopback ports; yields (address, temp dir)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="flray-", dir="/tmp"))  # short: Ray's socket paths
    port = free_port()
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(port), "--num-cpus", "2", "--num-gpus", "0",
           "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(temp_dir),
           "--ray-client-server-port", str(free_port()),
           "--dashboard-agent-listen-port", str(free_port()),
           "--dashboard-agent-grpc-port", str(free_port()),
           "--runtime-env-agent-port", str(free_port()),
           "--metrics-export-port", str(free_port())]
    log = temp_dir / "ray-start.log"
    with log.open("w") as out:
        head = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", temp_dir
    finally:
        stop_process(head.pid, grace=10)
        for pid in processes_naming(str(temp_dir)):  # anything Ray detached from the tree
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        head.wait(timeout=10)
        assert not processes_naming(str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_simulation_runs_on_an_existing_ray_cluster(ray_cluster, tmp_path, monkeypatch):
    from fl_sim.config import expand_grid, load_study
    from fl_sim.simulation import run_study

    address, temp_dir = ray_cluster
    study_file = tmp_path / "ray.yaml"
    study_file.write_text(yaml.safe_dump({
        "study": "ray", "out": str(tmp_path / "out"),
        "data": {"dataset": "synthetic", "image_size": 32, "synthetic": {"num_images": 140},
                 "partition": {"num_clients": 2}},
        "defaults": {"rounds": 1, "batch_size": 32, "model": {"name": "test_convnext"}},
    }))
    monkeypatch.setenv("FL_SIM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FL_SIM_RAY_ADDRESS", address)
    study = load_study(study_file)
    [run_dir] = run_study(study, expand_grid(study))

    assert json.loads((run_dir / "summary.json").read_text())["complete"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {(r["client"], r["split"]) for r in rows if r["scope"] == "client"} == {
        (c, s) for c in (0, 1) for s in ("train", "val", "test")}
    # The clients ran in this cluster's workers: their logs are in its temp dir, not /tmp/ray.
    assert list(temp_dir.glob("session_*/logs/worker-*")), "no Ray worker of this cluster ran"
