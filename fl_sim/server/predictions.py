"""The global test set's per-image predictions, one small file per evaluated round.

They are what the report's intervals and paired tests resample (fl_sim.stats): the server's
own data only. A client's split never leaves the client as per-image output; a client
sends the numbers the report needs about it instead.

`predictions/round_<r>.npz` holds the image ids and labels, each model's arg-max decision
(exact: the metrics of metrics.jsonl are computed from it) and its class probabilities in
float16 (for AUROC and calibration): about 30 KB for 1,500 images of 7 classes. A run of
several models on the global test set (the local baseline: one per client) stores one row
of decisions and probabilities per model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fl_sim.server.run_log import RunLog

FOLDER = "predictions"


@dataclass(frozen=True)
class Predictions:
    """One round's predictions: `decisions` (models, n) and `probs` (models, n, classes)."""

    image_ids: np.ndarray
    labels: np.ndarray
    decisions: np.ndarray
    probs: np.ndarray

    @property
    def models(self) -> int:
        return len(self.decisions)


def predictions_path(run_dir: Path, server_round: int) -> Path:
    return run_dir / FOLDER / f"round_{server_round:04d}.npz"


def save_predictions(run_dir: Path, server_round: int, image_ids: np.ndarray,
                     labels: np.ndarray, probs: list[np.ndarray]) -> None:
    """Round `server_round`'s file from each model's float32 probabilities, written beside
    it and renamed (a cut-off round's file is simply written again)."""
    path = predictions_path(run_dir, server_round)
    tmp = path.with_suffix(".npz.tmp")
    stacked = np.stack(probs)
    with RunLog.writing(path, tmp):
        path.parent.mkdir(exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez_compressed(f, image_id=np.asarray(image_ids, dtype=str),
                                label=np.asarray(labels, dtype=np.int16),
                                decision=stacked.argmax(2).astype(np.int16),
                                probs=stacked.astype(np.float16))
        os.replace(tmp, path)


def load_predictions(run_dir: Path, server_round: int) -> Predictions | None:
    """Round `server_round`'s predictions, None where the run has no such file (a run made
    before fl-sim kept them, or a round it did not evaluate)."""
    path = predictions_path(run_dir, server_round)
    if not path.exists():
        return None
    with np.load(path) as f:
        return Predictions(f["image_id"], f["label"].astype(np.int64),
                           f["decision"].astype(np.int64), f["probs"].astype(np.float32))


def clear_predictions(run_dir: Path) -> None:
    """A fresh start keeps no file of an earlier attempt."""
    for stale in (run_dir / FOLDER).glob("round_*.npz*"):
        stale.unlink()
