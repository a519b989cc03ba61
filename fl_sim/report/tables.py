"""Mean ± std over seeds of the test metrics at the best-on-validation round, and winners."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from fl_sim.report.collect import LABELS, METRICS

METRIC_NAMES = {"acc": "ACC", "bacc": "BACC", "precision": "Precision", "recall": "Recall",
                "f1": "F1", "avg": "AVG"}


def seed_table(at_best: pd.DataFrame) -> pd.DataFrame:
    """One row per strategy, model, optimizer and test set ("global", "client 0", ...).

    std is the sample standard deviation (ddof=1): NaN where a group has one seed.
    """
    rows = at_best.assign(
        test_set=[("global" if s == "global" else f"client {int(c)}")
                  for s, c in zip(at_best["scope"], at_best["client"])],
        # Global first, then clients in id order, whatever order the rows came in.
        order=at_best["client"].fillna(-1))
    groups = rows.groupby([*LABELS, "order", "test_set"])
    stats = groups[list(METRICS)].agg(["mean", "std"])
    stats.columns = [f"{metric}_{stat}" for metric, stat in stats.columns]
    stats.insert(0, "seeds", groups.size())
    return stats.reset_index().drop(columns="order")


@dataclass
class Winner:
    """The best configuration on one metric of the global test set, against the runner-up."""

    metric: str
    best: pd.Series  # a row of seed_table
    runner_up: pd.Series | None

    @property
    def gap(self) -> float:
        return self.best[f"{self.metric}_mean"] - self.runner_up[f"{self.metric}_mean"]

    @property
    def spread(self) -> float:
        """std of the winner + std of the runner-up: a gap above it is not seed noise alone."""
        return self.best[f"{self.metric}_std"] + self.runner_up[f"{self.metric}_std"]


def winners(table: pd.DataFrame) -> list[Winner]:
    """Per metric: the highest mean on the global test set, and the next one."""
    glob = table[table["test_set"] == "global"]
    out = []
    for metric in METRICS:
        ranked = glob.sort_values(f"{metric}_mean", ascending=False, kind="stable")
        out.append(Winner(metric, ranked.iloc[0], ranked.iloc[1] if len(ranked) > 1 else None))
    return out
