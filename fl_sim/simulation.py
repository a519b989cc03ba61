"""`fl-sim run`: every run of a study in Flower's Simulation Engine (Ray backend)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from rich.console import Console

from fl_sim.config import BASELINES, Run, StudyConfig
from fl_sim.data_partition import prepare_data
from fl_sim.errors import FlSimError
from fl_sim.models import timm_name
from fl_sim.server.baselines import BASELINE_RUNS
from fl_sim.server.loop import RoundReport
from fl_sim.server.server_app import make_server_app
from fl_sim.strategies import build_strategy


def quiet_flower(verbose: bool) -> None:
    """Flower and Ray log every message at INFO; fl-sim prints its own progress instead."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not verbose:  # Flower's warnings here are run_simulation's deprecation notice
        logging.getLogger("flwr").setLevel(logging.ERROR)


def is_complete(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("complete", False)
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def check_runs(runs: list[Run], num_clients: int) -> None:
    """Fail before any simulation starts if a run's model or strategy cannot be built."""
    for run in runs:
        timm_name(run.config.model.name)
        if run.config.strategy.name not in BASELINES:
            build_strategy(run.config.strategy, num_clients)


@contextlib.contextmanager
def study_lock(study_dir: Path) -> Iterator[None]:
    """One `fl-sim run` per study folder at a time; the OS frees the lock if the process dies."""
    study_dir.mkdir(parents=True, exist_ok=True)
    with open(study_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise FlSimError(
                f"another fl-sim run (pid {f.read().strip() or '?'}) is working on {study_dir}; "
                "wait for it to finish, or give this one another `out` or `study`.") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield


class Eta:
    """Time left, from the round times seen so far; a run's first round includes start-up."""

    def __init__(self, runs_left: int) -> None:
        self.runs_left = runs_left
        self.first: list[float] = []
        self.steady: list[float] = []
        self.run_started = False

    def start_run(self) -> None:
        self.run_started = True

    def add(self, r: RoundReport) -> str:
        (self.first if self.run_started else self.steady).append(r.seconds)
        self.run_started = False
        per_round = float(np.mean(self.steady or self.first))
        first = float(np.mean(self.first))
        run_left = (r.rounds - r.server_round) * per_round
        later = (self.runs_left - 1) * (first + (r.rounds - 1) * per_round)
        return f"ETA run {_hms(run_left)}, study {_hms(run_left + later)}"


def _hms(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else f"{seconds / 86400:.1f} d"


def run_study(study: StudyConfig, runs: list[Run], console: Console | None = None,
              verbose: bool = False) -> list[Path]:
    """Run each run of `runs` that has not finished yet (an interrupted run resumes from its
    last completed round); returns their run directories."""
    console = console or Console()
    quiet_flower(verbose)
    data = prepare_data(study.data)  # builds the cache once, before any client process starts
    check_runs(runs, data.num_clients)
    with study_lock(Path(study.out) / study.study):
        return _run_all(study, runs, data.num_clients, console, verbose)


def _run_all(study: StudyConfig, runs: list[Run], num_clients: int, console: Console,
             verbose: bool) -> list[Path]:
    done = []
    todo = [r for r in runs if not is_complete(r.dir(study))]
    eta = Eta(len(todo))
    for i, run in enumerate(runs, 1):
        run_dir = run.dir(study)
        if is_complete(run_dir):
            console.print(f"[{i}/{len(runs)}] {run.name}: finished before, skipped")
            done.append(run_dir)
            continue
        baseline = run.config.strategy.name in BASELINES
        how = "trained in this process, no Flower" if baseline else "round 1 includes Ray start-up"
        console.print(f"[{i}/{len(runs)}] {run.name}: {num_clients} clients, "
                      f"{run.config.rounds} rounds -> {run_dir}  ({how})",
                      highlight=False, soft_wrap=True)
        start = time.perf_counter()
        eta.start_run()

        def on_round(r: RoundReport) -> None:
            g, metric = r.global_test, run.config.selection_metric
            console.print(
                f"  round {r.server_round}/{r.rounds}  {r.seconds:5.1f} s  global test "
                f"acc {g['acc']:.3f} bacc {g['bacc']:.3f} avg {g['avg']:.3f} | val {metric} "
                f"{r.federated_val[metric]:.3f} (best round {r.best_round})  {eta.add(r)}",
                highlight=False, soft_wrap=True)

        if baseline:
            BASELINE_RUNS[run.config.strategy.name](study, run, run_dir, on_round=on_round).execute()
        else:
            _simulate(study, run, num_clients, on_round, verbose)
        if not is_complete(run_dir):
            raise FlSimError(f"run {run.name} ended without finishing; see the log above and "
                             f"{run_dir}/metrics.jsonl for the rounds it completed.")
        stopped = json.loads((run_dir / "summary.json").read_text()).get("stopped")
        console.print(f"  {run.name} done in {time.perf_counter() - start:.0f} s"
                      + (f"; stopped after round {stopped['round']}: {stopped['reason']}"
                         if stopped else ""), highlight=False, soft_wrap=True)
        eta.runs_left -= 1
        done.append(run_dir)
    return done


def _simulate(study: StudyConfig, run: Run, num_clients: int,
              on_round: Callable[[RoundReport], None], verbose: bool) -> None:
    """One federated run in Flower's Simulation Engine on Ray."""
    from flwr.simulation import run_simulation  # imports Ray: keep `--dry-run` fast

    resources = run.config.resources
    cluster = _ray_address()
    cores = None if cluster else local_cores()
    cpus = client_cpus(resources.num_cpus, num_clients, cores)
    run_simulation(
        server_app=make_server_app(study, run, on_round),
        client_app=_client_app(),
        num_supernodes=num_clients,
        backend_config={
            "client_resources": {"num_cpus": cpus, "num_gpus": resources.num_gpus},
            # A local Ray counts the cores as fl-sim did (not the host's, in a container
            # pinned to fewer), so the actors it fits are the wave `client_cpus` planned.
            "init_args": {"include_dashboard": False, "log_to_driver": verbose,
                          **(cluster or {"num_cpus": cores})},
        },
    )


def client_cpus(requested: float | str, num_clients: int, cores: int | None) -> float:
    """Ray's CPU share per client. `auto` runs k clients at a time on `cores` cores, k the
    smallest divisor of `num_clients` from `cores` to twice that (else `cores`): every wave
    is full and no core idles. Separate processes scale better than intra-op threads (3
    clients on 2 cores: 3 actors beat 2 actors and 1 two-thread actor; BENCHMARKS.md)."""
    if requested != "auto":
        return float(requested)
    if cores is None:  # a Ray cluster: its size is not known before Ray starts
        return 1.0
    k = next((d for d in range(cores, 2 * cores + 1) if num_clients % d == 0), cores)
    # A hair under cores / k: Flower starts int(cores / share) actors, which float error in
    # cores / k can make k - 1 (9 cores, 7 clients: 6 actors, and a second wave for one).
    return cores / min(k, num_clients) * (1 - 1e-9)


def local_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one (Linux)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _client_app():
    from fl_sim.client.client_app import app

    return app


def _ray_address() -> dict:
    """An existing Ray cluster to run on, from FL_SIM_RAY_ADDRESS (else a local Ray)."""
    address = os.environ.get("FL_SIM_RAY_ADDRESS")
    return {"address": address} if address else {}
