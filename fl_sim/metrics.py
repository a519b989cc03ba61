"""Classification metrics of the paper, computed with scikit-learn.

The five headline metrics are ACC, balanced ACC and the support-weighted precision, recall
and F1; AVG is their unweighted mean. Per-class recall and macro F1 follow as extra keys.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support, recall_score

HEADLINE = ("acc", "bacc", "precision", "recall", "f1")


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, loss: float | None = None
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
    return out
