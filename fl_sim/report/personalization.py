"""The personalization section of report.md: per client, the global model against the same
model fine-tuned on the client's own train split (`personalize`), on the client's test set,
with the paired test the client computed on it."""

from __future__ import annotations

import math

import pandas as pd

from fl_sim.report.collect import Study
from fl_sim.report.markdown import difference_cell, gap, markdown_table
from fl_sim.report.uncertainty import Difference, with_holm

PERSONALIZATION_TEXT = (
    "Runs with `personalize`: after the last round each client fine-tuned the best (and the "
    "final) global model on its own train split; the personalized model stays at the "
    "client. Per client, on its own test split: the global model at the best round against "
    "its personalized copy. Δ is personalized minus global with its paired 95 % bootstrap "
    "interval, computed at the client on the same draws of its test images, and the "
    "Holm-adjusted p over the table's clients and metrics; bold where distinguishable.")
SHOWN = ("bacc", "avg")


def _paired(tuned: pd.Series, own: pd.Series, client: int, metric: str) -> Difference | None:
    """The client's paired test of personalized vs global (None: a run made before clients
    sent one)."""
    if f"{metric}_delta_lo" not in tuned or math.isnan(tuned[f"{metric}_delta_lo"]):
        return None
    return Difference(a=("personalized", str(client), ""), b=("global", str(client), ""),
                      metric=metric, value=tuned[metric] - own[metric],
                      lo=tuned[f"{metric}_delta_lo"], hi=tuned[f"{metric}_delta_hi"],
                      p=tuned[f"{metric}_delta_p"], n=int(own["n"]))


def personalization_table(rows: pd.DataFrame, best_round: int) -> str:
    """A row per client (and their mean), global vs personalized, at `best_round`."""
    at = rows[(rows["round"] == best_round) & (rows["split"] == "test")]
    own = at[at["scope"] == "client"].set_index("client")
    tuned = at[at["scope"] == "personalized"].set_index("client")
    clients = sorted(set(own.index) & set(tuned.index))
    cells = [(c, m) for c in clients for m in SHOWN]
    tests = [_paired(tuned.loc[c], own.loc[c], c, m) for c, m in cells]
    tested = iter(with_holm([t for t in tests if t is not None]))
    paired = {key: None if t is None else next(tested) for key, t in zip(cells, tests)}

    def delta(c: int, m: str) -> str:
        d = paired[c, m]
        return gap(tuned.at[c, m] - own.at[c, m]) if d is None else difference_cell(d)

    header = ["client", "n", *(f"{m} {which}" for m in SHOWN for which in ("global",
                                                                          "personalized", "Δ"))]
    body = [[str(int(c)), str(int(own.at[c, "n"])),
             *(cell for m in SHOWN for cell in (f"{own.at[c, m]:.3f}", f"{tuned.at[c, m]:.3f}",
                                                delta(c, m)))]
            for c in clients]
    if clients:
        g, p = own.loc[clients], tuned.loc[clients]
        body.append(["mean", str(int(g["n"].sum())),
                     *(cell for m in SHOWN for cell in (f"{g[m].mean():.3f}", f"{p[m].mean():.3f}",
                                                        gap(p[m].mean() - g[m].mean())))])
    return markdown_table(header, body)


def personalization_section(study: Study) -> list[str]:
    """A table per run that personalized; nothing where none did."""
    parts = []
    for _, run in study.runs.sort_values("run").iterrows():
        rows = study.rows[study.rows["run"] == run["run"]]
        if (rows["scope"] == "personalized").any():
            parts += [f"### {run['run']}", personalization_table(rows, run["best_round"])]
    return ["## Personalization", PERSONALIZATION_TEXT, *parts] if parts else []
