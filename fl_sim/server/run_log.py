"""Where a run's numbers land: metrics.jsonl (one wide row per line) and TensorBoard.

Rows are flushed as they are written, so a crash loses no finished round.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

KEY_ORDER = ("round", "scope", "client", "split", "n", "loss", "acc", "bacc", "precision",
             "recall", "f1", "avg")


class RunLog:
    """Appends metric rows for one run; TensorBoard tags `global/test/bacc`, `client_0/val/acc`."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._tb = SummaryWriter(log_dir=str(run_dir))

    def row(self, server_round: int, scope: str, client: int | None, split: str,
            metrics: dict[str, float]) -> dict[str, Any]:
        row = {"round": server_round, "scope": scope, "client": client, "split": split}
        row.update({k: metrics[k] for k in KEY_ORDER if k in metrics})
        row.update({k: v for k, v in metrics.items() if k not in row})
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        prefix = f"client_{client}" if scope == "client" else scope
        for key, value in metrics.items():
            if key != "n":
                self._tb.add_scalar(f"{prefix}/{split}/{key}", value, server_round)
        return row

    def scalar(self, tag: str, value: float, server_round: int) -> None:
        self._tb.add_scalar(tag, value, server_round)

    def close(self) -> None:
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
