"""The cross-site section of report.md: each model of a run (the global model, each
client's local or personalized model) on each client's own test split (`cross_site_eval`)."""

from __future__ import annotations

import math

import pandas as pd

from fl_sim.report.collect import Study
from fl_sim.report.markdown import markdown_table

CROSS_SITE_TEXT = (
    "Runs with `cross_site_eval`, at the best round: a row per model, a column per client's "
    "own test split, each cell BACC with the 95 % bootstrap interval of that split (computed "
    "at the client: its predictions stay there; no paired test between cells). `global` is "
    "the global model as each client evaluated it (FedBN: with the client's own BatchNorm "
    "layers); `local_i` client i's own model (the local baseline); `personalized_i` client "
    "i's fine-tuned model. The cell of a model's own client is its own-site score; `mean` is "
    "the unweighted mean over the clients' splits.")
METRIC = "bacc"


def cross_site_matrix(rows: pd.DataFrame, best_round: int, has_global_model: bool) -> str:
    """The matrix of one run: models (rows) by the clients' test splits (columns)."""
    at = rows[(rows["round"] == best_round) & (rows["split"] == "test")]
    models = {}
    if has_global_model:
        models["global"] = at[at["scope"] == "client"].set_index("client")
    cross = at[at["scope"] == "cross_site"]
    for name in cross["site_model"].unique() if len(cross) else []:  # in the phase's order
        models[name] = cross[cross["site_model"] == name].set_index("client")
    clients = sorted({int(c) for scored in models.values() for c in scored.index})
    sizes = {c: int(s.at[c, "n"]) for s in models.values() for c in s.index}

    def cell(scored: pd.DataFrame, client: int) -> str:
        if client not in scored.index:
            return "—"
        value, lo, hi = (scored.at[client, k] if k in scored else math.nan
                         for k in (METRIC, f"{METRIC}_lo", f"{METRIC}_hi"))
        return f"{value:.3f}" if math.isnan(lo) else f"{value:.3f} [{lo:.3f}, {hi:.3f}]"

    header = ["model", *(f"client {c} (n={sizes[c]})" for c in clients), "mean"]
    return markdown_table(header, [
        [name, *(cell(scored, c) for c in clients),
         f"{scored.loc[[c for c in clients if c in scored.index], METRIC].mean():.3f}"]
        for name, scored in models.items()])


def cross_site_section(study: Study) -> list[str]:
    """A BACC matrix per run with `cross_site_eval`; nothing where none has it."""
    parts = []
    for _, run in study.runs.sort_values("run").iterrows():
        if run.get("cross_site_eval", False):
            rows = study.rows[study.rows["run"] == run["run"]]
            parts += [f"### {run['run']}", cross_site_matrix(
                rows, run["best_round"], run["strategy_name"] != "local")]
    return ["## Cross-site evaluation", CROSS_SITE_TEXT, *parts] if parts else []
