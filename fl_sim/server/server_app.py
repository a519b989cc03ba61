"""The ServerApp: one run of a study, driven by fl_sim.server.loop.

`make_server_app` binds a run for `fl-sim run` (Flower's `run_simulation` passes no run
config). The module-level `app` is what `[tool.flwr.app]` names for Flower's own tooling
(`flwr run`): it reads the study file, run name and output folder from the run config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_sim.config import Run, StudyConfig, expand_grid, load_study
from fl_sim.errors import FlSimError
from fl_sim.server.loop import FederatedRun, RoundReport


def run_dir_of(study: StudyConfig, run: Run) -> Path:
    """`<out>/<study>/<run-name>/`, the run-directory contract of DESIGN.md."""
    return Path(study.out) / study.study / run.name


def make_server_app(study: StudyConfig, run: Run,
                    on_round: Callable[[RoundReport], None] | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        FederatedRun(study, run, run_dir_of(study, run), on_round=on_round).execute(grid)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    study = load_study(str(cfg["study-config"]), data_root=cfg.get("data-root") or None,
                       out=cfg.get("out") or None)
    runs = expand_grid(study)
    name = str(cfg.get("run-name", "")) or runs[0].name
    matching = [r for r in runs if r.name == name]
    if not matching:
        raise FlSimError(f"run {name!r} is not in {cfg['study-config']}; its runs: "
                         + ", ".join(r.name for r in runs))
    FederatedRun(study, matching[0], run_dir_of(study, matching[0])).execute(grid)
