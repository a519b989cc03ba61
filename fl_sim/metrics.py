"""Classification metrics of the paper, computed with scikit-learn.

The five headline metrics are ACC, balanced ACC and the support-weighted precision, recall
and F1; AVG is their unweighted mean. Per-class recall and macro F1 follow as extra keys,
and, from the predicted probabilities, the clinical ones (`clinical_metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score, f1_score, precision_recall_fscore_support, recall_score, roc_auc_score,
)

HEADLINE = ("acc", "bacc", "precision", "recall", "f1")
MELANOMA = "mel"  # the class whose sensitivity and specificity a dermatologist asks for
ECE_BINS = 15


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, loss: float | None = None,
    probs: np.ndarray | None = None, classes: Sequence[str] | None = None,
) -> dict[str, float]:
    """Metrics of one evaluation; every key is always present so replies stay consistent.

    Balanced accuracy is the mean recall over the classes present in `y_true` (scikit-learn's
    definition), so a client split that lacks a rare class is not penalised for it.
    """
    labels = np.arange(num_classes)
    present = np.unique(y_true)
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="weighted", zero_division=0
    )
    out = {
        "n": int(len(y_true)),
        "acc": float(accuracy_score(y_true, y_pred)),
        "bacc": float(recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }
    out["avg"] = float(np.mean([out[k] for k in HEADLINE]))
    if loss is not None:
        out["loss"] = float(loss)
    out["f1_macro"] = float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))
    per_class = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    for k, r in enumerate(per_class):
        out[f"recall_c{k}"] = float(r)
    if probs is not None:
        out.update(clinical_metrics(y_true, probs, classes))
    return out


def clinical_metrics(y_true: np.ndarray, probs: np.ndarray,
                     classes: Sequence[str] | None = None) -> dict[str, float]:
    """One-vs-rest AUROC per class (`auroc_c<k>`, NaN where the split lacks the class's
    positives or negatives) and their mean over the classes that have both (`auroc`); the
    expected calibration error of the top class (`ece`, 15 equal-width bins); and, where a
    class is `mel`, melanoma sensitivity and specificity at the model's own decision (its
    arg-max). Every key is present whatever the split holds, so replies stay consistent;
    a model whose outputs are not finite (one that diverged) ranks nothing: NaN AUROC."""
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true)
    finite = bool(np.isfinite(probs).all())
    out: dict[str, float] = {}
    aurocs = []
    for k in range(probs.shape[1]):
        positive = y_true == k
        auroc = (float(roc_auc_score(positive, probs[:, k]))
                 if finite and 0 < positive.sum() < len(y_true) else float("nan"))
        out[f"auroc_c{k}"] = auroc
        if auroc == auroc:
            aurocs.append(auroc)
    out["auroc"] = float(np.mean(aurocs)) if aurocs else float("nan")
    out["ece"] = expected_calibration_error(y_true, probs)
    if classes is not None and MELANOMA in classes:
        mel = list(classes).index(MELANOMA)
        said, truly = probs.argmax(1) == mel, y_true == mel
        out["mel_sens"] = float(said[truly].mean()) if truly.any() else float("nan")
        out["mel_spec"] = float((~said[~truly]).mean()) if (~truly).any() else float("nan")
    return out


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray,
                               bins: int = ECE_BINS) -> float:
    """Σ_b |B_b|/n · |acc(B_b) − conf(B_b)| over equal-width bins of the top-class confidence."""
    if len(y_true) == 0 or not np.isfinite(probs).all():
        return float("nan")
    confidence = probs.max(1)
    correct = probs.argmax(1) == y_true
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    gap = np.abs(np.bincount(which, correct, bins) - np.bincount(which, confidence, bins))
    return float(gap.sum() / len(y_true))
