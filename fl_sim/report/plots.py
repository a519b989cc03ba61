"""The report's PNG figures: one function per kind of figure.

Figures are built on `matplotlib.figure.Figure`, not pyplot, so they render with Agg and
leave no global figure state behind in the calling process.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fl_sim.report.collect import LABELS, METRICS
from fl_sim.report.tables import METRIC_NAMES, compared_groups, group_name
from fl_sim.report.uncertainty import Bootstrap, configuration

AT_BEST = ("mean over seeds at each run's best-on-validation round; error bars: the 95 % "
           "interval, or ± std where a run kept no predictions")


def colors(names: list[str]) -> dict[str, tuple]:
    """A fixed colour per name, so a strategy keeps its colour across figures."""
    palette = colormaps["tab10"].colors
    return {n: palette[i % len(palette)] for i, n in enumerate(sorted(names))}


METRIC_COLORS = colors([METRIC_NAMES[m] for m in METRICS])


def slug(*parts: str) -> str:
    # '+' stays: an exponent's sign tells lr1e+30 from lr1e-30.
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", "_".join(p for p in parts if p)).strip("-")


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def error_bars(rows: pd.DataFrame, metric: str) -> tuple[pd.Series, pd.Series]:
    """How far the error bar of each seed_table row reaches below and above its mean: to
    the 95 % interval where the row has one, else ± std (0 for a single seed)."""
    mean, std = rows[f"{metric}_mean"], rows[f"{metric}_std"].fillna(0)
    below = (mean - rows[f"{metric}_lo"]).fillna(std)
    return below, (rows[f"{metric}_hi"] - mean).fillna(std)


def _grouped_bars(ax: Axes, mean: pd.DataFrame, below: pd.DataFrame, above: pd.DataFrame,
                  palette: dict[str, tuple], ylim: tuple[float, float] | None = (0, 1)) -> None:
    """One group of bars per row of `mean`, one bar per column, error bars reaching `below`
    and `above` it; ylim None fits the axis to the bars (gaps can be negative)."""
    x = np.arange(len(mean.index))
    width = 0.8 / len(mean.columns)
    for i, col in enumerate(mean.columns):
        offset = (i - (len(mean.columns) - 1) / 2) * width
        ax.bar(x + offset, mean[col], width,
               yerr=np.vstack([below[col].fillna(0), above[col].fillna(0)]), capsize=2,
               label=str(col), color=palette[col])
    ax.set_xticks(x, [str(i) for i in mean.index])
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)


def spider_plot(table: pd.DataFrame, strategy: str, optimizer: str, path: Path) -> Path:
    """Global test metrics of one strategy × optimizer: one axis per backbone, one polygon
    per metric (the paper's Figure 4). Fewer than three backbones make no polygon, so those
    are drawn as grouped bars."""
    rows = table[(table["test_set"] == "global") & (table["strategy"] == strategy)
                 & (table["optimizer"] == optimizer)].set_index("model")
    names = [METRIC_NAMES[m] for m in METRICS]
    means = rows[[f"{m}_mean" for m in METRICS]].set_axis(names, axis=1)
    title = f"{strategy} · {optimizer}: global test metrics per backbone"
    if len(rows) < 3:
        fig = Figure(figsize=(8, 5.5), layout="constrained")
        ax = fig.add_subplot()
        below, above = (pd.DataFrame({n: bars[i] for n, bars in
                                      zip(names, (error_bars(rows, m) for m in METRICS))})
                        for i in (0, 1))
        _grouped_bars(ax, means, below, above, METRIC_COLORS)
        ax.set_xlabel("backbone")
        ax.set_ylabel("score")
        fig.legend(title="metric", loc="outside lower center", ncols=len(names))
        fig.suptitle(f"{title}\nbars instead of a spider plot: a spider needs 3+ backbones, "
                     f"here {len(rows)}\n({AT_BEST})", fontsize="medium")
        return _save(fig, path)
    fig = Figure(figsize=(8, 6.5), layout="constrained")
    ax = fig.add_subplot(projection="polar")
    angles = np.linspace(0, 2 * np.pi, len(rows), endpoint=False)
    closed = np.append(angles, angles[0])
    for metric in names:
        values = np.append(means[metric].to_numpy(), means[metric].iloc[0])
        ax.plot(closed, values, marker="o", color=METRIC_COLORS[metric], label=metric)
        ax.fill(closed, values, color=METRIC_COLORS[metric], alpha=0.05)
    ax.set_xticks(angles, list(rows.index))
    # Zoom the radius onto the scores, else close backbones overlap at the rim.
    low, high = means.min().min(), means.max().max()
    ax.set_ylim(max(0.0, low - 0.05), min(1.0, high + 0.05))
    ax.set_rlabel_position(180 / len(rows))  # radius labels halfway between two backbones
    fig.legend(title="metric", loc="outside lower center", ncols=len(names))
    fig.suptitle(f"{title}\n(mean over seeds, at each run's best-on-validation round)",
                 fontsize="medium")
    return _save(fig, path)


def convergence_plot(rows: pd.DataFrame, model: str, optimizer: str,
                     palette: dict[str, tuple], boot: Bootstrap, path: Path) -> Path:
    """Global test metrics per round of one model × optimizer, the strategies overlaid; the
    band is each round's 95 % interval of the mean over seeds (± std for a strategy whose
    runs kept no predictions)."""
    rows = rows[(rows["scope"] == "global") & (rows["model"] == model)
                & (rows["optimizer"] == optimizer)]
    stats = rows.groupby([*LABELS, "round"])[list(METRICS)].agg(["mean", "std"])
    fig = Figure(figsize=(13, 7.5), layout="constrained")
    axes = fig.subplots(2, 3, sharex=True).ravel()
    for config, curves in stats.groupby(level=list(range(len(LABELS)))):
        r = curves.index.get_level_values("round")
        found = [boot.intervals(config, int(k), auroc=False) for k in r]
        for ax, metric in zip(axes, METRICS):
            mean, std = curves[(metric, "mean")], curves[(metric, "std")].fillna(0)
            lo, hi = ((mean - std, mean + std) if any(f is None for f in found) else
                      ([f[metric][0] for f in found], [f[metric][1] for f in found]))
            color = palette[config[0]]
            ax.plot(r, mean, marker=".", color=color, label=config[0])
            ax.fill_between(r, lo, hi, color=color, alpha=0.15)
    for ax, metric in zip(axes, METRICS):
        ax.set_title(METRIC_NAMES[metric])
        ax.grid(alpha=0.3)
    fig.supxlabel("round (0 = initial model)")
    fig.supylabel("score")
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    fig.legend(*axes[0].get_legend_handles_labels(), title="strategy", loc="outside right upper")
    fig.suptitle(f"{model} · {optimizer}: global test metrics per round "
                 "(mean over seeds, band = 95 % interval)")
    return _save(fig, path)


def client_bars_plot(table: pd.DataFrame, model: str, optimizer: str,
                     palette: dict[str, tuple], path: Path) -> Path:
    """Test metrics of one model × optimizer on every client's test set and the global one."""
    rows = table[(table["model"] == model) & (table["optimizer"] == optimizer)]
    test_sets = list(pd.unique(rows["test_set"]))  # the table's order: global, client 0, ...
    fig = Figure(figsize=(max(12, 3.3 * len(test_sets)), 7.5), layout="constrained")
    axes = fig.subplots(2, 3, sharey=True).ravel()
    for ax, metric in zip(axes, METRICS):
        below, above = error_bars(rows, metric)
        means, below, above = (rows.assign(value=v).pivot(index="test_set", columns="strategy",
                                                           values="value").reindex(test_sets)
                               for v in (rows[f"{metric}_mean"], below, above))
        _grouped_bars(ax, means, below, above, palette)
        ax.set_title(METRIC_NAMES[metric])
    fig.supxlabel("test set")
    fig.supylabel("score")
    fig.legend(*axes[0].get_legend_handles_labels(), title="strategy", loc="outside right upper")
    fig.suptitle(f"{model} · {optimizer}: test metrics per client\n({AT_BEST})")
    return _save(fig, path)


def pooled_gap_plot(rows: pd.DataFrame, palette: dict[str, tuple], boot: Bootstrap,
                    path: Path) -> Path:
    """One group of versus_pooled (a model × optimizer × recipe): per metric, a bar per
    strategy of its gap to pooled, error bars = the paired 95 % interval of the gap (± the
    strategy's std where a run kept no predictions)."""
    names = [METRIC_NAMES[m] for m in METRICS]
    is_ref = rows["strategy"] == rows["reference"]
    pooled = rows[is_ref].iloc[0]
    others = rows[~is_ref]
    gaps = others.set_index("strategy")[[f"{m}_gap" for m in METRICS]].set_axis(names, axis=1).T
    below, above = gaps.copy(), gaps.copy()
    for _, row in others.iterrows():
        for metric, name in zip(METRICS, names):
            tested = boot.difference(configuration(row), configuration(pooled), metric,
                                     row[f"{metric}_gap"])
            std = 0.0 if np.isnan(row[f"{metric}_std"]) else row[f"{metric}_std"]
            below.at[name, row["strategy"]] = std if tested is None else tested.value - tested.lo
            above.at[name, row["strategy"]] = std if tested is None else tested.hi - tested.value
    fig = Figure(figsize=(10, 6), layout="constrained")
    ax = fig.add_subplot()
    _grouped_bars(ax, gaps, below, above, palette, ylim=None)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("metric (global test set)")
    ax.set_ylabel(f"strategy − {pooled['strategy']}")
    # Below the axes: a legend at the upper right covered the title.
    fig.legend(loc="outside lower center", ncols=min(len(others), 4))
    group = group_name(pooled["model"], pooled["optimizer"], pooled["recipe"])
    fig.suptitle(f"{group}: gap to {pooled['strategy']} on the global test set\n"
                 "(mean over seeds at each run's best round; error bars: the paired 95 % "
                 "interval of the gap)", fontsize="medium")
    return _save(fig, path)


def write_figures(rows: pd.DataFrame, table: pd.DataFrame, versus: pd.DataFrame,
                  boot: Bootstrap, out: Path) -> dict[str, list[Path]]:
    """Every figure of a report into `out`, by kind."""
    palette = colors(list(table["strategy"].unique()))
    figures: dict[str, list[Path]] = {"spider": [], "convergence": [], "clients": [], "pooled": []}
    # A spider of the global test set: none for a strategy without a global model (FedPer).
    for strategy, optimizer in _pairs(table[table["test_set"] == "global"], "strategy",
                                      "optimizer"):
        name = slug(strategy, optimizer)
        figures["spider"].append(spider_plot(table, strategy, optimizer, out / f"spider_{name}.png"))
    for model, optimizer in _pairs(table, "model", "optimizer"):
        name = slug(model, optimizer)
        figures["convergence"].append(
            convergence_plot(rows, model, optimizer, palette, boot,
                             out / f"convergence_{name}.png"))
        figures["clients"].append(
            client_bars_plot(table, model, optimizer, palette, out / f"clients_{name}.png"))
    for key, group in compared_groups(versus):
        if len(group) > 1:  # pooled alone has no gap to draw
            figures["pooled"].append(
                pooled_gap_plot(group, palette, boot, out / f"vs_pooled_{slug(*key)}.png"))
    return figures


def _pairs(table: pd.DataFrame, a: str, b: str) -> list[tuple[str, str]]:
    return list(table[[a, b]].drop_duplicates().itertuples(index=False, name=None))
