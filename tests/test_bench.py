"""`fl-sim bench --quick` produces every row (that it is fast is for BENCHMARKS.md, not a test),
and keeps them when a later item fails."""

import pytest
from rich.console import Console

from fl_sim import bench
from fl_sim.cli import main


@pytest.mark.slow
def test_quick_bench_writes_every_row(ham_root, tmp_path):
    out = tmp_path / "BENCH.md"
    assert main(["bench", "--quick", "--ham-root", str(ham_root), "--output", str(out)]) == 0
    text = out.read_text()
    assert "## fl-sim bench --quick" in text and "Device:" in text and "flwr 1.39" in text
    for row in ("| data: images/s at 64 px", "| FL overhead: steady round",
                "| FL overhead: fixed cost per round", "| FL overhead: start-up",
                "| DP-SGD: train images/s, test_resnet at 32 px",
                "| communication: convnext_tiny", "| communication: pack",
                "| communication: unpack", "| communication: aggregate 3 replies",
                "| communication: simulation transport", "| communication: deployment wire",
                "| communication: server per round", "| communication: client per round"):
        assert row in text, row
    lines = [line for line in text.splitlines() if line.startswith(("| data", "| FL overhead: steady"))]
    for line in lines:  # measured ratios, not placeholders
        ratio, note = (cell.strip() for cell in line.split("|")[4:6])
        assert ratio.endswith("x") and float(ratio[:-1]) > 0
        assert ": met;" in note or ": NOT met;" in note, note  # the target's verdict


def test_rows_measured_before_a_failing_item_are_kept(tmp_path, monkeypatch):
    def crash(**_):
        raise RuntimeError("simulated crash in the FL-overhead item")

    monkeypatch.setattr(bench, "bench_overhead", crash)
    monkeypatch.setattr(bench, "bench_dpsgd", lambda *a, **k: [])  # minutes on a CPU
    out = tmp_path / "BENCH.md"
    with pytest.raises(RuntimeError, match="simulated crash"):  # the failure still surfaces
        bench.run_bench(True, tmp_path / "no-ham", out, Console(quiet=True))
    text = out.read_text()
    assert "## fl-sim bench --quick" in text and "(incomplete: a later item failed)" in text
    assert "| data | - | - | - | skipped: no HAM10000 copy at" in text  # the item before it
