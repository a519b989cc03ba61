"""`fl-sim bench`: fl-sim against the plain PyTorch loop and the hardware, side by side.

Five measurements, in one run, appended to BENCHMARKS.md with the device and versions:
- data: images/s from the decoded-image cache vs decoding the JPEGs with PIL in the loop;
- augmentation: images/s of the training input path with no augmentation, flips and
  90-degree turns (the default), and every option on (crop, rotation, colour jitter);
- DP-SGD: images/s of a client's training steps with per-image clipping and noise (Opacus)
  against the same steps without (`privacy.sample_level`);
- FL overhead: R rounds of N clients x E epochs in the Simulation Engine vs one process
  doing the same optimizer steps and the same evaluations with the same functions;
- communication: bytes per round, and the time to pack, unpack, transport and aggregate the
  arrays of a large model (random weights), fl-sim's helpers beside Flower's.
"""

from __future__ import annotations

import json
import pickle
import platform
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import flwr
import numpy as np
import timm
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from PIL import Image, ImageOps
from rich.console import Console
from rich.table import Table

from fl_sim.arrays import to_state_dict, weighted_mean
from fl_sim.client.train import train_local
from fl_sim.config import DataConfig, ModelConfig, RunConfig, StudyConfig, expand_grid
from fl_sim.config.schema import AugmentConfig
from fl_sim.data_partition import prepare_data
from fl_sim.evaluation import evaluate
from fl_sim.models import create_model
from fl_sim.task import build_model
from fl_sim.transforms import BatchPreprocessor

DEFAULT_HAM = Path("../shared/data/HAM10000-200x150")

# The augmentations compared: none, the default, and every option on at a typical strength.
AUGMENTATIONS = {
    "none": AugmentConfig(flips=False),
    "flips": AugmentConfig(),
    "full": AugmentConfig(crop_scale=0.7, rotation=15, brightness=0.2, contrast=0.2,
                          saturation=0.2, hue=0.02),
}


@dataclass
class Row:
    item: str
    fl_sim: str
    reference: str
    ratio: str
    note: str


def verdict(met: bool, target: str) -> str:
    return f"{target}: {'met' if met else 'NOT met'}"


def plain_pil(path: str, size: int) -> np.ndarray:
    """What a typical Dataset.__getitem__ does on every epoch."""
    with Image.open(path) as img:
        return np.asarray(ImageOps.fit(img.convert("RGB"), (size, size), Image.Resampling.BICUBIC))


def bench_data(ham_root: Path, sizes: list[int], batches: int, batch: int = 32) -> list[Row]:
    """Random batches through the training input path (uint8 rows -> normalised, augmented
    float tensor), one thread as in a loader worker: cache rows vs PIL decoding per image."""
    if not (ham_root / "HAM10000_metadata.csv").is_file():
        return [Row("data", "-", "-", "-", f"skipped: no HAM10000 copy at {ham_root}")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as cache:
            paths = {p.stem: str(p) for p in ham_root.glob("HAM10000_images_part_*/*.jpg")}
            return [_data_row(ham_root, Path(cache), paths, size, batches, batch) for size in sizes]
    finally:
        torch.set_num_threads(threads)


def _data_row(ham_root: Path, cache: Path, paths: dict[str, str], size: int, batches: int,
              batch: int) -> Row:
    start = time.perf_counter()
    data = prepare_data(DataConfig(dataset="ham10000", root=ham_root, image_size=size, cache_dir=cache),
                        progress=False)
    build = time.perf_counter() - start
    path_of_row = np.asarray([paths[i] for i in data.manifest["image_id"]], dtype=object)
    preprocess = BatchPreprocessor(size, ((0.5,) * 3, (0.5,) * 3), torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)

    def seconds(load) -> float:
        picks = [np.sort(rng.choice(len(path_of_row), batch, replace=False)) for _ in range(batches)]
        start = time.perf_counter()
        for idx in picks:
            preprocess(load(idx), generator, AUGMENTATIONS["flips"])
        return time.perf_counter() - start

    def cached_batch(idx: np.ndarray) -> np.ndarray:
        return data.images[idx]

    def decoded_batch(idx: np.ndarray) -> np.ndarray:
        return np.stack([plain_pil(p, size) for p in path_of_row[idx]])

    # Best of 3 alternating trials, fresh random batches each: a burst of load on a shared
    # machine slows one trial, not the ratio.
    trials = [(seconds(cached_batch), seconds(decoded_batch)) for _ in range(3)]
    cached = batches * batch / min(t for t, _ in trials)
    decoded = batches * batch / min(t for _, t in trials)
    return Row(f"data: images/s at {size} px, batch {batch}, 1 thread",
               f"{cached:,.0f} (cache)", f"{decoded:,.0f} (PIL decode)", f"{cached / decoded:.1f}x",
               f"{verdict(cached / decoded >= 5, 'target >= 5x')}; "
               f"cache of {len(path_of_row):,} images built in {build:.0f} s")


def bench_augment(sizes: list[int], batches: int, batch: int = 32) -> list[Row]:
    """images/s of uint8 batches through BatchPreprocessor with each of AUGMENTATIONS: on
    the CPU with one thread (as `data` measures), and on the GPU when there is one."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    threads = torch.get_num_threads()
    rows = []
    try:
        for device in devices:
            torch.set_num_threads(1 if device.type == "cpu" else threads)
            rows += [_augment_row(device, size, batches, batch) for size in sizes]
    finally:
        torch.set_num_threads(threads)
    return rows


def _augment_row(device: torch.device, size: int, batches: int, batch: int) -> Row:
    preprocess = BatchPreprocessor(size, ((0.5,) * 3, (0.5,) * 3), device)
    images = np.random.default_rng(0).integers(0, 256, (batches, batch, size, size, 3), dtype=np.uint8)

    def seconds(augment: AugmentConfig) -> float:
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for rows in images:
            preprocess(rows, generator, augment)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    seconds(AUGMENTATIONS["full"])  # warm-up: allocator, kernels
    # Best of 3 alternating trials, as in `data`: a burst of load slows one trial, not the ratio.
    trials = [{name: seconds(aug) for name, aug in AUGMENTATIONS.items()} for _ in range(3)]
    rate = {name: batches * batch / min(t[name] for t in trials) for name in AUGMENTATIONS}
    where = "1 thread" if device.type == "cpu" else "GPU"
    return Row(f"augmentation: images/s at {size} px, batch {batch}, {where}",
               f"{rate['full']:,.0f} (full set)", f"{rate['flips']:,.0f} (flips)",
               f"{rate['full'] / rate['flips']:.2f}x",
               f"none: {rate['none']:,.0f}; full: crop_scale 0.7, rotation 15, brightness, "
               "contrast, saturation 0.2, hue 0.02")


def bench_dpsgd(model: str, size: int, steps: int, batch: int = 32) -> list[Row]:
    """images/s of train_local's steps on random images: DP-SGD (`privacy.sample_level`, its
    model with GroupNorm) against the plain steps of the run's own model, on this process's
    device, best of 2 alternating trials after a warm-up."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (steps * batch, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 7, len(images))
    runs = {name: RunConfig.model_validate({
        "model": {"name": model}, "batch_size": batch, "optimizer": {"name": "adamw"},
        **({"privacy": {"sample_level": {"noise_multiplier": 1.0}}} if name == "dpsgd" else {})})
        for name in ("plain", "dpsgd")}
    built = {name: build_model(cfg, [str(k) for k in range(7)], size)
             for name, cfg in runs.items()}

    def seconds(name: str, rows: np.ndarray) -> float:
        model, preprocess = built[name]
        start = time.perf_counter()
        train_local(model, images, labels, rows, preprocess, runs[name],
                    np.random.default_rng(1))
        if preprocess.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for name in runs:  # warm-up: one batch
        seconds(name, np.arange(batch))
    trials = [{name: seconds(name, np.arange(len(images))) for name in runs} for _ in range(2)]
    rate = {name: len(images) / min(t[name] for t in trials) for name in runs}
    where = built["plain"][1].device.type.upper()
    return [Row(f"DP-SGD: train images/s, {model} at {size} px, batch {batch}, {where}",
                f"{rate['dpsgd']:,.1f} (DP-SGD)", f"{rate['plain']:,.1f} (plain)",
                f"{rate['dpsgd'] / rate['plain']:.2f}x",
                f"{steps} steps; Poisson batches, per-image clipping (ExpandedWeights), noise; "
                "GroupNorm for BatchNorm")]


def overhead_study(tmp: Path, rounds: int, clients: int, epochs: int, image_size: int,
                   num_images: int, model: str) -> StudyConfig:
    return StudyConfig.model_validate({
        "study": "bench", "out": str(tmp / "runs"),
        "data": {"dataset": "synthetic", "image_size": image_size, "cache_dir": str(tmp / "cache"),
                 "synthetic": {"num_images": num_images},
                 "partition": {"num_clients": clients}},
        "defaults": {"rounds": rounds, "local_epochs": epochs, "model": {"name": model},
                     "optimizer": {"name": "adamw"}, "augment": True,
                     # The plain loop trains on the GPU when there is one; so must the clients
                     # (Ray hides GPUs from actors that ask for none). All share it at once.
                     "resources": {"num_gpus": 1 / clients if torch.cuda.is_available() else 0}},
    })


def plain_loop(study: StudyConfig) -> float:
    """The same optimizer steps and evaluations as the simulation, in one process, with the
    same functions; no Flower, no Ray, no messages. Returns seconds per round."""
    run = expand_grid(study)[0].config
    data = prepare_data(study.data, progress=False)
    model, preprocess = build_model(run, data.class_names, data.images.shape[1])
    start = time.perf_counter()
    for r in range(1, run.rounds + 1):
        for c in range(data.num_clients):
            train_local(model, data.images, data.labels, data.indices(c, "train"), preprocess, run,
                        np.random.default_rng([run.seed, c, r]))
        for c in range(data.num_clients):
            for split in ("val", "test"):
                evaluate(model, data.images, data.labels, data.indices(c, split), preprocess,
                         run.eval_batch_size, data.classes)
        evaluate(model, data.images, data.labels, data.indices("global", "test"), preprocess,
                 run.eval_batch_size, data.classes)
    return (time.perf_counter() - start) / run.rounds


def bench_overhead(rounds: int, clients: int, epochs: int, image_size: int, num_images: int,
                   model: str) -> list[Row]:
    from fl_sim.simulation import run_study  # imports Ray

    with tempfile.TemporaryDirectory() as tmp:
        study = overhead_study(Path(tmp), rounds, clients, epochs, image_size, num_images, model)
        prepare_data(study.data, progress=False)  # both sides start from a built cache
        start = time.perf_counter()
        run_dir = run_study(study, expand_grid(study), console=Console(quiet=True))[0]
        total = time.perf_counter() - start
        seconds = json.loads((run_dir / "summary.json").read_text())["round_seconds"]
        plain = plain_loop(study)
    steady = float(np.mean(seconds[1:])) if len(seconds) > 1 else seconds[0]
    startup = total - sum(seconds[1:]) - steady  # Ray, actors, model builds, round-0 eval
    device = "GPU" if torch.cuda.is_available() else "CPU"
    work = f"{rounds} rounds x {clients} clients x {epochs} epoch, {model}, {image_size} px, {device}"
    return [
        Row(f"FL overhead: steady round ({work})", f"{steady:.2f} s", f"{plain:.2f} s (plain loop)",
            f"{steady / plain:.2f}x",
            f"{verdict(steady / plain <= 1.10, 'target <= 1.10x')}; both train, evaluate val/test/global"),
        Row("FL overhead: fixed cost per round", f"{steady - plain:.2f} s", "-", "-",
            f"{verdict(steady - plain <= 0.1, 'target <= 0.1 s')}; steady round less the plain "
            "loop's"),
        Row("FL overhead: start-up", f"{startup:.1f} s", "-", "-",
            "Ray init, actors, model builds, round-0 global eval"),
    ]


def bench_communication(model_name: str, clients: int, repeats: int = 1) -> list[Row]:
    """The arrays of `model_name` (random weights) through every step a round puts them
    through, fl-sim's helpers (fl_sim.arrays) beside the Flower helpers they replace."""
    model = create_model(ModelConfig(name=model_name), num_classes=7, image_size=224)
    state = model.state_dict()
    params = sum(v.numel() for v in state.values())

    def timed(fn):
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn()
        return out, (time.perf_counter() - start) / repeats

    record, pack = timed(lambda: ArrayRecord(state))
    _, unpack = timed(lambda: model.load_state_dict(to_state_dict(record)))
    _, unpack_flower = timed(lambda: model.load_state_dict(record.to_torch_state_dict()))
    replies = [RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 100 + i})})
               for i in range(clients)]
    _, mean = timed(lambda: weighted_mean(replies, "num-examples"))
    _, mean_flower = timed(lambda: aggregate_arrayrecords(replies, "num-examples"))
    # Simulation: Ray pickles each Message into its object store and unpickles it in the
    # receiving process. Deployment: Flower deflates the record's object tree to bytes.
    pickled, dumps = timed(lambda: pickle.dumps(record, protocol=5))
    _, loads = timed(lambda: pickle.loads(pickled))
    pickled = None  # frees the message's bytes before the next step
    blobs, deflate = timed(lambda: {oid: obj.deflate()
                                    for oid, obj in get_all_nested_objects(record).items()})
    _, inflate = timed(lambda: inflate_object_from_contents(record.object_id, dict(blobs)))  # consumes it
    blobs = None
    with tempfile.TemporaryDirectory() as tmp:
        _, save = timed(lambda: torch.save(to_state_dict(record), Path(tmp) / "last.pt"))

    message = record.count_bytes()
    per_round = message * 3 * clients  # train down + train up + evaluate down
    # One simulated round: the server unpacks once (global evaluation), aggregates once and
    # writes a checkpoint; each client unpacks twice (train, evaluate) and packs once.
    server = unpack + mean + save
    server_flower = unpack_flower + mean_flower + save
    client = 2 * unpack + pack
    client_flower = 2 * unpack_flower + pack

    def row(item: str, ours: float, flowers: float | None, note: str) -> Row:
        if flowers is None:
            return Row(item, f"{ours:.2f} s", "-", "-", note)
        return Row(item, f"{ours:.2f} s", f"{flowers:.2f} s (Flower's)", f"{ours / flowers:.2f}x", note)

    return [
        Row(f"communication: {model_name} ({params / 1e6:.0f} M params)",
            f"{message / 1e6:,.0f} MB/message", f"{per_round / 1e9:.2f} GB/round ({clients} clients)",
            "-", "train down + up, evaluate down"),
        row("communication: pack (state_dict -> ArrayRecord)", pack, None,
            "Flower's ArrayRecord(state_dict), used by both"),
        row("communication: unpack (ArrayRecord -> model weights)", unpack, unpack_flower,
            "load_state_dict(to_state_dict) vs load_state_dict(to_torch_state_dict)"),
        row(f"communication: aggregate {clients} replies", mean, mean_flower,
            "fl_sim.arrays.weighted_mean vs aggregate_arrayrecords"),
        row("communication: simulation transport, per message", dumps + loads, None,
            f"Ray's pickling, each way: dumps {dumps:.2f} s + loads {loads:.2f} s"),
        row("communication: deployment wire, per message", deflate + inflate, None,
            f"Flower's deflate {deflate:.2f} s + inflate {inflate:.2f} s"),
        row("communication: checkpoint per round", save, None, "torch.save of last.pt"),
        row(f"communication: server per round ({clients} clients)", server, server_flower,
            "unpack + aggregate + checkpoint; plus transport of every message"),
        row("communication: client per round", client, client_flower,
            "2 unpacks + 1 pack; plus transport of its 3 messages"),
    ]


def run_bench(quick: bool, ham_root: Path, output: Path | None, console: Console,
              latency: bool = False) -> list[Row]:
    if latency:
        from fl_sim.bench_latency import bench_deployed_round, bench_startup_per_run

        items = [lambda: bench_deployed_round(rounds=3),
                 lambda: bench_startup_per_run(runs=4),
                 lambda: bench_overhead(rounds=6, clients=3, epochs=1, image_size=32,
                                        num_images=1400, model="test_convnext")]
    elif quick:
        items = [lambda: bench_data(ham_root, sizes=[64], batches=10),
                 lambda: bench_augment(sizes=[64, 224], batches=10),
                 lambda: bench_dpsgd("test_resnet", size=32, steps=4),
                 lambda: bench_overhead(rounds=3, clients=3, epochs=1, image_size=32, num_images=600,
                                        model="test_convnext"),
                 lambda: bench_communication("convnext_tiny", clients=3)]
    else:
        items = [lambda: bench_data(ham_root, sizes=[64, 224], batches=30),
                 lambda: bench_augment(sizes=[64, 224], batches=30),
                 lambda: bench_dpsgd("tf_efficientnet_lite0", size=64, steps=6),
                 lambda: bench_overhead(rounds=5, clients=3, epochs=2, image_size=64, num_images=1400,
                                        model="resnet18"),
                 lambda: bench_communication("convnext_large", clients=3, repeats=3)]
    title = "fl-sim bench" + (" --latency" if latency else " --quick" if quick else "")
    rows: list[Row] = []
    try:
        for item in items:
            rows += item()
    except BaseException:
        if rows:  # a later item failed (or Ctrl-C): keep what was measured before it
            _publish(rows, title, False, output, console)
        raise
    _publish(rows, title, True, output, console)
    return rows


def _publish(rows: list[Row], title: str, complete: bool, output: Path | None,
             console: Console) -> None:
    table = Table(title=f"{title}{'' if complete else ' (incomplete)'}")
    for col in ("item", "fl-sim", "reference", "ratio", "note"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.item, r.fl_sim, r.reference, r.ratio, r.note)
    console.print(table)
    if output is not None:
        with open(output, "a", encoding="utf-8") as f:
            f.write(markdown(rows, title, complete))
        console.print(f"appended to {output}")


def markdown(rows: list[Row], title: str, complete: bool) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    lines = [
        (f"\n## {title}, {date.today().isoformat()}"
         f"{'' if complete else ' (incomplete: a later item failed)'}\n"),
        (f"Device: {device}. Python {platform.python_version()}, torch {torch.__version__}, "
         f"flwr {flwr.__version__}, timm {timm.__version__}.\n"),
        "| item | fl-sim | reference | ratio | note |", "|---|---|---|---|---|",
    ]
    lines += [f"| {r.item} | {r.fl_sim} | {r.reference} | {r.ratio} | {r.note} |" for r in rows]
    return "\n".join(lines) + "\n"
