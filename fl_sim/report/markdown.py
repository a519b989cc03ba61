"""The text of report.md: winners, tables, baselines, runs, skipped runs, figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from fl_sim.config import BASELINES
from fl_sim.report.collect import LABELS, METRICS, Study
from fl_sim.report.tables import (
    METRIC_NAMES, Winner, compared_groups, group_name, local_clients_table, winners,
)

FIGURE_TEXT = {
    "spider": "Spider plots (the paper's Figure 4): global test metrics per backbone, "
              "one plot per strategy × optimizer",
    "convergence": "Convergence: global test metrics per round, strategies overlaid",
    "clients": "Per-client test metrics at the best round",
    "pooled": "Gap to pooled: each strategy's global test metrics minus the pooled run's, "
              "per model × optimizer (× recipe)",
}

BASELINES_TEXT = (
    "Each strategy against the two baselines of the same model, optimizer and recipe (the "
    "settings in brackets; never across recipes): **pooled**, one model trained on the union "
    "of the clients' train splits, and **local**, each client training alone on its own train "
    "split, scored on the global test set as the unweighted mean of the clients' models. "
    "Global test set, mean ± std over seeds at each run's best round; Δ is the strategy's "
    "mean minus the pooled mean (negative: below pooled).")
NO_POOLED = (
    "No complete pooled run in this study. Adding `strategy: {name: pooled}` and "
    "`{name: local}` runs to the grid compares each federated strategy with one model trained "
    "on all clients' train splits and with each client training alone.")
LOCAL_TEXT = (
    "Each client's own model at its run's best round, on the global test set and on the "
    "client's own test split, mean ± std over seeds. The mean over clients on the global test "
    "set is the local row of the tables above.")


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


def gap(value: float) -> str:
    """Signed, 3 decimals, a true minus sign: '+0.012', '−0.012'."""
    return f"{value:+.3f}".replace("-", "−")


def versus_pooled_table(rows: pd.DataFrame) -> str:
    """Rows of versus_pooled: each metric, then its gap to pooled ('—' for the reference)."""
    header = ["strategy", "seeds"]
    header += [h for m in METRICS for h in (METRIC_NAMES[m], f"Δ {METRIC_NAMES[m]}")]
    return markdown_table(header, [
        [r["strategy"], str(r["seeds"])]
        + [cell for m in METRICS for cell in
           (score(r, m), "—" if r["strategy"] == r["reference"] else gap(r[f"{m}_gap"]))]
        for _, r in rows.iterrows()])


def local_table(rows: pd.DataFrame) -> str:
    """Rows of local_clients_table of one configuration: a row per client, the mean first,
    each metric on the global test set beside the same on the client's own test split."""
    on = {name: t.set_index("test_set") for name, t in rows.groupby("on")}
    glob, own = on["global test"], on["own test"]
    header = ["client", "seeds"]
    header += [f"{METRIC_NAMES[m]} {where}" for m in METRICS for where in ("global", "own")]
    return markdown_table(header, [
        ["mean over clients" if t == "global" else t, str(glob.at[t, "seeds"])]
        + [cell for m in METRICS for cell in (score(glob.loc[t], m), score(own.loc[t], m))]
        for t in glob.index])


def baselines_section(study: Study, versus: pd.DataFrame) -> list[str]:
    """Federated vs pooled vs local: a table per group that holds a pooled run."""
    parts = ["## Federated vs pooled vs local"]
    if not (versus["strategy_name"] == "pooled").any():
        return [*parts, NO_POOLED]
    parts.append(BASELINES_TEXT)
    for key, rows in compared_groups(versus):
        parts += [f"### {group_name(*key)}", versus_pooled_table(rows)]
    alone = versus[versus["reference"].isna()]
    if not alone.empty:
        parts.append("Not compared, for want of a pooled run of the same model, optimizer and "
                     f"recipe: {', '.join(config_name(r) for _, r in alone.iterrows())}.")
    if (study.runs["strategy_name"] == "local").any():
        local = local_clients_table(study.at_best(), study.at_best("global_test"))
        parts += ["### Local: each client's own model", LOCAL_TEXT]
        for _, rows in local.groupby(list(LABELS), sort=False):
            parts += [f"#### {config_name(rows.iloc[0])}", local_table(rows)]
    return parts


def contenders(study: Study, table: pd.DataFrame) -> pd.DataFrame:
    """The rows of the federated configurations, or all rows if the study has none."""
    baseline = study.runs.loc[study.runs["strategy_name"].isin(BASELINES), "strategy"]
    federated = table[~table["strategy"].isin(set(baseline))]
    return federated if (federated["test_set"] == "global").any() else table


def render(study: Study, table: pd.DataFrame, versus: pd.DataFrame,
           figures: dict[str, list[Path]], extra: Sequence[str] = ()) -> str:
    """report.md; `extra`: sections placed after the baselines (personalization, feature
    probes)."""
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
        "exceeds the seed spread when it is larger than the two configurations' std summed. "
        "The pooled and local baselines are references, not contenders: where the study "
        "holds federated runs, only those are ranked (the baselines are compared below).",
        "\n".join(f"- {winner_line(w)}" for w in winners(contenders(study, table))),
        "## Global test set",
        metrics_table(table[is_global], with_test_set=False),
        "## Client test sets",
        metrics_table(table[~is_global], with_test_set=True),
        *baselines_section(study, versus),
        *extra,
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
        if not paths:  # e.g. no pooled run
            continue
        parts += [f"## {FIGURE_TEXT[kind]}", "\n\n".join(f"![{p.stem}]({p.name})" for p in paths)]
    return "\n\n".join(parts) + "\n"
