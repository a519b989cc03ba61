"""Bootstrap intervals and paired tests over test images, vectorised over the replicates.

A replicate draws the n test images with replacement; each metric of a replicate is
computed from its confusion matrix (ACC, BACC, weighted precision / recall / F1, AVG) or
from the ranks of the predicted probabilities (macro one-vs-rest AUROC), for all B
replicates at once. The draws depend only on (n, seed): every model scored on the same
test set sees the same B resamples, so the difference of two models' replicates is their
paired bootstrap, and the same inputs give the same intervals, byte for byte.

Several seeds of one configuration are combined by a two-level bootstrap: each replicate
draws the images (shared by every seed, since they are scored on the same test set) and,
independently, S of the S seeds with replacement, and takes the mean over the drawn seeds.
Two configurations run with the same seeds draw the same seeds (paired on seeds too).
Used by the clients (intervals of their own test split, sent as numbers) and the report.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

REPLICATES = 2000
LEVEL = 0.95
SEED = 0
METRICS = ("acc", "bacc", "precision", "recall", "f1", "avg", "auroc")
HEADLINE = METRICS[:5]


class ImageDraws:
    """B draws of the n images of a test set with replacement, from (n, seed) alone."""

    def __init__(self, n: int, replicates: int = REPLICATES, seed: int = SEED) -> None:
        self.n, self.replicates = n, replicates
        self.indices = np.random.default_rng([seed, n]).integers(
            0, n, size=(replicates, n), dtype=np.int32)
        self._counts: np.ndarray | None = None

    @property
    def counts(self) -> np.ndarray:
        """(n, B) float32: how often each image is in each draw (one contiguous row per
        image), made once and shared by every model scored on this test set."""
        if self._counts is None:
            offsets = np.arange(self.replicates, dtype=np.int64)[:, None] * self.n
            flat = np.bincount((self.indices + offsets).ravel(),
                               minlength=self.replicates * self.n)
            self._counts = np.ascontiguousarray(flat.reshape(self.replicates, self.n).T,
                                                dtype=np.float32)
        return self._counts


def draw_seeds(seeds: int, replicates: int = REPLICATES, seed: int = SEED) -> np.ndarray:
    """(replicates, seeds) indices of seeds drawn with replacement (the second level)."""
    return np.random.default_rng([seed, seeds, 1]).integers(0, seeds, size=(replicates, seeds))


def replicate_metrics(labels: np.ndarray, decisions: np.ndarray, probs: np.ndarray | None,
                      draws: ImageDraws, num_classes: int) -> dict[str, np.ndarray]:
    """Each metric of METRICS on each of the B draws: arrays of shape (B,), with the
    definitions of fl_sim.metrics (BACC over the classes present in the draw, zero where a
    precision divides by zero). AUROC only where `probs` is given."""
    # Each draw's confusion matrix: the images' counts summed per (true, decided) cell.
    cells = labels.astype(np.int64) * num_classes + decisions
    order = np.argsort(cells, kind="stable")
    present, starts = np.unique(cells[order], return_index=True)
    cm = np.zeros((num_classes ** 2, draws.replicates))
    cm[present] = np.add.reduceat(draws.counts[order], starts, axis=0)
    out = confusion_metrics(cm.T.reshape(draws.replicates, num_classes, num_classes))
    if probs is not None:  # non-finite outputs (a diverged model) rank nothing
        out["auroc"] = (auroc_replicates(labels, probs, draws) if np.isfinite(probs).all()
                        else np.full(draws.replicates, np.nan))
    return out


def confusion_metrics(cm: np.ndarray) -> dict[str, np.ndarray]:
    """ACC, BACC, weighted P / R / F1 and AVG of confusion matrices (B, true, predicted)."""
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support, predicted = cm.sum(2), cm.sum(1)
    total = support.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, 0.0)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        weight = support / total[:, None]
        present = support > 0
        out = {"acc": tp.sum(1) / total,
               "bacc": (recall * present).sum(1) / present.sum(1),
               "precision": (weight * precision).sum(1),
               "recall": (weight * recall).sum(1),
               "f1": (weight * f1).sum(1)}
    out["avg"] = np.mean([out[k] for k in HEADLINE], axis=0)
    return out


def auroc_replicates(labels: np.ndarray, probs: np.ndarray, draws: ImageDraws) -> np.ndarray:
    """Macro one-vs-rest AUROC per draw: the mean over the classes that have positives and
    negatives in the draw. Each class's AUROC is the Mann-Whitney statistic with ties
    counted half (scikit-learn's roc_auc_score), from the images' counts in the draw."""
    per_class = np.stack([_class_auroc(probs[:, k], labels == k, draws.counts)
                          for k in range(probs.shape[1])])
    with warnings.catch_warnings():  # a replicate with no scorable class: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(per_class, axis=0)


def _class_auroc(score: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One class's AUROC per replicate from `weights` (n, B): each positive's weight times
    the weight of the negatives scored below it (ties half), over all positive-negative
    weight pairs."""
    if positive.all() or not positive.any():
        return np.full(weights.shape[1], np.nan)
    negatives = np.flatnonzero(~positive)
    negatives = negatives[np.argsort(score[negatives], kind="stable")]
    ranked, positives = score[negatives], np.flatnonzero(positive)
    # Negative weight at or below each row of the ranked negatives, row 0 = none (a row at a
    # time: numpy's cumsum along axis 0 is several times slower).
    cum_neg = np.empty((len(negatives) + 1, weights.shape[1]), dtype=np.float32)
    cum_neg[0] = 0
    for i, row in enumerate(weights[negatives]):
        np.add(cum_neg[i], row, out=cum_neg[i + 1])
    # Below a positive, plus half of its ties: the mean of the two cumulative sums around it.
    twice_below = cum_neg[np.searchsorted(ranked, score[positives], side="left")]
    twice_below += cum_neg[np.searchsorted(ranked, score[positives], side="right")]
    positive_weights = weights[positives]
    wins = 0.5 * np.einsum("ij,ij->j", positive_weights, twice_below, dtype=np.float64)
    pairs = positive_weights.sum(0, dtype=np.float64) * cum_neg[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / pairs, np.nan)


def combine_seeds(per_seed: np.ndarray, seed_draws: np.ndarray | None) -> np.ndarray:
    """(S, B) replicates of S seeds -> (B,) replicates of their mean, the seeds drawn by
    `seed_draws` (B, S) (None: one seed, or every seed in every replicate)."""
    if seed_draws is None or len(per_seed) == 1:
        return per_seed.mean(0)
    return per_seed[seed_draws, np.arange(per_seed.shape[1])[:, None]].mean(1)


def interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of the replicates (NaN ones left out)."""
    tail = 100 * (1 - level) / 2
    finite = replicates[np.isfinite(replicates)]
    if not len(finite):
        return float("nan"), float("nan")
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)


def p_value(differences: np.ndarray) -> float:
    """Two-sided p-value of `differences` (replicates of a − b) against no difference: the
    normal tail of their mean over their standard deviation, a z-test on the bootstrap's
    standard error. Not the share of replicates beyond 0: B draws can show no share under
    2 / (B + 1), and Holm multiplies that floor by the size of the table (63 cells at
    2,000 draws: 0.063, so no cell could be a finding). Below 1 − LEVEL about where the
    percentile interval leaves 0 out."""
    finite = differences[np.isfinite(differences)]
    if not len(finite):
        return float("nan")
    mean, sd = float(finite.mean()), float(finite.std())
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return math.erfc(abs(mean) / sd / math.sqrt(2))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaN ones stay NaN, uncounted)."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(len(p), np.nan)
    valid = np.flatnonzero(np.isfinite(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def split_intervals(labels: np.ndarray, probs: np.ndarray,
                    replicates: int = REPLICATES) -> dict[str, float]:
    """`<metric>_lo` / `<metric>_hi`: the 95 % bootstrap interval of every metric of METRICS
    on one split (a client's test split: these numbers travel, its predictions do not)."""
    if len(labels) == 0:
        return {f"{m}_{end}": float("nan") for m in METRICS for end in ("lo", "hi")}
    n, num_classes = probs.shape
    out: dict[str, float] = {}
    reps = replicate_metrics(labels, probs.argmax(1), probs, ImageDraws(n, replicates),
                             num_classes)
    for metric in METRICS:
        out[f"{metric}_lo"], out[f"{metric}_hi"] = interval(reps[metric])
    return out


def paired_split_difference(labels: np.ndarray, probs: np.ndarray, baseline: np.ndarray,
                            replicates: int = REPLICATES) -> dict[str, float]:
    """`<metric>_delta_lo` / `_hi` / `_p`: the paired 95 % interval and two-sided p-value of
    a model (`probs`) minus another (`baseline`) on one split, both scored on the same
    draws of its images (a client's test split, computed where its predictions stay)."""
    keys = [f"{m}_delta_{end}" for m in METRICS for end in ("lo", "hi", "p")]
    if len(labels) == 0:
        return dict.fromkeys(keys, float("nan"))
    n, num_classes = probs.shape
    draws = ImageDraws(n, replicates)
    a, b = (replicate_metrics(labels, p.argmax(1), p, draws, num_classes)
            for p in (probs, baseline))
    out: dict[str, float] = {}
    for metric in METRICS:
        difference = a[metric] - b[metric]
        out[f"{metric}_delta_lo"], out[f"{metric}_delta_hi"] = interval(difference)
        out[f"{metric}_delta_p"] = p_value(difference)
    return out
