"""Shared fixtures: where the real HAM10000 copy is, a per-test cache folder, and small
HAM10000-shaped folders made on the fly for the tests that need to break things."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
HAM_ROOT = REPO_ROOT.parent / "shared" / "data" / "HAM10000-200x150"
HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
HAM_SITES = ["rosendahl", "vidir_modern", "vidir_molemax", "vienna_dias"]


@pytest.fixture(scope="session")
def ham_root() -> Path:
    """The real HAM10000 copy at ../shared/data/HAM10000-200x150 (from the repo root)."""
    if not (HAM_ROOT / "HAM10000_metadata.csv").is_file():
        pytest.skip(
            f"HAM10000 copy not found at {HAM_ROOT} (expected ../shared/data/HAM10000-200x150 "
            "beside the repository)"
        )
    return HAM_ROOT


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """An empty decoded-image cache folder for one test."""
    return tmp_path


@pytest.fixture(scope="session")
def ham_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the whole session, so the real HAM10000 is decoded only once
    per image size (the tests that use it build it at 32 px)."""
    return tmp_path_factory.mktemp("ham-cache")


def write_fake_ham(
    root: Path, n_lesions: int = 42, layout: str = "parts", seed: int = 0
) -> pd.DataFrame:
    """A HAM10000-shaped folder: metadata CSV plus small JPEGs, one colour per class.

    layout "parts": HAM10000_images_part_1/ and _part_2/; "flat": one HAM10000_images/ folder.
    Lesions cycle through the 7 classes and 4 sites; every third lesion has two images.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for j in range(n_lesions):
        for _ in range(2 if j % 3 == 0 else 1):
            rows.append(
                {
                    "lesion_id": f"HAM_{j:07d}",
                    "image_id": f"ISIC_{9000000 + len(rows):07d}",
                    "dx": HAM_CLASSES[j % 7],
                    "dx_type": "histo",
                    "age": 50.0,
                    "sex": "female",
                    "localization": "back",
                    "dataset": HAM_SITES[j % 4],
                }
            )
    meta = pd.DataFrame(rows)
    root.mkdir(parents=True, exist_ok=True)
    meta.to_csv(root / "HAM10000_metadata.csv", index=False)
    half = len(meta) // 2
    for i, row in meta.iterrows():
        if layout == "flat":
            folder = root / "HAM10000_images"
        else:
            folder = root / ("HAM10000_images_part_1" if i < half else "HAM10000_images_part_2")
        folder.mkdir(exist_ok=True)
        colour = np.array([40 + 30 * HAM_CLASSES.index(row["dx"]), 120, 200 - 20 * (i % 5)])
        pixels = np.clip(colour + rng.normal(0, 8, (30, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{row['image_id']}.jpg", quality=90)
    return meta


@pytest.fixture
def fake_ham(tmp_path: Path) -> Callable[..., Path]:
    """Factory: fake_ham(layout="parts", n_lesions=42) -> root of a fresh fake HAM10000."""

    def make(layout: str = "parts", n_lesions: int = 42, name: str = "ham") -> Path:
        root = tmp_path / name
        write_fake_ham(root, n_lesions=n_lesions, layout=layout)
        return root

    return make
