"""Rare-class synthesis: class choice, shapes, train-rows-only reads, the on-disk cache,
determinism, and that the conditional GAN actually learns its classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fl_sim.client import synthesis
from fl_sim.client.synthesis import (
    SynthesisSettings,
    generate,
    minority_classes,
    sample_grid,
    synthesize,
    train_dcgan,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # One thread: the 2 shared cores are often busy, and oversubscribed OpenMP threads
    # slow a GAN step tenfold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _client(counts: list[int], side: int = 16, channels: int = 3, seed: int = 0):
    """A client's images and labels with `counts[c]` images of class c, pixel values
    0..200 (255 is left free as a sentinel)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(counts)), counts)
    images = rng.integers(0, 201, (len(labels), side, side, channels), dtype=np.uint8)
    return images, labels


def _no_training(*args, **kwargs):
    raise AssertionError("train_dcgan must not run")


def test_minority_classes_below_mean_of_present_classes() -> None:
    labels = np.repeat(np.arange(5), [10, 2, 0, 5, 3])  # present mean: 20 / 4 = 5
    assert minority_classes(labels, 5) == [1, 4]
    assert minority_classes(np.repeat(np.arange(3), 4), 3) == []  # balanced: none
    assert minority_classes(np.empty(0, dtype=np.int64), 3) == []


@pytest.mark.parametrize(("side", "channels"), [(20, 3), (28, 1)])
def test_generate_shapes_dtypes_labels(side: int, channels: int) -> None:
    images, labels = _client([6, 6, 6], side=side, channels=channels)
    g = train_dcgan(images, labels, 3, steps=2, batch_size=4, seed=0)
    out, out_labels = generate(g, {2: 5, 0: 3}, side, seed=1)
    assert out.shape == (8, side, side, channels) and out.dtype == np.uint8
    assert out_labels.dtype == np.int64
    assert out_labels.tolist() == [0] * 3 + [2] * 5


def test_synthesize_only_chosen_present_classes(tmp_path: Path) -> None:
    images, labels = _client([8, 3, 0, 8])  # class 2 absent
    train = np.arange(len(labels))
    settings = SynthesisSettings(classes=[1, 2], per_class=4, steps=2, batch_size=4)
    out = synthesize(images, labels, train, 4, settings, 0, tmp_path, "listed")
    assert out.classes == [1] and out.labels.tolist() == [1] * 4
    assert out.images.shape == (4, 16, 16, 3) and not out.from_cache

    settings = SynthesisSettings(classes="minority", per_class=2, steps=2, batch_size=4)
    out = synthesize(images, labels, train, 4, settings, 0, tmp_path, "minority")
    assert out.classes == [1] and out.labels.tolist() == [1, 1]

    with pytest.raises(ValueError):
        synthesize(images, labels, train, 4, SynthesisSettings(classes=[4]), 0, tmp_path, "x")


def test_nothing_to_synthesize_trains_nothing(tmp_path: Path, monkeypatch) -> None:
    images, labels = _client([5, 5])
    monkeypatch.setattr(synthesis, "train_dcgan", _no_training)
    out = synthesize(images, labels, np.arange(10), 2, SynthesisSettings(), 0, tmp_path, "k")
    assert out.classes == [] and out.images.shape == (0, 16, 16, 3) and len(out.labels) == 0


class _GuardedRows:
    """An image array that fails on any read of a row outside `allowed`."""

    def __init__(self, array: np.ndarray, allowed: np.ndarray) -> None:
        self.array, self.allowed = array, set(allowed.tolist())
        self.shape, self.dtype = array.shape, array.dtype

    def __getitem__(self, key):
        rows = np.atleast_1d(np.arange(len(self.array))[key])
        leaked = set(rows.tolist()) - self.allowed
        assert not leaked, f"read non-train rows {sorted(leaked)}"
        return self.array[key]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole image array was read")


def test_only_train_rows_reach_the_gan(tmp_path: Path, monkeypatch) -> None:
    images, labels = _client([10, 4, 10])
    train = np.flatnonzero(np.arange(len(labels)) % 3 != 0)  # every third row is val/test
    images[np.setdiff1d(np.arange(len(labels)), train)] = 255  # sentinel, never in train rows
    seen: list[np.ndarray] = []

    def spy(images, labels, *args, **kwargs):
        seen.append(np.asarray(images))
        return train_dcgan(images, labels, *args, **kwargs)

    monkeypatch.setattr(synthesis, "train_dcgan", spy)
    guarded = _GuardedRows(images, train)
    settings = SynthesisSettings(classes=[0, 1, 2], per_class=1, steps=2, batch_size=4)
    synthesize(guarded, labels, train, 3, settings, 0, tmp_path, "guarded")
    assert len(seen) == 1 and len(seen[0]) == len(train)
    assert seen[0].max() <= 200  # no sentinel pixel, even after resizing


def test_cache_hit_returns_identical_arrays_without_training(tmp_path: Path,
                                                             monkeypatch) -> None:
    images, labels = _client([8, 3, 8])
    train = np.arange(len(labels))
    settings = SynthesisSettings(per_class=3, steps=2, batch_size=4)
    first = synthesize(images, labels, train, 3, settings, 7, tmp_path, "client-0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client-0.npz"]  # no tmp left

    monkeypatch.setattr(synthesis, "train_dcgan", _no_training)
    again = synthesize(images, labels, train, 3, settings, 7, tmp_path, "client-0")
    assert again.from_cache and again.classes == first.classes == [1]
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.labels, first.labels)
    assert again.built_seconds == pytest.approx(first.built_seconds)

    # Other settings, seed or train split under the same key: rebuilt, never reused.
    for changed in [(SynthesisSettings(per_class=4, steps=2, batch_size=4), 7, train),
                    (settings, 8, train), (settings, 7, train[1:])]:
        with pytest.raises(AssertionError, match="must not run"):
            synthesize(images, labels, changed[2], 3, changed[0], changed[1], tmp_path,
                       "client-0")


def test_torn_cache_file_is_rebuilt(tmp_path: Path) -> None:
    images, labels = _client([8, 3, 8])
    (tmp_path / "k.npz").write_bytes(b"not a zip")
    settings = SynthesisSettings(per_class=2, steps=2, batch_size=4)
    out = synthesize(images, labels, np.arange(len(labels)), 3, settings, 0, tmp_path, "k")
    assert not out.from_cache and len(out.images) == 2


def test_same_seed_same_images() -> None:
    images, labels = _client([6, 6])

    def run(seed: int) -> np.ndarray:
        g = train_dcgan(images, labels, 2, steps=3, batch_size=4, seed=seed)
        return generate(g, {0: 2, 1: 2}, 16, seed=seed)[0]

    state = torch.get_rng_state()
    np.testing.assert_array_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(1))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is kept


def test_gan_learns_dark_and_bright_classes() -> None:
    """Class 0 is dark, class 1 bright: after a short training each class's samples are
    nearer their own class's mean brightness than the other's."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 64)
    base = np.where(labels == 0, 40, 210)[:, None, None, None]
    images = np.clip(base + rng.normal(0, 15, (128, 16, 16, 3)), 0, 255).astype(np.uint8)
    g = train_dcgan(images, labels, 2, steps=100, batch_size=32, seed=0)
    out, out_labels = generate(g, {0: 32, 1: 32}, 16, seed=1)
    dark, bright = out[out_labels == 0].mean(), out[out_labels == 1].mean()
    assert abs(dark - 40) < abs(dark - 210), (dark, bright)
    assert abs(bright - 210) < abs(bright - 40), (dark, bright)


def test_sample_grid_one_row_per_class() -> None:
    images = np.full((10, 4, 4, 3), 9, dtype=np.uint8)
    labels = np.array([0] * 3 + [5] * 7)
    grid = sample_grid(images, labels, per_row=8, pad=2)
    assert grid.shape == (2 + 2 * 6, 2 + 8 * 6, 3) and grid.dtype == np.uint8
    assert (grid[2:6, 2:6] == 9).all() and (grid[2:6, 2 + 3 * 6:] == 0).all()  # short row
