"""Per-image predictions on a test set, one small file per evaluated round.

They are what the report's intervals and paired tests resample (fl_sim.stats). The server
keeps its own: the global test set's, `<run>/predictions/round_<r>.npz`. A client keeps
those of its own test split where the client is (`SplitStore`): they never travel. In a
simulation every client's folder is on the server's disk, `<run>/clients/<client>/
predictions/`, so the report can compare two runs on one site's split; a deployed client
keeps none (its folder would be on the hospital's own machine, see docs/report.md).

A file holds the image ids and labels, each model's arg-max decision (exact: the metrics of
metrics.jsonl are computed from it) and its class probabilities in float16 (for AUROC and
calibration): about 30 KB for 1,500 images of 7 classes. A run of several models on the
global test set (the local baseline: one per client) stores one row of decisions and
probabilities per model. A second model of the same round on a client's split (a
personalized one) is kept beside the first, under its name (`personalized_round_<r>.npz`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FOLDER = "predictions"
CLIENTS = "clients"
PERSONAL = "personalized"  # a client's own model (the rows' scope of the same name)


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

    @property
    def images(self) -> str:
        """A digest of the image ids: two files of the same test set have the same one."""
        return hashlib.sha1("\n".join(self.image_ids).encode()).hexdigest()


def predictions_path(folder: Path, server_round: int, model: str = "") -> Path:
    return folder / FOLDER / f"{model + '_' if model else ''}round_{server_round:04d}.npz"


def client_folder(run_dir: Path, client: int) -> Path:
    """Where a simulated client keeps what never leaves it."""
    return run_dir / CLIENTS / str(client)


def save_predictions(folder: Path, server_round: int, image_ids: np.ndarray,
                     labels: np.ndarray, probs: list[np.ndarray], model: str = "") -> None:
    """Round `server_round`'s file from each model's float32 probabilities, written beside
    it and renamed (a cut-off round's file is simply written again). An OSError names the
    file."""
    path = predictions_path(folder, server_round, model)
    tmp = path.with_suffix(".npz.tmp")
    stacked = np.stack(probs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez_compressed(f, image_id=np.asarray(image_ids, dtype=str),
                                label=np.asarray(labels, dtype=np.int16),
                                decision=stacked.argmax(2).astype(np.int16),
                                probs=stacked.astype(np.float16))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        err.filename = str(path)
        raise


def load_predictions(folder: Path, server_round: int, model: str = "") -> Predictions | None:
    """Round `server_round`'s predictions, None where `folder` has no such file (a run made
    before fl-sim kept them, or a round it did not evaluate)."""
    path = predictions_path(folder, server_round, model)
    if not path.exists():
        return None
    with np.load(path) as f:
        return Predictions(f["image_id"], f["label"].astype(np.int64),
                           f["decision"].astype(np.int64), f["probs"].astype(np.float32))


def clear_predictions(run_dir: Path) -> None:
    """A fresh start keeps no file of an earlier attempt, the clients' included."""
    for folder in (run_dir, *(run_dir / CLIENTS).glob("*")):
        for stale in (folder / FOLDER).glob("*round_*.npz*"):
            stale.unlink()


@dataclass(frozen=True)
class SplitStore:
    """Where a client keeps its test split's predictions of one round's model (`model`:
    "" for the global one, PERSONAL for its own)."""

    folder: Path
    server_round: int
    model: str = ""

    def save(self, image_ids: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> None:
        save_predictions(self.folder, self.server_round, image_ids, labels, [probs], self.model)
