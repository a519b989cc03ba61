"""MLflow beside TensorBoard (`tracking: [tensorboard, mlflow]`).

Each run of a study is an MLflow run of the experiment named after the study, in a local
store inside the study folder: `<out>/<study>/mlflow.db` (SQLite: MLflow 3 refuses new
file stores) with artifacts in `<out>/<study>/mlartifacts/`. `mlflow ui --backend-store-uri
sqlite:///<out>/<study>/mlflow.db` shows the grid. Params are the run's resolved config,
flattened (`run_config.strategy.name`); metrics are metrics.jsonl's rows under
TensorBoard's tags (`global/test/bacc`, `client_0/val/acc`), the round as the step.

metrics.jsonl stays the record: a round's rows reach MLflow when the round is saved (a
round cut off never does), a resumed run's MLflow run is written again from metrics.jsonl,
and a finished run that has none yet (tracking added later) gets one from its files.
An MLflow error warns and stops the mirroring; it never costs a round.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fl_sim.config import flatten
from fl_sim.errors import FlSimError
from fl_sim.server.run_log import read_config, read_metrics, row_tags

log = logging.getLogger(__name__)

STORE, ARTIFACTS = "mlflow.db", "mlartifacts"
RUN_TAG = "fl_sim.run"  # the run folder's name: how a run finds its MLflow run again
REPORT_RUN = "report"  # the MLflow run that holds `fl-sim report`'s files as artifacts
BATCH = 1000  # MLflow's limit of metrics per log_batch (params: 100)


def mlflow_module() -> Any:
    try:
        import mlflow
    except ImportError:
        raise FlSimError("tracking lists mlflow, but the mlflow package is not installed: "
                         "pip install 'fl-sim[mlflow]' (or remove mlflow from tracking).") from None
    return mlflow


def store_uri(study_dir: Path) -> str:
    return f"sqlite:///{(study_dir / STORE).resolve()}"


def check_store(study_dir: Path) -> None:
    """The study's store opens (MLflow itself retries a store it cannot open for minutes)."""
    db = study_dir / STORE
    try:
        with contextlib.closing(sqlite3.connect(db)) as connection:
            connection.execute("PRAGMA schema_version")
    except sqlite3.Error as err:
        raise FlSimError(f"the study's MLflow store {db} cannot be opened as a SQLite database "
                         f"({err}): move it away, or remove mlflow from tracking.") from None


class MlflowStudy:
    """The study's experiment in its local store."""

    def __init__(self, study_dir: Path, study: str) -> None:
        mlflow = mlflow_module()
        self.entities = mlflow.entities
        self.client = mlflow.MlflowClient(tracking_uri=store_uri(study_dir))
        found = self.client.get_experiment_by_name(study)
        self.experiment = found.experiment_id if found else self.client.create_experiment(
            study, artifact_location=(study_dir / ARTIFACTS).resolve().as_uri())

    def runs_named(self, name: str) -> list[Any]:
        return self.client.search_runs([self.experiment], f"tags.`{RUN_TAG}` = '{name}'")

    def new_run(self, name: str, params: dict[str, str]) -> str:
        """A fresh MLflow run for run folder `name` (an older one of the same name is
        deleted: it is written again from the files); its id."""
        for old in self.runs_named(name):
            self.client.delete_run(old.info.run_id)
        run_id = self.client.create_run(self.experiment, run_name=name,
                                        tags={RUN_TAG: name}).info.run_id
        items = [self.entities.Param(k, v[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])
        return run_id

    def log_metrics(self, run_id: str, points: list[tuple[int, dict[str, float]]]) -> None:
        """(round, {tag: value}) points of one run."""
        now = int(time.time() * 1000)
        metrics = [self.entities.Metric(tag, float(value), now, step)
                   for step, values in points for tag, value in values.items()]
        for start in range(0, len(metrics), BATCH):
            self.client.log_batch(run_id, metrics=metrics[start:start + BATCH])


class MlflowMirror:
    """One run's MLflow run, fed the rows RunLog commits (fl_sim.server.run_log.Mirror).
    `rows`: what metrics.jsonl already holds (a resumed run), written first."""

    def __init__(self, study: MlflowStudy, run_name: str, resolved: dict[str, Any],
                 rows: list[tuple[int, dict[str, float]]]) -> None:
        self.study = study
        self.run_id = study.new_run(run_name, flatten(resolved, render=str))
        self.broken = False  # a write failed: the MLflow run lacks rows from there on
        self.commit(rows)

    def commit(self, points: list[tuple[int, dict[str, float]]]) -> None:
        if self.broken or not points:
            return
        try:
            self.study.log_metrics(self.run_id, points)
        except Exception as err:  # noqa: BLE001 - the run's own files are the record
            _warn(err, "this run's MLflow run stops here, marked FAILED")
            self.broken = True

    def close(self, finished: bool) -> None:
        status = "FAILED" if self.broken else "FINISHED" if finished else "KILLED"
        with tolerated("this run's MLflow status was not set"):
            self.study.client.set_terminated(self.run_id, status)


def _warn(err: Exception, what: str) -> None:
    log.warning("MLflow: %s: %s; %s (metrics.jsonl and TensorBoard carry on)",
                type(err).__name__, err, what)


@contextlib.contextmanager
def tolerated(what: str) -> Iterator[None]:
    """An MLflow error inside warns that `what` did not happen, and the run goes on; fl-sim's
    own (mlflow not installed) propagates."""
    try:
        yield
    except FlSimError:
        raise
    except Exception as err:  # noqa: BLE001 - the run's own files are the record
        _warn(err, what)


def saved_rows(run_dir: Path) -> list[tuple[int, dict[str, float]]]:
    """metrics.jsonl's rows as (round, {tag: value}) points (its nulls left out)."""
    if not (run_dir / "metrics.jsonl").exists():
        return []
    return [(row["round"], row_tags(row)) for row in read_metrics(run_dir)]


def open_mirror(run_dir: Path, study: str, resolved: dict[str, Any]) -> MlflowMirror | None:
    """The MLflow run of the run in `run_dir`, first given what metrics.jsonl holds; None,
    with a warning, where MLflow fails."""
    with tolerated("this run has no MLflow run"):
        return MlflowMirror(MlflowStudy(run_dir.parent, study), run_dir.name, resolved,
                            saved_rows(run_dir))
    return None


def export_finished(study_dir: Path, study: str, run_dirs: list[Path]) -> None:
    """Each finished run that has no MLflow run yet (tracking was added after it ran) gets
    one, from its config.yaml and metrics.jsonl."""
    with tolerated("finished runs were not exported"):
        store = MlflowStudy(study_dir, study)
        for run_dir in run_dirs:
            if not store.runs_named(run_dir.name):
                MlflowMirror(store, run_dir.name, read_config(run_dir) or {},
                             saved_rows(run_dir)).close(True)


def log_report(study_dir: Path, study: str, files: list[Path]) -> None:
    """`fl-sim report`'s files as the artifacts of the experiment's `report` run (an older
    report's run replaced), where the study tracks with MLflow."""
    try:
        with tolerated("the report's files were not logged"):
            store = MlflowStudy(study_dir, study)
            run_id = store.new_run(REPORT_RUN, {"files": str(len(files))})
            for path in files:
                store.client.log_artifact(run_id, str(path))
            store.client.set_terminated(run_id, "FINISHED")
    except FlSimError as err:  # mlflow not installed here: the report itself is written
        log.warning("%s The report's files were not logged to MLflow.", err)
