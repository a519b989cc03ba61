"""What SecAgg+ costs against plain FedAvg, side by side in one Simulation Engine per size.

    python benchmarks/bench_secure_aggregation.py [--clients 3 10] [--model test_convnext]
        [--rounds 10] [--out /tmp/secagg-bench]

For each client count, one `fl-sim run` of the quickstart's data and model (synthetic
32 px images, 1,400 of them, a random partition) with two runs: FedAvg, and FedAvg under
`secure_aggregation` (Flower's defaults). Reads their summary.json and prints a Markdown
table: the median round time, the bytes per round each way, and the final global test
ACC / BACC of both with their difference (the quantization error's effect).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

from fl_sim.cli import main as fl_sim


def study(out: Path, clients: int, model: str, rounds: int) -> Path:
    path = out / f"secagg_{clients}.yaml"
    path.write_text(yaml.safe_dump({
        "study": f"secagg_{clients}", "out": str(out),
        "data": {"dataset": "synthetic", "image_size": 32, "synthetic": {"num_images": 1400},
                 "partition": {"method": "random", "num_clients": clients, "seed": 0},
                 "global_test": {"source": "holdout", "fraction": 0.15}},
        "defaults": {"rounds": rounds, "batch_size": 32, "model": {"name": model},
                     "optimizer": {"name": "adamw"}, "resources": {"num_cpus": "auto"}},
        "grid": {"secure_aggregation": [None, {}]},
    }))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--model", default="test_convnext")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("/tmp/secagg-bench"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for clients in args.clients:
        assert fl_sim(["run", str(study(args.out, clients, args.model, args.rounds))]) == 0
        runs = {}
        for summary_file in (args.out / f"secagg_{clients}").glob("*/summary.json"):
            summary = json.loads(summary_file.read_text())
            runs["secagg" if summary["run"].endswith("_secagg_s0") else "plain"] = summary
        plain, secure = runs["plain"], runs["secagg"]
        for name, run in (("FedAvg", plain), ("FedAvg + SecAgg+", secure)):
            final = run["final"]["global_test"]
            rows.append(
                f"| {clients} | {name} | {statistics.median(run['round_seconds']):.2f} s | "
                f"{run['bytes_sent'] / run['rounds_done'] / 1e6:.2f} MB | "
                f"{run['bytes_received'] / run['rounds_done'] / 1e6:.2f} MB | "
                f"{final['acc']:.4f} | {final['bacc']:.4f} | "
                + ("" if run is plain else
                   f"{final['acc'] - plain['final']['global_test']['acc']:+.4f} / "
                   f"{final['bacc'] - plain['final']['global_test']['bacc']:+.4f}") + " |")
    print(f"\n{args.model}, {args.rounds} rounds:\n")
    print("| clients | run | median round | sent / round | received / round | final test ACC "
          "| final test BACC | Δ ACC / Δ BACC |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
