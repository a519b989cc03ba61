"""A client's train split as it trains: its own rows and, with `synthesis`, the images its
own GAN generated (fl_sim.client.synthesis), which only ever join the train split.

Federated clients and the baselines both train on `train_split`, so synthesis never differs
between them. The generated images are cached per client on the client's disk (beside the
decoded-image cache), so every round, process and resumed run reuses one GAN's output.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path

import numpy as np
import torch

from fl_sim.client.synthesis import SynthesisSettings, Synthesized, sample_grid, synthesize
from fl_sim.config import DataConfig, RunConfig, SynthesisConfig
from fl_sim.data_partition import FederatedData
from fl_sim.data_partition.cache import default_cache_dir
from fl_sim.errors import FlSimError


def own_class_counts(data: FederatedData, partition: int) -> np.ndarray:
    """The class counts of a client's own train images (none generated)."""
    return np.bincount(data.labels[data.indices(partition, "train")],
                       minlength=len(data.classes))


class Rows:
    """The dataset's image rows followed by `extra` ones, indexed as one array (rows >= N
    are extra): batches take both without copying the dataset."""

    def __init__(self, base: np.ndarray, extra: np.ndarray) -> None:
        self.base, self.extra = base, extra
        self.shape = (len(base) + len(extra), *base.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx)
        real = idx < len(self.base)
        if real.all():
            return self.base[idx]
        out = np.empty((len(idx), *self.base.shape[1:]), dtype=self.base.dtype)
        out[real] = self.base[idx[real]]
        out[~real] = self.extra[idx[~real] - len(self.base)]
        return out


def synthesis_classes(cfg: SynthesisConfig, codes: list[str]) -> str | list[int]:
    """`classes` as the GAN takes them: "minority", or indices of the named codes."""
    if cfg.classes == "minority":
        return "minority"
    unknown = [c for c in cfg.classes if c not in codes]
    if unknown:
        raise FlSimError(f"synthesis.classes names {unknown}, not classes of this dataset: "
                         f"use some of {', '.join(codes)}, or `minority`.")
    return [codes.index(c) for c in cfg.classes]


def client_synthesis(data: FederatedData, partition: int, run_cfg: RunConfig,
                     data_cfg: DataConfig, device: torch.device) -> Synthesized:
    """This client's generated train images (trained now, or read from its cache)."""
    hits = _synthesis.cache_info().hits
    made = _synthesis(data, partition, run_cfg.model_dump_json(include={"synthesis", "seed"}),
                      str(data_cfg.cache_dir or default_cache_dir()), str(device))
    if _synthesis.cache_info().hits > hits:  # made or read before by this process
        made = dataclasses.replace(made, from_cache=True, seconds=0.0)
    return made


@functools.lru_cache(maxsize=64)  # every client of a pooled or local baseline
def _synthesis(data: FederatedData, partition: int, settings_json: str, cache_dir: str,
               device: str) -> Synthesized:
    run = RunConfig.model_validate_json(settings_json)
    cfg = run.synthesis
    settings = SynthesisSettings(method=cfg.method, classes=synthesis_classes(cfg, data.classes),
                                 per_class=cfg.per_class, steps=cfg.steps,
                                 batch_size=cfg.batch_size)
    # The decoded-image cache's name (dataset, size, resize, source files) beside the
    # partition's digest: the GAN learnt from these pixels, not from another resize's.
    pixels = Path(getattr(data.images, "filename", None) or "in-memory").name
    key = hashlib.sha256(f"{pixels}|{data.digest}|{partition}|{settings_json}".encode()
                         ).hexdigest()[:16]
    seed = int(np.random.default_rng([run.seed, partition, 1]).integers(2**31))
    return synthesize(data.images, data.labels, data.indices(partition, "train"),
                      len(data.classes), settings, seed, f"{cache_dir}/synthesis",
                      f"client{partition}-{key}", device=device)


def synthesis_report(made: Synthesized, codes: list[str]) -> tuple[dict, np.ndarray | None]:
    """What a client tells the server of its synthesis: its cost and counts per class (as
    metrics), and a sample grid per class for TensorBoard (None if nothing was generated)."""
    metrics = {"synthesis_s": made.built_seconds, "from_cache": int(made.from_cache),
               **{f"generated_{codes[c]}": int((made.labels == c).sum()) for c in made.classes}}
    return metrics, sample_grid(made.images, made.labels) if len(made.labels) else None


def train_split(data: FederatedData, partitions: list[int], run_cfg: RunConfig,
                data_cfg: DataConfig, device: torch.device
                ) -> tuple[np.ndarray | Rows, np.ndarray, np.ndarray]:
    """(images, labels, train rows) of these clients (one, or all for the pooled baseline):
    their own rows, plus each one's generated images."""
    indices = np.concatenate([data.indices(p, "train") for p in partitions])
    if run_cfg.synthesis is None:
        return data.images, data.labels, indices
    made = [client_synthesis(data, p, run_cfg, data_cfg, device) for p in partitions]
    extra = np.concatenate([m.images for m in made])
    extra_labels = np.concatenate([m.labels for m in made])
    n = len(data.images)
    return (Rows(data.images, extra), np.concatenate([data.labels, extra_labels]),
            np.concatenate([indices, n + np.arange(len(extra_labels))]))
