"""Intervals and paired tests of the report, from the runs' global test predictions.

Every run keeps its per-image predictions on the global test set (predictions/), so the
report resamples those images (fl_sim.stats): one set of draws per test set, shared by every
configuration, which makes every comparison paired on images; several seeds of a
configuration are combined by the two-level bootstrap of fl_sim.stats. A client's own test
split is never resampled here: its interval is the one the client sent (`<metric>_lo`,
`<metric>_hi` in its rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from fl_sim.predictions import load_predictions
from fl_sim.report.collect import LABELS, Study
from fl_sim.stats import (
    LEVEL, METRICS, ImageDraws, combine_seeds, draw_seeds, holm, interval, p_value,
    replicate_metrics,
)

Config = tuple[str, str, str]  # the LABELS of a configuration (its seeds share them)


def configuration(row: pd.Series) -> Config:
    """The configuration of a table row (seed_table, versus_pooled)."""
    return tuple(row[k] for k in LABELS)


@dataclass(frozen=True)
class Difference:
    """a − b on one metric of the global test set: the difference of the configurations'
    means, its paired 95 % interval and two-sided p-value, and (set by `with_holm`) the
    Holm-adjusted p-value of the table it belongs to."""

    a: Config
    b: Config
    metric: str
    value: float
    lo: float
    hi: float
    p: float
    n: int
    p_holm: float = math.nan

    @property
    def distinguishable(self) -> bool:
        """The interval leaves 0 out, and so does the Holm-adjusted test of its table."""
        p = self.p if math.isnan(self.p_holm) else self.p_holm
        return p < 1 - LEVEL and not (self.lo <= 0 <= self.hi)


def with_holm(differences: list[Difference]) -> list[Difference]:
    """The same differences, each with the Holm-adjusted p-value of the whole family."""
    adjusted = holm([d.p for d in differences])
    return [replace(d, p_holm=p) for d, p in zip(differences, adjusted)]


def runs_of(runs: pd.DataFrame, config: Config) -> list[str]:
    """The runs (one per seed) of a configuration, by seed (`runs`: indexed by run)."""
    mask = np.logical_and.reduce([runs[k] == v for k, v in zip(LABELS, config)])
    return list(runs[mask].sort_values("seed").index)


@dataclass(frozen=True)
class Replicates:
    """One run's round on its test set: metric -> (B,) replicates, the mean over its models
    (the local baseline: one per client); `images` names the test set (a digest of its ids)."""

    images: str
    n: int
    metrics: dict[str, np.ndarray]


class Bootstrap:
    """The global test set of a study, resampled. Replicates are computed once per run and
    round and cached; a configuration or round without predictions has none (None)."""

    def __init__(self, study: Study) -> None:
        self.study = study
        self._runs = study.runs.set_index("run")
        self._draws: dict[int, ImageDraws] = {}  # by test set size: the draws depend on n only
        self._cache: dict[tuple[str, int, bool], Replicates | None] = {}

    def seeds(self, config: Config) -> list[str]:
        return runs_of(self._runs, config)

    def replicates(self, run: str, server_round: int, auroc: bool = True) -> Replicates | None:
        """A run's round, resampled (None without predictions); AUROC only where `auroc`."""
        key = (run, server_round, auroc)
        if key not in self._cache:
            self._cache[key] = self._resample(run, server_round, auroc)
        return self._cache[key]

    def _resample(self, run: str, server_round: int, auroc: bool) -> Replicates | None:
        found = load_predictions(self.study.folder / run, server_round)
        if found is None:
            return None
        n, classes = found.probs.shape[1:]
        if n not in self._draws:
            self._draws[n] = ImageDraws(n)
        draws = self._draws[n]
        per_model = [replicate_metrics(found.labels, found.decisions[m],
                                       found.probs[m] if auroc else None, draws, classes)
                     for m in range(found.models)]
        return Replicates(found.images, n, {k: np.mean([r[k] for r in per_model], axis=0)
                                      for k in per_model[0]})

    def _per_seed(self, config: Config, server_round: int | None, auroc: bool = True
                  ) -> tuple[list[int], Replicates] | None:
        """The configuration's seeds and their replicates stacked (S, B) per metric, at their
        best rounds (or `server_round`); None where a seed lacks predictions or the seeds
        were tested on different images."""
        runs = self.seeds(config)
        found = [self.replicates(r, int(self._runs.at[r, "best_round"])
                                 if server_round is None else server_round, auroc) for r in runs]
        if not runs or any(f is None for f in found) or len({f.images for f in found}) > 1:
            return None
        stacked = {k: np.stack([f.metrics[k] for f in found]) for k in found[0].metrics}
        return ([int(self._runs.at[r, "seed"]) for r in runs],
                Replicates(found[0].images, found[0].n, stacked))

    def intervals(self, config: Config, server_round: int | None = None, auroc: bool = True
                  ) -> dict[str, tuple[float, float]] | None:
        """metric -> 95 % interval of the configuration's mean over seeds (two-level where
        it has several), at its best rounds or at `server_round`."""
        found = self._per_seed(config, server_round, auroc)
        if found is None:
            return None
        seeds, per_seed = found
        draw = draw_seeds(len(seeds)) if len(seeds) > 1 else None
        return {k: interval(combine_seeds(v, draw)) for k, v in per_seed.metrics.items()}

    def difference(self, a: Config, b: Config, metric: str, value: float) -> Difference | None:
        """a − b (`value`: the difference of the table's means) with its paired interval
        and p-value; None where either lacks predictions or they were tested apart."""
        found_a, found_b = self._per_seed(a, None), self._per_seed(b, None)
        if found_a is None or found_b is None or found_a[1].images != found_b[1].images:
            return None
        (seeds_a, reps_a), (seeds_b, reps_b) = found_a, found_b
        return difference_of(a, b, metric, value, (seeds_a, reps_a.metrics[metric]),
                             (seeds_b, reps_b.metrics[metric]), reps_a.n)


def difference_of(a: Config, b: Config, metric: str, value: float,
                  seeds_a: tuple[list[int], np.ndarray], seeds_b: tuple[list[int], np.ndarray],
                  n: int) -> Difference:
    """The Difference a − b from each configuration's seeds and their (S, B) replicates
    of `metric` on the same draws of the same images: run with the same seeds, both draw
    the same seeds (paired on seeds too); else each its own."""
    (seeds, reps_a), (other, reps_b) = seeds_a, seeds_b
    draw_a = draw_seeds(len(seeds)) if len(seeds) > 1 else None
    draw_b = (draw_a if seeds == other else
              draw_seeds(len(other), seed=1) if len(other) > 1 else None)
    diff = combine_seeds(reps_a, draw_a) - combine_seeds(reps_b, draw_b)
    lo, hi = interval(diff)
    return Difference(a, b, metric, value, lo, hi, p_value(diff), n)


def with_intervals(table: pd.DataFrame, boot: Bootstrap) -> pd.DataFrame:
    """seed_table with the global test set's `<metric>_lo` / `<metric>_hi` from the
    bootstrap of each configuration's predictions (NaN where it has none). A client's own
    test split keeps the interval it sent (seed_table: the mean over seeds of the clients'
    intervals, an approximation with several seeds, see docs/report.md)."""
    out = table.copy()
    for i, row in out[out["test_set"] == "global"].iterrows():
        found = boot.intervals(configuration(row))
        for metric, (lo, hi) in (found or {}).items():
            out.at[i, f"{metric}_lo"], out.at[i, f"{metric}_hi"] = lo, hi
    return out
