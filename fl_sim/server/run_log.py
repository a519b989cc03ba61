"""Where a run's numbers land: metrics.jsonl (one wide row per line) and TensorBoard.

Rows are flushed as they are written, so a crash loses no finished round. TensorBoard gets
the same scalars (tags `global/test/bacc`, `client_0/val/acc`, so runs overlay), a confusion
matrix image per round, a custom-scalars layout and the run's HParams entry.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

KEY_ORDER = ("round", "scope", "client", "split", "n", "loss", "acc", "bacc", "precision",
             "recall", "f1", "avg")
LAYOUT_METRICS = ("acc", "bacc", "precision", "recall", "f1", "avg", "loss")


def json_line(row: dict[str, Any]) -> str:
    return json.dumps(row) + "\n"


class RunLog:
    """Appends metric rows for one run.

    `purge_step` (on resume) makes TensorBoard drop the events a cut-off round left behind.
    """

    def __init__(self, run_dir: Path, purge_step: int | None = None) -> None:
        self.run_dir = run_dir
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._tb = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)
        # Figures render on one background thread, off the round's critical path (~0.15 s
        # each); pyplot is not thread-safe, so they are plain matplotlib Figures.
        self._figures = ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-log-figures")
        self._figure: Future | None = None
        # One chart per metric; TensorBoard draws every run of the study in it, so fedavg
        # and fedprox overlay.
        self._tb.add_custom_scalars({
            scope: {m: ["Multiline", [f"^{tag}/{m}$"]] for m in LAYOUT_METRICS}
            for scope, tag in (("global test", "global/test"), ("federated val", "federated/val"))
        })

    def row(self, server_round: int, scope: str, client: int | None, split: str,
            metrics: dict[str, float]) -> dict[str, Any]:
        row = {"round": server_round, "scope": scope, "client": client, "split": split}
        row.update({k: metrics[k] for k in KEY_ORDER if k in metrics})
        row.update({k: v for k, v in metrics.items() if k not in row})
        self._jsonl.write(json_line(row))
        self._jsonl.flush()
        prefix = f"client_{client}" if scope == "client" else scope
        for key, value in metrics.items():
            if key != "n":
                self._tb.add_scalar(f"{prefix}/{split}/{key}", value, server_round)
        return row

    def scalar(self, tag: str, value: float, server_round: int) -> None:
        self._tb.add_scalar(tag, value, server_round)

    def confusion(self, tag: str, matrix: np.ndarray, classes: list[str], server_round: int) -> None:
        """The confusion matrix as an image (rows: true class, columns: predicted)."""
        self._wait_for_figure()  # one in flight at most; its error surfaces here
        self._figure = self._figures.submit(self._confusion, tag, matrix.copy(), classes, server_round)

    def _wait_for_figure(self) -> None:
        if self._figure is not None:
            self._figure.result()
            self._figure = None

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
        for summary in hparams(params, metrics):
            writer.add_summary(summary)
        for tag, value in metrics.items():
            self._tb.add_scalar(tag, value)

    def close(self) -> None:
        try:
            self._wait_for_figure()
        finally:
            self._figures.shutdown()
            self._jsonl.close()
            self._tb.close()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Readers never see a half-written file: write beside it, then rename."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All rows of a run's metrics.jsonl."""
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
