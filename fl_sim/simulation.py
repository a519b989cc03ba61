"""`fl-sim run`: every run of a study in Flower's Simulation Engine (Ray backend)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from rich.console import Console

from fl_sim.client.train import optimizer_kwargs
from fl_sim.config import BASELINES, Run, StudyConfig
from fl_sim.data_partition import prepare_data
from fl_sim.data_partition.inspect import data_warnings
from fl_sim.errors import FlSimError
from fl_sim.models import timm_name
from fl_sim.resources import check_resources, client_cpus, local_cores, local_resources
from fl_sim.server.baselines import BASELINE_RUNS
from fl_sim.server.checkpoints import another_configuration, changed_settings
from fl_sim.server.failures import Interrupted, RunFailed, failed_before, stop_requested
from fl_sim.server.loop import RoundReport
from fl_sim.server.run_log import read_config, read_summary
from fl_sim.server.server_app import make_server_app
from fl_sim.strategies import build_strategy
from fl_sim.tracking import check_store, export_finished, mlflow_module


def quiet_flower(verbose: bool) -> None:
    """Flower and Ray log every message at INFO; fl-sim prints its own progress instead."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not verbose:  # Flower's warnings here are run_simulation's deprecation notice
        flwr = logging.getLogger("flwr")
        flwr.setLevel(logging.ERROR)
        if not any(isinstance(f, _NoTracebacks) for f in flwr.filters):
            flwr.addFilter(_NoTracebacks())


class _NoTracebacks(logging.Filter):
    """Drops the tracebacks Flower logs of its engine's failure: fl-sim names the error
    itself (--verbose shows them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Traceback (most recent call last)" not in record.getMessage()


def is_complete(run_dir: Path) -> bool:
    return read_summary(run_dir).get("complete", False)


def check_runs(runs: list[Run], num_clients: int) -> None:
    """Fail before any simulation starts if a run's model or strategy cannot be built."""
    for run in runs:
        timm_name(run.config.model.name)
        if run.config.strategy.name not in BASELINES:
            build_strategy(run.config.strategy, num_clients,
                           client_lr=optimizer_kwargs(run.config.optimizer)["lr"])


class Terminated(SystemExit):
    """SIGTERM: the study stops as on Ctrl-C, and the process exits with 143 (128 + 15)."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


class SignalStop:
    """Ctrl-C (SIGINT) and SIGTERM stop a study within seconds: KeyboardInterrupt (exit 130)
    or Terminated (143), every finished round kept, the cut round's rows taken back.

    In a baseline the signal raises at once. In a simulation it only asks the ServerApp
    thread to stop (`stop_requested`); raising in the main thread instead would unwind
    Flower's engine, which shuts Ray down under the clients' pending replies and then waits
    for them forever. Flower ends the clients' work and Ray, run_simulation returns, and
    `raise_if_stopped` raises. A second signal exits at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.simulating = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals go to main
            yield
            return
        stop_requested.clear()
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        except Terminated:
            Console(stderr=True).print("terminated: finished rounds and runs are kept on disk")
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        stop_requested.set()
        logging.getLogger("flwr").setLevel(logging.CRITICAL)  # clients cut off: noise
        if not self.simulating:
            self.raise_if_stopped()

    def raise_if_stopped(self) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt if self.signum == signal.SIGINT else Terminated()


@contextlib.contextmanager
def study_lock(study_dir: Path) -> Iterator[None]:
    """One `fl-sim run` per study folder at a time; the OS frees the lock if the process dies.
    Folders it made for the study stay only if something was written into them."""
    made = [d for d in (study_dir, *study_dir.parents) if not d.exists()]
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
        lock = open(study_dir / ".lock", "a+")
    except OSError as err:
        raise FlSimError(
            f"cannot write the study folder {study_dir} ({err.strerror or err}"
            f"{'' if err.filename in (None, str(study_dir)) else ': ' + str(err.filename)}): "
            "give `out` (or --out) a folder this user can create and write.") from None
    try:
        with lock as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise FlSimError(
                    f"another fl-sim run (pid {f.read().strip() or '?'}) is working on "
                    f"{study_dir}; wait for it to finish, or give this one another `out` or "
                    "`study`.") from None
            f.truncate(0)
            f.write(str(os.getpid()))
            f.flush()
            yield
    finally:
        if made and [p.name for p in study_dir.iterdir()] == [".lock"]:  # refused early
            (study_dir / ".lock").unlink()
            for folder in made:
                with contextlib.suppress(OSError):
                    folder.rmdir()


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
    last completed round); returns their run directories.

    A run that diverges (or diverged before) is marked failed and skipped, and the study
    carries on: one bad learning rate of a days-long grid should not hold up the other runs,
    and resuming it would only diverge again. FlSimError at the end lists the failed runs."""
    console = console or Console()
    quiet_flower(verbose)
    mlflow = "mlflow" in study.tracking
    if mlflow:
        mlflow_module()  # installed, before minutes of data preparation
    if not _ray_address():  # this machine's cores and GPUs are known before Ray starts
        for run in runs:
            if run.config.strategy.name not in BASELINES:
                wanted = run.config.resources
                check_resources(1.0 if wanted.num_cpus == "auto" else float(wanted.num_cpus),
                                wanted.num_gpus, local_resources(), cluster=False)
    stop = SignalStop()
    study_dir = Path(study.out) / study.study
    # The lock first: a second run of the study is refused before it prepares any data.
    with study_lock(study_dir), stop.installed():
        data = prepare_data(study.data)  # the cache, built once, before any client starts
        for line in data_warnings(study.data, data):  # as `fl-sim data inspect` says them
            console.print(f"[yellow]warning:[/yellow] {line}", highlight=False, soft_wrap=True)
        check_runs(runs, data.num_clients)
        if mlflow:
            check_store(study_dir)
            export_finished(study_dir, study.study,
                            [run.dir(study) for run in runs if is_complete(run.dir(study))])
        return _run_all(study, runs, data.num_clients, console, verbose, stop)


class StudyProgress:
    """A study's runs as the console shows them, and what became of each: the progress
    lines, the ETA, and the runs that failed (a diverged run does not stop the study)."""

    def __init__(self, study: StudyConfig, runs: list[Run], num_clients: int,
                 console: Console) -> None:
        self.study, self.runs, self.num_clients, self.console = study, runs, num_clients, console
        self.failed: list[str] = []
        self.todo = [r for r in runs if self._still_to_run(r)]
        self.eta = Eta(len(self.todo))

    def _number(self, run: Run) -> str:
        return f"[{self.runs.index(run) + 1}/{len(self.runs)}] {run.name}"

    def _still_to_run(self, run: Run) -> bool:
        """False (and says so) for a run that finished or failed before."""
        run_dir = run.dir(self.study)
        if is_complete(run_dir):
            # A finished run is kept only while it is still the run the study asks for.
            saved = read_config(run_dir)
            if saved is not None and (changed := changed_settings(saved,
                                                                  run.resolved(self.study))):
                raise FlSimError(another_configuration(run_dir, changed))
            self.console.print(f"{self._number(run)}: finished before, skipped")
            return False
        if failure := failed_before(run_dir):
            self.console.print(f"{self._number(run)}: failed before, in round "
                               f"{failure['round']} ({failure['reason']}), skipped",
                               highlight=False, soft_wrap=True)
            self._note_failure(run, failure)
            return False
        return True

    def _note_failure(self, run: Run, failed: dict) -> None:
        """`failed`: a run's {round, client, reason} (summary.json, RunFailed)."""
        self.failed.append(f"{run.name}: round {failed['round']}, {failed['reason']}")

    def execute(self, run: Run, body: Callable[[Callable[[RoundReport], None]], object]) -> None:
        """`body(on_round)` trains the run; a RunFailed is noted and the study carries on."""
        run_dir = run.dir(self.study)
        how = ("trained in this process, no Flower" if run.config.strategy.name in BASELINES
               else "in Flower's Simulation Engine")
        self.console.print(f"{self._number(run)}: {self.num_clients} clients, "
                           f"{run.config.rounds} rounds -> {run_dir}  ({how})",
                           highlight=False, soft_wrap=True)
        start = time.perf_counter()
        self.eta.start_run()

        def on_round(r: RoundReport) -> None:
            metric = run.config.selection_metric
            best = r.best_round if r.best_round > 0 else "none yet"  # (eval_every)
            self.console.print(
                f"  round {r.server_round}/{r.rounds}  {r.seconds:5.1f} s  {r.global_text()} "
                f"| val {metric} {r.federated_val[metric]:.3f} (best round {best})  "
                f"{self.eta.add(r)}",
                highlight=False, soft_wrap=True)

        try:
            body(on_round)
        except RunFailed as err:
            self.console.print(f"  {run.name} failed: {err}", highlight=False, soft_wrap=True)
            self._note_failure(run, err.failed)
            self.eta.runs_left -= 1
            return
        if not is_complete(run_dir):
            raise FlSimError(f"run {run.name} ended without finishing; see the log above and "
                             f"{run_dir}/metrics.jsonl for the rounds it completed.")
        stopped = read_summary(run_dir).get("stopped")
        self.console.print(f"  {run.name} done in {time.perf_counter() - start:.0f} s"
                           + (f"; stopped after round {stopped['round']}: {stopped['reason']}"
                              if stopped else ""), highlight=False, soft_wrap=True)
        self.eta.runs_left -= 1

    def raise_if_failed(self) -> None:
        if self.failed:
            raise FlSimError(
                f"{len(self.failed)} of {len(self.runs)} runs failed: training diverged, so each "
                "is marked failed in its summary.json, not resumed and never ranked: "
                f"{'; '.join(self.failed)}. To run one again, change the settings that made it "
                "fail (e.g. a lower optimizer.lr, which gives the run another name and folder) "
                f"or delete its folder under {Path(self.study.out) / self.study.study}.")


def simulation_groups(runs: list[Run]) -> list[list[Run]]:
    """Federated runs, one group per set of client resources. Each group is one simulation,
    so its runs share one Ray start and one set of warm client actors."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        r = run.config.resources
        groups.setdefault((r.num_cpus, r.num_gpus), []).append(run)
    return list(groups.values())


def _run_all(study: StudyConfig, runs: list[Run], num_clients: int, console: Console,
             verbose: bool, stop: SignalStop) -> list[Path]:
    """The baselines first (in this process), then each simulation group."""
    progress = StudyProgress(study, runs, num_clients, console)
    baseline = {r.name: r.config.strategy.name in BASELINES for r in progress.todo}
    for run in (r for r in progress.todo if baseline[r.name]):
        progress.execute(run, lambda on_round, run=run: BASELINE_RUNS[
            run.config.strategy.name](study, run, run.dir(study), on_round=on_round).execute())
    for group in simulation_groups([r for r in progress.todo if not baseline[r.name]]):
        _simulate(study, group, num_clients, progress, verbose, stop)
    progress.raise_if_failed()
    return [run.dir(study) for run in runs if is_complete(run.dir(study))]


def _simulate(study: StudyConfig, runs: list[Run], num_clients: int, progress: StudyProgress,
              verbose: bool, stop: SignalStop) -> None:
    """Federated runs with the same client resources in one Flower Simulation Engine on one
    Ray: started once, its client actors stay warm (imports, data, model) from run to run."""
    import ray  # keep `--dry-run` fast
    from flwr.simulation import run_simulation

    resources = runs[0].config.resources
    cluster = _ray_address()
    cores = None if cluster else local_cores()
    cpus = client_cpus(resources.num_cpus, num_clients, cores)
    # A local Ray counts the cores as fl-sim did (not the host's, in a container pinned to
    # fewer), so the actors it fits are the wave `client_cpus` planned.
    init_args = {"include_dashboard": False, "log_to_driver": verbose, "logging_level": "WARNING",
                 **(cluster or {"num_cpus": cores})}
    stop.simulating = True
    try:
        # Started here, not by Flower (which takes a running Ray as it is): ray.init replaces
        # the SIGTERM handler with one that exits at once, so fl-sim takes it back after.
        handler = signal.getsignal(signal.SIGTERM)
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}},
                 **init_args)
        signal.signal(signal.SIGTERM, handler)
        # Flower's engine would start no actor and then never exit.
        check_resources(cpus, resources.num_gpus, ray.cluster_resources(), bool(cluster))
        run_simulation(
            server_app=make_server_app(study, runs, progress.execute),
            client_app=_client_app(),
            num_supernodes=num_clients,
            backend_config={"client_resources": {"num_cpus": cpus,
                                                 "num_gpus": resources.num_gpus},
                            "init_args": init_args},
        )
    except Interrupted:
        stop.raise_if_stopped()
        raise
    except Exception as err:
        # Flower's engine failed under a ServerApp thread that waits for replies which will
        # never come, and that thread would keep the process alive: stop it, then exit.
        stop_requested.set()
        if isinstance(err, FlSimError):  # the ServerApp's own, re-raised by Flower
            raise
        cause = err.__cause__ or err
        raise FlSimError(
            f"Flower's Simulation Engine stopped ({type(cause).__name__}: {cause}); finished "
            "rounds and runs are kept on disk, and the next `fl-sim run` resumes. Run again "
            "with --verbose for the clients' own logs.") from err
    finally:
        stop.simulating = False
        ray.shutdown()  # Flower's own shutdown is skipped when the engine fails to start
    stop.raise_if_stopped()  # a signal after the last round


def _client_app():
    from fl_sim.client.client_app import app

    return app


def _ray_address() -> dict:
    """An existing Ray cluster to run on, from FL_SIM_RAY_ADDRESS (else a local Ray)."""
    address = os.environ.get("FL_SIM_RAY_ADDRESS")
    return {"address": address} if address else {}
