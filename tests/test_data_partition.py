"""Partitioners on the real HAM10000: lesion grouping, split sizes, determinism, skew, sites."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fl_sim.config import DataConfig
from fl_sim.data_partition import PARTITIONERS, FederatedData, prepare_data
from fl_sim.data_partition.partitioners import fold_plan, label_skew
from fl_sim.errors import FlSimError

METHODS = sorted(PARTITIONERS)


def ham_cfg(ham_root: Path, cache_dir: Path, **partition) -> DataConfig:
    return DataConfig(
        dataset="ham10000",
        root=ham_root,
        cache_dir=cache_dir,
        image_size=32,
        partition={"num_clients": 5, **partition},
    )


@pytest.fixture(scope="session")
def ham_data(ham_root: Path, ham_cache_dir: Path) -> dict[str, FederatedData]:
    """Each partitioner once on the full HAM10000 (the cache is built by the first)."""
    return {
        m: prepare_data(ham_cfg(ham_root, ham_cache_dir, method=m), progress=False) for m in METHODS
    }


def test_every_image_is_placed_once(ham_data: dict[str, FederatedData]) -> None:
    for data in ham_data.values():
        m = data.manifest
        assert len(m) == len(data.images) == len(data.labels) == 10015
        assert m["image_id"].is_unique
        all_rows = [
            data.indices(c, s) for c in range(data.num_clients) for s in ("train", "val", "test")
        ]
        all_rows.append(data.indices("global", "test"))
        assert sorted(np.concatenate(all_rows).tolist()) == list(range(10015))


@pytest.mark.parametrize("method", METHODS)
def test_no_lesion_in_two_clients_or_two_splits(
    ham_data: dict[str, FederatedData], method: str
) -> None:
    m = ham_data[method].manifest
    per_lesion = m.groupby("lesion_id")[["client", "split"]].nunique()
    assert (per_lesion["client"] == 1).all(), (
        "a lesion is held by two clients (or a client and the server)"
    )
    assert (per_lesion["split"] == 1).all(), "a lesion sits in two splits"
    assert m["lesion_id"].nunique() == 7470


@pytest.mark.parametrize("method", METHODS)
def test_split_sizes_match_the_fractions(ham_data: dict[str, FederatedData], method: str) -> None:
    data = ham_data[method]
    m = data.manifest
    assert (m["client"] == "global").mean() == pytest.approx(0.15, abs=0.005)
    for c in range(data.num_clients):
        mine = m[m["client"] == str(c)]
        lesions = mine.drop_duplicates("lesion_id")["split"].value_counts()
        n = len(mine.drop_duplicates("lesion_id"))
        # Lesions: exact to the fold (k = 5 folds for 60/20/20), within rounding.
        for split, share in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
            assert abs(lesions.get(split, 0) - share * n) <= 0.01 * n + 7, (c, split)
        # Images: lesions hold 1-6 images, so image shares wobble a little more.
        if len(mine) >= 300:
            images = mine["split"].value_counts(normalize=True)
            assert images["train"] == pytest.approx(0.6, abs=0.025), c
            assert images["val"] == pytest.approx(0.2, abs=0.025), c
            assert images["test"] == pytest.approx(0.2, abs=0.025), c


def test_random_gives_near_equal_stratified_clients(ham_data: dict[str, FederatedData]) -> None:
    data = ham_data["random"]
    m = data.manifest[data.manifest["client"] != "global"]
    sizes = m["client"].value_counts()
    assert data.num_clients == 5 and len(sizes) == 5
    assert sizes.max() / sizes.min() < 1.05
    mix = pd.crosstab(m["client"], m["label"], normalize="index")
    assert (mix.max() - mix.min()).max() < 0.03  # every client mirrors the label mix


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_partition_other_seed_another(
    ham_root: Path, ham_cache_dir: Path, ham_data: dict[str, FederatedData], method: str
) -> None:
    again = prepare_data(ham_cfg(ham_root, ham_cache_dir, method=method), progress=False)
    other = prepare_data(ham_cfg(ham_root, ham_cache_dir, method=method, seed=1), progress=False)
    first = ham_data[method].manifest
    pd.testing.assert_frame_equal(again.manifest, first)
    changed = (other.manifest[["client", "split"]] != first[["client", "split"]]).any(axis=1).mean()
    assert changed > 0.3, f"seed 1 moved only {changed:.1%} of the images"


def test_dirichlet_skew_grows_as_alpha_shrinks(ham_root: Path, ham_cache_dir: Path) -> None:
    skew = {}
    for alpha in (0.1, 100.0):
        data = prepare_data(
            ham_cfg(ham_root, ham_cache_dir, method="dirichlet", alpha=alpha), progress=False
        )
        pool = data.manifest["client"] != "global"
        skew[alpha] = label_skew(
            data.labels[pool.to_numpy()], data.manifest["client"][pool].to_numpy(), 7
        )
    print(
        f"label skew (mean TV distance): alpha 0.1 -> {skew[0.1]:.3f}, "
        f"alpha 100 -> {skew[100.0]:.3f}"
    )
    assert skew[0.1] > 0.3
    assert skew[100.0] < 0.05
    assert skew[0.1] > 10 * skew[100.0]


def test_site_gives_one_client_per_dataset_column_value(
    ham_root: Path, ham_data: dict[str, FederatedData]
) -> None:
    data = ham_data["site"]
    assert data.num_clients == 4
    meta = pd.read_csv(ham_root / "HAM10000_metadata.csv").set_index("image_id")
    m = data.manifest[data.manifest["client"] != "global"]
    site = meta.loc[m["image_id"], "dataset"].to_numpy()
    assert (m["site"].to_numpy() == site).all()
    expected = {"0": "rosendahl", "1": "vidir_modern", "2": "vidir_molemax", "3": "vienna_dias"}
    mismatch = m["client"].map(expected).to_numpy() != site
    # Only images of the 9 lesions photographed at two sites may sit at their other site.
    two_site_lesions = set(
        meta.groupby("lesion_id")["dataset"].nunique().loc[lambda s: s > 1].index
    )
    assert len(two_site_lesions) == 9
    assert set(m["lesion_id"][mismatch]) <= two_site_lesions
    assert mismatch.sum() <= 9


def test_manifest_file(ham_data: dict[str, FederatedData], tmp_path: Path) -> None:
    data = ham_data["random"]
    data.write_manifest(tmp_path / "run" / "partition.csv")
    written = pd.read_csv(tmp_path / "run" / "partition.csv", dtype=str)
    assert list(written.columns) == ["image_id", "lesion_id", "label", "client", "split"]
    assert len(written) == 10015
    assert set(written["client"]) == {"0", "1", "2", "3", "4", "global"}
    assert set(written.loc[written["client"] == "global", "split"]) == {"test"}
    assert written["label"].value_counts().to_dict() == {
        "nv": 6705,
        "mel": 1113,
        "bkl": 1099,
        "bcc": 514,
        "akiec": 327,
        "vasc": 142,
        "df": 115,
    }
    # Labels, classes and manifest agree row by row.
    assert (np.asarray(data.classes)[data.labels] == data.manifest["label"].to_numpy()).all()
    assert data.class_names[data.classes.index("nv")] == "melanocytic nevus"


def test_indices_rejects_unknown_client_or_split(ham_data: dict[str, FederatedData]) -> None:
    data = ham_data["random"]
    assert data.indices(2, "val").dtype == np.int64
    np.testing.assert_array_equal(data.indices("2", "val"), data.indices(2, "val"))
    for client, split in ((5, "train"), ("global", "train"), (0, "holdout")):
        with pytest.raises(ValueError, match="clients are 0..4"):
            data.indices(client, split)


def test_max_images_keeps_a_grouped_stratified_subset(ham_root: Path, ham_cache_dir: Path) -> None:
    cfg = ham_cfg(ham_root, ham_cache_dir).model_copy(update={"max_images": 500})
    data = prepare_data(cfg, progress=False)
    assert 450 <= len(data.labels) <= 550
    assert len(data.images) == len(data.labels)
    share = data.manifest["label"].value_counts(normalize=True)
    assert share["nv"] == pytest.approx(6705 / 10015, abs=0.04)
    assert set(share.index) == {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
    # Whole lesions only: every kept lesion keeps all its images.
    meta = pd.read_csv(ham_root / "HAM10000_metadata.csv")
    kept = meta[meta["lesion_id"].isin(data.manifest["lesion_id"])]
    assert len(kept) == len(data.labels)


def test_fold_plan_honours_fractions() -> None:
    assert fold_plan([0.6, 0.2, 0.2], 1000) == [3, 1, 1]
    assert fold_plan([0.85, 0.15], 1000) == [17, 3]
    assert fold_plan([0.7, 0.15, 0.15], 1000) == [14, 3, 3]
    assert fold_plan([0.6, 0.2, 0.2], 2) == [1, 1, 0]  # two lesions: train first, then val
    assert fold_plan([0.2, 0.4, 0.4], 1) == [1, 0, 0]  # one lesion always trains


def test_too_many_clients_is_an_error(ham_root: Path, ham_cache_dir: Path) -> None:
    cfg = ham_cfg(ham_root, ham_cache_dir, num_clients=60).model_copy(update={"max_images": 60})
    with pytest.raises(
        FlSimError, match=r"asks for 60 clients but the data has only \d+ lesions.*fewer clients"
    ):
        prepare_data(cfg, progress=False)
