"""What the intervals and paired tests add to `fl-sim report`, measured side by side.

    python benchmarks/bench_report_intervals.py [--runs 20] [--images 1500] [--rounds 8]

Writes a study of `--runs` run folders as fl-sim writes them (pooled, local, FedAvg,
FedProx and FedAdam, seeds until the count is reached; config.yaml, metrics.jsonl,
summary.json, predictions/ of every round for a global test set of `--images` images of
HAM10000's class mix, and each client's clients/<k>/predictions/ of every round for a test
split of a fifth as many), then times `write_report` on three copies: without any
predictions (the report as it was), with the global test set's only (intervals, paired
tests, convergence bands), and with the clients' too (the sites' tables). Prints a
Markdown table of the three and the differences.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from fl_sim.config import RunConfig, run_name
from fl_sim.metrics import classification_metrics
from fl_sim.report import write_report
from fl_sim.predictions import CLIENTS as CLIENT_FOLDERS, client_folder, save_predictions

STRATEGIES = ({"name": "pooled"}, {"name": "local"}, {"name": "fedavg"},
              {"name": "fedprox", "proximal_mu": 0.01}, {"name": "fedadam"})
SKILL = {"pooled": 1.6, "local": 0.9, "fedavg": 1.4, "fedprox": 1.35, "fedadam": 1.3}
MIX = np.array([.03, .05, .11, .01, .11, .67, .02])
CLIENTS = 3


def probabilities(labels: np.ndarray, skill: float, rng: np.random.Generator) -> np.ndarray:
    logits = rng.normal(size=(len(labels), len(MIX)))
    logits[np.arange(len(labels)), labels] += skill
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def write_run(study: Path, strategy: dict, seed: int, labels: np.ndarray, rounds: int) -> None:
    cfg = RunConfig(rounds=rounds, model={"name": "tf_efficientnet_lite0"}, strategy=strategy,
                    seed=seed)
    run_dir = study / run_name(cfg)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(
        {"study": study.name, "run": run_dir.name, "data": {"dataset": "synthetic"},
         "run_config": cfg.model_dump(mode="json")}, sort_keys=False))
    rng = np.random.default_rng([seed, len(strategy["name"])])
    ids = np.array([f"img{i:05d}" for i in range(len(labels))])
    models = CLIENTS if strategy["name"] == "local" else 1
    rows = []
    split = len(labels) // 5  # each client's own test split
    for r in range(rounds + 1):
        skill = SKILL[strategy["name"]] * r / rounds
        probs = [probabilities(labels, skill, rng) for _ in range(models)]
        save_predictions(run_dir, r, ids, labels, probs)
        scores = [classification_metrics(labels, p.argmax(1), len(MIX), probs=p) for p in probs]
        glob = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
        rows.append({"round": r, "scope": "global", "client": None, "split": "test", **glob})
        if r:
            for c in range(CLIENTS):
                own = slice(c * split, (c + 1) * split)
                save_predictions(client_folder(run_dir, c), r, ids[own], labels[own],
                                 [probabilities(labels[own], skill, rng)])
            rows += [{"round": r, "scope": "client", "client": c, "split": s, **glob}
                     for c in range(CLIENTS) for s in ("val", "test")]
            rows.append({"round": r, "scope": "federated", "client": None, "split": "val", **glob})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run_dir / "summary.json").write_text(json.dumps(
        {"run": run_dir.name, "complete": True, "rounds": rounds, "best": {"round": rounds},
         "final": {"round": rounds}, "wall_time_s": 1.0, "bytes_sent": 0}))


def timed_report(study: Path) -> float:
    start = time.perf_counter()
    write_report(study)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    labels = np.random.default_rng(0).choice(len(MIX), args.images, p=MIX)
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "bench-intervals"
        grid = itertools.islice(((s, seed) for seed in itertools.count()
                                 for s in STRATEGIES), args.runs)
        for strategy, seed in grid:
            write_run(study, strategy, seed, labels, args.rounds)
        without, server_only = Path(tmp) / "bench-plain", Path(tmp) / "bench-global"
        for copy, removed in ((without, ("predictions", CLIENT_FOLDERS)),
                              (server_only, (CLIENT_FOLDERS,))):
            shutil.copytree(study, copy)
            for folder in (f for name in removed for f in copy.glob(f"*/{name}")):
                shutil.rmtree(folder)
        plain, intervals, sites = (timed_report(s) for s in (without, server_only, study))
    print(f"| report of {args.runs} runs, {args.images} test images, {args.rounds} rounds "
          "| seconds |\n|---|---|")
    print(f"| without predictions (no intervals) | {plain:.1f} |")
    print(f"| with intervals and paired tests | {intervals:.1f} |")
    print(f"| and the sites' tables ({CLIENTS} clients' own splits) | {sites:.1f} |")
    print(f"| added by the bootstrap | {intervals - plain:+.1f} |")
    print(f"| added by the sites' tables | {sites - intervals:+.1f} |")


if __name__ == "__main__":
    main()
