"""Issue #25, item 5: Flower's own way in, `flwr run .`, on the local simulation SuperLink it
starts (detached, in a private FLWR_HOME on ports of this test's own). A federation of the
wrong size is refused in seconds, naming the config that fits; the config it names runs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from processes import free_port, left_in_group, processes_naming

from fl_sim.config import ResourcesConfig
from fl_sim.deploy.processes import descendants
from fl_sim.resources import flower_federation_config, local_cores

ROOT = Path(__file__).resolve().parents[1]
FLWR = str(Path(sys.executable).parent / "flwr")
# The study travels as run config text: TOML's \n escapes inside one basic string.
TINY = ("study: tiny\\ndata:\\n  dataset: synthetic\\n  image_size: 32\\n"
        "  synthetic: {num_images: 240}\\n  partition: {method: random, num_clients: 3}\\n"
        "defaults:\\n  rounds: 1\\n  batch_size: 16\\n"
        "  model: {name: test_convnext, pretrained: false}\\n")


def flwr_run(env: dict, out: Path, federation: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(
        [FLWR, "run", ".", "--stream", "--federation-config", federation, "--run-config",
         f'out="{out}" study-config="tiny.yaml" study-yaml="{TINY}"'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc, time.monotonic() - start


@pytest.mark.slow
def test_flwr_run_on_flowers_local_superlink(tmp_path):
    http, control = free_port(), free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http),
           "FLWR_LOCAL_CONTROL_API_PORT": str(control),
           # Flower would otherwise build each run an env of its own from PyPI (`uv sync`)
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    try:
        # Flower's default federation, 2 SuperNodes, for a 3-client study: used to wait an hour
        short, seconds = flwr_run(env, tmp_path / "out", "num-supernodes=2")
        text = short.stdout + short.stderr
        assert "this simulated federation has 2 SuperNodes, and the study splits its data " \
               "for 3 clients" in text, text[-3000:]
        fits = " ".join(f"{key}={value}" for key, value
                        in flower_federation_config(ResourcesConfig(), 3, local_cores()).items())
        assert f'--federation-config "{fits}"' in text
        assert seconds < 150, f"refused after {seconds:.0f} s (SuperLink start, FAB, Ray)"
        assert not (tmp_path / "out" / "tiny" / "fedavg_test_convnext_sgd_s0"
                    / "summary.json").exists()

        ran, _ = flwr_run(env, tmp_path / "out", fits)
        text = ran.stdout + ran.stderr
        assert "fl-sim: 3 SuperNodes, one a client" in text, text[-3000:]
        assert "fl-sim: round 1/1" in text
        if local_cores() == 2:  # fl-sim's num_cpus: auto, 3 clients on 2 cores: all three at once
            assert "Constructed ActorPool with: 3 actors" in text
        assert (tmp_path / "out" / "tiny" / "fedavg_test_convnext_sgd_s0"
                / "summary.json").exists()
    finally:
        pid = next(iter(processes_naming(f"--port\0{http}\0")), None)  # the local SuperLink
        groups = set()
        for p in [pid, *descendants(pid)] if pid else []:
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(p))
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while any(left_in_group(g) for g in groups) and time.monotonic() < deadline:
            time.sleep(0.5)
        for group in groups:
            assert not left_in_group(group), left_in_group(group)
    assert pid, "flwr run started no local SuperLink"
