"""HAM10000 loading: both public layouts, labels and names, and each bad input's message."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fl_sim.config import DataConfig
from fl_sim.data_partition import CLASS_NAMES, CLASSES, prepare_data
from fl_sim.data_partition.ham10000 import load_table
from fl_sim.errors import FlSimError


def cfg_for(root: Path, cache_dir: Path, **kw: object) -> DataConfig:
    return DataConfig(dataset="ham10000", root=root, cache_dir=cache_dir, image_size=16, **kw)


def test_real_metadata_and_labels(ham_root: Path, cache_dir: Path) -> None:
    table = load_table(cfg_for(ham_root, cache_dir))
    assert len(table) == 10015 and table["lesion_id"].nunique() == 7470
    assert table["label"].value_counts().to_dict() == {
        "nv": 6705,
        "mel": 1113,
        "bkl": 1099,
        "bcc": 514,
        "akiec": 327,
        "vasc": 142,
        "df": 115,
    }
    assert table["site"].value_counts().to_dict() == {
        "vidir_molemax": 3954,
        "vidir_modern": 3363,
        "rosendahl": 2259,
        "vienna_dias": 439,
    }
    parts = table["path"].map(lambda p: Path(p).parent.name).value_counts().to_dict()
    assert parts == {"HAM10000_images_part_1": 5000, "HAM10000_images_part_2": 5015}
    assert CLASSES == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert CLASS_NAMES == [
        "actinic keratosis",
        "basal cell carcinoma",
        "benign keratosis",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevus",
        "vascular lesion",
    ]


@pytest.mark.parametrize("layout", ["parts", "flat"])
def test_both_layouts_load_the_same(
    fake_ham: Callable[..., Path], cache_dir: Path, layout: str
) -> None:
    root = fake_ham(layout=layout)
    data = prepare_data(cfg_for(root, cache_dir, global_test={"fraction": 0.2}), progress=False)
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    assert data.manifest["image_id"].tolist() == meta["image_id"].tolist()
    assert (np.asarray(CLASSES)[data.labels] == meta["dx"].to_numpy()).all()
    assert data.images.shape == (len(meta), 16, 16, 3)
    # The fake images' red channel encodes the class: decoded pixels must follow the labels.
    red = data.images[:, :, :, 0].mean(axis=(1, 2))
    assert np.corrcoef(red, data.labels)[0, 1] > 0.99


# ----------------------------------------------------------------------------- bad input


def test_missing_metadata_file(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises(
        FlSimError,
        match=re.escape(
            f"HAM10000 metadata not found: {tmp_path}/HAM10000_metadata.csv. Set data.root"
        ),
    ):
        prepare_data(cfg_for(tmp_path, cache_dir), progress=False)


@pytest.mark.parametrize("column", ["image_id", "lesion_id", "dx"])
def test_missing_column(fake_ham: Callable[..., Path], cache_dir: Path, column: str) -> None:
    root = fake_ham()
    csv = root / "HAM10000_metadata.csv"
    pd.read_csv(csv).drop(columns=column).to_csv(csv, index=False)
    with pytest.raises(
        FlSimError,
        match=rf"{re.escape(str(csv))} has no column '{column}' \(columns found: .*"
        r"needs the columns image_id, lesion_id, dx",
    ):
        prepare_data(cfg_for(root, cache_dir), progress=False)


def test_empty_value(fake_ham: Callable[..., Path], cache_dir: Path) -> None:
    root = fake_ham()
    csv = root / "HAM10000_metadata.csv"
    meta = pd.read_csv(csv)
    meta.loc[4, "lesion_id"] = None
    meta.to_csv(csv, index=False)
    with pytest.raises(
        FlSimError,
        match=r"1 empty value\(s\) in column 'lesion_id', the first on line 6\. Fill them in",
    ):
        prepare_data(cfg_for(root, cache_dir), progress=False)


def test_unknown_label(fake_ham: Callable[..., Path], cache_dir: Path) -> None:
    root = fake_ham()
    csv = root / "HAM10000_metadata.csv"
    meta = pd.read_csv(csv)
    meta.loc[[3, 7], "dx"] = "scc"
    meta.to_csv(csv, index=False)
    first = meta.loc[3, "image_id"]
    with pytest.raises(
        FlSimError,
        match=rf"{re.escape(str(csv))} has an unknown label 'scc' in column 'dx' \(2 row\(s\), "
        rf"the first for image {first}\)\. Known labels: akiec, bcc, bkl, df, mel, nv, vasc",
    ):
        prepare_data(cfg_for(root, cache_dir), progress=False)


def test_missing_image(fake_ham: Callable[..., Path], cache_dir: Path) -> None:
    root = fake_ham()
    gone = sorted((root / "HAM10000_images_part_2").glob("*.jpg"))
    for path in gone[:3]:
        path.unlink()
    with pytest.raises(
        FlSimError,
        match=re.escape(
            f"Image '{gone[0].stem}' (and 2 more) listed in {root}/HAM10000_metadata.csv was not "
            f"found: no {gone[0].stem}.jpg (or .jpeg/.png) in {root}, "
            f"{root}/HAM10000_images_part_1, {root}/HAM10000_images_part_2. Put the image files"
        ),
    ):
        prepare_data(cfg_for(root, cache_dir), progress=False)


def test_unreadable_image(fake_ham: Callable[..., Path], cache_dir: Path) -> None:
    root = fake_ham()
    bad = sorted((root / "HAM10000_images_part_1").glob("*.jpg"))[5]
    bad.write_bytes(b"this is not a JPEG")
    with pytest.raises(
        FlSimError,
        match=rf"Cannot read image {re.escape(str(bad))}: .*replace it with a fresh copy",
    ):
        prepare_data(cfg_for(root, cache_dir), progress=False)
    assert list(cache_dir.glob("*.npy")) == []  # no half-built cache left behind
    assert list(cache_dir.glob("*.tmp*")) == []


def test_duplicated_image_id(fake_ham: Callable[..., Path], cache_dir: Path) -> None:
    root = fake_ham()
    csv = root / "HAM10000_metadata.csv"
    meta = pd.read_csv(csv)
    pd.concat([meta, meta.iloc[[2]]]).to_csv(csv, index=False)
    with pytest.raises(
        FlSimError, match=rf"lists image_id '{meta.loc[2, 'image_id']}' more than once"
    ):
        prepare_data(cfg_for(root, cache_dir), progress=False)


def test_site_partition_without_dataset_column(
    fake_ham: Callable[..., Path], cache_dir: Path
) -> None:
    root = fake_ham()
    csv = root / "HAM10000_metadata.csv"
    pd.read_csv(csv).drop(columns="dataset").to_csv(csv, index=False)
    cfg = cfg_for(root, cache_dir, partition={"method": "site"})
    with pytest.raises(
        FlSimError,
        match=r"'site' needs the acquisition site .*'dataset' column.*"
        r"Use partition.method 'random' or 'dirichlet'",
    ):
        prepare_data(cfg, progress=False)
    prepare_data(
        cfg.model_copy(update={"partition": cfg.partition.model_copy(update={"method": "random"})}),
        progress=False,
    )
