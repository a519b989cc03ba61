"""The robustness study's table (docs/results.md): each rule's global test BACC and ACC at its
best round, with 95 % intervals, and paired differences on the same test images (Holm over
each metric's 35): each rule under each attack against itself without, and each rule without an
attack against FedAvg without.

    python benchmarks/robustness_table.py runs/ham10000-robustness
"""

from __future__ import annotations

import sys
from pathlib import Path

from fl_sim.report.collect import load_study
from fl_sim.report.uncertainty import Bootstrap, with_holm
from fl_sim.server.run_log import read_summary

METRICS = ("bacc", "acc")


def main(folder: Path) -> None:
    study = load_study(folder)
    boot = Bootstrap(study)
    runs = study.runs.copy()
    runs["rule"] = runs["strategy"].str.split(" ").str[0]
    runs["attack"] = runs["strategy"].str.extract(r"wce-cosine-?([a-z]*)")[0].replace("", "none")
    config = {(r.rule, r.attack): (r.strategy, r.model, r.optimizer) for r in runs.itertuples()}
    best = {r.run: read_summary(folder / r.run)["best"]["global_test"] for r in runs.itertuples()}
    score = {(r.rule, r.attack, m): best[r.run][m] for r in runs.itertuples() for m in METRICS}
    rules = list(dict.fromkeys(runs["rule"]))
    attacks = ["none", *sorted(a for a in set(runs["attack"]) if a != "none")]
    pairs = [((rule, attack), (rule, "none")) for rule in rules for attack in attacks[1:]]
    pairs += [((rule, "none"), ("fedavg", "none")) for rule in rules if rule != "fedavg"]
    # Holm per metric: with B = 2,000 draws the smallest two-sided p is 2/2001, so a family
    # of more than 49 comparisons could never pass 0.05 (one of 70 could not).
    diffs = [d for m in METRICS for d in with_holm([
        boot.difference(config[a], config[b], m, score[(*a, m)] - score[(*b, m)])
        for a, b in pairs])]
    by_pair = {(d.a, d.b, d.metric): d for d in diffs}

    for metric in METRICS:
        print(f"\n{metric.upper()}, (attacked − clean; * a finding)\n")
        print("| rule | " + " | ".join(attacks) + " |\n|---|" + "---|" * len(attacks))
        for rule in rules:
            cells = []
            for attack in attacks:
                lo, hi = boot.intervals(config[rule, attack], auroc=False)[metric]
                cell = f"{score[rule, attack, metric]:.3f} [{lo:.3f}, {hi:.3f}]"
                if attack != "none":
                    d = by_pair[config[rule, attack], config[rule, "none"], metric]
                    cell += f" ({d.value:+.3f}{'*' if d.distinguishable else ''})"
                cells.append(cell)
            print(f"| {rule} | " + " | ".join(cells) + " |")
    print("\nThe eight smallest Holm-adjusted p-values:\n")
    print("| a − b | metric | difference [95 % interval] | Holm p | verdict |\n|---|---|---|---|---|")
    for d in sorted(diffs, key=lambda d: d.p_holm)[:8]:  # the strongest, findings or not
        a, b = (next(k for k, v in config.items() if v == c) for c in (d.a, d.b))
        print(f"| {'/'.join(a)} − {'/'.join(b)} | {d.metric} | {d.value:+.3f} "
              f"[{d.lo:+.3f}, {d.hi:+.3f}] | {d.p_holm:.3f} | "
              f"{'a finding' if d.distinguishable else 'not distinguishable'} |")
    print(f"\n{sum(d.distinguishable for d in diffs)} of {len(diffs)} differences "
          f"distinguishable on {diffs[0].n} test images (Holm over each metric's "
          f"{len(pairs)}).")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
