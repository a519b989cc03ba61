"""Load a study folder's run directories into pandas tables.

Each run gets three labels taken from its config.yaml: strategy, model, optimizer. Runs
that differ in nothing but their seed share all three, so the tables can average over
seeds. Each run also keeps its recipe, the varying settings that are not the strategy's,
so that a federated run is compared with the pooled and local baselines of its recipe only.
A run that cannot be reported (unfinished, missing or broken files) is kept as a skipped
run with its reason, never dropped silently.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pandas as pd
import yaml
from pydantic import ValidationError

from fl_sim.config import (
    PRIVATE_HEAD, RunConfig, flatten, format_validation_error, recipe_label, run_labels,
)
from fl_sim.errors import FlSimError
from fl_sim.metrics import HEADLINE
from fl_sim.server.run_log import read_metrics

METRICS = (*HEADLINE, "avg")
CLINICAL = ("auroc", "mel_sens", "mel_spec", "ece")  # absent in runs made before fl-sim had them
LABELS = ("strategy", "model", "optimizer")
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")
REPORT_DIR = "report"

# Config keys that the labels or the seed already name, or that cannot change a result.
# Any other key that varies across the study's runs is added to the strategy label, so
# that a mean over seeds never mixes two settings.
_NAMED_KEYS = {
    "run_config.seed", "run_config.strategy.name", "run_config.strategy.proximal_mu",
    "run_config.strategy.weighting", "run_config.model.name", "run_config.optimizer.name",
    "run_config.optimizer.lr", "run_config.training", "run_config.finetune.trainable",
    "data.cache_dir",
}
_HINT_PREFIXES = ("run_config.resources.",)  # scheduling hints for Ray, not settings


@dataclass
class Study:
    """The reportable runs of one study folder."""

    folder: Path
    runs: pd.DataFrame  # one row per complete run: run, labels, recipe, seed, best_round, ...
    rows: pd.DataFrame  # every metrics.jsonl row of those runs, with their labels
    skipped: list[tuple[str, str]]  # (run folder name, why it is not in the report)

    @property
    def name(self) -> str:
        return self.folder.name

    def at_best(self, split: str = "test") -> pd.DataFrame:
        """Rows of `split` (global and per client) at each run's best-on-validation round.

        "test" is every model's test set; "global_test" holds the local baseline's client
        models on the global test set, kept apart so that they never count as a client's test.
        """
        best = self.rows["round"] == self.rows["run"].map(self.runs.set_index("run")["best_round"])
        tested = (self.rows["split"] == split) & self.rows["scope"].isin(["global", "client"])
        return self.rows[best & tested]


class _Skip(Exception):
    """A run that stays out of the tables; the message says why."""


def load_study(folder: Path) -> Study:
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise FlSimError(f"study folder {folder} {what}: pass <out>/<study>, the "
                         "folder `fl-sim run` writes one run directory per run into.")
    run_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and d.name != REPORT_DIR
                      and any((d / f).exists() for f in RUN_FILES))
    if not run_dirs:
        hint = (" It looks like a run directory itself: pass its parent folder."
                if (folder / "metrics.jsonl").exists() else "")
        raise FlSimError(f"no run in {folder}: expected sub-folders holding "
                         f"{', '.join(RUN_FILES)}, as `fl-sim run` writes them.{hint}")
    runs, rows, configs, skipped = [], [], [], []
    for run_dir in run_dirs:
        try:
            run, run_rows, config, notes = _load_run(run_dir)
        except _Skip as why:
            skipped.append((run_dir.name, str(why)))
            continue
        skipped += [(run_dir.name, note) for note in notes]
        runs.append(run)
        rows.append(run_rows.assign(run=run["run"]))
        configs.append(config)
    if not runs:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped)
        raise FlSimError(f"no complete run in {folder} to report on ({reasons}).")
    runs_df = pd.DataFrame(runs)
    settings = _recipe_tags(_varying_settings(configs), configs)
    # Strategy settings (params, ...) belong to one strategy; the rest is the recipe.
    of_strategy = settings.columns.str.startswith("run_config.strategy.")
    runs_df["recipe"] = _suffixes(settings.loc[:, ~of_strategy])
    runs_df["strategy"] += _suffixes(settings)
    rows_df = pd.concat(rows, ignore_index=True).merge(
        runs_df[["run", *LABELS, "strategy_name", "seed"]], on="run", validate="many_to_one")
    return Study(folder, runs_df, rows_df, skipped)


def _load_run(run_dir: Path) -> tuple[dict[str, Any], pd.DataFrame, dict[str, Any], list[str]]:
    """A run's labels and facts, its metric rows, its raw config and what of it was left out
    (a torn last line of metrics.jsonl); _Skip if not reportable."""
    summary = _read(run_dir / "summary.json", _parse_summary)
    if summary.get("failed"):
        raise _Skip(_failure(summary["failed"]))
    if not summary.get("complete"):
        done = (summary.get("final") or {}).get("round", 0)
        raise _Skip(f"not complete ({done} of {summary.get('rounds', '?')} rounds finished)")
    config = _read(run_dir / "config.yaml", yaml.safe_load)
    try:
        cfg = RunConfig.model_validate(config["run_config"])
    except (TypeError, KeyError):
        raise _Skip("config.yaml has no run_config mapping") from None
    except ValidationError as err:
        raise _Skip(f"config.yaml is not a valid run config: {format_validation_error(err)}") from None
    torn: list[int] = []
    rows = pd.DataFrame(_read_rows(run_dir, torn.append))
    if rows.empty:
        raise _Skip("metrics.jsonl is empty")
    best_round = (summary.get("best") or {}).get("round")
    if best_round is None:
        raise _Skip("summary.json names no best round")
    key = ["round", "scope", "client", "split", *(["site_model"] if "site_model" in rows else [])]
    if rows.duplicated(key).any():
        raise _Skip("metrics.jsonl holds some rows twice: the run was written twice into "
                    "one folder; run it again")
    if (cfg.strategy.name not in PRIVATE_HEAD  # FedPer / FedRep: no global model to test
            and not ((rows["round"] == best_round) & (rows["scope"] == "global")).any()):
        raise _Skip(f"metrics.jsonl has no global test row at the best round {best_round}")
    run = {"run": run_dir.name, **run_labels(cfg), "strategy_name": cfg.strategy.name,
           "seed": cfg.seed, "best_round": best_round,
           "selection_metric": cfg.selection_metric, "rounds": cfg.rounds,
           "cross_site_eval": cfg.cross_site_eval,
           "wall_time_s": summary.get("wall_time_s", math.nan),
           "bytes_sent": summary.get("bytes_sent", math.nan),
           "privacy": summary.get("privacy") or {}, "stopped": summary.get("stopped")}
    notes = [f"metrics.jsonl line {line} is torn (cut off in the middle of a write) and was "
             "left out; the run's other rows are reported" for line in torn]
    return run, rows, config, notes


def _read(path: Path, parse: Any) -> Any:
    try:
        return parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _Skip(f"no {path.name}") from None
    except (ValueError, yaml.YAMLError) as err:  # JSONDecodeError is a ValueError
        raise _Skip(f"{path.name} is unreadable: {err}") from None


def _parse_summary(text: str) -> dict[str, Any]:
    """summary.json as strict JSON: a bare NaN or Infinity (runs that diverged before fl-sim
    stopped them) must not rank a run."""
    summary = json.loads(text, parse_constant=_non_finite)
    if not isinstance(summary, dict):
        raise _Skip("summary.json does not hold a JSON object")
    return summary


def _non_finite(constant: str) -> NoReturn:
    raise _Skip(f"summary.json holds a bare {constant}: the run diverged (a non-finite loss "
                "or metric) and cannot be ranked; run it again with other settings (a "
                "smaller learning rate, say)")


def _failure(failed: dict[str, Any]) -> str:
    """'failed in round 3: <reason>', with the client where the reason does not name it."""
    client, reason = failed.get("client"), failed.get("reason", "no reason given")
    at = f" (client {client})" if client is not None and f"client {client}" not in reason else ""
    return f"failed in round {failed.get('round', '?')}{at}: {reason}"


def _read_rows(run_dir: Path, on_torn: Callable[[int], None]) -> list[dict[str, Any]]:
    try:
        return read_metrics(run_dir, on_torn)
    except FileNotFoundError:
        raise _Skip("no metrics.jsonl") from None
    except FlSimError as err:
        raise _Skip(str(err)) from None


def _varying_settings(configs: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per run: the config keys that vary across runs but no label names."""
    # Through the schema: a key added since a run was made reads as its default there.
    flat = pd.DataFrame([flatten({"data": c.get("data"), "run_config": RunConfig.model_validate(
        c["run_config"]).model_dump(mode="json")}) for c in configs])
    return flat[[k for k in flat.columns if k not in _NAMED_KEYS
                 and not k.startswith(_HINT_PREFIXES) and flat[k].nunique(dropna=False) > 1]]


# Run settings that `recipe_label` spells in a few letters (`wce-cosine`).
_RECIPE_PREFIXES = ("run_config.loss.", "run_config.synthesis", "run_config.personalize",
                    "run_config.privacy", "run_config.sampler",
                    "run_config.lr_schedule.", "run_config.adversary",
                    "run_config.availability", "run_config.secure_aggregation",
                    "run_config.local_steps", "run_config.client_state")


def _recipe_tags(settings: pd.DataFrame, configs: list[dict[str, Any]]) -> pd.DataFrame:
    """The varying recipe settings as one `recipe` column of short tags, where each tag
    stands for one combination of them (else they stay spelled out, key by key)."""
    keys = [k for k in settings.columns if k.startswith(_RECIPE_PREFIXES)]
    if not keys:
        return settings
    tags = pd.Series([recipe_label(RunConfig.model_validate(c["run_config"])) for c in configs],
                     index=settings.index)
    # Element-wise str: astype(str) keeps a missing value (a null sub-config) as NaN.
    combinations = settings[keys].map(str).agg("|".join, axis=1)
    if combinations.groupby(tags).nunique().max() > 1:
        return settings
    return settings.drop(columns=keys).assign(recipe=tags)


def _suffixes(settings: pd.DataFrame) -> list[str]:
    """' [key=value, ...]' per run (the recipe tag alone); '' where no key varies. A key the
    run lacks (e.g. FedAdam's `strategy.params.eta` in a FedAvg run) is left out of its
    label."""
    keys = list(settings.columns)
    return ["" if not keys else " [" + ", ".join(
        str(row[k]) if k == "recipe" else f"{k.removeprefix('run_config.')}={row[k]}"
        for k in keys if not pd.isna(row[k])) + "]" for _, row in settings.iterrows()]
