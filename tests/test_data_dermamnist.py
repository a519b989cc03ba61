"""DermaMNIST through medmnist's npz files, tested on small npz files written in its format."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from fl_sim.config import DataConfig
from fl_sim.data_partition import prepare_data
from fl_sim.errors import FlSimError

SIZES = {"train": 70, "val": 14, "test": 21}


def write_npz(path: Path, size: int = 28, **override: np.ndarray) -> dict[str, np.ndarray]:
    """A DermaMNIST-format npz: {split}_images (n, s, s, 3) uint8, {split}_labels (n, 1)."""
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for split, n in SIZES.items():
        labels = (np.arange(n) % 7).astype(np.uint8)[:, None]
        images = np.zeros((n, size, size, 3), np.uint8)
        images[..., 0] = labels[:, :, None] * 30  # the class, readable from the pixels
        images[..., 1] = rng.integers(0, 255, (n, 1, 1))
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    arrays.update(override)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return arrays


def cfg_for(root: Path, cache_dir: Path, **kw: object) -> DataConfig:
    return DataConfig(
        dataset="dermamnist",
        root=root,
        cache_dir=cache_dir,
        **{"image_size": 28, "dermamnist_size": 28, **kw},
    )


def test_loads_a_local_npz(tmp_path: Path, cache_dir: Path) -> None:
    arrays = write_npz(tmp_path / "medmnist" / "dermamnist.npz")
    data = prepare_data(cfg_for(tmp_path / "medmnist", cache_dir), progress=False)
    assert data.images.shape == (105, 28, 28, 3)
    np.testing.assert_array_equal(data.images[:70], arrays["train_images"])
    np.testing.assert_array_equal(data.images[84:], arrays["test_images"])
    np.testing.assert_array_equal(data.labels[84:], arrays["test_labels"][:, 0])
    m = data.manifest
    # The official test split is the global test set; clients come from train + val.
    np.testing.assert_array_equal(data.indices("global", "test"), np.arange(84, 105))
    assert (
        m["image_id"].iloc[0] == "dermamnist_train_00000"
        and m["image_id"].iloc[84] == "dermamnist_test_00000"
    )
    assert (m["lesion_id"] == m["image_id"]).all()
    assert data.num_clients == 3 and (m["client"].iloc[:84] != "global").all()


@pytest.mark.parametrize("size", [64, 128])
def test_sizes_and_resizing(tmp_path: Path, cache_dir: Path, size: int) -> None:
    write_npz(tmp_path / f"dermamnist_{size}.npz", size=size)
    data = prepare_data(
        cfg_for(tmp_path, cache_dir, dermamnist_size=size, image_size=32), progress=False
    )
    assert data.images.shape == (105, 32, 32, 3)
    red = data.images[:, 16, 16, 0].astype(int)
    np.testing.assert_allclose(red, data.labels * 30, atol=2)


def test_root_may_name_the_file(tmp_path: Path, cache_dir: Path) -> None:
    write_npz(tmp_path / "my-copy.npz")
    assert (
        len(prepare_data(cfg_for(tmp_path / "my-copy.npz", cache_dir), progress=False).labels)
        == 105
    )


def test_downloads_through_medmnist(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    class FakeDermaMNIST:  # medmnist's class: downloads {root}/dermamnist_{size}.npz
        def __init__(self, split: str, download: bool, root: str, size: int) -> None:
            calls.append((split, download, root, size))
            write_npz(Path(root) / f"dermamnist_{size}.npz", size=size)

    monkeypatch.setitem(sys.modules, "medmnist", types.SimpleNamespace(DermaMNIST=FakeDermaMNIST))
    data = prepare_data(
        cfg_for(tmp_path / "dl", cache_dir, dermamnist_size=64, image_size=64), progress=False
    )
    assert calls == [("train", True, str(tmp_path / "dl"), 64)]
    assert data.images.shape == (105, 64, 64, 3)
    prepare_data(
        cfg_for(tmp_path / "dl", cache_dir, dermamnist_size=64, image_size=64), progress=False
    )
    assert len(calls) == 1  # the second time the local file is read


def test_download_failure_says_how_to_get_it(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(**kw: object) -> None:
        raise RuntimeError(
            "\n    Automatic download failed! Please download dermamnist_224.npz manually."
        )

    monkeypatch.setitem(sys.modules, "medmnist", types.SimpleNamespace(DermaMNIST=offline))
    with pytest.raises(
        FlSimError,
        match=rf"DermaMNIST file not found: {re.escape(str(tmp_path))}/dermamnist_224.npz, and "
        r"medmnist could not download it \(Automatic download failed!.*\)\. "
        r"Download dermamnist_224.npz from MedMNIST's Zenodo record",
    ):
        prepare_data(cfg_for(tmp_path, cache_dir, dermamnist_size=224), progress=False)


def test_without_medmnist_installed(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "medmnist", None)  # import medmnist -> ImportError
    with pytest.raises(
        FlSimError,
        match=r"dermamnist.npz, and the medmnist package .* not installed \(pip install medmnist\)",
    ):
        prepare_data(cfg_for(tmp_path, cache_dir), progress=False)


def test_unknown_label(tmp_path: Path, cache_dir: Path) -> None:
    labels = (np.arange(14) % 7).astype(np.uint8)[:, None]
    labels[5] = 9
    write_npz(tmp_path / "dermamnist.npz", val_labels=labels)
    with pytest.raises(
        FlSimError, match=r"'val_labels' holds the unknown label 9 \(DermaMNIST's are 0..6"
    ):
        prepare_data(cfg_for(tmp_path, cache_dir), progress=False)


def test_missing_key_and_bad_shape(tmp_path: Path, cache_dir: Path) -> None:
    arrays = write_npz(tmp_path / "a" / "dermamnist.npz")
    del arrays["test_labels"]
    (tmp_path / "b").mkdir()
    np.savez(tmp_path / "b" / "dermamnist.npz", **arrays)
    with pytest.raises(FlSimError, match=r"has no array 'test_labels' \(it has: "):
        prepare_data(cfg_for(tmp_path / "b", cache_dir), progress=False)
    write_npz(tmp_path / "c" / "dermamnist.npz", train_images=np.zeros((69, 28, 28, 3), np.uint8))
    with pytest.raises(
        FlSimError,
        match=r"'train_images' has shape \(69, 28, 28, 3\) \(uint8\), expected \(70, s, s, 3\)",
    ):
        prepare_data(cfg_for(tmp_path / "c", cache_dir), progress=False)


def test_site_partition_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    write_npz(tmp_path / "dermamnist.npz")
    with pytest.raises(FlSimError, match=r"'site' needs the acquisition site"):
        prepare_data(cfg_for(tmp_path, cache_dir, partition={"method": "site"}), progress=False)
