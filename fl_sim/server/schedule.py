"""The learning rate per server round: constant, cosine with warm-up, or the plateau
schedule with early stopping (Algorithm 1 of "Leveraging Modern Vision Model Architectures
and Transfer Learning for Medical Image Analysis").

The server owns the schedule and sends each round's rate to the clients in the train
message, so every client of a round trains at the same rate; its state is part of a run's
checkpoint, so a resumed run continues the schedule where it was.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from fl_sim.config import LRScheduleConfig


@dataclass
class PlateauState:
    """Where Algorithm 1 stands: what it watches, its best value, rounds without a better one."""

    watching: str = "train_acc"  # then "val_loss", once train accuracy passed the threshold
    best: float | None = None
    stale_rounds: int = 0
    reductions: int = 0
    scale: float = 1.0


class LRSchedule:
    def __init__(self, cfg: LRScheduleConfig, base_lr: float, rounds: int,
                 state: dict | None = None) -> None:
        self.cfg, self.base_lr, self.rounds = cfg, base_lr, rounds
        self.plateau = PlateauState(**(state or {}))

    def state(self) -> dict:
        return asdict(self.plateau)

    def lr(self, server_round: int) -> float:
        """The learning rate of round `server_round` (1-based)."""
        if self.cfg.name == "plateau":
            return self.base_lr * self.plateau.scale
        if self.cfg.name == "constant":
            return self.base_lr
        warmup = self.cfg.warmup_rounds or 0
        if server_round <= warmup:  # linear ramp up to the base rate at round warmup + 1
            return self.base_lr * server_round / (warmup + 1)
        low = self.base_lr * (self.cfg.min_factor or 0.0)
        # Over the rounds after warm-up, from the base rate toward `low`; the last round
        # still trains (t < 1).
        t = (server_round - warmup - 1) / max(self.rounds - warmup, 1)
        return low + (self.base_lr - low) * 0.5 * (1 + math.cos(math.pi * t))

    def after_round(self, train_acc: float, val_loss: float) -> str | None:
        """Feed a finished round's example-weighted train accuracy and validation loss;
        returns why the run stops (plateau only), else None."""
        if self.cfg.name != "plateau":
            return None
        p, c = self.plateau, self.cfg
        threshold = 0.9 if c.threshold is None else c.threshold
        patience = 2 if c.patience is None else c.patience
        factor = 0.5 if c.factor is None else c.factor
        max_reductions = 2 if c.max_reductions is None else c.max_reductions
        if p.watching == "train_acc" and train_acc > threshold:
            p.watching, p.best, p.stale_rounds = "val_loss", None, 0
        # Both are compared as "higher is better".
        value = train_acc if p.watching == "train_acc" else -val_loss
        if p.best is None or value > p.best:
            p.best, p.stale_rounds = value, 0
            return None
        p.stale_rounds += 1
        if p.stale_rounds < patience:
            return None
        what = "train accuracy" if p.watching == "train_acc" else "validation loss"
        if p.reductions >= max_reductions:
            return (f"early stop: {what} did not improve for {patience} rounds after "
                    f"{p.reductions} learning-rate reductions (plateau schedule)")
        p.scale *= factor
        p.reductions += 1
        p.stale_rounds = 0
        return None
