"""The model's features (and its own head's predictions) for every split a probe uses.

Supervised (timm) models give their penultimate features, the pooled pre-logits that the
linear head reads; the CLIP variant gives its unit image features in the text space, which
its head compares with the class prompts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from torch import nn

from fl_sim.errors import FlSimError
from fl_sim.evaluation import autocast
from fl_sim.models.clip import ClipClassifier
from fl_sim.probe.source import ProbedRun
from fl_sim.task import build_model
from fl_sim.transforms import BatchPreprocessor

CLIENT_SPLITS = ("train", "val", "test")
GLOBAL_TEST = "global_test"  # the server's global test set, as a client's model sees it


@dataclass(frozen=True)
class Split:
    """One split's features as one model sees them; row i of each array is the same image."""

    x: np.ndarray  # (n, D) float32 features
    y: np.ndarray  # (n,) true labels
    rows: np.ndarray  # (n,) row indices into the dataset
    head: np.ndarray  # (n,) the network's own predictions

    @staticmethod
    def concat(splits: list[Split]) -> Split:
        return Split(*(np.concatenate([getattr(s, k) for s in splits])
                       for k in ("x", "y", "rows", "head")))


# (client, split) -> Split; split is train, val, test or global_test. A client's key holds
# only what its model made of its own rows (and of the global test set).
Features = dict[tuple[int, str], Split]


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D) features and the (B, K) logits the model's own head makes of them."""
    if isinstance(model, ClipClassifier):
        feats = model.image_features(x)
        return feats, model.class_logits(feats)
    pooled = model.forward_features(x)
    return model.forward_head(pooled, pre_logits=True), model.forward_head(pooled)


@torch.inference_mode()
def extract(model: nn.Module, preprocess: BatchPreprocessor, images: np.ndarray,
            labels: np.ndarray, rows: np.ndarray, batch_size: int,
            advance: Callable[[int], None] = lambda n: None) -> Split:
    """Features of images[rows], in batches, without augmentation."""
    model.eval()
    feats, preds = [], []
    for start in range(0, len(rows), batch_size):
        idx = rows[start:start + batch_size]
        with autocast(preprocess.device):
            f, logits = features_and_logits(model, preprocess(images[idx]))
        feats.append(f.float().cpu())
        preds.append(logits.argmax(1).cpu())
        advance(len(idx))
    return Split(torch.cat(feats).numpy(), labels[rows], rows, torch.cat(preds).numpy())


def extract_features(run: ProbedRun, console: Console) -> Features:
    """Every client's train/val/test features and the global test set's, from the model each
    client holds (the global model, or a local run's own model per client)."""
    data, cfg = run.data, run.cfg
    # Built without pretrained weights: the checkpoint overwrites every tensor (strict load),
    # so a weights file or hub download the run needed is not needed here.
    build_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": False})})
    model, preprocess = build_model(build_cfg, data.class_names, data.images.shape[1])
    clients = range(data.num_clients)
    global_rows = data.indices("global", "test")
    total = sum(len(data.indices(c, s)) for c in clients for s in CLIENT_SPLITS)
    total += len(global_rows) * len(run.states)
    features: Features = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("features", total=total)

        def advance(n: int) -> None:
            progress.advance(task, n)

        def of(rows: np.ndarray) -> Split:
            return extract(model, preprocess, data.images, data.labels, rows,
                           cfg.eval_batch_size, advance)

        for owner, state in run.states.items():
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as err:
                raise FlSimError(f"checkpoints/{run.checkpoint}.pt does not fit the model that "
                                 f"{run.run_dir / 'config.yaml'} describes: {err}") from None
            progress.update(task, description="features: " + (
                "global test" if owner is None else f"client {owner}"))
            shared = of(global_rows)
            for c in clients if owner is None else [owner]:
                progress.update(task, description=f"features: client {c}")
                features.update({(c, s): of(data.indices(c, s)) for s in CLIENT_SPLITS})
                features[(c, GLOBAL_TEST)] = shared
    return features
