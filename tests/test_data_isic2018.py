"""ISIC 2018 Task 3 test set: the real ground-truth CSV, and the loader on generated images."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fl_sim.config import DataConfig
from fl_sim.data_partition import prepare_data
from fl_sim.data_partition.isic2018 import GROUND_TRUTH_CSV, read_ground_truth
from fl_sim.errors import FlSimError


@pytest.fixture(scope="module")
def real_csv(ham_root: Path) -> Path:
    return ham_root / GROUND_TRUTH_CSV


def make_test_set(real_csv: Path, root: Path, n: int = 14, nested: bool = True) -> pd.DataFrame:
    """The first n rows of the real ground truth, with a generated image for each real id,
    laid out like the official zips (CSV in its own folder, images in ..._Input/)."""
    truth = pd.read_csv(real_csv).head(n)
    csv_dir = root / "ISIC2018_Task3_Test_GroundTruth" if nested else root
    csv_dir.mkdir(parents=True, exist_ok=True)
    truth.to_csv(csv_dir / GROUND_TRUTH_CSV, index=False)
    images = root / "ISIC2018_Task3_Test_Input"
    images.mkdir(exist_ok=True)
    for i, image_id in enumerate(truth["image"]):
        Image.new("RGB", (60, 45), (i * 15, 100, 100)).save(images / f"{image_id}.jpg", quality=95)
    return truth


def test_real_ground_truth(real_csv: Path) -> None:
    truth = read_ground_truth(real_csv)
    assert len(truth) == 1512 and truth["image_id"].is_unique
    assert truth["label"].value_counts().to_dict() == {
        "nv": 909,
        "bkl": 217,
        "mel": 171,
        "bcc": 93,
        "df": 44,
        "akiec": 43,
        "vasc": 35,
    }
    assert truth["image_id"].iloc[0] == "ISIC_0034524" and truth["label"].iloc[0] == "nv"
    assert truth["image_id"].iloc[2] == "ISIC_0034526" and truth["label"].iloc[2] == "bkl"


def test_isic2018_as_global_test_set(
    real_csv: Path, fake_ham: Callable[..., Path], cache_dir: Path, tmp_path: Path
) -> None:
    truth = make_test_set(real_csv, tmp_path / "isic2018")
    ham = fake_ham()
    cfg = DataConfig(
        dataset="ham10000",
        root=ham,
        cache_dir=cache_dir,
        image_size=16,
        global_test={"source": "isic2018", "root": tmp_path / "isic2018"},
    )
    data = prepare_data(cfg, progress=False)
    n_ham = len(pd.read_csv(ham / "HAM10000_metadata.csv"))
    rows = data.indices("global", "test")
    np.testing.assert_array_equal(rows, np.arange(n_ham, n_ham + len(truth)))  # appended after HAM
    m = data.manifest.iloc[rows]
    assert m["image_id"].tolist() == truth["image"].tolist()
    assert (m["lesion_id"] == m["image_id"]).all()
    onehot = truth[["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]].to_numpy()
    assert m["label"].tolist() == [
        ["mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"][j] for j in onehot.argmax(1)
    ]
    # the generated images' red channel went up by 15 per image
    assert np.all(np.diff(data.images[rows][:, 8, 8, 0].astype(int)) > 0)
    # all HAM rows belong to clients: nothing of HAM is held out
    assert (data.manifest["client"].iloc[:n_ham] != "global").all()
    assert "ham10000-isic2018-16px" in next(cache_dir.glob("*.npy")).name


def test_missing_test_images_named(
    real_csv: Path, fake_ham: Callable[..., Path], cache_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "isic2018"
    make_test_set(real_csv, root, n=5, nested=False)
    (root / GROUND_TRUTH_CSV).write_text(real_csv.read_text())  # all 1,512 ids, 5 images
    cfg = DataConfig(
        dataset="ham10000",
        root=fake_ham(),
        cache_dir=cache_dir,
        global_test={"source": "isic2018", "root": root},
    )
    with pytest.raises(
        FlSimError,
        match=re.escape(
            f"Image 'ISIC_0034529' (and 1506 more) listed in {root}/{GROUND_TRUTH_CSV} was not "
            "found"
        ),
    ):
        prepare_data(cfg, progress=False)


def test_missing_ground_truth(
    fake_ham: Callable[..., Path], cache_dir: Path, tmp_path: Path
) -> None:
    cfg = DataConfig(
        dataset="ham10000",
        root=fake_ham(),
        cache_dir=cache_dir,
        global_test={"source": "isic2018", "root": tmp_path / "nowhere"},
    )
    with pytest.raises(
        FlSimError,
        match=rf"no {GROUND_TRUTH_CSV} in {re.escape(str(tmp_path))}/nowhere or its subfolders"
        r".*global_test.root",
    ):
        prepare_data(cfg, progress=False)


def test_ground_truth_without_exactly_one_class(real_csv: Path, tmp_path: Path) -> None:
    truth = pd.read_csv(real_csv).head(5)
    truth.loc[3, "MEL"] = 1.0  # now both MEL and its real class
    csv = tmp_path / GROUND_TRUTH_CSV
    truth.to_csv(csv, index=False)
    with pytest.raises(
        FlSimError,
        match=rf"{re.escape(str(csv))} line 5 \(image {truth.loc[3, 'image']}\) "
        r"does not mark exactly one class",
    ):
        read_ground_truth(csv)


def test_ground_truth_missing_column(real_csv: Path, tmp_path: Path) -> None:
    csv = tmp_path / GROUND_TRUTH_CSV
    pd.read_csv(real_csv).head(5).drop(columns="VASC").to_csv(csv, index=False)
    with pytest.raises(FlSimError, match=rf"{re.escape(str(csv))} has no column 'VASC'"):
        read_ground_truth(csv)


def test_isic2018_only_with_ham10000(tmp_path: Path, cache_dir: Path) -> None:
    cfg = DataConfig(
        dataset="synthetic",
        cache_dir=cache_dir,
        global_test={"source": "isic2018", "root": tmp_path},
    )
    with pytest.raises(FlSimError, match="goes with dataset 'ham10000' only, not 'synthetic'"):
        prepare_data(cfg, progress=False)
