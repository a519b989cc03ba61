"""The synthetic dataset: HAM10000's schema, deterministic, and learnable by a tiny CNN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fl_sim.config import DataConfig
from fl_sim.data_partition import CLASSES, prepare_data, synthetic


def test_schema_like_ham10000(cache_dir: Path) -> None:
    data = prepare_data(DataConfig(cache_dir=cache_dir, image_size=32), progress=False)
    m = data.manifest
    assert data.images.shape == (1400, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.classes == CLASSES and len(data.class_names) == 7
    assert set(m["label"]) == set(CLASSES)
    # lesions photographed 1-3 times
    shots = m.groupby("lesion_id").size()
    assert set(shots.unique()) == {1, 2, 3} and (shots > 1).mean() > 0.2
    # 4 sites with clearly different label mixes
    mix = pd.crosstab(m["site"], m["label"], normalize="index")
    assert list(mix.index) == ["site_a", "site_b", "site_c", "site_d"]
    assert mix.loc["site_a", "nv"] > 0.45 and mix.loc["site_c", "nv"] < 0.2
    # imbalanced, but milder than HAM10000 (nv 67%)
    share = m["label"].value_counts(normalize=True)
    assert 0.2 < share.max() < 0.4 and share.min() > 0.05
    # shots of one lesion are similar but not identical images
    lesion = shots[shots == 3].index[0]
    rows = np.flatnonzero(m["lesion_id"] == lesion)
    a, b = data.images[rows[0]].astype(int), data.images[rows[1]].astype(int)
    assert 0 < np.abs(a - b).mean() < 40


def test_deterministic_and_drawable_in_parts(tmp_path: Path) -> None:
    table = synthetic.make_table(300)
    pd.testing.assert_frame_equal(table, synthetic.make_table(300))
    whole = np.stack(list(synthetic.iter_images(table, 24, "crop")))
    part = np.stack(list(synthetic.iter_images(table.iloc[100:110], 24, "crop")))
    np.testing.assert_array_equal(part, whole[100:110])
    again = prepare_data(
        DataConfig(cache_dir=tmp_path / "other", image_size=24, synthetic={"num_images": 300}),
        progress=False,
    )
    np.testing.assert_array_equal(again.images, whole)


def test_tiny_cnn_beats_the_majority_class(cache_dir: Path) -> None:
    """A few seconds of CPU training on one thread; held-out accuracy clearly above the
    majority-class rate."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    data = prepare_data(DataConfig(cache_dir=cache_dir, image_size=32), progress=False)
    train = np.concatenate(
        [data.indices(c, s) for c in range(data.num_clients) for s in ("train", "val")]
    )
    test = data.indices("global", "test")

    def tensors(rows: np.ndarray) -> tuple:
        x = torch.from_numpy(np.asarray(data.images[rows])).permute(0, 3, 1, 2).float() / 255
        return x, torch.from_numpy(data.labels[rows])

    (x, y), (x_test, y_test) = tensors(train), tensors(test)

    def block(i: int, o: int) -> list:
        return [nn.Conv2d(i, o, 3, stride=2, padding=1), nn.BatchNorm2d(o), nn.ReLU()]

    model = nn.Sequential(
        *block(3, 16),
        *block(16, 32),
        *block(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 7),
    )
    epochs, batch = 10, 32
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=epochs * -(-len(x) // batch))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # convolutions this small run faster on one thread
    try:
        for _ in range(epochs):
            model.train()
            for b in torch.randperm(len(x)).split(batch):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[b]), y[b]).backward()
                opt.step()
                sched.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    majority = np.bincount(data.labels[test]).max() / len(test)
    print(f"tiny CNN accuracy {accuracy:.3f}, majority-class rate {majority:.3f}")
    assert accuracy > majority + 0.3


def test_one_site_held_out_whole_is_the_global_test_set(cache_dir: Path) -> None:
    """An unseen domain (issue #15): the server tests on a site no client trains on."""
    cfg = DataConfig.model_validate({"cache_dir": str(cache_dir), "image_size": 32,
                                     "partition": {"method": "site"},
                                     "global_test": {"source": "site", "site": "site_b"}})
    data = prepare_data(cfg, progress=False)
    m = data.manifest
    held = m[m["client"] == "global"]
    assert set(held["split"]) == {"test"} and (held["site"] == "site_b").mean() == 1.0
    assert data.num_clients == 3 and "site_b" not in set(m.loc[m["client"] != "global", "site"])
    # whole lesions: none is both in the test set and at a client
    assert not set(held["lesion_id"]) & set(m.loc[m["client"] != "global", "lesion_id"])


def test_a_site_that_is_not_there_is_named_with_the_ones_that_are(cache_dir: Path) -> None:
    from fl_sim.errors import FlSimError

    cfg = DataConfig.model_validate({"cache_dir": str(cache_dir), "image_size": 32,
                                     "global_test": {"source": "site", "site": "vienna"}})
    with pytest.raises(FlSimError, match="'vienna' is not a site.*site_a, site_b, site_c, site_d"):
        prepare_data(cfg, progress=False)
    with pytest.raises(ValueError, match="`site` goes with source 'site'"):
        DataConfig.model_validate({"global_test": {"source": "site"}})
