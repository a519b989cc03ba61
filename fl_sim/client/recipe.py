"""Recipes for imbalanced data, read from the run config: the loss and the epoch sampler.

Both look only at the labels of the split being trained (a client's own train split, or the
pooled union for the pooled baseline), except `class_weights: federation`, whose weights
come from the federation's total class counts (each client's counts, summed by the server).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from fl_sim.config import LossConfig
from fl_sim.wire import FEDERATION_COUNTS

FOCAL_GAMMA = 2.0
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def class_weights(counts: np.ndarray) -> np.ndarray:
    """n / (classes present × n_c) per class, from the class counts: the mean weight over
    the counted images is 1.

    A class absent from the counts gets weight 1: no image of it is ever a target, and no
    count of zero is divided by.
    """
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.ones(len(counts))
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


PRIOR_FLOOR = 1e-6  # the prior of a class the split lacks: log stays finite


def log_prior(counts: np.ndarray) -> np.ndarray:
    """log of the split's label frequencies, a missing class at PRIOR_FLOOR."""
    counts = np.asarray(counts, dtype=np.float64)
    return np.log(np.maximum(counts / counts.sum(), PRIOR_FLOOR))


def federation_counts(config: Mapping[str, Any]) -> np.ndarray | None:
    """The federation's class counts the server sent in the run's config, if it did
    (loss.class_weights: federation)."""
    counts = config.get(FEDERATION_COUNTS)
    return None if counts is None else np.asarray(counts, dtype=np.int64)


def make_loss(cfg: LossConfig, train_labels: np.ndarray,
              federation_counts: np.ndarray | None = None) -> Loss:
    """The batch loss (logits, targets) -> scalar of `cfg`, fitted to `train_labels` (and to
    the federation's class counts where `cfg.class_weights` is federation)."""
    smoothing = cfg.label_smoothing
    fitted: dict[tuple[str, int], torch.Tensor] = {}  # by number of classes, at the first batch

    def per_class(kind: str, logits: torch.Tensor) -> torch.Tensor:
        k = logits.shape[1]
        if (kind, k) not in fitted:
            own = np.bincount(train_labels, minlength=k)
            values = (log_prior(own) if kind == "prior" else class_weights(
                own if cfg.weights_from == "client" else federation_counts))
            fitted[kind, k] = torch.as_tensor(values, dtype=logits.dtype, device=logits.device)
        return fitted[kind, k]

    if cfg.weights_from == "federation" and federation_counts is None:
        raise ValueError("class_weights: federation, but the federation's class counts did not "
                         "come with the message")
    if cfg.name == "ce":
        return lambda logits, y: F.cross_entropy(logits, y, label_smoothing=smoothing)
    if cfg.name == "weighted_ce":
        return lambda logits, y: F.cross_entropy(logits, y, weight=per_class("weights", logits),
                                                 label_smoothing=smoothing)
    if cfg.name == "logit_adjusted":
        # Training sees logits + tau x log(prior) (Menon et al. 2021; balanced softmax at
        # tau 1); the model's own logits, used for prediction, learn the balanced posterior.
        tau = 1.0 if cfg.tau is None else cfg.tau
        return lambda logits, y: F.cross_entropy(logits + tau * per_class("prior", logits), y,
                                                 label_smoothing=smoothing)
    gamma = FOCAL_GAMMA if cfg.gamma is None else cfg.gamma

    def focal(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # (1 - p_t)^gamma down-weights the images the model already gets right; weighted,
        # each image also by its class's weight (alpha-balanced, Lin et al. 2017: a mean).
        ce = F.cross_entropy(logits, y, reduction="none", label_smoothing=smoothing)
        p_true = logits.softmax(1).gather(1, y[:, None])[:, 0]
        loss = (1 - p_true) ** gamma * ce
        if cfg.weights_from:
            loss = loss * per_class("weights", logits)[y]
        return loss.mean()

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
