"""Images/s: reading batches from the decoded-image cache vs decoding the JPEGs with PIL.

    python benchmarks/bench_data.py [--root ../shared/data/HAM10000-200x150] [--sizes 64 224]

For each size it builds (or reuses) the HAM10000 cache in --cache-dir, then times random
batches of 32 images turned into a torch uint8 tensor (N, 3, S, S), three ways:
  cache      rows of the .npy memmap (the OS page cache is warm: the build just wrote it)
  decode     fl-sim's decoder on each JPEG (PIL with draft-mode DCT scaling, then resize)
  plain PIL  Image.open -> convert("RGB") -> ImageOps.fit, what a typical Dataset does
A benchmark, not a test: it prints the numbers for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image, ImageOps
from rich.console import Console
from rich.table import Table

from fl_sim.config import DataConfig
from fl_sim.data_partition import prepare_data
from fl_sim.data_partition.cache import decode_image

REPO_ROOT = Path(__file__).resolve().parents[1]


def plain_pil(path: str, size: int) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(ImageOps.fit(img.convert("RGB"), (size, size), Image.Resampling.BICUBIC))


def rate(load_batch: Callable[[np.ndarray], torch.Tensor], batches: list[np.ndarray]) -> float:
    load_batch(batches[0])  # warm-up
    start = time.perf_counter()
    for rows in batches:
        out = load_batch(rows)
        assert out.dtype == torch.uint8 and out.shape[0] == len(rows)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def bench_size(args: argparse.Namespace, cache_dir: Path, size: int) -> dict[str, float]:
    """Cache build time and the three reading rates at one image size."""
    cfg = DataConfig(dataset="ham10000", root=args.root, cache_dir=cache_dir, image_size=size)
    start = time.perf_counter()
    data = prepare_data(cfg)
    build = time.perf_counter() - start
    paths = {p.stem: str(p) for p in args.root.glob("HAM10000_images_part_*/*.jpg")}
    path_of_row = np.asarray([paths[i] for i in data.manifest["image_id"]], dtype=object)
    rng = np.random.default_rng(args.seed)

    def batches(k: int) -> list[np.ndarray]:
        return [np.sort(rng.choice(len(path_of_row), args.batch, replace=False)) for _ in range(k)]

    def decoded(rows: np.ndarray) -> torch.Tensor:
        return to_tensor(np.stack([decode_image(p, size, "crop") for p in path_of_row[rows]]))

    def plain(rows: np.ndarray) -> torch.Tensor:
        return to_tensor(np.stack([plain_pil(p, size) for p in path_of_row[rows]]))

    return {
        "build": build,
        "cache": rate(lambda rows: to_tensor(data.images[rows]), batches(args.cache_batches)),
        "decode": rate(decoded, batches(args.decode_batches)),
        "plain": rate(plain, batches(args.decode_batches)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root", type=Path, default=REPO_ROOT.parent / "shared/data/HAM10000-200x150"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cache-batches", type=int, default=300)
    parser.add_argument("--decode-batches", type=int, default=30)
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a data-loading worker is one thread

    console = Console()
    table = Table(title=f"images/s, random batches of {args.batch} -> torch uint8 tensor")
    for col in (
        "size",
        "cache build (s)",
        "cache read",
        "decode (draft)",
        "plain PIL",
        "cache/PIL",
    ):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            r = bench_size(args, args.cache_dir or Path(tmp), size)
            console.print(
                f"size {size}: cache {r['cache']:.0f} img/s, decode {r['decode']:.0f} img/s, "
                f"plain PIL {r['plain']:.0f} img/s, build {r['build']:.1f} s"
            )
            table.add_row(
                str(size),
                f"{r['build']:.1f}",
                f"{r['cache']:,.0f}",
                f"{r['decode']:,.0f}",
                f"{r['plain']:,.0f}",
                f"{r['cache'] / r['plain']:,.0f}x",
            )
    console.print(table)
    console.print(
        f"{date.today()} | {os.cpu_count()} CPU cores, 1 torch thread, load average "
        f"{os.getloadavg()[0]:.1f} at the end | Python "
        f"{platform.python_version()}, numpy {np.__version__}, Pillow {PIL.__version__}, "
        f"torch {torch.__version__}"
    )


if __name__ == "__main__":
    main()
