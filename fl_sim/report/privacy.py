"""The privacy section of report.md: per run with `privacy`, the ε each level spent (at its
δ) beside the run's global test BACC, whether a target stopped it, and a figure of the
global test BACC against the ε spent, round by round (the privacy-utility trade-off)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from fl_sim.report.collect import Study
from fl_sim.report.markdown import markdown_table
from fl_sim.report.plots import colors

PRIVACY_TEXT = (
    "Runs with `privacy`: ε spent at the run's δ, by level (client-level: any one client's "
    "whole data, Flower's RDP accountant without amplification by sampling; sample-level: "
    "any one image of a client, Opacus's RDP accountant, the largest over clients). The "
    "accounting covers the released models, not the metrics clients report (docs/privacy.md). "
    "BACC: global test at the best round.")
LEVELS = {"client_level": "client-level", "sample_level": "sample-level (DP-SGD)"}


def _settings(level: str, spent: dict) -> str:
    clip = spent["clipping_norm"] if level == "client_level" else spent["max_grad_norm"]
    who = f", {spent['clipping']} clips" if level == "client_level" else ""
    return f"z {spent['noise_multiplier']:g}, C {clip:g}{who}"


def privacy_table(study: Study, dp_runs: pd.DataFrame) -> str:
    best = study.at_best()
    bacc = best[best["scope"] == "global"].set_index("run")["bacc"]
    body = []
    for _, run in dp_runs.iterrows():
        privacy, stopped = run["privacy"], run["stopped"]
        for level, name in LEVELS.items():
            if level in privacy:
                spent = privacy[level]
                body.append([run["run"], name, _settings(level, spent),
                             f"{spent['epsilon']:.3g}", f"{privacy['delta']:g}",
                             "—" if privacy["target_epsilon"] is None
                             else f"{privacy['target_epsilon']:g}",
                             f"{bacc.get(run['run'], float('nan')):.3f}",
                             stopped["reason"] if isinstance(stopped, dict) else "—"])
    return markdown_table(["run", "level", "settings", "ε", "δ", "target ε", "BACC",
                           "stopped"], body)


def privacy_plot(study: Study, dp_runs: pd.DataFrame, path: Path) -> Path:
    """Global test BACC against ε after each round, a line per run and level."""
    rows = study.rows[study.rows["run"].isin(dp_runs["run"])]
    bacc = rows[(rows["scope"] == "global") & (rows["split"] == "test")].set_index(
        ["run", "round"])["bacc"]
    spent = rows[(rows["scope"] == "privacy") & rows["client"].isna()]
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    palette = colors(list(dp_runs["run"]))
    for (run, level), curve in spent.groupby(["run", "split"]):
        curve = curve.sort_values("round")
        y = [bacc.get((run, r)) for r in curve["round"]]
        ax.plot(curve["epsilon"], y, marker="o", color=palette[run],
                linestyle="-" if level == "client_level" else "--",
                label=f"{run} ({LEVELS[level]})")
    ax.set_xlabel("ε spent (after the round)")
    ax.set_ylabel("global test BACC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.suptitle("Privacy against utility, round by round")
    fig.savefig(path, dpi=110)
    return path


def privacy_section(study: Study, out: Path) -> list[str]:
    """The table and the figure; nothing where no run has privacy."""
    dp_runs = study.runs[study.runs["privacy"].map(bool)].sort_values("run")
    if dp_runs.empty:
        return []
    figure = privacy_plot(study, dp_runs, out / "privacy.png")
    return ["## Privacy", PRIVACY_TEXT, privacy_table(study, dp_runs),
            f"![privacy]({figure.name})"]
