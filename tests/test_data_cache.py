"""The decoded-image cache: decoded once, keyed by source and size, shared between processes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fl_sim.config import DataConfig
from fl_sim.data_partition import cache, prepare_data
from fl_sim.errors import FlSimError

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def decoder_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every call of the one JPEG decoder, recorded."""
    calls: list[Path] = []
    real = cache.decode_image

    def counting(path: Path, size: int, resize: cache.Resize) -> np.ndarray:
        calls.append(Path(path))
        return real(path, size, resize)

    monkeypatch.setattr(cache, "decode_image", counting)
    return calls


def ham_cfg(root: Path, cache_dir: Path, **kw: object) -> DataConfig:
    return DataConfig(
        dataset="ham10000", root=root, cache_dir=cache_dir, **{"image_size": 32, **kw}
    )


def test_second_load_decodes_no_jpeg(
    ham_root: Path, cache_dir: Path, decoder_calls: list[Path]
) -> None:
    cfg = ham_cfg(ham_root, cache_dir, max_images=300)
    first = prepare_data(cfg, progress=False)
    n = len(first.labels)
    assert len(decoder_calls) == n
    assert all(p.suffix == ".jpg" for p in decoder_calls)
    decoder_calls.clear()
    second = prepare_data(cfg, progress=False)
    assert decoder_calls == []
    assert isinstance(second.images, np.memmap) and second.images.shape == (n, 32, 32, 3)
    np.testing.assert_array_equal(second.images, first.images)
    assert len(list(cache_dir.glob("*.npy"))) == 1


def test_full_ham10000_reloads_without_decoding(
    ham_root: Path, ham_cache_dir: Path, decoder_calls: list[Path]
) -> None:
    prepare_data(ham_cfg(ham_root, ham_cache_dir), progress=False)  # built here or by another test
    decoder_calls.clear()
    data = prepare_data(ham_cfg(ham_root, ham_cache_dir), progress=False)
    assert decoder_calls == []
    assert data.images.shape == (10015, 32, 32, 3)
    assert not data.images.flags.writeable


def test_changed_size_or_resize_builds_a_new_cache(
    ham_root: Path, cache_dir: Path, decoder_calls: list[Path]
) -> None:
    small = prepare_data(
        ham_cfg(ham_root, cache_dir, max_images=100, image_size=16), progress=False
    )
    n = len(small.labels)
    larger = prepare_data(
        ham_cfg(ham_root, cache_dir, max_images=100, image_size=24), progress=False
    )
    padded = prepare_data(
        ham_cfg(ham_root, cache_dir, max_images=100, image_size=24, resize="pad"), progress=False
    )
    assert len(decoder_calls) == 3 * n
    assert small.images.shape[1:] == (16, 16, 3) and larger.images.shape[1:] == (24, 24, 3)
    assert not np.array_equal(larger.images, padded.images)
    names = sorted(p.name for p in cache_dir.glob("*.npy"))
    assert len(names) == 3
    assert [n.split("-")[1:3] for n in names] == [
        ["16px", "crop"],
        ["24px", "crop"],
        ["24px", "pad"],
    ]
    sidecar = json.loads(cache_dir.joinpath(names[2]).with_suffix(".json").read_text())
    assert sidecar["image_size"] == 24 and sidecar["resize"] == "pad" and sidecar["images"] == n


def test_changed_source_file_builds_a_new_cache(
    fake_ham: Callable[..., Path], cache_dir: Path, decoder_calls: list[Path]
) -> None:
    root = fake_ham()
    cfg = ham_cfg(root, cache_dir, global_test={"fraction": 0.2})
    before = prepare_data(cfg, progress=False)
    image = sorted((root / "HAM10000_images_part_1").glob("*.jpg"))[0]
    Image.new("RGB", (40, 30), (255, 0, 0)).save(image)  # a replaced image file
    os.utime(image, ns=(1, 1))
    decoder_calls.clear()
    after = prepare_data(cfg, progress=False)
    assert len(decoder_calls) == len(before.labels)
    assert len(list(cache_dir.glob("*.npy"))) == 2
    row = int(np.flatnonzero(after.manifest["image_id"] == image.stem)[0])
    assert np.abs(after.images[row].astype(int) - (255, 0, 0)).max() < 10  # the new pixels


def _checksum_script(cfg: DataConfig) -> str:
    return textwrap.dedent(
        f"""
        import hashlib, numpy as np
        from fl_sim.config import DataConfig
        from fl_sim.data_partition import prepare_data
        cfg = DataConfig.model_validate_json({cfg.model_dump_json()!r})
        data = prepare_data(cfg, progress=False)
        print(type(data.images).__name__,
              hashlib.sha256(np.ascontiguousarray(data.images)).hexdigest(),
              hashlib.sha256(data.manifest.to_csv().encode()).hexdigest())
        """
    )


def _run(script: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_two_processes_read_the_same_cache(ham_root: Path, ham_cache_dir: Path) -> None:
    cfg = ham_cfg(ham_root, ham_cache_dir)
    here = prepare_data(cfg, progress=False)
    files = {p: p.stat().st_mtime_ns for p in ham_cache_dir.glob("*.npy")}
    proc = _run(_checksum_script(cfg))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    kind, images_sha, manifest_sha = out.split()
    assert kind == "memmap"
    assert images_sha == hashlib.sha256(np.ascontiguousarray(here.images)).hexdigest()
    assert manifest_sha == hashlib.sha256(here.manifest.to_csv().encode()).hexdigest()
    assert {p: p.stat().st_mtime_ns for p in ham_cache_dir.glob("*.npy")} == files  # not rebuilt


def test_builders_at_once_make_one_cache(cache_dir: Path) -> None:
    """Two builders racing for one cache: the second waits on the lock, then maps the file
    the first built; the images are produced once and no temporary file is left."""
    produced = []

    def produce() -> Iterator[np.ndarray]:
        produced.append(threading.current_thread().name)
        for i in range(4):
            time.sleep(0.1)  # slow enough that the other builder arrives mid-build
            yield np.full((8, 8, 3), i, np.uint8)

    path = cache_dir / "race.npy"
    results: dict[str, np.ndarray] = {}

    def build() -> None:
        results[threading.current_thread().name] = cache.load_or_build(
            path, 4, 8, produce, description={}, progress=False
        )

    threads = [threading.Thread(target=build, name=f"builder-{i}") for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert len(produced) == 1
    assert [int(results[t.name][3, 0, 0, 0]) for t in threads] == [3, 3]
    assert sorted(p.name for p in cache_dir.iterdir()) == ["race.json", "race.lock", "race.npy"]


def test_crop_and_pad(tmp_path: Path) -> None:
    # A 4:2 image: left half red, right half blue, a green stripe down the middle.
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, :40] = (255, 0, 0)
    pixels[:, 40:] = (0, 0, 255)
    pixels[:, 38:42] = (0, 255, 0)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    crop = cache.decode_image(tmp_path / "wide.png", 20, "crop")
    pad = cache.decode_image(tmp_path / "wide.png", 20, "pad")
    assert crop.shape == pad.shape == (20, 20, 3) and crop.dtype == np.uint8
    # crop: the centre square, edge to edge, no black
    assert crop.max(axis=-1).min() > 200
    # pad: the whole image, 10 px high, with 5 black rows above and below
    assert (pad[:5] == 0).all() and (pad[-5:] == 0).all()
    assert pad[10, 1, 0] > 200 and pad[10, -2, 2] > 200


def test_damaged_cache_file_is_an_error(fake_ham: Callable[..., Path], cache_dir: Path) -> None:
    cfg = ham_cfg(fake_ham(), cache_dir)
    prepare_data(cfg, progress=False)
    (path,) = cache_dir.glob("*.npy")
    np.save(path, np.zeros((3, 32, 32, 3), np.uint8))
    with pytest.raises(
        FlSimError, match=rf"Cache file {re.escape(str(path))}.*delete it and run again"
    ):
        prepare_data(cfg, progress=False)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FL_SIM_CACHE", str(tmp_path / "c"))
    assert cache.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FL_SIM_CACHE")
    assert cache.default_cache_dir() == Path.home() / ".cache" / "fl-sim"


def test_any_spelling_of_the_root_shares_one_cache(
    fake_ham: Callable[..., Path],
    cache_dir: Path,
    decoder_calls: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = fake_ham()
    prepare_data(ham_cfg(root, cache_dir), progress=False)
    decoder_calls.clear()
    (root.parent / "link").symlink_to(root)
    monkeypatch.chdir(root.parent)
    for spelling in (Path("ham"), Path("link"), root / ".." / "ham"):
        prepare_data(ham_cfg(spelling, cache_dir), progress=False)
    assert decoder_calls == []
    assert len(list(cache_dir.glob("*.npy"))) == 1
