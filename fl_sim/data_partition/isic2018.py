"""The official ISIC 2018 Task 3 test set (1,512 images) as the server's global test set.

    <root>/ISIC2018_Task3_Test_GroundTruth.csv   image, MEL, NV, BCC, AKIEC, BKL, DF, VASC (one-hot)
    <root>/ISIC2018_Task3_Test_Input/            ISIC_*.jpg (or the images flat in <root>)

The CSV may also sit one folder down, as the official zip extracts it. The test images come
from lesions that are not in HAM10000 and carry no lesion id: each image is its own lesion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fl_sim.data_partition import ham10000
from fl_sim.errors import FlSimError

GROUND_TRUTH_CSV = "ISIC2018_Task3_Test_GroundTruth.csv"
ONE_HOT_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
SITE = "isic2018_test"


def find_ground_truth(root: Path) -> Path:
    """The ground-truth CSV in `root` or one of its direct subfolders."""
    root = Path(root).expanduser()
    candidates = [root / GROUND_TRUTH_CSV]
    if root.is_dir():
        candidates += sorted(p / GROUND_TRUTH_CSV for p in root.iterdir() if p.is_dir())
    for csv in candidates:
        if csv.is_file():
            return csv
    raise FlSimError(
        f"ISIC 2018 Task 3 ground truth not found: no {GROUND_TRUTH_CSV} in {root} or its "
        "subfolders. Set data.global_test.root to the folder holding that CSV and the test "
        "images (docs/data.md says where to get them), or use global_test.source: holdout."
    )


def read_ground_truth(csv: Path) -> pd.DataFrame:
    """image_id and label (HAM10000 code) per row of the one-hot ground-truth CSV."""
    frame = ham10000.read_csv(csv)
    ham10000.require_columns(frame, ("image", *ONE_HOT_COLUMNS), csv, "ISIC 2018 ground truth")
    try:
        onehot = frame[list(ONE_HOT_COLUMNS)].astype(float).to_numpy()
    except ValueError as err:
        raise FlSimError(
            f"{csv} has a non-numeric value in its class columns ({err}). Use the CSV of the "
            "official release."
        ) from None
    bad = np.flatnonzero((onehot == 1).sum(axis=1) != 1)
    if len(bad):
        row = int(bad[0])
        raise FlSimError(
            f"{csv} line {row + 2} (image {frame['image'].iloc[row]}) does not mark exactly one "
            f"class with 1.0 in {', '.join(ONE_HOT_COLUMNS)}. Use the CSV of the official release."
        )
    codes = np.array([c.lower() for c in ONE_HOT_COLUMNS])[onehot.argmax(axis=1)]
    return pd.DataFrame({"image_id": frame["image"], "label": codes})


def load_table(root: Path) -> pd.DataFrame:
    """The test images as table rows (all of them official_test), with their file paths."""
    root = Path(root).expanduser().resolve()
    csv = find_ground_truth(root)
    truth = read_ground_truth(csv)
    return pd.DataFrame(
        {
            "image_id": truth["image_id"],
            "lesion_id": truth["image_id"],
            "label": truth["label"],
            "site": SITE,
            "official_test": True,
            "path": ham10000.locate_images(root, truth["image_id"].tolist(), csv),
        }
    )
