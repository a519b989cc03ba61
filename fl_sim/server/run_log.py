"""Where a run's numbers land: metrics.jsonl (one wide row per line) and TensorBoard.

Rows are flushed as they are written, so a crash loses no finished round. TensorBoard gets
the same scalars (tags `global/test/bacc`, `client_0/val/acc`, so runs overlay), a confusion
matrix image per round, a custom-scalars layout and the run's HParams entry.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import yaml
from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from fl_sim.errors import FlSimError

KEY_ORDER = ("round", "scope", "client", "split", "n", "loss", "acc", "bacc", "precision",
             "recall", "f1", "avg")
ROW_KEYS = ("round", "scope", "client", "split", "site_model", "n")  # what a row is of
LAYOUT_METRICS = ("acc", "bacc", "precision", "recall", "f1", "avg", "loss")


class Mirror(Protocol):
    """Another tracker that gets each saved round's rows (fl_sim.tracking.MlflowMirror)."""

    def commit(self, points: list[tuple[int, dict[str, float]]]) -> None: ...

    def close(self, finished: bool) -> None: ...


def json_line(row: dict[str, Any]) -> str:
    return json.dumps(row) + "\n"


def row_tags(row: dict[str, Any]) -> dict[str, float]:
    """A row's numbers under their TensorBoard tags: `global/test/bacc`, `client_0/val/acc`,
    `personalized/client_0/test/bacc`, `cross_site/local_0/client_1/test/bacc`."""
    scope, client, model = row["scope"], row["client"], row.get("site_model")
    prefix = (f"client_{client}" if scope == "client" else scope if client is None
              else f"{scope}/{model + '/' if model else ''}client_{client}")
    return {f"{prefix}/{row['split']}/{k}": v for k, v in row.items()
            if k not in ROW_KEYS and isinstance(v, (int, float))}


class RunLog:
    """Appends metric rows for one run.

    `purge_step` (on resume) makes TensorBoard drop the events a cut-off round left behind;
    `rollback` drops the rows written since the last `commit` (a round that was not saved);
    a `mirror` gets the rows of each commit. An OSError of any write names the file it was
    writing (a full disk's error names none).
    """

    def __init__(self, run_dir: Path, purge_step: int | None = None,
                 mirror: Mirror | None = None) -> None:
        self.run_dir, self.mirror = run_dir, mirror
        self._uncommitted: list[tuple[int, dict[str, float]]] = []
        metrics = run_dir / "metrics.jsonl"
        with self.writing(metrics):
            # Unbuffered: a row is one write, which a failure can take back whole.
            self._jsonl = open(metrics, "ab", buffering=0)
        self.commit()
        self.events = run_dir / "events.out.tfevents.*"
        with self.writing(self.events):
            self._tb = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)
        with contextlib.suppress(AttributeError):  # TensorBoard's privates: else vaguer errors
            events = self._tb._get_file_writer().event_writer
            self.events = Path(events._file_name)
            # Its writer thread prints a write error as a traceback, then the next call here
            # raises it again: that one is reported, the thread's is noise. (TensorBoard's
            # internals: where they differ, the traceback just stays.)
            worker = getattr(getattr(events, "_async_writer", None), "_worker", None)
            if worker is not None:
                worker._invoke_excepthook = lambda thread: None
        # Figures render on one background thread, off the round's critical path (~0.15 s
        # each); pyplot is not thread-safe, so they are plain matplotlib Figures.
        self._figures = ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-log-figures")
        self._figure: Future | None = None
        # One chart per metric; TensorBoard draws every run of the study in it, so fedavg
        # and fedprox overlay.
        with self.writing(self.events):
            self._tb.add_custom_scalars({
                scope: {m: ["Multiline", [f"^{tag}/{m}$"]] for m in LAYOUT_METRICS}
                for scope, tag in (("global test", "global/test"),
                                   ("federated val", "federated/val"))
            })

    @staticmethod
    @contextlib.contextmanager
    def writing(path: Path, *temporary: Path) -> Iterator[None]:
        """Make an OSError raised inside name `path` (the file being written) and leave none
        of the `temporary` files behind."""
        try:
            yield
        except OSError as err:
            for tmp in temporary:
                tmp.unlink(missing_ok=True)
            err.filename = str(path)
            raise

    def row(self, server_round: int, scope: str, client: int | None, split: str,
            metrics: dict[str, float], site_model: str | None = None) -> dict[str, Any]:
        """One row; `site_model` names which of a scope's models it scores (cross-site:
        `local_0` on client 1's test split; a study's `model` is its backbone)."""
        row = {"round": server_round, "scope": scope, "client": client, "split": split,
               **({"site_model": site_model} if site_model else {})}
        row.update({k: metrics[k] for k in KEY_ORDER if k in metrics})
        row.update({k: v for k, v in metrics.items() if k not in row})
        # Strict JSON: a non-finite metric is null in the file (TensorBoard keeps the NaN).
        self._append(json_line({k: None if isinstance(v, float) and not math.isfinite(v) else v
                                for k, v in row.items()}))
        tags = row_tags(row)
        with self.writing(self.events):
            for tag, value in tags.items():
                self._tb.add_scalar(tag, value, server_round)
        if self.mirror is not None:
            self._uncommitted.append((server_round, tags))
        return row

    def _append(self, line: str) -> None:
        """One line at the end of metrics.jsonl, or (a failed write) none of it: a torn
        line would break every later read of the file."""
        end = self._jsonl.seek(0, os.SEEK_END)
        data = memoryview(line.encode())
        with self.writing(Path(self._jsonl.name)):
            try:
                while data:
                    data = data[self._jsonl.write(data):]
            except OSError:
                self._jsonl.truncate(end)
                raise

    def commit(self) -> None:
        """The rows written so far belong to saved rounds."""
        self._committed = self._jsonl.seek(0, os.SEEK_END)
        if self.mirror is not None:
            self.mirror.commit(self._uncommitted)
        self._uncommitted = []

    def rollback(self) -> None:
        """Drop the rows written since the last commit (truncating needs no free space)."""
        self._jsonl.truncate(self._committed)
        self._uncommitted = []

    def scalar(self, tag: str, value: float, server_round: int) -> None:
        with self.writing(self.events):
            self._tb.add_scalar(tag, value, server_round)

    def image(self, tag: str, image: np.ndarray, server_round: int) -> None:
        """A uint8 HWC image (e.g. a grid of a client's generated images)."""
        with self.writing(self.events):
            self._tb.add_image(tag, image, server_round, dataformats="HWC")

    def confusion(self, tag: str, matrix: np.ndarray, classes: list[str], server_round: int) -> None:
        """The confusion matrix as an image (rows: true class, columns: predicted)."""
        self._wait_for_figure()  # one in flight at most; its error surfaces here
        self._figure = self._figures.submit(self._confusion, tag, matrix.copy(), classes, server_round)

    def _wait_for_figure(self) -> None:
        if self._figure is not None:
            figure, self._figure = self._figure, None
            with self.writing(self.events):
                figure.result()

    def _confusion(self, tag: str, matrix: np.ndarray, classes: list[str], server_round: int) -> None:
        fig = Figure(figsize=(4.5, 4))
        ax = fig.add_subplot()
        ax.imshow(matrix, cmap="Blues")
        ticks = np.arange(len(classes))
        ax.set_xticks(ticks, classes, rotation=45)
        ax.set_yticks(ticks, classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{tag}, round {server_round}")
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > matrix.max() / 2 else "black")
        fig.tight_layout()
        self._tb.add_figure(tag, fig, server_round)  # closes the figure

    def hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        """The run's HParams entry, in the run's own folder so the table lists it by name."""
        writer = self._tb._get_file_writer()
        with self.writing(self.events):
            for summary in hparams(params, metrics):
                writer.add_summary(summary)
            for tag, value in metrics.items():
                self._tb.add_scalar(tag, value)

    def close(self, finished: bool = False) -> None:
        """Closes every file, even when a write to one of them fails; `finished`: the run
        is complete (its mirror's status)."""
        try:
            self._wait_for_figure()
        finally:
            self._figures.shutdown()
            self._jsonl.close()
            if self.mirror is not None:
                self.mirror.close(finished)
            with self.writing(self.events):
                self._tb.close()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Readers never see a half-written file: write beside it, then rename. Strict JSON (a
    NaN raises ValueError); a failed write names `path` and leaves no temporary file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    with RunLog.writing(path, tmp):
        tmp.write_text(text)
        os.replace(tmp, path)


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A run's summary.json; {} where there is none yet or it cannot be read."""
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """A run's config.yaml; None where there is none or it cannot be read."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def read_metrics(run_dir: Path, on_torn: Callable[[int], None] | None = None
                 ) -> list[dict[str, Any]]:
    """The complete rows of a run's metrics.jsonl.

    A last line that is not a JSON row was torn by a crash in the middle of a write; its
    round is repeated on resume, so it is dropped and `on_torn` gets its 1-based line number.
    A bad line before the last is damage no crash explains: FlSimError.
    """
    path = run_dir / "metrics.jsonl"
    with open(path, encoding="utf-8", errors="replace") as f:  # a torn tail may be any bytes
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    rows = []
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif number == lines[-1][0]:
            if on_torn is not None:
                on_torn(number)
        else:
            raise FlSimError(
                f"{path} line {number} is not a JSON row, and it is not the last line, so no "
                "crash in the middle of a write explains it: the file is damaged. Restore it "
                f"from a backup, or delete {run_dir} to run this run again from round 1.")
    return rows
