"""Run names and labels: the one place that turns a run's settings into readable text.

`run_name` names a run's folder; `run_labels` gives the strategy / model / optimizer labels
that the report groups runs by. Both read the same pieces, so a report reads like the
folders it comes from.
"""

from __future__ import annotations

from fl_sim.config.schema import BASELINES, RunConfig, StrategyConfig

# Grid keys that run_name spells out; other varying scalars are appended as `<key><value>`.
NAMED_KEYS = {"strategy", "model", "finetune", "optimizer", "training", "clip", "seed", "loss",
              "synthesis", "personalize", "privacy", "sampler", "lr_schedule", "adversary",
              "availability", "secure_aggregation", "local_steps", "client_state"}


def proximal_mu(strategy: StrategyConfig) -> float:
    return 0.01 if strategy.proximal_mu is None else strategy.proximal_mu


def ditto_lambda(strategy: StrategyConfig) -> float:
    return 0.1 if strategy.ditto_lambda is None else strategy.ditto_lambda


def head_epochs(strategy: StrategyConfig) -> int:
    return 1 if strategy.head_epochs is None else strategy.head_epochs


def strategy_label(strategy: StrategyConfig) -> str:
    """e.g. `fedavg`, `fedprox-mu0.01`, `ditto-lam0.1`, `fedrep-head1`, `fedavg-uniform`,
    `fedavg-frac0.1` (a sample of the clients trains each round), `pooled`."""
    label = strategy.name
    if strategy.name == "fedprox":
        label += f"-mu{proximal_mu(strategy):g}"
    if strategy.name == "ditto":
        label += f"-lam{ditto_lambda(strategy):g}"
    if strategy.name == "fedrep":
        label += f"-head{head_epochs(strategy)}"
    if strategy.fraction_train < 1:
        label += f"-frac{strategy.fraction_train:g}"
    if strategy.fraction_evaluate < 1:
        label += f"-evalfrac{strategy.fraction_evaluate:g}"
    if strategy.weighting == "uniform" and strategy.name not in BASELINES:  # no averaging
        label += "-uniform"
    return label


def finetune_tag(cfg: RunConfig) -> str:
    """`head` or `ft0.15` for a partly trained model; '' when all of it trains."""
    trainable = cfg.finetune.trainable
    if trainable == "all":
        return ""
    return "head" if trainable == "head" else f"ft{trainable:g}"


def run_labels(cfg: RunConfig) -> dict[str, str]:
    """The report's labels of a run: strategy, model (with `-clip` for the CLIP variant, and
    its trained part, e.g. `-head`, where not all of it trains), optimizer (with its learning
    rate where set)."""
    model = "-".join(p for p in (cfg.model.name, "" if cfg.training == "supervised"
                                 else cfg.training, finetune_tag(cfg)) if p)
    optimizer = cfg.optimizer.name
    if cfg.optimizer.lr is not None:
        optimizer += f"-lr{cfg.optimizer.lr:g}"
    return {"strategy": strategy_label(cfg.strategy), "model": model, "optimizer": optimizer}


def privacy_tag(cfg: RunConfig) -> str:
    """e.g. `cdp-z1-c0.5` (client-level: noise multiplier, clipping norm; `cdpc` where the
    clients clip, `cdpa` / `cdpca` with an adaptive norm starting there), `dpsgd-z1.1-c1`,
    both joined, then `-eps8` for a target ε and `-d1e-06` for another δ than 1e-5; ''
    without privacy."""
    privacy = cfg.privacy
    if privacy is None:
        return ""
    parts = []
    if (dp := privacy.client_level) is not None:
        kind = ("cdp" if dp.clipping == "server" else "cdpc") + ("a" if dp.adaptive else "")
        parts.append(f"{kind}-z{dp.noise_multiplier:g}-c{dp.clipping_norm:g}")
    if (sgd := privacy.sample_level) is not None:
        parts.append(f"dpsgd-z{sgd.noise_multiplier:g}-c{sgd.max_grad_norm:g}")
    if privacy.target_epsilon is not None:
        parts.append(f"eps{privacy.target_epsilon:g}")
    if privacy.delta != type(privacy).model_fields["delta"].default:
        parts.append(f"d{privacy.delta:g}")
    return "-".join(parts)


def adversary_tag(cfg: RunConfig) -> str:
    """e.g. `signflip10-c2` (client 2 sends -10 x its update), `alie1-f0.2` (a fifth of the
    clients); '' without an adversary."""
    adv = cfg.adversary
    if adv is None:
        return ""
    who = (f"c{'.'.join(map(str, adv.clients))}" if adv.clients is not None
           else f"f{adv.fraction:g}")
    return f"{adv.attack.replace('_', '')}{adv.resolved_strength:g}-{who}"


def recipe_parts(cfg: RunConfig) -> list[str]:
    """The training recipe where it differs from the defaults: loss, synthesis,
    personalization, privacy, sampler, lr schedule, hostile and absent clients, secure
    aggregation, local steps, kept optimizer state."""
    parts = []
    loss = cfg.loss
    if loss.name != "ce" or loss.label_smoothing:
        tag = {"ce": "ce", "weighted_ce": "wce", "focal": "focal",
               "logit_adjusted": "la"}[loss.name]
        if loss.name == "focal" and loss.weights_from:  # weighted focal: focalw, focalwfed
            tag += "w"
        if loss.class_weights == "federation":  # wcefed: the federation's counts
            tag += "fed"
        if loss.gamma is not None:
            tag += f"-g{loss.gamma:g}"
        if loss.tau is not None:
            tag += f"-t{loss.tau:g}"
        if loss.label_smoothing:
            tag += f"-ls{loss.label_smoothing:g}"
        parts.append(tag)
    if cfg.synthesis is not None:  # e.g. dcgan200, dcgan200-df-vasc
        classes = cfg.synthesis.classes
        parts.append("-".join([f"{cfg.synthesis.method}{cfg.synthesis.per_class}",
                               *([] if classes == "minority" else classes)]))
    if (tune := cfg.personalize) is not None:  # pers1: 1 epoch at each client; pers-s100-lr0.001
        parts.append("-".join([f"pers{'' if tune.steps else tune.fine_tune_epochs}",
                               *([f"s{tune.steps}"] if tune.steps else []),
                               *([f"lr{tune.lr:g}"] if tune.lr is not None else []),
                               *([tune.optimizer.name] if tune.optimizer else [])]))
    if cfg.privacy is not None:
        parts.append(privacy_tag(cfg))
    if cfg.sampler != "shuffle":
        parts.append(cfg.sampler)
    if cfg.lr_schedule.name != "constant":
        parts.append(cfg.lr_schedule.name)
    if cfg.adversary is not None:
        parts.append(adversary_tag(cfg))
    if cfg.availability is not None:  # e.g. drop0.5
        parts.append(f"drop{cfg.availability.dropout:g}")
    if cfg.secure_aggregation is not None:
        parts.append("secagg")
    if cfg.local_steps is not None:  # e.g. steps100: 100 optimizer steps a round
        parts.append(f"steps{cfg.local_steps}")
    if cfg.client_state == "keep":  # the clients' optimizer state kept across rounds
        parts.append("keepopt")
    return parts


def recipe_label(cfg: RunConfig) -> str:
    """The recipe in a few letters, e.g. `wce-cosine`; `ce` for the defaults."""
    return "-".join(recipe_parts(cfg)) or "ce"


# Augmentation options as they appear in a run name, e.g. `aug-crop0.7-rot15-b0.2`.
AUGMENT_TAGS = {"crop_scale": "crop", "rotation": "rot", "brightness": "b", "contrast": "c",
                "saturation": "s", "hue": "h"}


def augment_tag(cfg: RunConfig) -> str:
    """`aug-` and the options that are on, e.g. `aug-crop0.7-rot15` or `aug-noflip-b0.2`; ''
    for the plain switch (true: flips and 90-degree turns; false: none), whose names predate
    the options (in a grid, `_augmentTrue` / `_augmentFalse` tell its runs apart)."""
    aug = cfg.augment
    if not aug.enabled:
        return ""
    values = {key: getattr(aug, key) for key in AUGMENT_TAGS}
    if values["crop_scale"] == 1:
        values["crop_scale"] = None  # the whole image: no crop
    parts = [f"{AUGMENT_TAGS[key]}{value:g}" for key, value in values.items() if value]
    if parts and not aug.flips:
        parts.insert(0, "noflip")
    return "-".join(["aug", *parts]) if parts else ""


def run_name(cfg: RunConfig) -> str:
    """Stable, readable, e.g. `fedprox-mu0.01_convnext_t_sgd_s0`, `pooled_convnext_t_sgd_wce_cosine_s0`."""
    labels = run_labels(cfg)
    parts = [labels["strategy"], cfg.model.name.replace("/", "-"), labels["optimizer"]]
    if finetune_tag(cfg):
        parts.insert(2, finetune_tag(cfg))
    if cfg.training == "clip":
        tower = cfg.clip.text_model.rstrip("/").rsplit("/", 1)[-1].replace(":", "-")
        parts.append(f"clip-{tower}" + ("" if cfg.clip.loss == "clip" else f"-{cfg.clip.loss}"))
    tail = [*recipe_parts(cfg), augment_tag(cfg)]
    return "_".join([*parts, *filter(None, tail)]) + f"_s{cfg.seed}"
