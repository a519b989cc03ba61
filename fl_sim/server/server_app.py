"""The ServerApp: a study's runs, each driven by fl_sim.server.loop.

`make_server_app` binds a study's runs for `fl-sim run` (Flower's `run_simulation` passes
no run config). The module-level `app` is what `[tool.flwr.app]` names for Flower's own tooling
(`flwr run`): it reads the study file, run name and output folder from the run config.
"""

from __future__ import annotations

import tempfile
import time
from logging import INFO
from pathlib import Path
from typing import Callable

from flwr.app import Context, UserConfig
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

from fl_sim.config import BASELINES, ResourcesConfig, Run, StudyConfig, expand_grid, load_study
from fl_sim.errors import FlSimError
from fl_sim.resources import flower_federation_config, local_cores
from fl_sim.server.failures import stop_if_requested, stop_requested
from fl_sim.server.loop import FederatedRun, RoundReport

OnRound = Callable[[RoundReport], None]
RunExecutor = Callable[[Run, Callable[[OnRound], object]], None]


def make_server_app(study: StudyConfig, runs: list[Run], execute: RunExecutor) -> ServerApp:
    """A ServerApp that drives `runs` one after another on one grid: in simulation, a study's
    runs share one Ray and one set of warm client actors. `execute(run, body)` calls
    `body(on_round)` and does the study's bookkeeping around it (progress, failed runs)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        for run in runs:
            stop_if_requested()  # Ctrl-C between two runs: not one more round-0 evaluation
            execute(run, lambda on_round, run=run: FederatedRun(
                study, run, run.dir(study), on_round=on_round).execute(grid))

    return app


def _study_from_run_config(cfg: UserConfig) -> StudyConfig:
    """The study named by the run config. `fl-sim deploy submit` also ships the file's text as
    `study-yaml`: the submitting machine's path means nothing where the ServerApp runs."""
    overrides = {"data_root": cfg.get("data-root") or None, "out": cfg.get("out") or None}
    text = str(cfg.get("study-yaml", ""))
    if not text:
        return load_study(str(cfg["study-config"]), **overrides)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(str(cfg["study-config"])).name
        path.write_text(text)
        return load_study(path, **overrides)


def _log_round(r: RoundReport) -> None:
    """Progress for `flwr run --stream` / `fl-sim deploy submit --stream`."""
    log(INFO, "fl-sim: round %d/%d in %.1f s, %s (best round %d)", r.server_round, r.rounds,
        r.seconds, r.global_text(), r.best_round)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    study = _study_from_run_config(cfg)
    runs = expand_grid(study)
    name = str(cfg.get("run-name", "")) or runs[0].name
    matching = [r for r in runs if r.name == name]
    if not matching:
        raise FlSimError(f"run {name!r} is not in {cfg['study-config']}; its runs: "
                         + ", ".join(r.name for r in runs))
    if matching[0].config.strategy.name in BASELINES:
        raise FlSimError(f"run {name!r} is a {matching[0].config.strategy.name} baseline: it "
                         "trains on one machine without Flower; run it with `fl-sim run`.")
    run_dir = matching[0].dir(study)
    log(INFO, "fl-sim: run %s -> %s", name, run_dir.resolve())
    federated = FederatedRun(study, matching[0], run_dir, on_round=_log_round)
    if isinstance(grid, InMemoryGrid):  # Flower's simulation runtime (`flwr run .` locally)
        check_simulated_federation(grid, federated.data.num_clients, matching[0].config.resources)
    federated.execute(grid)


def check_simulated_federation(grid: Grid, num_clients: int, resources: ResourcesConfig,
                               settle_s: float = 30.0) -> None:
    """Under Flower's simulation runtime the federation is as large as its config says, and
    Flower's default (2 SuperNodes) would leave a 3-client study waiting an hour for a third:
    refuse in seconds, naming the config that fits, with fl-sim's `num_cpus: auto` in it
    (Flower's own default of 2 CPUs a client runs one client at a time on 2 cores)."""
    deadline = time.monotonic() + settle_s  # the engine registers its nodes as it starts
    while not (nodes := len(list(grid.get_node_ids()))) and time.monotonic() < deadline:
        stop_requested.wait(0.2)
    cores = local_cores()
    fits = flower_federation_config(resources, num_clients, cores)
    pairs = " ".join(f"{key}={value}" for key, value in fits.items())
    options = " ".join(f"--{key} {value}" for key, value in fits.items())
    if nodes != num_clients:
        raise FlSimError(
            f"this simulated federation has {nodes} SuperNodes, and the study splits its data "
            f"for {num_clients} clients, one a SuperNode; a simulation adds none. Run it as "
            f'`flwr run . --stream --federation-config "{pairs}"` (fl-sim\'s num_cpus on this '
            f"machine's {cores} cores), or set it once: `flwr federation "
            f"simulation-config @none/default local {options}`.")
    log(INFO, "fl-sim: %d SuperNodes, one a client; fl-sim's num_cpus on this machine's %d "
        "cores is --federation-config \"%s\" (Flower's default: 2 CPUs a client)",
        nodes, cores, pairs)
