"""Evaluate a model on rows of the decoded-image cache (used by clients and the server)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fl_sim.data_partition import FederatedData
from fl_sim.metrics import classification_metrics
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
    """Predicted classes of images[indices] and the mean cross-entropy loss."""
    model.eval()
    device = preprocess.device
    preds, total_loss = [], torch.zeros((), device=device)  # on the device: one sync, at the end
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        with autocast(device):
            logits = model(preprocess(images[idx])).float()
        y = torch.from_numpy(labels[idx]).to(device)
        total_loss += F.cross_entropy(logits, y, reduction="sum")
        preds.append(logits.argmax(1))
    y_pred = torch.cat(preds).cpu().numpy() if preds else np.empty(0, dtype=np.int64)
    return y_pred, total_loss.item() / max(len(indices), 1)


def evaluate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    preprocess: BatchPreprocessor,
    batch_size: int,
    num_classes: int,
) -> dict[str, float]:
    """Metrics of `model` on images[indices] (see fl_sim.metrics), with the mean CE loss."""
    y_pred, loss = predict(model, images, labels, indices, preprocess, batch_size)
    return classification_metrics(labels[indices], y_pred, num_classes, loss=loss)


def evaluate_splits(model: nn.Module, data: FederatedData, partition: int,
                    preprocess: BatchPreprocessor, batch_size: int) -> dict[str, float]:
    """`evaluate` on a client's val and test splits, keys prefixed (`val_acc`, `test_n`, ...)."""
    metrics = {}
    for split in ("val", "test"):
        result = evaluate(model, data.images, data.labels, data.indices(partition, split),
                          preprocess, batch_size, len(data.classes))
        metrics.update({f"{split}_{k}": v for k, v in result.items()})
    return metrics


def autocast(device: torch.device, enabled: bool = True) -> torch.autocast:
    """bf16 autocast on CUDA; a no-op elsewhere (CPU autocast is slower for these models)
    or where not `enabled`."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=enabled and device.type == "cuda")
