"""The GPU check of issue #26: fl-sim's CUDA path on a real GPU, in one command of at most
8 minutes (run it through benchmarks/gpu_check.sh, which installs the bundle first).

    python benchmarks/gpu_check.py OUT [--dry-run] [--work DIR] [--budget-s 450]

Writes under OUT: results.md (the table), results.json, studies/ (the study files it ran),
logs/ (each step's console, timestamped, and its GPU memory samples) and runs/ (each run's
metrics.jsonl, summary.json and config.yaml; the caches and checkpoints stay in --work).

Steps, each in its own processes with its own time limit, the table rewritten after each:
1. quickstart: examples/quickstart.yaml with resources {num_gpus: 0.33}: 3 clients packed
   on one GPU, each reporting CUDA as its device (metrics.jsonl train rows, key `cuda_device`);
   GPU memory sampled with nvidia-smi: the peak per client actor, and what is held after the
   first of its two runs ends, before the second run's clients start;
2. dpsgd: one round of DP-SGD (privacy.sample_level) with 3 clients on the GPU;
3. bench: fl-sim bench's GPU rows: the FL overhead against the plain loop on resnet50 at
   224 px (bf16 autocast), images/s of a training step beside timm's published figure, a
   DP-SGD step.

--dry-run (CPU, seconds): writes and validates the study files (fl_sim.config.load_study,
`fl-sim run --dry-run`), runs nothing else, and fills the table from what is there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "examples" / "quickstart.yaml"

# timm's published training throughput (results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv
# in huggingface/pytorch-image-models: AMP, channels_last, PyTorch 1.12, CUDA 11.3, one RTX
# 3090). timm publishes training figures for no other GPU.
TIMM_TRAIN = {
    "resnet50": {"images_s": 1218.01, "batch": 512, "size": 224, "gpu": "RTX 3090"},
    "convnext_tiny": {"images_s": 819.24, "batch": 256, "size": 224, "gpu": "RTX 3090"},
}
BENCH_MODEL = "resnet50"


@dataclass
class Row:
    check: str
    result: str
    target: str
    verdict: str  # met | NOT met | not measured | info
    note: str = ""


# ---- study files ---------------------------------------------------------------------------

def quickstart_study(work: Path) -> dict:
    """examples/quickstart.yaml, its clients packed on one GPU; runs and cache in `work`."""
    study = yaml.safe_load(QUICKSTART.read_text())
    study["study"] = "gpu_quickstart"
    study["out"] = str(work / "runs")
    study["data"]["cache_dir"] = str(work / "cache")
    study["defaults"]["resources"] = {"num_cpus": "auto", "num_gpus": 0.33}
    return study


def dpsgd_study(work: Path) -> dict:
    """One round of DP-SGD at 3 clients on the GPU (a model with per-image gradients)."""
    return {
        "study": "gpu_dpsgd", "out": str(work / "runs"),
        "data": {"dataset": "synthetic", "image_size": 32, "cache_dir": str(work / "cache"),
                 "synthetic": {"num_images": 600},
                 "partition": {"method": "random", "num_clients": 3, "seed": 0},
                 "global_test": {"source": "holdout", "fraction": 0.15}},
        "defaults": {"rounds": 1, "local_epochs": 1, "batch_size": 32,
                     "model": {"name": "test_resnet", "pretrained": False},
                     "optimizer": {"name": "adamw"}, "strategy": {"name": "fedavg"},
                     "privacy": {"sample_level": {"noise_multiplier": 1.0, "max_grad_norm": 1.0},
                                 "delta": 1e-5},
                     "resources": {"num_cpus": "auto", "num_gpus": 0.33}, "seed": 0},
    }


def write_study(study: dict, path: Path) -> Path:
    """Writes the study and checks it the way `fl-sim run` reads it."""
    from fl_sim.config import load_study

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    load_study(path)  # FlSimError on a bad file
    return path


# ---- GPU memory sampling -------------------------------------------------------------------

def _smi(*query: str) -> list[list[str]] | None:
    try:
        out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.strip()]


class MemorySampler:
    """nvidia-smi every `every` s on a thread: total memory used and, where the container
    lets nvidia-smi see them, the memory of each process. One JSON line per sample."""

    def __init__(self, path: Path, every: float = 0.2) -> None:
        self.path, self.every = path, every
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(s) + "\n" for s in self.samples))

    def _loop(self) -> None:
        while not self._stop.is_set():
            t = time.time()
            gpu = _smi("--query-gpu=memory.used,memory.total")
            if gpu is None:
                return  # no nvidia-smi (a CPU machine): no samples
            apps = _smi("--query-compute-apps=pid,used_memory") or []
            self.samples.append({"t": t, "used_mib": float(gpu[0][0]), "total_mib": float(gpu[0][1]),
                                 "pids": {a[0]: float(a[1]) for a in apps if len(a) == 2
                                          and a[1].replace(".", "").isdigit()}})
            self._stop.wait(self.every)


# ---- running fl-sim ------------------------------------------------------------------------

def run_logged(cmd: list[str], log: Path, timeout_s: float, env: dict | None = None) -> dict:
    """Runs `cmd`, writing each output line with its time to `log`. Returns {rc, pid, lines:
    [(t, text)], seconds, timed_out}."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    start = time.time()
    lines: list[tuple[float, str]] = []
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=REPO, start_new_session=True)
        timed_out = threading.Event()

        def stop() -> None:  # SIGTERM to the whole group (fl-sim, Ray), SIGKILL 20 s later
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            threading.Timer(20, lambda: _kill(proc.pid)).start()

        timer = threading.Timer(timeout_s, stop)
        timer.start()
        try:
            for text in proc.stdout:
                t = time.time()
                lines.append((t, text.rstrip("\n")))
                f.write(f"{t:.3f} {text}")
                f.flush()
            rc = proc.wait()
        finally:
            timer.cancel()
    return {"rc": rc, "pid": proc.pid, "lines": lines, "seconds": time.time() - start,
            "timed_out": timed_out.is_set()}


def _kill(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def fl_sim_run(study_file: Path, log: Path, timeout_s: float) -> dict:
    return run_logged([sys.executable, "-m", "fl_sim.cli", "run", str(study_file)], log, timeout_s)


def run_markers(lines: list[tuple[float, str]]) -> dict[str, dict[str, float]]:
    """From fl-sim run's console: when each run started (`[k/n] name: ...`) and ended
    (`  name done in ...`), by run name."""
    marks: dict[str, dict[str, float]] = {}
    for t, text in lines:
        if m := re.match(r"\[(\d+)/(\d+)\] (\S+): ", text):
            marks.setdefault(m.group(3), {})["start"] = t
            marks[m.group(3)]["index"] = int(m.group(1))
        elif m := re.match(r"\s+(\S+) done in ", text):
            marks.setdefault(m.group(1), {})["end"] = t
    return marks


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def client_devices(rows: list[dict]) -> dict[int, set[str]]:
    """The device each client reported in its train rows: `cuda_device` (the CUDA index, -1
    for the CPU). Clients whose rows lack it (runs of an older fl-sim) are absent."""
    out: dict[int, set[str]] = {}
    for r in rows:
        if r.get("scope") == "client" and r.get("split") == "train" and "cuda_device" in r:
            out.setdefault(int(r["client"]), set()).add("cuda" if r["cuda_device"] >= 0 else "cpu")
    return out


def client_peaks(rows: list[dict]) -> dict[int, float]:
    """Each client's largest `gpu_peak_mb` (MiB torch's allocator reserved in its process, if
    the train rows carry it)."""
    out: dict[int, float] = {}
    for r in rows:
        if r.get("scope") == "client" and r.get("split") == "train" and "gpu_peak_mb" in r:
            c = int(r["client"])
            out[c] = max(out.get(c, 0.0), float(r["gpu_peak_mb"]))
    return out


def memory_summary(samples: list[dict], marks: dict[str, dict[str, float]],
                   driver_pid: int | None) -> dict:
    """What the samples say about a two-run study: idle memory before it, each run's peak,
    the memory held between the first run's end and the second run's start (+0.5 s: the
    second run's clients get their first message only after its model build and round-0
    evaluation), and per process (where nvidia-smi sees them) the client actors' peaks."""
    if not samples:
        return {}
    runs = sorted((m for m in marks.values() if "start" in m), key=lambda m: m["index"])
    first_t = runs[0]["start"] if runs else samples[0]["t"]
    before = [s["used_mib"] for s in samples if s["t"] < first_t]
    out: dict = {"idle_mib": min(before) if before else samples[0]["used_mib"],
                 "total_mib": samples[0]["total_mib"], "samples": len(samples)}
    for k, m in enumerate(runs, 1):
        end = m.get("end", math.inf)
        used = [s["used_mib"] for s in samples if m["start"] <= s["t"] <= end]
        out[f"run{k}_peak_mib"] = max(used) if used else None
    if len(runs) >= 2 and "end" in runs[0]:
        lo, hi = runs[0]["end"], runs[1]["start"] + 0.5
        gap = [s for s in samples if lo <= s["t"] <= hi]
        if not gap:  # a short gap between two samples: the last sample before it ends
            gap = [s for s in samples if s["t"] <= hi][-1:]
        if gap:
            held = max(gap, key=lambda s: s["used_mib"])
            out["held_between_runs_mib"] = held["used_mib"]
            out["held_between_runs_pids"] = held["pids"]
    actors: dict[str, float] = {}
    for s in samples:
        for pid, mib in s["pids"].items():
            if driver_pid is None or pid != str(driver_pid):
                actors[pid] = max(actors.get(pid, 0.0), mib)
    out["actor_peaks_mib"] = actors
    if driver_pid is not None:
        out["driver_peak_mib"] = max((s["pids"].get(str(driver_pid), 0.0) for s in samples),
                                     default=0.0)
    return out


# ---- the steps -----------------------------------------------------------------------------

def step_quickstart(ctx: dict) -> list[Row]:
    study = quickstart_study(ctx["work"])
    path = write_study(study, ctx["out"] / "studies" / "quickstart_gpu.yaml")
    names = run_names(path)
    if ctx["dry_run"]:
        dry = dry_run_listing(path, ctx)
        return [Row("quickstart: 3 clients at num_gpus 0.33", f"dry run: {dry}", "2/2 runs complete",
                    "not measured"),
                Row("clients report CUDA as their device", "dry run", "3/3 clients: cuda",
                    "not measured", "train rows' `cuda_device`"),
                Row("GPU memory: peak per client actor", "dry run", "-", "not measured"),
                Row("GPU memory: held after run 1, before run 2's clients", "dry run",
                    "given back: run 2's peak <= run 1's + 5 % + 256 MiB", "not measured")]
    with MemorySampler(ctx["out"] / "logs" / "quickstart_gpu_mem.jsonl") as sampler:
        time.sleep(1.0)  # idle samples before the study
        done = fl_sim_run(path, ctx["out"] / "logs" / "quickstart.log", ctx["limit"]("quickstart"))
    run_dirs = [ctx["work"] / "runs" / study["study"] / n for n in names]
    copy_runs(run_dirs, ctx["out"] / "runs" / study["study"])
    rows_by_run = {d.name: read_rows(d) for d in run_dirs}
    complete = [d.name for d in run_dirs if read_summary(d).get("complete")]
    accs = [f"{read_summary(d).get('final', {}).get('global', {}).get('acc', float('nan')):.3f}"
            if read_summary(d).get("complete") else "-" for d in run_dirs]
    mem = memory_summary(sampler.samples, run_markers(done["lines"]), done["pid"])
    (ctx["out"] / "logs" / "quickstart_memory.json").write_text(json.dumps(mem, indent=1))
    return quickstart_rows(done, names, complete, accs, rows_by_run, mem)


def quickstart_rows(done: dict, names: list[str], complete: list[str], accs: list[str],
                    rows_by_run: dict[str, list[dict]], mem: dict) -> list[Row]:
    ran = Row("quickstart: 3 clients at num_gpus 0.33",
              f"{len(complete)}/{len(names)} runs complete in {done['seconds']:.0f} s; final "
              f"global test acc {', '.join(accs)}",
              f"{len(names)}/{len(names)} runs complete",
              "met" if len(complete) == len(names) else "NOT met",
              f"exit {done['rc']}" + (" (timed out)" if done["timed_out"] else ""))
    devices: dict[int, set[str]] = {}
    for rows in rows_by_run.values():
        for c, d in client_devices(rows).items():
            devices.setdefault(c, set()).update(d)
    gpu_procs = len(mem.get("actor_peaks_mib", {}))
    seen = f"nvidia-smi saw {gpu_procs} GPU processes besides the driver" if mem else "no nvidia-smi samples"
    if devices:
        cuda = sorted(c for c, d in devices.items() if d == {"cuda"})
        device = Row("clients report CUDA as their device",
                     f"{len(cuda)}/3 clients: cuda ({', '.join(f'{c}: {sorted(d)}' for c, d in sorted(devices.items()))})",
                     "3/3 clients: cuda", "met" if len(cuda) == 3 else "NOT met", seen)
    else:
        device = Row("clients report CUDA as their device",
                     "not reported: no train row has `cuda_device`", "3/3 clients: cuda",
                     "met" if gpu_procs >= 3 else "not measured",
                     f"{seen}; the train rows lack `cuda_device` (a run of an older fl-sim)")
    actor_peaks = mem.get("actor_peaks_mib", {})
    torch_peaks: dict[int, float] = {}
    for rows in rows_by_run.values():
        for c, p in client_peaks(rows).items():
            torch_peaks[c] = max(torch_peaks.get(c, 0.0), p)
    if actor_peaks or torch_peaks:
        parts = []
        if actor_peaks:
            parts.append(f"max {max(actor_peaks.values()):,.0f} MiB per actor process (nvidia-smi, "
                         f"CUDA context included; {len(actor_peaks)} processes)")
        if torch_peaks:
            parts.append(f"max {max(torch_peaks.values()):,.0f} MiB reserved by torch (train rows' "
                         "gpu_peak_mb)")
        peak = Row("GPU memory: peak per client actor", "; ".join(parts), "-", "info",
                   f"GPU total {mem.get('total_mib', 0):,.0f} MiB, idle {mem.get('idle_mib', 0):,.0f} MiB")
    else:
        peak = Row("GPU memory: peak per client actor",
                   "not measured: nvidia-smi shows no processes here and the train rows have no "
                   "gpu_peak_mb", "-", "not measured",
                   f"study peaks (all processes): run 1 {mem.get('run1_peak_mib')}, run 2 "
                   f"{mem.get('run2_peak_mib')} MiB" if mem else "")
    held = mem.get("held_between_runs_mib")
    p1, p2 = mem.get("run1_peak_mib"), mem.get("run2_peak_mib")
    if held is None or p1 is None or p2 is None:
        between = Row("GPU memory: held after run 1, before run 2's clients", "not measured",
                      "given back: run 2's peak <= run 1's + 5 % + 256 MiB", "not measured",
                      "no nvidia-smi samples or no run markers in the log")
    else:
        given_back = p2 <= 1.05 * p1 + 256
        pids = mem.get("held_between_runs_pids") or {}
        between = Row("GPU memory: held after run 1, before run 2's clients",
                      f"{held - mem['idle_mib']:,.0f} MiB over idle ({held:,.0f} used)"
                      + (f"; per process: {', '.join(f'{p}: {m:,.0f}' for p, m in pids.items())}" if pids else ""),
                      "given back: run 2's peak <= run 1's + 5 % + 256 MiB",
                      "met" if given_back else "NOT met",
                      f"study peaks: run 1 {p1:,.0f} MiB, run 2 {p2:,.0f} MiB; the warm actors keep "
                      "their CUDA context and torch's cached blocks between runs")
    return [ran, device, peak, between]


def step_dpsgd(ctx: dict) -> list[Row]:
    study = dpsgd_study(ctx["work"])
    path = write_study(study, ctx["out"] / "studies" / "dpsgd_gpu.yaml")
    names = run_names(path)
    target = "1 round complete; ε per client, finite"
    if ctx["dry_run"]:
        return [Row("DP-SGD: one round, 3 clients on the GPU",
                    f"dry run: {dry_run_listing(path, ctx)}", target, "not measured")]
    done = fl_sim_run(path, ctx["out"] / "logs" / "dpsgd.log", ctx["limit"]("dpsgd"))
    run_dir = ctx["work"] / "runs" / study["study"] / names[0]
    copy_runs([run_dir], ctx["out"] / "runs" / study["study"])
    return [dpsgd_row(done, read_summary(run_dir), read_rows(run_dir))]


def dpsgd_row(done: dict, summary: dict, rows: list[dict]) -> Row:
    eps = {r["client"]: r.get("epsilon") for r in rows
           if r.get("scope") == "privacy" and r.get("split") == "sample_level" and r.get("client") is not None}
    finite = {c: e for c, e in eps.items() if isinstance(e, (int, float)) and math.isfinite(e) and e > 0}
    devices = client_devices(rows)
    ok = bool(summary.get("complete")) and len(finite) == 3
    return Row("DP-SGD: one round, 3 clients on the GPU",
               f"{'complete' if summary.get('complete') else 'not complete'} in {done['seconds']:.0f} s; "
               f"ε per client: {', '.join(f'{c}: {e:.2f}' for c, e in sorted(finite.items())) or 'none'}",
               "1 round complete; ε per client, finite", "met" if ok else "NOT met",
               f"exit {done['rc']}" + (" (timed out)" if done["timed_out"] else "")
               + (f"; devices {dict(sorted((c, sorted(d)) for c, d in devices.items()))}" if devices
                  else "; train rows have no `cuda_device`"))


def step_bench(ctx: dict) -> list[Row]:
    ref = TIMM_TRAIN[BENCH_MODEL]
    if ctx["dry_run"]:
        return [Row(f"bench: FL overhead, steady round ({BENCH_MODEL}, 224 px, 3 clients, GPU)",
                    "dry run", "<= 1.10x the plain loop", "not measured"),
                Row(f"bench: train step images/s, {BENCH_MODEL} at 224 px, batch {ref['batch']}, bf16",
                    "dry run", f"{ref['images_s']:,.0f} (timm, {ref['gpu']})", "not measured")]
    rows_file = ctx["out"] / "logs" / "bench_rows.json"
    done = run_logged([sys.executable, str(Path(__file__).resolve()), "--bench-rows", str(rows_file),
                       "--work", str(ctx["work"])],
                      ctx["out"] / "logs" / "bench.log", ctx["limit"]("bench"))
    rows = [Row(**r) for r in json.loads(rows_file.read_text())] if rows_file.is_file() else []
    if done["rc"] != 0:
        rows.append(Row("bench: the rest of the bench rows", f"exit {done['rc']}"
                        + (" (timed out)" if done["timed_out"] else ""), "-", "NOT met",
                        "see logs/bench.log"))
    return rows


def bench_rows(out_file: Path, work: Path) -> None:
    """In its own process (its CUDA memory is not the studies'): each row is written to
    `out_file` as soon as it is measured."""
    import torch

    from fl_sim import bench

    rows: list[Row] = []

    def keep(new: list[Row]) -> None:
        rows.extend(new)
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps([asdict(r) for r in rows], indent=1))

    keep(train_step_rows(BENCH_MODEL, 224, TIMM_TRAIN[BENCH_MODEL]["batch"], steps=8))
    torch.cuda.empty_cache()  # the step's batch of 512 is not the clients' memory
    for r in bench.bench_overhead(rounds=3, clients=3, epochs=1, image_size=224, num_images=1500,
                                  model=BENCH_MODEL):
        verdict = ("met" if ": met" in r.note else "NOT met") if "target" in r.note else "info"
        keep([Row(f"bench: {r.item}", r.fl_sim, r.reference, verdict, f"ratio {r.ratio}; {r.note}")])
    for r in bench.bench_dpsgd("tf_efficientnet_lite0", size=64, steps=6):
        keep([Row(f"bench: {r.item}", r.fl_sim, r.reference, "info", f"ratio {r.ratio}; {r.note}")])
    torch.cuda.empty_cache()


def train_step_rows(model: str, size: int, batch: int, steps: int) -> list[Row]:
    """images/s of fl-sim's training step (train_local: the batch preprocessed and augmented
    on the GPU, bf16 autocast, AdamW) on random images, beside timm's published figure."""
    import numpy as np
    import torch

    from fl_sim.client.train import train_local
    from fl_sim.config import RunConfig
    from fl_sim.task import build_model

    cfg = RunConfig.model_validate({"model": {"name": model, "pretrained": False},
                                    "batch_size": batch, "optimizer": {"name": "adamw"}})
    net, preprocess = build_model(cfg, [str(k) for k in range(7)], size)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (steps * batch, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 7, len(images))
    torch.cuda.reset_peak_memory_stats()
    train_local(net, images, labels, np.arange(2 * batch), preprocess, cfg, np.random.default_rng(1))
    torch.cuda.synchronize()
    start = time.perf_counter()
    train_local(net, images, labels, np.arange(len(images)), preprocess, cfg, np.random.default_rng(2))
    torch.cuda.synchronize()
    rate = len(images) / (time.perf_counter() - start)
    ref = TIMM_TRAIN[model]
    peak = torch.cuda.max_memory_allocated() / 2**20
    return [Row(f"bench: train step images/s, {model} at {size} px, batch {batch}, bf16, "
                f"{torch.cuda.get_device_name()}",
                f"{rate:,.0f}", f"{ref['images_s']:,.0f} (timm, {ref['gpu']}, AMP fp16, NHWC, batch "
                f"{ref['batch']})", "info",
                f"ratio {rate / ref['images_s']:.2f}x; {steps} steps after 2 warm-up steps; "
                f"preprocessing and flips/turns on the GPU, AdamW; peak allocated {peak:,.0f} MiB; "
                "timm publishes training figures for an RTX 3090 only")]


# ---- plumbing ------------------------------------------------------------------------------

def run_names(study_file: Path) -> list[str]:
    from fl_sim.config import expand_grid, load_study

    return [r.name for r in expand_grid(load_study(study_file))]


def dry_run_listing(path: Path, ctx: dict) -> str:
    """`fl-sim run --dry-run` on the study file, in a process of its own."""
    done = run_logged([sys.executable, "-m", "fl_sim.cli", "run", str(path), "--dry-run"],
                      ctx["out"] / "logs" / f"{path.stem}_dry_run.log", 120)
    if done["rc"] != 0:
        raise SystemExit(f"fl-sim run --dry-run {path} failed: "
                         + "\n".join(t for _, t in done["lines"][-10:]))
    return done["lines"][0][1] if done["lines"] else "no output"


def copy_runs(run_dirs: list[Path], dest: Path) -> None:
    """What a run folder holds that is small: its rows, summary and config."""
    for d in run_dirs:
        for name in ("metrics.jsonl", "summary.json", "config.yaml"):
            if (d / name).is_file():
                (dest / d.name).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(d / name, dest / d.name / name)


def device_line() -> str:
    gpu = _smi("--query-gpu=name,memory.total,driver_version")
    try:
        import torch

        torch_v = f"torch {torch.__version__} (CUDA {torch.version.cuda})"
    except ImportError:
        torch_v = "no torch"
    versions = []
    for mod in ("flwr", "ray", "timm", "opacus"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            versions.append(f"{mod} missing")
    where = (f"{gpu[0][0]}, {float(gpu[0][1]):,.0f} MiB, driver {gpu[0][2]}" if gpu
             else "no GPU (nvidia-smi absent)")
    return (f"Device: {where}; {os.cpu_count()} CPU cores. Python {platform.python_version()}, "
            f"{torch_v}, {', '.join(versions)}.")


def write_table(out: Path, rows: list[Row], header: str, dry_run: bool, steps_done: list[str],
                steps_all: list[str]) -> None:
    lines = [f"## GPU check{' (dry run)' if dry_run else ''}, {time.strftime('%Y-%m-%d %H:%M')}", "",
             header, "", f"Steps done: {', '.join(steps_done) or 'none'} of {', '.join(steps_all)}.", "",
             "| check | result | target | verdict | note |", "|---|---|---|---|---|"]
    lines += [f"| {r.check} | {r.result} | {r.target} | {r.verdict} | {r.note} |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"header": header, "dry_run": dry_run,
                                                  "steps_done": steps_done,
                                                  "rows": [asdict(r) for r in rows]}, indent=1))


STEPS = {"quickstart": step_quickstart, "dpsgd": step_dpsgd, "bench": step_bench}
# Each step's share of what is left of the budget when it starts, and its floor.
SHARES = {"quickstart": (0.35, 60), "dpsgd": (0.3, 45), "bench": (1.0, 60)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help="folder for results.md, results.json, studies/, logs/, runs/")
    ap.add_argument("--dry-run", action="store_true", help="write and validate the study files, run nothing")
    ap.add_argument("--work", help="runs and caches (default: a temporary folder)")
    ap.add_argument("--budget-s", type=float, default=450, help="seconds for all steps together")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated, of " + ", ".join(STEPS))
    ap.add_argument("--bench-rows", help=argparse.SUPPRESS)  # internal: the bench step's process
    args = ap.parse_args(argv)
    if args.bench_rows:
        bench_rows(Path(args.bench_rows), Path(args.work))
        return 0
    if not args.out:
        ap.error("OUT is required")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="fl-sim-gpu-check-")).resolve()
    os.environ.setdefault("FL_SIM_CACHE", str(work / "cache"))
    deadline = time.time() + args.budget_s
    steps = [s for s in args.steps.split(",") if s]

    def limit(step: str) -> float:
        share, floor = SHARES[step]
        return max(floor, share * (deadline - time.time()))

    ctx = {"out": out, "work": work, "dry_run": args.dry_run, "limit": limit}
    header = device_line()
    rows: list[Row] = []
    done: list[str] = []
    for step in steps:
        if not args.dry_run and time.time() > deadline - 30:
            rows.append(Row(f"{step}", "skipped: the time budget is spent", "-", "not measured"))
            continue
        print(f"gpu_check: {step} ...", flush=True)
        try:
            rows += STEPS[step](ctx)
            done.append(step)
        except Exception as err:  # one broken step must not lose the others' rows
            rows.append(Row(step, f"failed: {type(err).__name__}: {err}", "-", "NOT met",
                            "see gpu_check.log"))
            import traceback

            traceback.print_exc()
        write_table(out, rows, header, args.dry_run, done, steps)
    print((out / "results.md").read_text())
    return 0 if all(r.verdict != "NOT met" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
