"""The text of report.md: winners, tables, runs, skipped runs, figures."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from fl_sim.report.collect import LABELS, METRICS, Study
from fl_sim.report.tables import METRIC_NAMES, Winner, winners

FIGURE_TEXT = {
    "spider": "Spider plots (the paper's Figure 4): global test metrics per backbone, "
              "one plot per strategy × optimizer",
    "convergence": "Convergence: global test metrics per round, strategies overlaid",
    "clients": "Per-client test metrics at the best round",
}


def score(row: pd.Series, metric: str) -> str:
    """'mean ± std' of a seed_table row; the mean alone for a single seed."""
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def metrics_table(table: pd.DataFrame, with_test_set: bool) -> str:
    keys = [*LABELS, "test_set"] if with_test_set else list(LABELS)
    header = [*keys, "seeds", *(METRIC_NAMES[m] for m in METRICS)]
    return markdown_table(header, [
        [str(r[k]) for k in keys] + [str(r["seeds"])]
        + [score(r, m) for m in METRICS]
        for _, r in table.iterrows()])


def config_name(row: pd.Series) -> str:
    return " · ".join(str(row[k]) for k in LABELS)


def winner_line(w: Winner) -> str:
    m = w.metric
    head = f"**{METRIC_NAMES[m]}**: {config_name(w.best)} ({score(w.best, m)})"
    if w.runner_up is None:
        return f"{head}, the only configuration"
    versus = f"{head} leads {config_name(w.runner_up)} ({score(w.runner_up, m)}) by {w.gap:.3f}"
    if math.isnan(w.spread):
        return f"{versus}; seed spread unknown (a single seed)"
    verdict = "exceeds" if w.gap > w.spread else "is within"
    return f"{versus}, which {verdict} the seed spread ({w.spread:.3f})"


def render(study: Study, table: pd.DataFrame, figures: dict[str, list[Path]]) -> str:
    runs = study.runs.sort_values("run")
    selection = ", ".join(sorted(runs["selection_metric"].unique()))
    is_global = table["test_set"] == "global"
    parts = [
        f"# Report: {study.name}",
        f"{len(runs)} complete run(s), {len(study.skipped)} skipped, from `{study.folder}`. "
        f"Each run's best round is chosen on the federated validation {selection} (never on "
        "test); every number below is a test metric at that round, as mean ± std over seeds "
        "(sample std; a single seed shows the mean alone). Precision, recall and F1 are "
        "support-weighted; AVG is the mean of the other five. `test_metrics.csv` holds the "
        "same numbers unrounded.",
        "## Winners on the global test set",
        "Per metric, the configuration with the highest mean against the next one. The gap "
        "exceeds the seed spread when it is larger than the two configurations' std summed.",
        "\n".join(f"- {winner_line(w)}" for w in winners(table)),
        "## Global test set",
        metrics_table(table[is_global], with_test_set=False),
        "## Client test sets",
        metrics_table(table[~is_global], with_test_set=True),
        "## Runs",
        markdown_table(
            ["run", *LABELS, "seed", "best round", "rounds", "wall time (s)", "MB sent"],
            [[r["run"], *(str(r[k]) for k in LABELS), str(r["seed"]), str(r["best_round"]),
              str(r["rounds"]), f"{r['wall_time_s']:.0f}", f"{r['bytes_sent'] / 1e6:.1f}"]
             for _, r in runs.iterrows()]),
        "## Skipped runs",
        "\n".join(f"- `{name}`: {why}" for name, why in study.skipped) or "None.",
    ]
    for kind, paths in figures.items():
        parts += [f"## {FIGURE_TEXT[kind]}", "\n\n".join(f"![{p.stem}]({p.name})" for p in paths)]
    return "\n\n".join(parts) + "\n"
