"""The rows the server writes from what clients report: a train row per client, val/test
rows per split, their example-weighted means, and the privacy ledger's ε per level."""

from __future__ import annotations

from typing import Any

import numpy as np

from fl_sim.server.run_log import RunLog

SPLITS = ("val", "test")


# What a client's train reply reports beside its weights (train_local's result).
TRAIN_METRICS = ("train_loss", "train_acc", "steps", "train_time_s", "cuda_device", "gpu_peak_mb")


def train_row(metrics: Any, n: int) -> dict[str, Any]:
    """A `train` row from train_local's result (a client's reply metrics, or the dict):
    with the device it trained on (`cuda_device`, -1 for the CPU) and its peak GPU memory."""
    return {"n": n, "loss": float(metrics["train_loss"]), "acc": float(metrics["train_acc"]),
            "steps": int(metrics["steps"]), "time_s": float(metrics["train_time_s"]),
            "cuda_device": int(metrics["cuda_device"]), "gpu_peak_mb": float(metrics["gpu_peak_mb"])}


def mean_row(rows: list[dict[str, Any]], keys: list[str] | None = None) -> dict[str, Any]:
    """The example-weighted mean (by `n`) of rows' metrics, and their total `n`."""
    weights = np.array([r["n"] for r in rows], dtype=float)
    keys = keys or [k for k in rows[0] if k != "n"]
    mean = {k: float(np.average([r[k] for r in rows], weights=weights)) for k in keys}
    return {**mean, "n": int(weights.sum())}


def split_rows(metrics: dict[str, Any], splits: tuple[str, ...] = SPLITS, model: str = ""
               ) -> dict[str, dict[str, Any]]:
    """A client's `val_*` / `test_*` metrics as a row per split (`n` an integer); with
    `model`, those of `<model>_val_*` / `<model>_test_*`."""
    rows = {}
    for split in splits:
        prefix = f"{model}_{split}_" if model else f"{split}_"
        rows[split] = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
        rows[split]["n"] = int(rows[split]["n"])
    return rows


def log_clients(server_round: int, evaluations: list[dict], log: RunLog) -> dict:
    """Per-client val/test rows from each client's `partition-id`, `val_*` and `test_*`
    metrics (Ditto's personal model's, `personal_*`, as rows of scope `personalized`);
    returns (and logs) the example-weighted mean of the clients' val metrics."""
    val_rows = []
    for metrics in evaluations:
        client = int(metrics["partition-id"])
        if "personal_val_n" in metrics:
            for split, row in split_rows(metrics, model="personal").items():
                log.row(server_round, "personalized", client, split, row)
        for split, row in split_rows(metrics).items():
            log.row(server_round, "client", client, split, row)
            if split == "val":
                val_rows.append(row)
    federated = mean_row(val_rows)
    log.row(server_round, "federated", None, "val", federated)
    return federated


def log_privacy(server_round: int, privacy: dict[str, Any], log: RunLog) -> None:
    """Rows of scope `privacy` from the ledger's summary: the ε of each level (split) after
    the round, and under DP-SGD each client's own."""
    for level in ("client_level", "sample_level"):
        if level in privacy:
            spent = privacy[level]
            log.row(server_round, "privacy", None, level,
                    {"epsilon": spent["epsilon"], "delta": privacy["delta"]})
            for trainer, epsilon in spent.get("clients", {}).items():
                if trainer != "pooled":  # the pooled model's is the row above
                    log.row(server_round, "privacy", int(trainer), level,
                            {"epsilon": epsilon, "delta": privacy["delta"]})
