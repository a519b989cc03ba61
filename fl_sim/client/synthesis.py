"""Rare-class synthesis: a small conditional DCGAN that each client trains on its own train
split, then samples images of the chosen classes to add to that train split only.

Privacy: the GAN, its training images and what it generates stay on the client. Nothing here
sends anything anywhere; the cache is a file on the client's own disk.

Only the rows in `train_indices` of the client's image array are ever read (validation and
test rows never reach the GAN), and the result is cached per client so later rounds, other
processes and resumed runs reuse it instead of training again.

The model: a DCGAN generator (transposed convolutions, BatchNorm, ReLU, tanh) conditioned by
a label embedding concatenated to the noise, and a discriminator with spectral norm and
LeakyReLU conditioned by projection (Miyato & Koyama 2018), trained with the hinge loss. It
works at 32 px (images up to 47 px) or 64 px (larger images) and its output is resized to
the dataset's side with bilinear antialiasing. Real images are sampled class-balanced, so
rare classes get as many discriminator looks as common ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

logger = logging.getLogger(__name__)

NOISE_DIM = 64
EMBED_DIM = 32
WIDTH = 32  # channels of the widest-resolution layer; doubled at each halving
# Adam as in SNGAN (hinge loss + spectral norm): beta1 = 0 trains far less mode-collapsed
# than DCGAN's 0.5 here (per-class pixel std of samples 12.4 vs 3.5 on HAM10000 at 32 px,
# 600 steps; real images: 30.8).
LR_G, LR_D = 1e-4, 4e-4  # two time-scale update rule (TTUR): 14.8 vs 12.4 above
BETAS = (0.0, 0.9)
CHUNK = 256  # images resized (or generated) per batch: bounds memory at 224 px
# Bumped when the model or training changes, so an old cache file is never reused.
CACHE_VERSION = 1

Progress = Callable[[int, float, float], None]  # (step, discriminator loss, generator loss)


@dataclass
class SynthesisSettings:
    """What the client synthesizes. Defaults fit 2 CPU cores: 600 steps of batch 32 at 64 px
    took 1.8 minutes end to end for 2,000 images; raise `steps` on a GPU (docs/synthesis.md)."""

    method: Literal["dcgan"] = "dcgan"
    classes: Literal["minority"] | list[int] = "minority"
    per_class: int = 200
    steps: int = 600
    batch_size: int = 32


@dataclass
class Synthesized:
    """Generated train images. `seconds` is what this call took (about 0 from the cache);
    `built_seconds` is what training and generation took when the images were made."""

    images: np.ndarray  # uint8 NHWC, the dataset's side and channels
    labels: np.ndarray  # int64
    classes: list[int]
    seconds: float
    from_cache: bool
    built_seconds: float = field(default=0.0)


def minority_classes(labels: np.ndarray, num_classes: int) -> list[int]:
    """Classes present in `labels` with fewer images than the mean count of present classes.

    The mean over present classes only: a class the client lacks neither counts nor can be
    generated (the GAN has nothing of it to learn from). A perfectly balanced split has no
    minority class.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    present = counts > 0
    if not present.any():
        return []
    mean = counts[present].mean()
    return [int(c) for c in np.flatnonzero(present & (counts < mean))]


def internal_size(side: int) -> int:
    """The GAN's working side for images of side `side`: 32 up to 47 px, else 64."""
    return 32 if side < 48 else 64


class Generator(nn.Module):
    """(noise, label) -> image in [-1, 1], NCHW at `size` px."""

    def __init__(self, num_classes: int, channels: int, size: int) -> None:
        super().__init__()
        self.num_classes, self.channels, self.size = num_classes, channels, size
        ups = int(np.log2(size)) - 2  # 4 px -> size px
        width = WIDTH * 2 ** (ups - 1)
        self.embed = nn.Embedding(num_classes, EMBED_DIM)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(NOISE_DIM + EMBED_DIM, width, 4, 1, 0, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        ]
        for _ in range(ups - 1):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(width // 2), nn.ReLU(inplace=True)]
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, self.embed(y)], dim=1)
        return self.net(h[:, :, None, None])


class Discriminator(nn.Module):
    """(image, label) -> realness score; spectral norm everywhere keeps it 1-Lipschitz-ish,
    which is what makes small GANs train stably without tuning."""

    def __init__(self, num_classes: int, channels: int, size: int) -> None:
        super().__init__()
        downs = int(np.log2(size)) - 2  # size px -> 4 px
        layers: list[nn.Module] = []
        width_in, width = channels, WIDTH
        for _ in range(downs):
            layers += [spectral_norm(nn.Conv2d(width_in, width, 4, 2, 1)),
                       nn.LeakyReLU(0.2, inplace=True)]
            width_in, width = width, width * 2
        self.net = nn.Sequential(*layers)
        self.head = spectral_norm(nn.Linear(width_in, 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, width_in))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.net(x).sum(dim=(2, 3))
        return self.head(h)[:, 0] + (self.embed(y) * h).sum(dim=1)


def resize_uint8(images: np.ndarray, side: int) -> np.ndarray:
    """uint8 NHWC -> uint8 NHWC at `side` px (bilinear, antialiased), in chunks."""
    if images.shape[1] == side and images.shape[2] == side:
        return np.ascontiguousarray(images)
    out = np.empty((len(images), side, side, images.shape[3]), dtype=np.uint8)
    for start in range(0, len(images), CHUNK):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + CHUNK]))
        out[start:start + CHUNK] = _to_uint8(_resize(_to_float(x), side))
    return out


def _to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _resize(x: torch.Tensor, side: int) -> torch.Tensor:
    if x.shape[-1] == side:
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True,
                         align_corners=False)


def _balanced_sampler(labels: np.ndarray, gen: torch.Generator) -> Callable[[int], torch.Tensor]:
    """Draws row indices class-balanced: a present class uniformly, then one of its rows."""
    order = torch.from_numpy(np.argsort(labels, kind="stable"))
    counts = torch.from_numpy(np.bincount(labels))
    starts = torch.cumsum(counts, 0) - counts
    present = torch.nonzero(counts).flatten()

    def draw(n: int) -> torch.Tensor:
        cls = present[torch.randint(len(present), (n,), generator=gen)]
        offset = (torch.rand(n, generator=gen, dtype=torch.float64) * counts[cls]).long()
        return order[starts[cls] + offset]

    return draw


def train_dcgan(images: np.ndarray, labels: np.ndarray, num_classes: int, *, steps: int,
                batch_size: int, seed: int, device: str | torch.device = "cpu",
                progress: Progress | None = None, log_every: int = 100) -> Generator:
    """Train a conditional DCGAN on uint8 NHWC `images` with int `labels`; return the
    generator in eval mode.

    Deterministic given `seed` on CPU (same torch version and thread count), and it leaves
    torch's global random state as it found it. `progress(step, d_loss, g_loss)` is called
    every `log_every` steps and after the last; the same goes to the debug log.
    """
    device = torch.device(device)
    labels = np.asarray(labels, dtype=np.int64)
    size = internal_size(images.shape[1])
    real = torch.from_numpy(resize_uint8(images, size)).to(device)  # uint8: 4x less memory
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g_net = Generator(num_classes, images.shape[3], size).to(device)
        d_net = Discriminator(num_classes, images.shape[3], size).to(device)
    gen = torch.Generator().manual_seed(seed)
    draw = _balanced_sampler(labels, gen)
    opt_g = torch.optim.Adam(g_net.parameters(), lr=LR_G, betas=BETAS)
    opt_d = torch.optim.Adam(d_net.parameters(), lr=LR_D, betas=BETAS)
    y_all = torch.tensor(labels, device=device)
    for step in range(1, steps + 1):
        idx = draw(batch_size).to(device)
        x, y = _to_float(real[idx]), y_all[idx]
        z = torch.randn(batch_size, NOISE_DIM, generator=gen).to(device)
        fake = g_net(z, y)
        # Hinge loss: D pushes real scores above 1 and fake ones below -1.
        d_loss = F.relu(1 - d_net(x, y)).mean() + F.relu(1 + d_net(fake.detach(), y)).mean()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_loss = -d_net(fake, y).mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        if step % log_every == 0 or step == steps:
            logger.debug("dcgan step %d/%d: d_loss %.3f g_loss %.3f", step, steps,
                         d_loss.item(), g_loss.item())
            if progress is not None:
                progress(step, d_loss.item(), g_loss.item())
    return g_net.eval()


@torch.no_grad()
def generate(generator: Generator, counts: dict[int, int], image_size: int,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`counts[c]` images of each class c, as uint8 NHWC at `image_size` px and int64
    labels, in ascending class order. Deterministic given `seed`."""
    generator.eval()
    device = next(generator.parameters()).device
    labels = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in sorted(counts.items())]
                            + [np.empty(0, dtype=np.int64)])
    gen = torch.Generator().manual_seed(seed)
    images = np.empty((len(labels), image_size, image_size, generator.channels), dtype=np.uint8)
    for start in range(0, len(labels), CHUNK):
        y = torch.from_numpy(labels[start:start + CHUNK])
        z = torch.randn(len(y), NOISE_DIM, generator=gen)
        x = generator(z.to(device), y.to(device)).float().cpu()
        images[start:start + CHUNK] = _to_uint8(_resize(x, image_size))
    return images, labels


def choose_classes(train_labels: np.ndarray, num_classes: int,
                   classes: Literal["minority"] | Sequence[int]) -> list[int]:
    """The classes to generate: the minority ones, or the listed ones the client has.

    A listed class absent from the client's train split is skipped (logged): there is
    nothing to learn it from.
    """
    if classes == "minority":
        return minority_classes(train_labels, num_classes)
    wanted = sorted({int(c) for c in classes})
    if any(c < 0 or c >= num_classes for c in wanted):
        raise ValueError(f"synthesis classes {wanted} outside 0..{num_classes - 1}")
    present = set(np.unique(train_labels).tolist())
    skipped = [c for c in wanted if c not in present]
    if skipped:
        logger.info("synthesis: classes %s absent from this client's train split, skipped",
                    skipped)
    return [c for c in wanted if c in present]


def synthesize(images: np.ndarray, labels: np.ndarray, train_indices: np.ndarray,
               num_classes: int, settings: SynthesisSettings, seed: int,
               cache_dir: str | os.PathLike, cache_key: str, *,
               device: str | torch.device = "cpu",
               progress: Progress | None = None) -> Synthesized:
    """Generated train images for one client: `settings.per_class` images of each chosen
    class, from a GAN trained on rows `train_indices` of `images` only.

    `images` is the client's uint8 NHWC array (a memmap is fine: only train rows are read,
    in chunks). The result is cached as `<cache_dir>/<cache_key>.npz`; a file made under
    other settings, seed or train split is rebuilt, never reused.
    """
    if settings.method != "dcgan":
        raise ValueError(f"unknown synthesis method {settings.method!r}")
    if os.sep in cache_key or (os.altsep and os.altsep in cache_key):
        raise ValueError(f"cache_key must be a file name, got {cache_key!r}")
    start = time.perf_counter()
    train_indices = np.asarray(train_indices, dtype=np.int64)
    train_labels = np.asarray(labels[train_indices], dtype=np.int64)
    classes = choose_classes(train_labels, num_classes, settings.classes)
    path = Path(cache_dir) / f"{cache_key}.npz"
    fingerprint = _fingerprint(settings, classes, seed, num_classes, images.shape[1:],
                               train_indices, train_labels)
    cached = _load(path, fingerprint)
    if cached is not None:
        cached.seconds = time.perf_counter() - start
        return cached
    side, channels = images.shape[1], images.shape[3]
    out_images = np.empty((0, side, side, channels), dtype=np.uint8)
    out_labels = np.empty(0, dtype=np.int64)
    if classes and settings.per_class > 0:
        real = _read_rows(images, train_indices, internal_size(side))
        g_net = train_dcgan(real, train_labels, num_classes, steps=settings.steps,
                            batch_size=settings.batch_size, seed=seed, device=device,
                            progress=progress)
        out_images, out_labels = generate(g_net, {c: settings.per_class for c in classes},
                                          side, seed + 1)
    seconds = time.perf_counter() - start
    result = Synthesized(out_images, out_labels, classes, seconds, False, seconds)
    _save(path, result, fingerprint)
    return result


def _read_rows(images: np.ndarray, rows: np.ndarray, side: int) -> np.ndarray:
    """Rows `rows` of `images` resized to `side`, read a chunk at a time so a 224 px
    memmap is never loaded whole."""
    out = np.empty((len(rows), side, side, images.shape[3]), dtype=np.uint8)
    for start in range(0, len(rows), CHUNK):
        out[start:start + CHUNK] = resize_uint8(np.asarray(images[rows[start:start + CHUNK]]),
                                                side)
    return out


def _fingerprint(settings: SynthesisSettings, classes: list[int], seed: int, num_classes: int,
                 shape: tuple[int, ...], train_indices: np.ndarray,
                 train_labels: np.ndarray) -> str:
    meta = {"version": CACHE_VERSION, "method": settings.method, "classes": classes,
            "per_class": settings.per_class, "steps": settings.steps,
            "batch_size": settings.batch_size, "seed": seed, "num_classes": num_classes,
            "shape": list(shape)}
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    digest.update(train_indices.tobytes())
    digest.update(train_labels.tobytes())
    return digest.hexdigest()


def _load(path: Path, fingerprint: str) -> Synthesized | None:
    """The cached result at `path` if it was made from the same inputs, else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["fingerprint"]) != fingerprint:
                logger.info("synthesis cache %s was made under other settings: rebuilding",
                            path)
                return None
            return Synthesized(data["images"], data["labels"].astype(np.int64),
                               [int(c) for c in data["classes"]], 0.0, True,
                               float(data["built_seconds"]))
    except (OSError, ValueError, KeyError) as err:  # a torn or foreign file: rebuild it
        logger.warning("synthesis cache %s unreadable (%s): rebuilding", path, err)
        return None


def _save(path: Path, result: Synthesized, fingerprint: str) -> None:
    """Write atomically (tmp file + os.replace): a crash never leaves a half file that a
    resumed run would load."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=result.images, labels=result.labels,
                     classes=np.asarray(result.classes, dtype=np.int64),
                     built_seconds=result.built_seconds, fingerprint=fingerprint)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def sample_grid(images: np.ndarray, labels: np.ndarray, per_row: int = 8,
                pad: int = 2) -> np.ndarray:
    """A uint8 HWC grid for TensorBoard: one row per class (ascending), its first `per_row`
    images; short rows are left black. Channels are those of `images`."""
    classes = sorted(set(labels.tolist()))
    side, channels = images.shape[1], images.shape[3]
    cell = side + pad
    grid = np.zeros((pad + len(classes) * cell, pad + per_row * cell, channels), dtype=np.uint8)
    for row, c in enumerate(classes):
        for col, image in enumerate(images[labels == c][:per_row]):
            top, left = pad + row * cell, pad + col * cell
            grid[top:top + side, left:left + side] = image
    return grid
