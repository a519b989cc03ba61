"""The text of report.md: winners, tables, baselines, runs, skipped runs, figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from fl_sim.config import BASELINES
from fl_sim.report.collect import CLINICAL, LABELS, METRICS, Study
from fl_sim.report.tables import (
    METRIC_NAMES, Winner, compared_groups, group_name, local_clients_table, winners,
)
from fl_sim.report.uncertainty import Bootstrap, Difference, configuration, with_holm
from fl_sim.stats import METRICS as TESTED

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


WINNERS_TEXT = (
    "Per metric, the configuration with the highest mean against the next one. Where both "
    "kept their global test predictions, a winner is named only where the paired bootstrap "
    "on the same test images (and the same seeds, where both have them) tells them apart: "
    "its 95 % interval of the difference leaves 0 out and the p-value, Holm-adjusted over "
    "the metrics of this list, is below 0.05; otherwise the line says \"not distinguishable "
    "on N test images\" with the interval, the largest difference the test set could hide. "
    "Without predictions (runs made before fl-sim kept them), the gap is set against the "
    "seed spread (the two std summed). The pooled and local baselines are references, not "
    "contenders: where the study holds federated runs, only those are ranked (the "
    "baselines are compared below).")
PAIRED_TEXT = (
    "Paired tests: each row is the first strategy minus the second on the same global test "
    "images (and the same seeds where both have them), with the 95 % interval of the "
    "difference and the p-value Holm-adjusted over every cell of this table; **bold**: "
    "distinguishable (the interval leaves 0 out and the adjusted p is below 0.05).")
CLINICAL_TEXT = (
    "Macro one-vs-rest AUROC (the mean over the classes present, with its 95 % interval), "
    "melanoma sensitivity and specificity at the model's own decision (its most probable "
    "class), and the expected calibration error of the top class (15 bins), at each run's "
    "best round, mean ± std over seeds.")


def score(row: pd.Series, metric: str) -> str:
    """'mean ± std [lo, hi]' of a seed_table row: the mean alone for a single seed, the 95 %
    interval where the row has one; '—' where the run has no such metric."""
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    if math.isnan(mean):
        return "—"
    text = f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"
    lo, hi = row.get(f"{metric}_lo", math.nan), row.get(f"{metric}_hi", math.nan)
    return text if math.isnan(lo) else f"{text} [{lo:.3f}, {hi:.3f}]"


def p_text(p: float) -> str:
    """A p-value, to three decimals down to 0.001."""
    return f"{p:.3f}" if p >= 0.001 else "< 0.001"


def verdict(d: Difference) -> str:
    """The paired test of a difference in words, with its interval (and Holm's p)."""
    holm = "" if math.isnan(d.p_holm) else f", Holm {p_text(d.p_holm)}"
    tested = f"paired 95 % interval [{gap(d.lo)}, {gap(d.hi)}], p {p_text(d.p)}{holm}"
    if d.distinguishable:
        return f"distinguishable ({tested})"
    return f"not distinguishable on {d.n:,} test images ({tested})"


def difference_cell(d: Difference | None) -> str:
    """Δ [lo, hi] and the Holm-adjusted p of a paired difference, bold where distinguishable."""
    if d is None:
        return "—"
    text = f"{gap(d.value)} [{gap(d.lo)}, {gap(d.hi)}] (p {p_text(d.p_holm)})"
    return f"**{text}**" if d.distinguishable else text


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


def winner_line(w: Winner, tested: Difference | None = None) -> str:
    """The winner of one metric against the runner-up: with `tested` (their paired test),
    a winner named only where the test tells them apart; else the seed-spread rule."""
    m = w.metric
    head = f"**{METRIC_NAMES[m]}**: {config_name(w.best)} ({score(w.best, m)})"
    if w.runner_up is None:
        return f"{head}, the only configuration"
    runner_up = f"{config_name(w.runner_up)} ({score(w.runner_up, m)})"
    if tested is not None:
        if tested.distinguishable:
            return f"{head} wins against {runner_up} by {gap(w.gap)}: {verdict(tested)}"
        return (f"**{METRIC_NAMES[m]}**: no winner between {config_name(w.best)} "
                f"({score(w.best, m)}) and {runner_up}: the difference {gap(w.gap)} is "
                f"{verdict(tested)}")
    versus = f"{head} leads {runner_up} by {w.gap:.3f}"
    if math.isnan(w.spread):
        return f"{versus}; seed spread unknown (a single seed)"
    relation = "exceeds" if w.gap > w.spread else "is within"
    return f"{versus}, which {relation} the seed spread ({w.spread:.3f})"


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


def baselines_section(study: Study, versus: pd.DataFrame, boot: Bootstrap) -> list[str]:
    """Federated vs pooled vs local: a table per group that holds a pooled run, and the
    group's paired tests where its runs kept their predictions."""
    parts = ["## Federated vs pooled vs local"]
    if not (versus["strategy_name"] == "pooled").any():
        return [*parts, NO_POOLED]
    parts.append(BASELINES_TEXT)
    for key, rows in compared_groups(versus):
        parts += [f"### {group_name(*key)}", versus_pooled_table(rows)]
        if len(rows) > 1 and (paired := paired_table(rows, boot)) is not None:
            parts += [PAIRED_TEXT, paired]
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


def holm_adjusted(tests: list[Difference | None]) -> list[Difference | None]:
    """The tests Holm-adjusted as one family (the missing ones, None, stay out of it)."""
    adjusted = iter(with_holm([d for d in tests if d is not None]))
    return [None if d is None else next(adjusted) for d in tests]


def tested_family(boot: Bootstrap, pairs: list[tuple[pd.Series, pd.Series]],
                  metrics: Sequence[str]) -> list[list[Difference | None]]:
    """Each pair's paired difference (a − b) per metric, Holm-adjusted as one family."""
    flat = holm_adjusted([boot.difference(configuration(a), configuration(b), m,
                                          a[f"{m}_mean"] - b[f"{m}_mean"])
                          for a, b in pairs for m in metrics])
    return [flat[i:i + len(metrics)] for i in range(0, len(flat), len(metrics))]


def paired_table(rows: pd.DataFrame, boot: Bootstrap) -> str | None:
    """One group of versus_pooled: every other strategy against pooled, and each federated
    strategy against local; None where no pair has predictions."""
    pooled = rows[rows["strategy"] == rows["reference"]].iloc[0]
    federated = [r for _, r in rows.iterrows() if r["strategy_name"] not in BASELINES]
    local = [r for _, r in rows.iterrows() if r["strategy_name"] == "local"]
    pairs = [(r, pooled) for _, r in rows.iterrows() if r["strategy"] != pooled["strategy"]]
    pairs += [(r, lo) for lo in local for r in federated]
    cells = tested_family(boot, pairs, TESTED)
    if all(d is None for row in cells for d in row):
        return None
    return markdown_table(
        ["comparison", *(f"Δ {METRIC_NAMES[m]}" for m in TESTED)],
        [[f"{a['strategy']} − {b['strategy']}", *map(difference_cell, row)]
         for (a, b), row in zip(pairs, cells)])


def clinical_table(table: pd.DataFrame) -> str | None:
    """The global test set's AUROC (with its interval), melanoma sensitivity and
    specificity, and calibration error per configuration; None where no run has them."""
    glob = table[table["test_set"] == "global"]
    if glob["auroc_mean"].isna().all():
        return None
    shown = [m for m in CLINICAL if glob[f"{m}_mean"].notna().any()]
    return markdown_table([*LABELS, "seeds", *(METRIC_NAMES[m] for m in shown)], [
        [str(r[k]) for k in LABELS] + [str(r["seeds"])] + [score(r, m) for m in shown]
        for _, r in glob.iterrows()])


def winners_section(study: Study, table: pd.DataFrame, boot: Bootstrap) -> list[str]:
    """Per metric the best configuration against the runner-up, by their paired test where
    both have predictions (Holm over the metrics), else by the seed spread."""
    found = winners(contenders(study, table))
    if not found:
        return []
    tests = holm_adjusted([
        None if w.runner_up is None else boot.difference(
            configuration(w.best), configuration(w.runner_up), w.metric, w.gap)
        for w in found])
    return ["## Winners on the global test set", WINNERS_TEXT,
            "\n".join(f"- {winner_line(w, t)}" for w, t in zip(found, tests))]


def contenders(study: Study, table: pd.DataFrame) -> pd.DataFrame:
    """The rows of the federated configurations, or all rows if the study has none."""
    baseline = study.runs.loc[study.runs["strategy_name"].isin(BASELINES), "strategy"]
    federated = table[~table["strategy"].isin(set(baseline))]
    return federated if (federated["test_set"] == "global").any() else table


def render(study: Study, table: pd.DataFrame, versus: pd.DataFrame, boot: Bootstrap,
           figures: dict[str, list[Path]], extra: Sequence[str] = ()) -> str:
    """report.md; `extra`: sections placed after the baselines (personalization, feature
    probes)."""
    runs = study.runs.sort_values("run")
    selection = ", ".join(sorted(runs["selection_metric"].unique()))
    is_global = table["test_set"] == "global"
    clinical = clinical_table(table)
    parts = [
        f"# Report: {study.name}",
        f"{len(runs)} complete run(s), {len(study.skipped)} skipped, from `{study.folder}`. "
        f"Each run's best round is chosen on the federated validation {selection} (never on "
        "test); every number below is a test metric at that round, as mean ± std over seeds "
        "(sample std; a single seed shows the mean alone), then its 95 % bootstrap interval "
        "in brackets where the runs kept what it needs (docs/report.md: on the global test "
        "set, over its images and the seeds; on a client's split, the interval the client "
        "sent). Precision, recall and F1 are support-weighted; AVG is the mean of the other "
        "five. `test_metrics.csv` holds the same numbers unrounded.",
        *winners_section(study, table, boot),
        "## Global test set",
        metrics_table(table[is_global], with_test_set=False),
        *(["## Clinical metrics on the global test set", CLINICAL_TEXT, clinical]
          if clinical else []),
        "## Client test sets",
        metrics_table(table[~is_global], with_test_set=True),
        *baselines_section(study, versus, boot),
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
