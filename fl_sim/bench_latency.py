"""`fl-sim bench --latency`: what a round and a run cost beyond their work, side by side.

- deployed vs simulated round: the quickstart's FedAvg run on a loopback SuperLink with 3
  insecure SuperNodes (each in its own process, as `fl-sim deploy` starts them), and the same
  run in the Simulation Engine; the steady rounds (2..R) of each;
- start-up per run: a 1-run and a 4-run study of 2-round runs; the wall time an additional
  run adds, less the work of its rounds, is the start-up it pays.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import yaml
from rich.console import Console

from fl_sim.bench import Row, verdict
from fl_sim.config import expand_grid, load_study


def quickstart_study(path: Path, out: Path, rounds: int, seeds: int = 1) -> Path:
    """examples/quickstart.yaml's FedAvg run (seeds 0..seeds-1), its cache under `out`."""
    path.write_text(yaml.safe_dump({
        "study": "latency", "out": str(out),
        "data": {"dataset": "synthetic", "image_size": 32, "cache_dir": str(out / "cache"),
                 "synthetic": {"num_images": 1400},
                 "partition": {"method": "random", "num_clients": 3, "seed": 0},
                 "global_test": {"source": "holdout", "fraction": 0.15}},
        "defaults": {"rounds": rounds, "local_epochs": 1, "batch_size": 32,
                     "model": {"name": "test_convnext", "pretrained": False},
                     "optimizer": {"name": "adamw"}, "strategy": {"name": "fedavg"},
                     "resources": {"num_cpus": "auto", "num_gpus": 0}},
        "grid": {"seed": list(range(seeds))},
    }))
    return path


def _simulated(study_path: Path) -> tuple[float, list[dict]]:
    """(wall seconds, summaries) of `fl-sim run` on the study."""
    from fl_sim.simulation import run_study  # imports Ray

    study = load_study(study_path)
    start = time.perf_counter()
    dirs = run_study(study, expand_grid(study), console=Console(quiet=True))
    wall = time.perf_counter() - start
    return wall, [json.loads((d / "summary.json").read_text()) for d in dirs]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def loopback_federation(home: Path, nodes: int) -> Iterator[None]:
    """An insecure SuperLink and `nodes` SuperNodes on 127.0.0.1 in a private FLWR_HOME,
    started as `fl-sim deploy` starts them; all stopped afterwards. The nodes split this
    machine's cores, as the simulation's clients do (`resources.num_cpus: auto`)."""
    from fl_sim.deploy import cli, processes
    from fl_sim.resources import local_cores

    previous = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(home)
    try:
        fleet = f"127.0.0.1:{_free_port()}"
        argv = ["deploy", "superlink", "--insecure", "--fleet-address", fleet,
                "--port", str(_free_port())]
        if cli.main(argv) != 0:
            raise RuntimeError("the SuperLink did not start")
        for i in range(nodes):
            if cli.main(["deploy", "supernode", "--insecure", "--superlink", fleet,
                         "--partition-id", str(i), "--port", str(_free_port()),
                         "--threads", str(max(1, local_cores() // nodes))]) != 0:
                raise RuntimeError(f"SuperNode {i} did not start")
        yield
    finally:
        processes.stop_all(grace=5)
        if previous is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = previous


def _deployed(study_path: Path, home: Path, rounds: int) -> dict:
    from fl_sim.deploy import cli

    with loopback_federation(home, nodes=3):
        run_id, _ = cli.submit_run(study_path)
        status, details = cli.wait_finished(run_id, timeout=300 + 180 * rounds)
    if status != f"{cli.FINISHED}:completed":
        raise RuntimeError(f"the deployed run ended {status}: {details}")
    study = load_study(study_path)
    return json.loads((expand_grid(study)[0].dir(study) / "summary.json").read_text())


def steady(summary: dict) -> float:
    seconds = summary["round_seconds"]
    return float(np.mean(seconds[1:] if len(seconds) > 1 else seconds))


def bench_deployed_round(rounds: int) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        deployed = _deployed(quickstart_study(tmp / "d.yaml", tmp / "deployed", rounds),
                             tmp / "flwr-home", rounds)
        _, [simulated] = _simulated(quickstart_study(tmp / "s.yaml", tmp / "simulated", rounds))
    d, s = steady(deployed), steady(simulated)
    same = deployed["final"]["global_test"] == simulated["final"]["global_test"]
    return [Row(f"latency: deployed round vs simulated ({rounds} rounds, quickstart FedAvg, "
                "loopback SuperLink + 3 SuperNodes)",
                f"{d:.2f} s (deployed)", f"{s:.2f} s (simulated)", f"+{d - s:.2f} s",
                f"{verdict(d - s <= 5, 'target <= 5 s over simulated')}; steady rounds 2..R; "
                f"final global test acc {deployed['final']['global_test']['acc']:.4f} deployed, "
                f"{simulated['final']['global_test']['acc']:.4f} simulated"
                f" ({'identical metrics' if same else 'metrics DIFFER'})")]


def bench_startup_per_run(runs: int = 4) -> list[Row]:
    """A 1-run and a `runs`-run study of 2-round runs: an additional run costs the difference
    of their wall times over runs - 1; less its two rounds' work (the steady round, twice),
    that is its start-up."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        walls, rounds = [], []
        for n in (1, runs):
            wall, summaries = _simulated(quickstart_study(tmp / f"s{n}.yaml", tmp / f"s{n}",
                                                          rounds=2, seeds=n))
            walls.append(wall)
            rounds += [s["round_seconds"][1] for s in summaries]
    per_run = (walls[1] - walls[0]) / (runs - 1)
    work = 2 * float(np.median(rounds))
    return [Row(f"latency: start-up per additional run ({runs}-run study of 2-round runs)",
                f"{per_run - work:.1f} s", f"{walls[0] - work:.1f} s (the first run)", "-",
                f"{verdict(per_run - work <= 5, 'target <= 5 s')}; an additional run: "
                f"{per_run:.1f} s of wall time for {work:.1f} s of rounds (2 x the steady round)")]
