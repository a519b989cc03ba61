"""The GPU check's plumbing on the CPU (issue #26, item 3): benchmarks/gpu_check.py --dry-run
writes and validates its study files and fills its table; its readings of memory samples,
run logs and metrics rows give the verdicts they should; benchmarks/gpu_bundle.py repacks a
wheel (here a small fake Ray) into a valid, installable one and writes the manifest."""

import base64
import csv
import hashlib
import importlib.util
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fl_sim.config import expand_grid, load_study

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check")
gpu_bundle = _load("gpu_bundle")


def test_dry_run_writes_valid_studies_and_every_row(tmp_path):
    out = tmp_path / "out"
    assert gpu_check.main([str(out), "--dry-run", "--work", str(tmp_path / "work")]) == 0
    quick = load_study(out / "studies" / "quickstart_gpu.yaml")
    runs = expand_grid(quick)
    assert len(runs) == 2 and quick.data.partition.num_clients == 3
    assert all(r.config.resources.num_gpus == pytest.approx(0.33) for r in runs)
    assert Path(quick.out) == tmp_path / "work" / "runs"  # runs and caches stay out of OUT
    dp = expand_grid(load_study(out / "studies" / "dpsgd_gpu.yaml"))
    assert len(dp) == 1 and dp[0].config.rounds == 1
    assert dp[0].config.privacy.sample_level.noise_multiplier == 1.0
    assert dp[0].config.resources.num_gpus == pytest.approx(0.33)
    table = (out / "results.md").read_text()
    for check in ("quickstart: 3 clients at num_gpus 0.33", "clients report CUDA as their device",
                  "GPU memory: peak per client actor", "GPU memory: held after run 1",
                  "DP-SGD: one round, 3 clients on the GPU", "bench: FL overhead",
                  "bench: train step images/s, resnet50 at 224 px"):
        assert f"| {check}" in table, check
    assert "study gpu_quickstart: 2 runs" in table  # `fl-sim run --dry-run` ran on the file
    result = json.loads((out / "results.json").read_text())
    assert result["steps_done"] == ["quickstart", "dpsgd", "bench"]
    assert len(result["rows"]) == 7 and all(r["verdict"] == "not measured" for r in result["rows"])


def _samples(used_by_time, pids=None):
    return [{"t": t, "used_mib": u, "total_mib": 80000.0, "pids": pids or {}} for t, u in used_by_time]


def test_memory_summary_reads_the_gap_between_runs():
    lines = [(10.0, "[1/2] fedavg_a: 3 clients, 10 rounds -> x  (in Flower's Simulation Engine)"),
             (20.0, "  fedavg_a done in 10 s"),
             (20.2, "[2/2] fedprox_a: 3 clients, 10 rounds -> x  (in Flower's Simulation Engine)"),
             (30.0, "  fedprox_a done in 10 s")]
    marks = gpu_check.run_markers(lines)
    assert marks["fedavg_a"] == {"start": 10.0, "index": 1, "end": 20.0}
    samples = _samples([(5, 500), (12, 4000), (20.1, 2500), (25, 4100)],
                       pids={"11": 900.0, "12": 1200.0})
    samples[1]["pids"] = {"11": 900.0, "12": 1200.0, "99": 1500.0}
    mem = gpu_check.memory_summary(samples, marks, driver_pid=11)
    assert mem["idle_mib"] == 500 and mem["run1_peak_mib"] == 4000 and mem["run2_peak_mib"] == 4100
    assert mem["held_between_runs_mib"] == 2500
    assert mem["actor_peaks_mib"] == {"12": 1200.0, "99": 1500.0}  # the driver left out
    assert mem["driver_peak_mib"] == 900.0


def _train_rows(device_key=True, clients=3):
    rows = []
    for c in range(clients):
        row = {"round": 1, "scope": "client", "client": c, "split": "train", "n": 10}
        if device_key:
            row.update(cuda_device=0, gpu_peak_mb=700.0 + c)
        rows.append(row)
    return rows


def test_quickstart_rows_give_verdicts():
    done = {"rc": 0, "seconds": 42.0, "timed_out": False}
    mem = {"idle_mib": 500.0, "total_mib": 80000.0, "run1_peak_mib": 4000.0,
           "run2_peak_mib": 4100.0, "held_between_runs_mib": 2500.0,
           "held_between_runs_pids": {"12": 800.0}, "actor_peaks_mib": {"12": 1200.0, "13": 1100.0, "14": 1000.0}}
    ran, device, peak, between = gpu_check.quickstart_rows(
        done, ["a", "b"], ["a", "b"], ["0.770", "0.771"], {"a": _train_rows(), "b": []}, mem)
    assert ran.verdict == "met" and "2/2 runs complete" in ran.result
    assert device.verdict == "met" and device.result.startswith("3/3 clients: cuda")
    assert "1,200 MiB per actor" in peak.result and "702 MiB reserved by torch" in peak.result
    assert between.verdict == "met" and "2,000 MiB over idle" in between.result

    stacked = {**mem, "run2_peak_mib": 8000.0}  # run 1's memory not given back
    _, _, _, between = gpu_check.quickstart_rows(done, ["a", "b"], ["a"], ["0.770", "-"],
                                                 {"a": _train_rows()}, stacked)
    assert between.verdict == "NOT met"
    # Clients that do not report a device: said so; nvidia-smi's 3 processes still count.
    ran, device, _, _ = gpu_check.quickstart_rows(done, ["a", "b"], ["a"], ["0.770", "-"],
                                                  {"a": _train_rows(device_key=False)}, mem)
    assert ran.verdict == "NOT met"
    assert "no train row has `cuda_device`" in device.result and device.verdict == "met"
    _, device, peak, between = gpu_check.quickstart_rows(
        done, ["a"], ["a"], ["0.7"], {"a": _train_rows(device_key=False)}, {})
    assert device.verdict == peak.verdict == between.verdict == "not measured"
    cpu = _train_rows()
    cpu[2]["cuda_device"] = -1  # client 2 trained on the CPU
    _, device, _, _ = gpu_check.quickstart_rows(done, ["a"], ["a"], ["0.7"], {"a": cpu}, mem)
    assert device.verdict == "NOT met" and device.result.startswith("2/3")


def test_dpsgd_row_needs_a_finite_epsilon_per_client():
    done = {"rc": 0, "seconds": 30.0, "timed_out": False}
    rows = _train_rows() + [{"round": 1, "scope": "privacy", "client": None, "split": "sample_level",
                             "epsilon": 3.0}]
    rows += [{"round": 1, "scope": "privacy", "client": c, "split": "sample_level", "epsilon": 2.5 + c}
             for c in range(3)]
    row = gpu_check.dpsgd_row(done, {"complete": True}, rows)
    assert row.verdict == "met" and "0: 2.50" in row.result
    rows[-1]["epsilon"] = None  # strict JSON's non-finite
    assert gpu_check.dpsgd_row(done, {"complete": True}, rows).verdict == "NOT met"
    assert gpu_check.dpsgd_row(done, {}, rows[:-1]).verdict == "NOT met"


def _hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def fake_wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A wheel as pip builds them: the files, METADATA, WHEEL and a RECORD of them all."""
    info = f"{name}-{version}.dist-info"
    files = {**files,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\n"
                              b"Tag: cp312-cp312-manylinux2014_x86_64\n"}
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for path, data in files.items():
        writer.writerow([path, _hash(data), len(data)])
    writer.writerow([f"{info}/RECORD", "", ""])
    path = folder / f"{name}-{version}-cp312-cp312-manylinux2014_x86_64.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for p, data in files.items():
            zf.writestr(p, data)
        zf.writestr(f"{info}/RECORD", record.getvalue())
    return path


def test_bundle_repacks_ray_without_its_jars_and_writes_the_manifest(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "ray", "2.55.1", {
        "ray/__init__.py": b"__version__ = '2.55.1'\n",
        "ray/_raylet.so": bytes(range(256)) * 2000,  # 512 KB: recompressed
        "ray/jars/ray_dist.jar": b"java" * 1000,
        "ray/tune/__init__.py": b"",
        "ray/dashboard/client/build/index.html": b"<html/>",
        "ray/dashboard/agent.py": b"# kept\n"})
    fake_wheel(wheels, "iterators", "0.0.2", {"iterators/__init__.py": b"x = 1\n"})
    out = tmp_path / "bundle"
    assert gpu_bundle.main(["--out", str(out), "--wheels-from", str(wheels)]) == 0
    manifest = json.loads((out / "MANIFEST.json").read_text())
    files = {f["name"]: f for f in manifest["files"]}
    assert set(files) == {"ray", "iterators"}
    for f in files.values():
        path = out / "wheels" / f["file"]
        assert f["size"] == path.stat().st_size
        assert f["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest["total_bytes"] == sum(f["size"] for f in files.values()) <= gpu_bundle.LIMIT
    assert "repacked" not in files["iterators"]  # small: copied as it is
    repacked = out / "wheels" / files["ray"]["file"]
    assert files["ray"]["repacked"]["dropped_files"] == 3
    with zipfile.ZipFile(repacked) as zf:
        names = zf.namelist()
        record = zf.read("ray-2.55.1.dist-info/RECORD").decode()
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_LZMA}
    assert "ray/dashboard/agent.py" in names and "ray/_raylet.so" in names
    assert not [n for n in names if n.startswith(("ray/jars/", "ray/tune/", "ray/dashboard/client/"))]
    assert "ray/jars" not in record and "ray/_raylet.so," in record
    assert gpu_bundle.check_record(repacked) == []
    assert "ray-2.55.1" in (out / "MANIFEST.md").read_text()
    assert (out / "requirements.txt").read_text() == "iterators==0.0.2\nray==2.55.1\n"
    install = (out / "install.sh").read_text()
    assert "--no-index --no-deps" in install and "--system-site-packages" in install
    # pip installs the LZMA-compressed wheel (as for the GPU machine: cp312, --no-deps).
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                    "--no-compile", "--target", str(target), "--python-version", "3.12",
                    "--platform", "manylinux2014_x86_64", "--implementation", "cp",
                    "--only-binary=:all:", str(repacked)], check=True)
    assert (target / "ray" / "_raylet.so").read_bytes() == bytes(range(256)) * 2000
    assert not (target / "ray" / "jars").exists()


def test_check_record_finds_a_broken_wheel(tmp_path):
    wheel = fake_wheel(tmp_path, "demo", "1.0", {"demo/__init__.py": b"a = 1\n"})
    broken = tmp_path / "broken.whl"
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(broken, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, b"a = 2\n" if info.filename == "demo/__init__.py" else data)
        dst.writestr("demo/extra.py", b"")
    problems = gpu_bundle.check_record(broken)
    assert any("demo/__init__.py: hash" in p for p in problems)
    assert any("demo/extra.py: not in RECORD" in p for p in problems)


def test_bundle_over_the_limit_fails(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "iterators", "0.0.2", {"iterators/__init__.py": b"x = 1\n" * 100})
    monkeypatch.setattr(gpu_bundle, "LIMIT", 100)
    assert gpu_bundle.main(["--out", str(tmp_path / "b"), "--wheels-from", str(wheels)]) == 1


def test_what_the_bundle_leaves_out():
    for name in ("torch", "nvidia-cublas-cu12", "nvidia_cudnn_cu12", "triton", "numpy", "uv",
                 "Pillow", "scikit_learn"):
        assert gpu_bundle.excluded(name), name
    for name in ("flwr", "ray", "opacus", "open_clip_torch", "pydantic", "rich", "matplotlib",
                 "dp-accounting", "protobuf"):
        assert gpu_bundle.excluded(name) is None, name
