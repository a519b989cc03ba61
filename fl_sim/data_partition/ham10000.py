"""HAM10000 from a local copy in the public layout (Harvard Dataverse, ISIC archive, Kaggle).

    <root>/HAM10000_metadata.csv       lesion_id, image_id, dx, ... dataset
    <root>/HAM10000_images_part_1/     ISIC_*.jpg
    <root>/HAM10000_images_part_2/     ISIC_*.jpg
or the same images in one flat folder (<root>/ itself or any one subfolder of it).

Every dataset module has the same three functions: `load_table` (one row per image:
image_id, lesion_id, label, site, official_test, plus what `iter_images` needs), `identity`
(what keys the decoded-image cache) and `iter_images` (the decoded images in table order).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fl_sim.config import DataConfig
from fl_sim.data_partition.cache import Resize, decode_files, file_identity
from fl_sim.errors import FlSimError

# HAM10000's dx codes, in the order of label indices everywhere in fl-sim (and in DermaMNIST).
CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
CLASS_NAMES = [
    "actinic keratosis",
    "basal cell carcinoma",
    "benign keratosis",
    "dermatofibroma",
    "melanoma",
    "melanocytic nevus",
    "vascular lesion",
]
UNKNOWN_SITE = "unknown"

METADATA_CSV = "HAM10000_metadata.csv"
REQUIRED_COLUMNS = ("image_id", "lesion_id", "dx")
SITE_COLUMN = "dataset"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def load_table(cfg: DataConfig) -> pd.DataFrame:
    """One row per image of the metadata, each with the path of its image file."""
    assert cfg.root is not None  # DataConfig requires it for ham10000
    root = Path(cfg.root).expanduser().resolve()  # one spelling per folder: one cache key
    csv = root / METADATA_CSV
    if not csv.is_file():
        raise FlSimError(
            f"HAM10000 metadata not found: {csv}. Set data.root to the folder that holds "
            f"{METADATA_CSV} and the images (HAM10000_images_part_1/ and _part_2/, or one flat "
            "folder); docs/data.md says where to get HAM10000."
        )
    meta = read_csv(csv)
    require_columns(meta, REQUIRED_COLUMNS, csv, "HAM10000's metadata")
    labels = meta["dx"].str.strip().str.lower()
    check_labels(labels, meta["image_id"], csv, "dx")
    duplicated = meta["image_id"][meta["image_id"].duplicated()]
    if len(duplicated):
        raise FlSimError(
            f"{csv} lists image_id '{duplicated.iloc[0]}' more than once ({len(duplicated)} "
            "duplicate rows). Each image must appear once: remove the duplicates."
        )
    sites = meta[SITE_COLUMN].fillna(UNKNOWN_SITE) if SITE_COLUMN in meta else UNKNOWN_SITE
    return pd.DataFrame(
        {
            "image_id": meta["image_id"],
            "lesion_id": meta["lesion_id"],
            "label": labels,
            "site": sites,
            "official_test": False,
            "path": locate_images(root, meta["image_id"].tolist(), csv),
        }
    )


def identity(table: pd.DataFrame) -> dict[str, Any]:
    """Each image file's path, size and mtime: a replaced or edited file makes a new cache."""
    return {"files": file_identity(table["path"])}


def iter_images(table: pd.DataFrame, size: int, resize: Resize) -> Iterator[np.ndarray]:
    return decode_files(table["path"], size, resize)


# ------------------------------------------------------------------ shared with isic2018


def read_csv(csv: Path) -> pd.DataFrame:
    """A metadata CSV with every column as text (ids such as 'HAM_0000118' stay as written)."""
    try:
        frame = pd.read_csv(csv, dtype=str)
    except UnicodeDecodeError:
        raise FlSimError(_not_utf8(csv)) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise FlSimError(
            f"Cannot parse {csv} as CSV: {err}. Replace it with the file of the public release."
        ) from None
    if frame.empty:
        raise FlSimError(
            f"{csv} holds a header but no rows, so there is no image to use. Replace it with "
            "the file of the public release."
        )
    return frame


def _not_utf8(csv: Path) -> str:
    """Where the text stops being UTF-8, by line: pandas' offset counts from its read buffer."""
    where = ""
    for number, line in enumerate(csv.read_bytes().split(b"\n"), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as err:
            byte = line[err.start]
            where = f": line {number}, byte {err.start + 1} is #x{byte:02x} ({err.reason})"
            break
    return (
        f"{csv} is not UTF-8 text{where}. Was it saved as Latin-1 or Windows-1252? Save it as "
        "UTF-8, or replace it with the file of the public release."
    )


def require_columns(frame: pd.DataFrame, columns: Sequence[str], csv: Path, what: str) -> None:
    """Every column present and no empty cell in them, or an error naming the first culprit."""
    for col in columns:
        if col not in frame.columns:
            raise FlSimError(
                f"{csv} has no column '{col}' (columns found: "
                f"{', '.join(map(str, frame.columns))}). "
                f"{what} needs the columns {', '.join(columns)}: use the file of the public "
                "release, or rename the column that holds this information."
            )
        empty = frame[col].isna() | (frame[col].str.strip() == "")
        if empty.any():
            line = int(np.flatnonzero(empty.to_numpy())[0]) + 2  # header is line 1
            raise FlSimError(
                f"{csv} has {int(empty.sum())} empty value(s) in column '{col}', the first on "
                f"line {line}. Fill them in or remove those rows."
            )


def check_labels(labels: pd.Series, image_ids: pd.Series, csv: Path, column: str) -> None:
    unknown = ~labels.isin(CLASSES)
    if unknown.any():
        value = labels[unknown].iloc[0]
        raise FlSimError(
            f"{csv} has an unknown label '{value}' in column '{column}' "
            f"({int((labels == value).sum())} row(s), the first for image "
            f"{image_ids[unknown].iloc[0]}). Known labels: {', '.join(CLASSES)}. Correct or "
            "remove those rows."
        )


def locate_images(root: Path, image_ids: list[str], listed_in: Path) -> list[str]:
    """The file of each image id, searched in `root` and each of its direct subfolders.

    That covers the two-part public layout, one flat folder, and ISIC 2018's
    ISIC2018_Task3_Test_Input/. When an id is in two folders (Kaggle's copy ships both
    HAM10000_images_part_1 and ham10000_images_part_1) the first in sorted order wins.
    """
    folders = [root, *sorted(p for p in root.iterdir() if p.is_dir())]
    found: dict[str, str] = {}
    for folder in folders:
        with os.scandir(folder) as entries:
            for entry in entries:
                stem, suffix = os.path.splitext(entry.name)
                if suffix.lower() in IMAGE_SUFFIXES and stem not in found and entry.is_file():
                    found[stem] = entry.path
    missing = [i for i in image_ids if i not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        looked = ", ".join(str(f) for f in folders[:4]) + (", ..." if len(folders) > 4 else "")
        raise FlSimError(
            f"Image '{missing[0]}'{more} listed in {listed_in} was not found: no "
            f"{missing[0]}.jpg (or .jpeg/.png) in {looked}. Put the image files in {root} (the "
            "public two-part layout or one flat folder), or remove their rows from "
            f"{listed_in.name}."
        )
    return [found[i] for i in image_ids]
