"""Run names and labels: the one place that turns a run's settings into readable text.

`run_name` names a run's folder; `run_labels` gives the strategy / model / optimizer labels
that the report groups runs by. Both read the same pieces, so a report reads like the
folders it comes from.
"""

from __future__ import annotations

from fl_sim.config.schema import BASELINES, RunConfig, StrategyConfig

# Grid keys that run_name spells out; other varying scalars are appended as `<key><value>`.
NAMED_KEYS = {"strategy", "model", "optimizer", "training", "clip", "seed", "loss", "sampler",
              "lr_schedule"}


def proximal_mu(strategy: StrategyConfig) -> float:
    return 0.01 if strategy.proximal_mu is None else strategy.proximal_mu


def strategy_label(strategy: StrategyConfig) -> str:
    """e.g. `fedavg`, `fedprox-mu0.01`, `fedavg-uniform`, `pooled`."""
    label = strategy.name
    if strategy.name == "fedprox":
        label += f"-mu{proximal_mu(strategy):g}"
    if strategy.weighting == "uniform" and strategy.name not in BASELINES:  # no averaging
        label += "-uniform"
    return label


def run_labels(cfg: RunConfig) -> dict[str, str]:
    """The report's labels of a run: strategy, model (with `-clip` for the CLIP variant),
    optimizer (with its learning rate where set)."""
    model = cfg.model.name if cfg.training == "supervised" else f"{cfg.model.name}-{cfg.training}"
    optimizer = cfg.optimizer.name
    if cfg.optimizer.lr is not None:
        optimizer += f"-lr{cfg.optimizer.lr:g}"
    return {"strategy": strategy_label(cfg.strategy), "model": model, "optimizer": optimizer}


def recipe_parts(cfg: RunConfig) -> list[str]:
    """The training recipe where it differs from the defaults: loss, sampler, lr schedule."""
    parts = []
    loss = cfg.loss
    if loss.name != "ce" or loss.label_smoothing:
        tag = {"ce": "ce", "weighted_ce": "wce", "focal": "focal"}[loss.name]
        if loss.gamma is not None:
            tag += f"-g{loss.gamma:g}"
        if loss.label_smoothing:
            tag += f"-ls{loss.label_smoothing:g}"
        parts.append(tag)
    if cfg.sampler != "shuffle":
        parts.append(cfg.sampler)
    if cfg.lr_schedule.name != "constant":
        parts.append(cfg.lr_schedule.name)
    return parts


def recipe_label(cfg: RunConfig) -> str:
    """The recipe in a few letters, e.g. `wce-cosine`; `ce` for the defaults."""
    return "-".join(recipe_parts(cfg)) or "ce"


def run_name(cfg: RunConfig) -> str:
    """Stable, readable, e.g. `fedprox-mu0.01_convnext_t_sgd_s0`, `pooled_convnext_t_sgd_wce_cosine_s0`."""
    labels = run_labels(cfg)
    parts = [labels["strategy"], cfg.model.name.replace("/", "-"), labels["optimizer"]]
    if cfg.training == "clip":
        tower = cfg.clip.text_model.rstrip("/").rsplit("/", 1)[-1].replace(":", "-")
        parts.append(f"clip-{tower}" + ("" if cfg.clip.loss == "clip" else f"-{cfg.clip.loss}"))
    return "_".join([*parts, *recipe_parts(cfg)]) + f"_s{cfg.seed}"
