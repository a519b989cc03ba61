"""A synthetic dataset in HAM10000's schema: procedurally drawn lesion-like images.

The offline default (quickstart, fast tests); it is only ever used when a config names it.
Same schema as HAM10000: the 7 dx codes and names, lesion ids (30% of lesions photographed
2-3 times, each shot slightly moved, turned, lit and noised), and 4 acquisition sites with
different label mixes and looks (skin tone, light, vignetting, hairs). The class decides the
lesion's size, outline, colours and texture, loosely after the real dermoscopic signs, so a
small CNN learns it at 32-64 px; the class mix (majority nv ~30%) is milder than HAM's 67%.

Everything is a function of (SEED, lesion number, shot): the same table and pixels on every
machine, and any subset of rows can be drawn alone. Images are drawn at the cache size
directly (no JPEGs).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from fl_sim.config import DataConfig
from fl_sim.data_partition.cache import Resize, digest
from fl_sim.data_partition.ham10000 import CLASSES

VERSION = 1  # bump when the drawing changes: it is part of the cache key
SEED = 0  # one fixed dataset; the partition seed varies the split, not the images

SITES = ("site_a", "site_b", "site_c", "site_d")
SITE_SHARE = np.array([0.35, 0.30, 0.20, 0.15])
# P(label | site), columns in CLASSES order: akiec bcc bkl df mel nv vasc.
SITE_LABEL_MIX = np.array(
    [
        [0.04, 0.05, 0.10, 0.06, 0.12, 0.55, 0.08],  # a: a mole clinic, mostly nevi
        [0.08, 0.10, 0.22, 0.08, 0.24, 0.20, 0.08],  # b: pigmented-lesion referrals
        [0.20, 0.22, 0.14, 0.10, 0.12, 0.12, 0.10],  # c: non-melanoma skin cancer clinic
        [0.14, 0.14, 0.14, 0.14, 0.16, 0.14, 0.14],  # d: a balanced study cohort
    ]
)
SHOTS, SHOT_P = np.array([1, 2, 3]), np.array([0.7, 0.2, 0.1])

# Per site: skin RGB, light gain, vignetting strength, expected number of hairs.
SITE_LOOK = [
    ((226, 184, 164), 1.00, 0.0, 0.5),
    ((206, 158, 128), 0.92, 0.5, 1.5),
    ((236, 200, 182), 1.06, 0.2, 0.2),
    ((190, 146, 116), 0.95, 0.8, 1.0),
]

# Per class: radius range, outline irregularity, edge softness, base RGB.
CLASS_LOOK = {
    "akiec": ((0.40, 0.65), 0.12, 0.10, (190, 100, 90)),
    "bcc": ((0.35, 0.55), 0.06, 0.04, (215, 150, 150)),
    "bkl": ((0.40, 0.70), 0.10, 0.02, (165, 120, 75)),
    "df": ((0.25, 0.40), 0.05, 0.05, (150, 100, 70)),
    "mel": ((0.50, 0.80), 0.20, 0.04, (95, 58, 40)),
    "nv": ((0.35, 0.60), 0.05, 0.04, (135, 88, 60)),
    "vasc": ((0.30, 0.50), 0.06, 0.02, (150, 50, 75)),
}


def load_table(cfg: DataConfig) -> pd.DataFrame:
    return make_table(cfg.synthetic.num_images)


def make_table(num_images: int, seed: int = SEED) -> pd.DataFrame:
    """Lesions drawn one by one (site, label given the site, shots) until num_images images."""
    rng = np.random.default_rng(seed)
    n = num_images  # never more lesions than images
    site = rng.choice(len(SITES), size=n, p=SITE_SHARE)
    label = (rng.random((n, 1)) > SITE_LABEL_MIX.cumsum(axis=1)[site]).sum(axis=1)
    shots = rng.choice(SHOTS, size=n, p=SHOT_P)
    lesion_no = np.repeat(np.arange(n), shots)[:num_images]
    shot = np.concatenate([np.arange(k) for k in shots])[:num_images]
    return pd.DataFrame(
        {
            "image_id": [f"SYN_{i:07d}" for i in range(num_images)],
            "lesion_id": [f"SYNL_{j:07d}" for j in lesion_no],
            "label": np.asarray(CLASSES)[label[lesion_no]],
            "site": np.asarray(SITES)[site[lesion_no]],
            "official_test": False,
            "lesion_no": lesion_no,
            "shot": shot,
        }
    )


def identity(table: pd.DataFrame) -> dict[str, Any]:
    return {
        "generator": VERSION,
        "seed": SEED,
        "rows": digest(f"{r.lesion_no}:{r.shot}:{r.label}:{r.site}" for r in table.itertuples()),
    }


def iter_images(table: pd.DataFrame, size: int, resize: Resize) -> Iterator[np.ndarray]:
    """Drawn at `size` directly; `resize` does not apply (the images are square already)."""
    for row in table.itertuples():
        yield draw(int(row.lesion_no), int(row.shot), row.label, SITES.index(row.site), size)


def draw(
    lesion_no: int, shot: int, label: str, site: int, size: int, seed: int = SEED
) -> np.ndarray:
    """One (size, size, 3) uint8 image: skin background, the lesion, hairs, noise."""
    look = np.random.default_rng([seed, lesion_no])  # the lesion itself: same in every shot
    take = np.random.default_rng([seed, lesion_no, shot + 1])  # this photograph
    (r_lo, r_hi), irregular, edge, base = CLASS_LOOK[label]
    skin, gain, vignette, hairs = SITE_LOOK[site]

    axis = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(axis, axis, indexing="ij")

    # Skin: site tone jittered per lesion, a smooth light gradient, optional vignetting.
    rgb = np.empty((size, size, 3))
    rgb[:] = np.asarray(skin) * (1 + look.normal(0, 0.05, 3))
    rgb *= (1 + 0.08 * (take.normal() * x + take.normal() * y))[..., None]
    rgb *= (1 - vignette * np.clip(np.hypot(x, y) - 0.8, 0, None))[..., None]

    # The lesion's outline: a radius that wobbles with angle (harmonics fixed per lesion),
    # centred near the middle; each shot shifts, turns and rescales it a little.
    radius = look.uniform(r_lo, r_hi) * (1 + take.normal(0, 0.05))
    cx, cy = take.normal(0, 0.08, 2)
    turn = take.uniform(0, 2 * np.pi)
    dx, dy = x - cx, y - cy
    r = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx) + turn
    k = np.arange(1, 6)
    amp = irregular * look.uniform(0.3, 1.0, 5) / k**0.5
    phase = look.uniform(0, 2 * np.pi, 5)
    outline = radius * (
        1 + (amp[:, None, None] * np.cos(k[:, None, None] * theta + phase[:, None, None])).sum(0)
    )
    inside = 1 / (1 + np.exp(-(outline - r) / max(edge, 1.5 / size)))
    rel = r / np.maximum(outline, 1e-6)  # 0 at the centre, 1 on the border

    colour = np.asarray(base) * (1 + look.normal(0, 0.10, 3))
    strength = look.uniform(0.3, 1.0)  # how clearly this lesion shows its class's signs
    lesion = np.empty_like(rgb)
    lesion[:] = colour
    opacity = np.full((size, size), 0.95)
    blotch = _smooth_noise(look, size, 4)
    if label == "akiec":  # rough red scaly patch: mottled, with white scale flecks
        lesion *= (1 + 0.25 * (_smooth_noise(take, size, max(size // 4, 2)) - 0.5))[..., None]
        flecks = take.random((size, size)) < 0.1 * strength
        lesion[flecks] = (235, 225, 215)
        opacity *= 0.85
    elif label == "bcc":  # pearly translucent nodule crossed by thin red vessels
        opacity *= 0.75
        for _ in range(look.integers(2, 5)):
            a, b = look.uniform(-1, 1, (2, 2)) * radius * 0.8
            vessel = _segment(x, y, a + (cx, cy), b + (cx, cy), 1.2 / size + 0.01)
            vessel *= strength
            lesion = lesion * (1 - vessel[..., None]) + np.array([170, 30, 40]) * vessel[..., None]
    elif label == "bkl":  # stuck-on waxy plaque with dark comedo-like dots and pale crypts
        dots = _smooth_noise(look, size, max(size // 3, 2))
        lesion[dots > 1 - 0.3 * strength] *= 0.55
        crypts = dots < 0.3 * strength
        lesion[crypts] = lesion[crypts] * 0.5 + np.array([230, 210, 170]) * 0.5
    elif label == "df":  # firm brown ring around a white scar-like centre
        centre = strength / (1 + np.exp(-(0.45 - rel) / 0.08))
        lesion = lesion * (1 - centre[..., None]) + np.array([238, 228, 220]) * centre[..., None]
    elif label == "mel":  # asymmetric, variegated: black and blue-grey zones in dark brown
        lesion[blotch > 1 - 0.4 * strength] = (30, 22, 24)
        lesion[blotch < 0.35 * strength] = (104, 112, 140)
        lesion *= (1 + 0.3 * (rel - 0.5))[..., None]
    elif label == "nv":  # symmetric, evenly brown, a little darker in the middle
        lesion *= (0.85 + 0.2 * np.clip(rel, 0, 1))[..., None]
    else:  # vasc: a cluster of red-purple lagoons on pale skin
        inside[:] = 0
        for _ in range(look.integers(3, 7)):
            ox, oy = look.normal(0, radius * 0.45, 2)
            lobe_r = radius * look.uniform(0.3, 0.5)
            lobe = 1 / (1 + np.exp(-(lobe_r - np.hypot(dx - ox, dy - oy)) / max(edge, 1.5 / size)))
            inside = np.maximum(inside, lobe)
        lesion *= (0.8 + 0.4 * blotch)[..., None]
    alpha = (inside * opacity)[..., None]
    rgb = rgb * (1 - alpha) + lesion * alpha

    # Hairs: dark thin lines across the field, more at some sites.
    for _ in range(take.poisson(hairs)):
        a, b = take.uniform(-1.2, 1.2, (2, 2))
        hair = _segment(x, y, a, b, 1.0 / size + 0.004)
        rgb = rgb * (1 - 0.8 * hair[..., None]) + 40 * 0.8 * hair[..., None]

    rgb = rgb * gain * (1 + take.normal(0, 0.04)) + take.normal(0, 6, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Values in [0, 1] varying smoothly over about `cells` blobs across the image."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC))


def _segment(
    x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray, width: float
) -> np.ndarray:
    """Soft mask (0..1) of the line segment a-b of the given half-width."""
    d = np.asarray(b) - np.asarray(a)
    t = np.clip(((x - a[0]) * d[0] + (y - a[1]) * d[1]) / max(float(d @ d), 1e-9), 0, 1)
    dist = np.hypot(x - (a[0] + t * d[0]), y - (a[1] + t * d[1]))
    return np.clip(1 - dist / width, 0, 1)
