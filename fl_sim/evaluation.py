"""Evaluate a model on rows of the decoded-image cache (used by clients and the server)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fl_sim.data_partition import FederatedData
from fl_sim.metrics import classification_metrics
from fl_sim.predictions import SplitStore
from fl_sim.stats import paired_split_difference, split_intervals
from fl_sim.transforms import BatchPreprocessor


@torch.inference_mode()
def predict(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    preprocess: BatchPreprocessor,
    batch_size: int,
) -> tuple[np.ndarray, float]:
    """Predicted class probabilities of images[indices] (float32, one row per image) and the
    mean cross-entropy loss."""
    model.eval()
    device = preprocess.device
    probs, total_loss = [], torch.zeros((), device=device)  # on the device: one sync, at the end
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        with autocast(device):
            logits = model(preprocess(images[idx])).float()
        y = torch.from_numpy(labels[idx]).to(device)
        total_loss += F.cross_entropy(logits, y, reduction="sum")
        probs.append(logits.softmax(1))
    out = torch.cat(probs).cpu().numpy() if probs else np.empty((0, 0), dtype=np.float32)
    return out, total_loss.item() / max(len(indices), 1)


def evaluate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    preprocess: BatchPreprocessor,
    batch_size: int,
    classes: Sequence[str],
) -> dict[str, float]:
    """Metrics of `model` on images[indices] (see fl_sim.metrics), with the mean CE loss."""
    probs, loss = predict(model, images, labels, indices, preprocess, batch_size)
    return metrics_of(labels[indices], probs, classes, loss)


def metrics_of(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str],
               loss: float) -> dict[str, float]:
    """classification_metrics of the arg-max decisions, with the clinical metrics of `probs`."""
    probs = probs.reshape(len(probs), len(classes))  # an empty split's (0, 0): (0, C)
    return classification_metrics(y_true, probs.argmax(1), len(classes), loss=loss,
                                  probs=probs, classes=classes)


def split_predictions(model: nn.Module, data: FederatedData, partition: int, split: str,
                      preprocess: BatchPreprocessor, batch_size: int) -> tuple[np.ndarray, float]:
    """`predict` on one of a client's splits."""
    return predict(model, data.images, data.labels, data.indices(partition, split), preprocess,
                   batch_size)


def evaluate_splits(model: nn.Module, data: FederatedData, partition: int,
                    preprocess: BatchPreprocessor, batch_size: int,
                    splits: Sequence[str] = ("val", "test"),
                    baseline: np.ndarray | None = None,
                    keep: SplitStore | None = None) -> dict[str, float]:
    """`evaluate` on a client's val and test splits, keys prefixed (`val_acc`, `test_n`, ...),
    with the bootstrap intervals of the test split's metrics (`test_bacc_lo`, `test_bacc_hi`,
    ...): what the report needs of a split whose predictions never leave the client.
    `baseline`, another model's probabilities on the test split, adds the paired test of
    this model against it (`test_bacc_delta_lo`, `_hi`, `_p`). `keep` stores the test
    split's per-image predictions where the client is (fl_sim.predictions)."""
    metrics = {}
    for split in splits:
        probs, loss = split_predictions(model, data, partition, split, preprocess, batch_size)
        rows = data.indices(partition, split)
        labels = data.labels[rows]
        result = metrics_of(labels, probs, data.classes, loss)
        if split == "test":
            result.update(split_intervals(labels, probs))
            if keep is not None:
                keep.save(data.manifest["image_id"].to_numpy()[rows], labels, probs)
            if baseline is not None:
                result.update(paired_split_difference(labels, probs, baseline))
        metrics.update({f"{split}_{k}": v for k, v in result.items()})
    return metrics


def autocast(device: torch.device, enabled: bool = True) -> torch.autocast:
    """bf16 autocast on CUDA; a no-op elsewhere (CPU autocast is slower for these models)
    or where not `enabled`."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=enabled and device.type == "cuda")
