"""Mean ± std over seeds of the test metrics at the best-on-validation round, winners, and
the federated strategies against the pooled and local baselines. Intervals and paired
tests: fl_sim.report.uncertainty."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from fl_sim.report.collect import CLINICAL, LABELS, METRICS
from fl_sim.stats import METRICS as INTERVAL_METRICS

METRIC_NAMES = {"acc": "ACC", "bacc": "BACC", "precision": "Precision", "recall": "Recall",
                "f1": "F1", "avg": "AVG", "auroc": "AUROC", "mel_sens": "MEL sens.",
                "mel_spec": "MEL spec.", "ece": "ECE"}
BOUNDS = [f"{m}_{end}" for m in INTERVAL_METRICS for end in ("lo", "hi")]


def seed_table(at_best: pd.DataFrame) -> pd.DataFrame:
    """One row per strategy, model, optimizer and test set ("global", "client 0", ...).

    std is the sample standard deviation (ddof=1): NaN where a group has one seed. The
    clinical metrics of runs that lack them are NaN; `<metric>_lo` / `_hi` are the mean over
    seeds of the intervals the rows hold (a client's own test split), NaN elsewhere.
    """
    at_best = at_best.reindex(columns=list(dict.fromkeys([*at_best.columns, *CLINICAL, *BOUNDS])))
    rows = at_best.assign(
        test_set=[("global" if s == "global" else f"client {int(c)}")
                  for s, c in zip(at_best["scope"], at_best["client"])],
        # Global first, then clients in id order, whatever order the rows came in.
        order=at_best["client"].fillna(-1))
    groups = rows.groupby([*LABELS, "order", "test_set"])
    stats = groups[[*METRICS, *CLINICAL]].agg(["mean", "std"])
    stats.columns = [f"{metric}_{stat}" for metric, stat in stats.columns]
    stats = stats.join(groups[BOUNDS].mean())
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
    out: list[Winner] = []
    if glob.empty:  # only runs without a global model (FedPer / FedRep)
        return out
    for metric in (*METRICS, *(["auroc"] if glob["auroc_mean"].notna().any() else [])):
        ranked = glob.sort_values(f"{metric}_mean", ascending=False, kind="stable")
        out.append(Winner(metric, ranked.iloc[0], ranked.iloc[1] if len(ranked) > 1 else None))
    return out


# A baseline is compared within one model, optimizer and recipe, never across.
GROUP = ["model", "optimizer", "recipe"]
_ORDER = {"pooled": 0, "local": 2}  # the federated strategies sit between them, at 1


def group_name(model: str, optimizer: str, recipe: str) -> str:
    return f"{model} · {optimizer}{recipe}"


def versus_pooled(table: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The global rows of seed_table, each with the pooled configuration of its model,
    optimizer and recipe (`reference`, NaN where there is none) and `<metric>_gap` = its
    mean − the reference's mean. Pooled first, then the federated strategies, then local.
    """
    kinds = runs[[*LABELS, "recipe", "strategy_name"]].drop_duplicates()
    glob = table[table["test_set"] == "global"].merge(kinds, on=list(LABELS), validate="one_to_one")
    glob = (glob.assign(order=glob["strategy_name"].map(_ORDER).fillna(1))
            .sort_values([*GROUP, "order"], kind="stable").drop(columns="order"))
    means = [f"{m}_mean" for m in METRICS]
    # Two pooled labels (e.g. pooled-uniform) in one group: the first in sort order is the
    # reference, the other gets its gap like any strategy.
    pooled = (glob[glob["strategy_name"] == "pooled"].drop_duplicates(GROUP)
              [[*GROUP, "strategy", *means]].rename(columns={"strategy": "reference"}))
    out = glob.merge(pooled, on=GROUP, how="left", suffixes=("", "_pooled"))
    for m in METRICS:
        out[f"{m}_gap"] = out[f"{m}_mean"] - out[f"{m}_mean_pooled"]
    return out.drop(columns=[f"{c}_pooled" for c in means])


def compared_groups(versus: pd.DataFrame) -> list[tuple[tuple[str, str, str], pd.DataFrame]]:
    """The (model, optimizer, recipe) groups of versus_pooled that hold a pooled run."""
    return [(key, rows) for key, rows in versus.groupby(GROUP, sort=False)
            if rows["reference"].notna().all()]


def local_clients_table(at_best: pd.DataFrame, on_global_test: pd.DataFrame) -> pd.DataFrame:
    """The local baseline's client models, as seed_table rows with `on` = "global test" (the
    "split: global_test" rows) or "own test" (each client's own test split). Test set
    "global" is the mean over the clients: on the global test set the run's global row
    already is that mean; on the own test splits it is taken here, per run.
    """
    local, on_global_test = (rows[rows["strategy_name"] == "local"]
                             for rows in (at_best, on_global_test))
    own = local[local["scope"] == "client"]
    own_mean = (own.groupby(["run", *LABELS], as_index=False)[list(METRICS)].mean()
                .assign(scope="global", client=math.nan))
    on = {"global test": pd.concat([local[local["scope"] == "global"], on_global_test]),
          "own test": pd.concat([own_mean, own])}
    return pd.concat([seed_table(rows).assign(on=name) for name, rows in on.items()],
                     ignore_index=True)
