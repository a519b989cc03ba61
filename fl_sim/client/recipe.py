"""Recipes for imbalanced data, read from the run config: the loss and the epoch sampler.

Both look only at the labels of the split being trained (a client's own train split, or the
pooled union for the pooled baseline): nothing here sees another client's data.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fl_sim.config import LossConfig

FOCAL_GAMMA = 2.0
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """n / (classes present × n_c) per class: the mean weight over the split's images is 1.

    A class absent from the split gets weight 1: no image of it is ever a target, and no
    count of zero is divided by.
    """
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.ones(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def make_loss(cfg: LossConfig, train_labels: np.ndarray) -> Loss:
    """The batch loss (logits, targets) -> scalar of `cfg`, fitted to `train_labels`."""
    smoothing = cfg.label_smoothing
    if cfg.name == "ce":
        return lambda logits, y: F.cross_entropy(logits, y, label_smoothing=smoothing)
    if cfg.name == "weighted_ce":
        weights: dict[int, torch.Tensor] = {}  # by number of classes, known at the first batch

        def weighted_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            k = logits.shape[1]
            if k not in weights:
                weights[k] = torch.as_tensor(class_weights(train_labels, k), dtype=logits.dtype,
                                             device=logits.device)
            return F.cross_entropy(logits, y, weight=weights[k], label_smoothing=smoothing)

        return weighted_ce
    gamma = FOCAL_GAMMA if cfg.gamma is None else cfg.gamma

    def focal(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # (1 - p_t)^gamma down-weights the images the model already gets right.
        ce = F.cross_entropy(logits, y, reduction="none", label_smoothing=smoothing)
        p_true = logits.softmax(1).gather(1, y[:, None])[:, 0]
        return ((1 - p_true) ** gamma * ce).mean()

    return focal


def epoch_order(indices: np.ndarray, labels: np.ndarray, sampler: str,
                rng: np.random.Generator) -> np.ndarray:
    """One epoch's rows: a permutation (shuffle), or as many draws with replacement, each
    class equally likely (balanced: probability 1 / count of the image's class)."""
    if sampler == "shuffle":
        return rng.permutation(indices)
    y = labels[indices]
    counts = np.bincount(y)
    p = 1.0 / counts[y]
    return rng.choice(indices, size=len(indices), replace=True, p=p / p.sum())
