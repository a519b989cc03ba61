"""Metrics against a confusion case worked out by hand."""

import numpy as np
import pytest

from fl_sim.metrics import classification_metrics


def test_hand_checked_confusion_case():
    # 3 classes. Class 0: 4 images, 3 right (one called 1). Class 1: 2 images, 1 right
    # (one called 2). Class 2: 2 images, both right. Class 3 absent from y_true.
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    m = classification_metrics(y_true, y_pred, num_classes=4, loss=0.5)
    assert m["n"] == 8
    assert m["acc"] == pytest.approx(6 / 8)
    # recalls 3/4, 1/2, 1 over the classes present -> balanced acc 0.75
    assert m["bacc"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    # precisions: class0 3/3, class1 1/2, class2 2/3; weights 4/8, 2/8, 2/8
    precision = (4 * 1.0 + 2 * 0.5 + 2 * (2 / 3)) / 8
    assert m["precision"] == pytest.approx(precision)
    assert m["recall"] == pytest.approx(6 / 8)  # weighted recall == accuracy
    f1 = [2 * 1.0 * 0.75 / 1.75, 0.5, 2 * (2 / 3) * 1.0 / (5 / 3)]
    assert m["f1"] == pytest.approx((4 * f1[0] + 2 * f1[1] + 2 * f1[2]) / 8)
    assert m["avg"] == pytest.approx(np.mean([m[k] for k in ("acc", "bacc", "precision", "recall", "f1")]))
    assert m["loss"] == 0.5
    assert [m[f"recall_c{k}"] for k in range(4)] == pytest.approx([0.75, 0.5, 1.0, 0.0])
    assert m["f1_macro"] == pytest.approx(sum(f1) / 4)  # absent class 3 scores 0


def test_keys_do_not_depend_on_the_classes_present():
    a = classification_metrics(np.array([0, 1]), np.array([0, 1]), 7)
    b = classification_metrics(np.array([5, 5]), np.array([5, 2]), 7)
    assert a.keys() == b.keys()
