"""The decoded-image cache: every image decoded and resized once into one on-disk uint8 array.

A cache file is `<cache_dir>/<dataset>-<size>px-<resize>-<key>.npy`, shape (N, S, S, 3), RGB,
with a `.json` sidecar describing it. The key hashes everything that decides its bytes (the
dataset, each source file's path, size and mtime or the generator's parameters, the image
ids in row order, the size, the resize mode and FORMAT_VERSION), so a changed source or size
makes a new file and a stale one is never read.

Readers open it with `np.load(mmap_mode="r")`: every process (the driver, the server, each
Ray client) maps the same file and shares the OS page cache instead of holding a private copy.
The first process to need it builds it under a file lock, into a temporary file that is then
renamed over the final name, so a reader never sees a half-written cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fl_sim.errors import FlSimError

# Bump when the bytes written for the same inputs change (decoder settings, resize maths).
FORMAT_VERSION = 1

Resize = Literal["crop", "pad"]
_RESAMPLE = Image.Resampling.BICUBIC


def default_cache_dir() -> Path:
    """$FL_SIM_CACHE, else ~/.cache/fl-sim."""
    env = os.environ.get("FL_SIM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fl-sim"


def resize_image(img: Image.Image, size: int, resize: Resize) -> np.ndarray:
    """A PIL image -> (size, size, 3) uint8 RGB.

    crop: scale the short side to `size`, then cut the centre square (a 4:3 dermoscopy image
    loses 1/8 of its width on each side; the lesion is nearly always central).
    pad: scale the long side to `size` and pad the rest with black (keeps the whole field
    of view; the model sees black bars).
    """
    img = img.convert("RGB")
    if resize == "crop":
        out = ImageOps.fit(img, (size, size), method=_RESAMPLE)
    else:
        out = ImageOps.pad(img, (size, size), method=_RESAMPLE, color=(0, 0, 0))
    return np.asarray(out, dtype=np.uint8)


def decode_image(path: Path, size: int, resize: Resize) -> np.ndarray:
    """Decode one image file into (size, size, 3) uint8 RGB. The only JPEG decoder of fl-sim."""
    try:
        with Image.open(path) as img:
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers `size`:
            # several times faster for the usual large-to-small resize.
            img.draft("RGB", (size, size))
            return resize_image(img, size, resize)
    except FileNotFoundError:
        raise FlSimError(
            f"Image file not found: {path}. Put the missing file back, or remove its row "
            "from the dataset's metadata."
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise FlSimError(
            f"Cannot read image {path}: {err}. The file is damaged or not an image: replace "
            "it with a fresh copy of the dataset's file, or remove its row from the metadata."
        ) from None


def decode_files(paths: Iterable[Path], size: int, resize: Resize) -> Iterator[np.ndarray]:
    """Decode image files in order (the producer of JPEG-based caches)."""
    for path in paths:
        yield decode_image(path, size, resize)


def file_identity(paths: Iterable[Path]) -> list[list[Any]]:
    """[path, bytes, mtime_ns] per file: a re-downloaded or edited image changes the key."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise FlSimError(
                f"Image file not found: {path}. Put the missing file back, or remove its row "
                "from the dataset's metadata."
            ) from None
        out.append([str(path), st.st_size, st.st_mtime_ns])
    return out


def digest(values: Iterable[object]) -> str:
    """A short fingerprint of a sequence (image ids in row order, say)."""
    h = hashlib.sha256()
    for value in values:
        h.update(f"{value}\n".encode())
    return h.hexdigest()


def cache_path(
    cache_dir: Path, dataset: str, size: int, resize: Resize, identity: dict[str, Any]
) -> Path:
    """Where the cache for these exact inputs lives."""
    blob = json.dumps(
        {"format": FORMAT_VERSION, "dataset": dataset, "size": size, "resize": resize, **identity},
        sort_keys=True,
        default=str,
    )
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / f"{dataset}-{size}px-{resize}-{key}.npy"


def open_cache(path: Path, n: int, size: int) -> np.ndarray | None:
    """The cache at `path` as a read-only memmap, or None when it does not exist yet."""
    if not path.exists():
        return None
    images = np.load(path, mmap_mode="r")
    if images.shape != (n, size, size, 3) or images.dtype != np.uint8:
        raise FlSimError(
            f"Cache file {path} holds an array of shape {images.shape} ({images.dtype}), expected "
            f"({n}, {size}, {size}, 3) uint8. It is damaged or was written by another tool: "
            "delete it and run again to rebuild it."
        )
    return images


def load_or_build(
    path: Path,
    n: int,
    size: int,
    produce: Callable[[], Iterator[np.ndarray]],
    *,
    description: dict[str, Any],
    progress: bool = True,
) -> np.ndarray:
    """Open the cache at `path`, building it first from `produce()` (n images) if absent.

    Safe with several processes: one builds under an exclusive lock, the others wait on the
    lock and then open the finished file.
    """
    images = open_cache(path, n, size)
    if images is not None:
        return images
    with _locked(path.with_suffix(".lock")):
        images = open_cache(path, n, size)  # another process may have built it meanwhile
        if images is None:
            _build(path, n, size, produce, description, progress)
            images = open_cache(path, n, size)
    assert images is not None
    return images


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """The cache folder's lock for one file, the folder made first."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock_path, "a")
    except OSError as err:
        raise FlSimError(
            f"cannot write the image cache in {lock_path.parent} ({err.strerror or err}: "
            f"{err.filename}): set data.cache_dir (or $FL_SIM_CACHE) to a folder this user can "
            "create and write.") from None
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build(
    path: Path,
    n: int,
    size: int,
    produce: Callable[[], Iterator[np.ndarray]],
    description: dict[str, Any],
    progress: bool,
) -> None:
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        count = 0
        with _progress(progress, f"caching {path.name}", n) as advance:
            for img in produce():
                out[count] = img
                count += 1
                advance()
        if count != n:  # a producer that yields too few rows is a bug, not bad input
            raise RuntimeError(f"cache producer yielded {count} images, expected {n}")
        out.flush()
        del out
        sidecar = {
            **description,
            "file": path.name,
            "shape": [n, size, size, 3],
            "dtype": "uint8",
            "format": FORMAT_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        tmp_json = tmp.with_suffix(".json")
        tmp_json.write_text(json.dumps(sidecar, indent=2, default=str) + "\n")
        os.replace(tmp_json, path.with_suffix(".json"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".json").unlink(missing_ok=True)


@contextlib.contextmanager
def _progress(enabled: bool, label: str, total: int) -> Iterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=False,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)
