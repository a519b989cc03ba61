"""The sites' section of report.md: every model a site scores on its own test split (the
global model, the site's own or personalized model) against pooled, per site and on the
mean over the sites, with paired tests (FLamby's per-centre table).

Each simulated client keeps its split's per-image predictions in its own folder
(fl_sim.predictions), all on the one disk of a simulation: the report resamples each site's
test images (draws made from the site and its size, shared by every run scored there, so
every comparison is paired on images), combines seeds by the two-level bootstrap of
fl_sim.stats, and takes the mean over the sites inside each replicate. Runs made before the
clients kept their predictions have no row here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fl_sim.metrics import classification_metrics
from fl_sim.predictions import CLIENTS, PERSONAL, Predictions, client_folder, load_predictions
from fl_sim.report.collect import LABELS, Study
from fl_sim.report.markdown import difference_cell, holm_adjusted, markdown_table
from fl_sim.report.plots import colors
from fl_sim.report.uncertainty import (
    Bootstrap, Config, Difference, configuration, difference_of, runs_of,
)
from fl_sim.stats import ImageDraws, replicate_metrics

METRIC = "bacc"
SITES_TEXT = (
    "Each model a site can be served, on the site's own test split at the run's best round: "
    "the global model (FedBN: with the site's BatchNorm layers), the site's own model "
    "(local; FedPer / FedRep: the shared body with the site's head) and its personalized "
    "model (Ditto's personal model; `personalize`: the global model fine-tuned at the "
    "site), beside the global model's BACC on the global test set: FLamby's two tables in "
    "one. BACC, the mean over seeds; `mean of the sites` is the unweighted mean. The "
    "site's predictions stay in the site's folder (in a simulation all on one disk), where "
    "these are computed.")
PAIRED_SITES_TEXT = (
    "The same against pooled (the pooled run of the same model, optimizer and recipe, else "
    "the one pooled configuration of the model and optimizer): Δ BACC with its paired 95 % "
    "bootstrap interval (the same draws of each site's images, and of the seeds where both "
    "ran the same) and the p-value Holm-adjusted over every cell of the table; the sites' "
    "mean's replicate is the mean over the sites of theirs; the global test set's is the "
    "paired test of the report's other tables. **Bold**: distinguishable.")
_SERVED = {"pooled": "pooled model", "local": "own model", "fedper": "own head",
           "fedrep": "own head"}


def model_label(strategy_name: str, model: str) -> str:
    """What a site's model of a run is called in the tables."""
    if model == PERSONAL:
        return "personal model" if strategy_name == "ditto" else "fine-tuned"
    return _SERVED.get(strategy_name, "global model")


@dataclass(frozen=True)
class SiteScores:
    """A configuration's seeds on one site's test split: the metric per seed (S,) and its
    replicates (S, B); `images` names the split (a digest of its ids), `n` its size."""

    images: str
    n: int
    values: np.ndarray
    replicates: np.ndarray


class SiteSplits:
    """The sites' test splits of a study, resampled; replicates cached per run and model."""

    def __init__(self, study: Study) -> None:
        self.study = study
        self._runs = study.runs.set_index("run")
        self._draws: dict[tuple[int, int], ImageDraws] = {}
        self._cache: dict[tuple[str, str], dict[int, SiteScores] | None] = {}

    def _found(self, run: str, model: str) -> dict[int, Predictions] | None:
        """The run's best round on every site's split (None where a site kept no file)."""
        run_dir = self.study.folder / run
        best = int(self._runs.at[run, "best_round"])
        sites = sorted(int(d.name) for d in (run_dir / CLIENTS).glob("*") if d.name.isdigit())
        found = {s: load_predictions(client_folder(run_dir, s), best, model) for s in sites}
        return found if sites and all(f is not None for f in found.values()) else None

    def scores(self, run: str, model: str) -> dict[int, SiteScores] | None:
        """One run's scores per site (a single seed), None without predictions."""
        key = (run, model)
        if key not in self._cache:
            found = self._found(run, model)
            self._cache[key] = None if found is None else {
                site: self._resample(site, f) for site, f in found.items()}
        return self._cache[key]

    def _resample(self, site: int, found: Predictions) -> SiteScores:
        n, classes = found.probs.shape[1:]
        if (site, n) not in self._draws:  # a seed per site: two sites' draws are independent
            self._draws[site, n] = ImageDraws(n, seed=1 + site)
        reps = replicate_metrics(found.labels, found.decisions[0], None, self._draws[site, n],
                                 classes)[METRIC]
        value = classification_metrics(found.labels, found.decisions[0], classes)[METRIC]
        return SiteScores(found.images, n, np.array([value]), reps[None])

    def per_seed(self, config: Config, model: str
                 ) -> tuple[list[int], dict[int, SiteScores]] | None:
        """The configuration's seeds and its scores per site, the seeds stacked; None where
        a seed kept no predictions or the seeds were tested on different splits."""
        runs = runs_of(self._runs, config)
        found = [self.scores(r, model) for r in runs]
        if not runs or any(f is None for f in found) or len({
                tuple((site, s.images) for site, s in f.items()) for f in found}) > 1:
            return None
        return ([int(self._runs.at[r, "seed"]) for r in runs],
                {site: SiteScores(s.images, s.n, np.concatenate([f[site].values for f in found]),
                                  np.concatenate([f[site].replicates for f in found]))
                 for site, s in found[0].items()})


def _reference(study: Study, row: pd.Series) -> Config | None:
    """The pooled configuration a configuration is compared with (see PAIRED_SITES_TEXT)."""
    runs = study.runs
    pooled = runs[(runs["strategy_name"] == "pooled") & (runs["model"] == row["model"])
                  & (runs["optimizer"] == row["optimizer"])]
    same = pooled[pooled["recipe"] == row["recipe"]]
    configs = (same if not same.empty else pooled)[list(LABELS)].drop_duplicates()
    return tuple(configs.iloc[0]) if len(configs) == 1 else None


def _differences(a: tuple[list[int], dict[int, SiteScores]],
                 b: tuple[list[int], dict[int, SiteScores]], configs: tuple[Config, Config],
                 sites: list[int]) -> list[Difference] | None:
    """a − b on each of `sites` and on their mean; None unless both were scored on exactly
    those sites' splits."""
    (seeds_a, at_a), (seeds_b, at_b) = a, b
    if ({s: x.images for s, x in at_a.items()} != {s: x.images for s, x in at_b.items()}
            or sorted(at_a) != sites):
        return None
    parts = [(at_a[s].values.mean() - at_b[s].values.mean(), at_a[s].replicates,
              at_b[s].replicates, at_a[s].n) for s in sites]
    parts.append((np.mean([p[0] for p in parts]), np.mean([p[1] for p in parts], axis=0),
                  np.mean([p[2] for p in parts], axis=0), sum(p[3] for p in parts)))
    return [difference_of(*configs, METRIC, float(value), (seeds_a, ra), (seeds_b, rb), n)
            for value, ra, rb, n in parts]


def sites_plot(labels: list[str], tested: list[list[Difference | None]], sites: list[int],
               path: Path) -> Path:
    """A forest plot of the paired table: a line per comparison, a marker per test set (the
    global one hollow, each site's in colour, the sites' mean black) at Δ BACC with its
    paired 95 % interval."""
    fig = Figure(figsize=(9, 1.2 + 0.45 * len(labels) * (len(sites) + 2) ** 0.5),
                 layout="constrained")
    ax = fig.subplots()
    names = ["global test", *(f"client {s}" for s in sites), "mean of the sites"]
    palette = {**colors(names[1:-1]), names[0]: "grey", names[-1]: "black"}
    for k, (name, offset) in enumerate(zip(names, np.linspace(0.3, -0.3, len(names)))):
        at = [(i, row[k]) for i, row in enumerate(tested) if row[k] is not None]
        if not at:
            continue
        y = len(labels) - 1 - np.array([i for i, _ in at]) + offset
        ds = [d for _, d in at]
        bold = k in (0, len(names) - 1)
        ax.errorbar([d.value for d in ds], y, xerr=[[d.value - d.lo for d in ds],
                                                     [d.hi - d.value for d in ds]],
                    fmt="s" if k == 0 else "D" if bold else "o", color=palette[name],
                    mfc="white" if k == 0 else palette[name], markersize=6 if bold else 4,
                    linewidth=1.6 if bold else 0.9, label=name)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(np.arange(len(labels))[::-1], labels, fontsize=8)
    ax.set_xlabel("Δ BACC against pooled (paired 95 % interval)")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=min(len(names), 6), fontsize=8)
    fig.suptitle("Each model against pooled, on the global test set and on each site's own "
                 "test split, at each run's best round", fontsize="medium")
    fig.savefig(path, dpi=110)
    return path


def sites_section(study: Study, table: pd.DataFrame, boot: Bootstrap, out: Path) -> list[str]:
    """The two tables and the figure (`sites_vs_pooled.png` in `out`); nothing where no run
    kept its sites' predictions. `table` (seed_table) and `boot` give the global test set's
    column."""
    splits = SiteSplits(study)
    configs = study.runs.drop_duplicates(list(LABELS)).sort_values("run")
    found = [(row, model, per) for _, row in configs.iterrows() for model in ("", PERSONAL)
             if (per := splits.per_seed(configuration(row), model)) is not None]
    if not found:
        return []
    glob = {configuration(r): r[f"{METRIC}_mean"]
            for _, r in table[table["test_set"] == "global"].iterrows()}

    def on_global(row: pd.Series, model: str) -> float:
        return glob.get(configuration(row), np.nan) if model == "" else np.nan

    sites = sorted({s for _, _, (_, per) in found for s in per})
    columns = ["global test", *(f"client {s}" for s in sites), "mean of the sites"]
    values = [[row["strategy"], model_label(row["strategy_name"], model), str(len(seeds)),
               "—" if np.isnan(on_global(row, model)) else f"{on_global(row, model):.3f}",
               *(f"{per[s].values.mean():.3f}" if s in per else "—" for s in sites),
               f"{np.mean([p.values.mean() for p in per.values()]):.3f}"]
              for row, model, (seeds, per) in found]
    parts = ["## The sites' own test splits", SITES_TEXT,
             markdown_table(["strategy", "model", "seeds", *columns], values)]
    pooled = {configuration(row): (row, per) for row, model, per in found
              if row["strategy_name"] == "pooled" and model == ""}
    pairs = []
    for row, model, per in found:
        config, ref = configuration(row), _reference(study, row)
        if ref in pooled and ref != config and (
                tested := _differences(per, pooled[ref][1], (config, ref), sites)) is not None:
            gap = on_global(row, model) - on_global(pooled[ref][0], "")
            overall = None if np.isnan(gap) else boot.difference(config, ref, METRIC, gap)
            pairs.append((row, model, ref, [overall, *tested]))
    if not pairs:
        return parts
    flat = holm_adjusted([d for *_, tested in pairs for d in tested])
    tested = [flat[i * len(columns):(i + 1) * len(columns)] for i in range(len(pairs))]
    labels = [f"{row['strategy']} ({model_label(row['strategy_name'], model)}) − {ref[0]}"
              for row, model, ref, _ in pairs]
    figure = sites_plot([f"{row['strategy']}\n{model_label(row['strategy_name'], model)} − "
                         f"{ref[0]}" for row, model, ref, _ in pairs],
                        tested, sites, out / "sites_vs_pooled.png")
    body = [[label, *map(difference_cell, row)] for label, row in zip(labels, tested)]
    return [*parts, PAIRED_SITES_TEXT, markdown_table(["comparison", *columns], body),
            f"![sites against pooled]({figure.name})"]
