"""The personalization section of report.md: per client, the global model against the same
model fine-tuned on the client's own train split (`personalize`), on the client's test set."""

from __future__ import annotations

import pandas as pd

from fl_sim.report.collect import Study
from fl_sim.report.markdown import gap, markdown_table

PERSONALIZATION_TEXT = (
    "Runs with `personalize`: after the last round each client fine-tuned the best (and the "
    "final) global model on its own train split; the personalized model stays at the "
    "client. Per client, on its own test split: the global model at the best round against "
    "its personalized copy (Δ: personalized minus global).")
SHOWN = ("bacc", "avg")


def personalization_table(rows: pd.DataFrame, best_round: int) -> str:
    """A row per client (and their mean), global vs personalized, at `best_round`."""
    at = rows[(rows["round"] == best_round) & (rows["split"] == "test")]
    own = at[at["scope"] == "client"].set_index("client")
    tuned = at[at["scope"] == "personalized"].set_index("client")
    clients = sorted(set(own.index) & set(tuned.index))
    header = ["client", "n", *(f"{m} {which}" for m in SHOWN for which in ("global",
                                                                          "personalized", "Δ"))]
    body = [[str(int(c)), str(int(own.at[c, "n"])),
             *(cell for m in SHOWN for cell in (f"{own.at[c, m]:.3f}", f"{tuned.at[c, m]:.3f}",
                                                gap(tuned.at[c, m] - own.at[c, m])))]
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
