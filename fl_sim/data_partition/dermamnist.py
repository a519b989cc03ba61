"""DermaMNIST (MedMNIST v2/v3): HAM10000 pre-resized to 28, 64, 128 or 224 px, in one npz.

    <root>/dermamnist.npz          28 px   (medmnist's names; `root` may also be the file itself)
    <root>/dermamnist_{size}.npz   64, 128, 224 px
    keys: train_images (n, s, s, 3) uint8, train_labels (n, 1), and the same for val and test

When the file is absent and the `medmnist` package is installed, it is downloaded into
`root` (default ~/.medmnist, medmnist's own). The npz carries no lesion ids, so each image is
its own lesion: medmnist's official split was made by image, and images of one lesion can sit
in both its train and test splits (a leak of medmnist's, not fixable here). The official test
split is the global test set; clients are partitioned from train + val.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from fl_sim.config import DataConfig
from fl_sim.data_partition.cache import Resize, digest, file_identity, resize_image
from fl_sim.data_partition.ham10000 import CLASSES, UNKNOWN_SITE
from fl_sim.errors import FlSimError

SPLITS = ("train", "val", "test")
DEFAULT_ROOT = Path("~/.medmnist")


def npz_name(size: int) -> str:
    return "dermamnist.npz" if size == 28 else f"dermamnist_{size}.npz"


def find_npz(root: Path | None, size: int) -> Path:
    """The local npz for `size`, downloaded through medmnist first when absent and possible."""
    root = Path(root or DEFAULT_ROOT).expanduser().resolve()
    if root.suffix == ".npz":
        if root.is_file():
            return root
        root, wanted = root.parent, root.name
    else:
        wanted = npz_name(size)
    path = root / wanted
    if path.is_file():
        return path
    how = (
        f"Download {npz_name(size)} from MedMNIST's Zenodo record (https://zenodo.org/records/"
        f"10519652) into {root}, or set data.root to the folder or file that holds it."
    )
    try:
        import medmnist
    except ImportError:
        raise FlSimError(
            f"DermaMNIST file not found: {path}, and the medmnist package that could download "
            f"it is not installed (pip install medmnist). {how}"
        ) from None
    root.mkdir(parents=True, exist_ok=True)
    try:
        medmnist.DermaMNIST(split="train", download=True, root=str(root), size=size)
    except Exception as err:  # medmnist wraps every download failure in a bare RuntimeError
        raise FlSimError(
            f"DermaMNIST file not found: {path}, and medmnist could not download it "
            f"({str(err).strip().splitlines()[0]}). {how}"
        ) from None
    if not path.is_file():
        raise FlSimError(f"medmnist reported a download but {path} does not exist. {how}")
    return path


def load_table(cfg: DataConfig) -> pd.DataFrame:
    """One row per image of the three official splits; test rows are the official test set."""
    path = find_npz(cfg.root, cfg.dermamnist_size)
    parts = []
    with _open_npz(path) as npz:
        for split in SPLITS:
            _require(npz, path, f"{split}_labels")
            labels = npz[f"{split}_labels"]
            if labels.ndim not in (1, 2) or labels.reshape(len(labels), -1).shape[1] != 1:
                raise FlSimError(
                    f"{path}: '{split}_labels' has shape {labels.shape}, expected (n, 1) class "
                    "indices as medmnist writes them. Use the npz of the MedMNIST release."
                )
            labels = labels.reshape(-1).astype(np.int64)
            bad = (labels < 0) | (labels >= len(CLASSES))
            if bad.any():
                raise FlSimError(
                    f"{path}: '{split}_labels' holds the unknown label {labels[bad][0]} "
                    f"(DermaMNIST's are 0..{len(CLASSES) - 1} = {', '.join(CLASSES)}). Use the "
                    "npz of the MedMNIST release."
                )
            _check_images(npz, path, split, len(labels))
            ids = [f"dermamnist_{split}_{i:05d}" for i in range(len(labels))]
            parts.append(
                pd.DataFrame(
                    {
                        "image_id": ids,
                        "lesion_id": ids,
                        "label": np.asarray(CLASSES)[labels],
                        "site": UNKNOWN_SITE,
                        "official_test": split == "test",
                        "npz": str(path),
                        "npz_split": split,
                        "npz_row": np.arange(len(labels)),
                    }
                )
            )
    return pd.concat(parts, ignore_index=True)


def identity(table: pd.DataFrame) -> dict[str, Any]:
    """The npz file (path, size, mtime) and which of its rows, in order."""
    return {
        "files": file_identity(sorted(set(table["npz"]))),
        "rows": digest(table["image_id"]),
    }


def iter_images(table: pd.DataFrame, size: int, resize: Resize) -> Iterator[np.ndarray]:
    """The selected npz rows, resized when the cache size differs from the npz size."""
    path = Path(table["npz"].iloc[0])
    with _open_npz(path) as npz:
        arrays: dict[str, np.ndarray] = {}
        for split, row in zip(table["npz_split"], table["npz_row"], strict=True):
            if split not in arrays:
                arrays[split] = npz[f"{split}_images"]
            img = arrays[split][row]
            if img.shape[0] == img.shape[1] == size:
                yield img
            else:
                yield resize_image(Image.fromarray(img), size, resize)


def _open_npz(path: Path) -> Any:
    try:
        return np.load(path)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise FlSimError(
            f"Cannot read {path} as an npz file: {err}. Delete it and download it again."
        ) from None


def _require(npz: Any, path: Path, key: str) -> None:
    if key not in npz.files:
        raise FlSimError(
            f"{path} has no array '{key}' (it has: {', '.join(npz.files)}). A DermaMNIST npz "
            "holds train/val/test _images and _labels: use the npz of the MedMNIST release."
        )


def _check_images(npz: Any, path: Path, split: str, n: int) -> None:
    """Shape and dtype from the .npy header, without loading the array."""
    key = f"{split}_images"
    _require(npz, path, key)
    with npz.zip.open(f"{key}.npy") as fh:
        version = np.lib.format.read_magic(fh)
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read(fh)
    if (
        len(shape) != 4
        or shape[0] != n
        or shape[1] != shape[2]
        or shape[3] != 3
        or dtype != np.uint8
    ):
        raise FlSimError(
            f"{path}: '{key}' has shape {shape} ({dtype}), expected ({n}, s, s, 3) uint8 RGB "
            f"images, one per row of '{split}_labels'. Use the npz of the MedMNIST release."
        )
