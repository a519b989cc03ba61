"""The experiments.yaml schema, validated with pydantic.

A study file has four top-level keys:

    study:     name of the study (the folder under the output directory)
    data:      dataset, root, image size, partition, global test set (shared by all runs)
    defaults:  one run's settings (rounds, epochs, batch size, model, optimizer, strategy, ...)
    grid:      lists of alternatives for any key of `defaults`, expanded as a product
               (or a list of such grids: the runs of each, one after the other)

Unknown keys are rejected with their path named; numbers are range-checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    """Base model: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- data


class SplitFractions(Strict):
    """How each client's data is split (fractions of its images, by lesion)."""

    train: float = Field(0.6, gt=0, lt=1)
    val: float = Field(0.2, gt=0, lt=1)
    test: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitFractions:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self


class PartitionConfig(Strict):
    """Which client holds which lesions. Every method groups images by lesion_id."""

    method: Literal["random", "dirichlet", "site"] = "random"
    num_clients: int = Field(3, ge=1, le=1000, description="ignored by `site` (one client per site)")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (dirichlet only)")
    seed: int = Field(0, ge=0, description="fixed across runs so that runs compare on one split")
    splits: SplitFractions = SplitFractions()


class GlobalTestConfig(Strict):
    """The server's test set: a lesion-grouped hold-out, one acquisition site held out whole
    (an unseen domain), or the official ISIC 2018 Task 3 test."""

    source: Literal["holdout", "site", "isic2018", "none"] = Field(
        "holdout", description="site: every image of `site`, which no client sees; none: no "
                               "server test set (a SuperNode's own data, all for it)"
    )
    fraction: float = Field(0.15, gt=0, lt=1, description="holdout only")
    site: str | None = Field(None, description="site only: e.g. HAM10000's vienna_dias")
    root: Path | None = Field(
        None,
        description="isic2018: folder with ISIC2018_Task3_Test_GroundTruth.csv and the images",
    )

    @model_validator(mode="after")
    def _root_for_isic(self) -> GlobalTestConfig:
        if self.source == "isic2018" and self.root is None:
            raise ValueError("source 'isic2018' needs `root`: the folder of the ISIC 2018 test set")
        if (self.source == "site") != (self.site is not None):
            raise ValueError("`site` goes with source 'site' (and it needs one), e.g. "
                             "{source: site, site: vienna_dias}")
        return self


class SyntheticConfig(Strict):
    """Procedural lesion-like images in HAM10000's schema (offline default)."""

    num_images: int = Field(1400, ge=70, le=200_000)


class DataConfig(Strict):
    dataset: Literal["ham10000", "dermamnist", "synthetic"] = "synthetic"
    root: Path | None = Field(None, description="local copy of the dataset (not for synthetic)")
    image_size: int = Field(64, ge=8, le=1024, description="side of the square images the cache holds")
    resize: Literal["crop", "pad"] = Field(
        "crop", description="crop: resize the short side then center-crop; pad: fit inside, pad black"
    )
    max_images: int | None = Field(
        None, ge=10, description="use a lesion-grouped, label-stratified subset (quick tests)"
    )
    dermamnist_size: Literal[28, 64, 128, 224] = 224
    synthetic: SyntheticConfig = SyntheticConfig()
    cache_dir: Path | None = Field(
        None, description="decoded-image cache; default $FL_SIM_CACHE or ~/.cache/fl-sim"
    )
    partition: PartitionConfig = PartitionConfig()
    global_test: GlobalTestConfig = GlobalTestConfig()

    @model_validator(mode="after")
    def _root_for_real_data(self) -> DataConfig:
        if self.dataset == "ham10000" and self.root is None:
            raise ValueError(
                "dataset 'ham10000' needs `root`: the folder holding HAM10000_metadata.csv"
            )
        return self


# ----------------------------------------------------------------------------- one run


class ModelConfig(Strict):
    name: str = Field("convnext_t", description="a short name of the registry or any timm name")
    pretrained: bool | Path = Field(
        False, description="true: timm/hub weights; false: random init; a path: a local weights file"
    )
    input_size: int | None = Field(
        None, ge=8, le=1024, description="model input side; default: the dataset's image_size"
    )
    normalize: Literal["model", "imagenet", "none"] = Field(
        "model", description="model: mean/std from the model's pretrained config"
    )
    strict: bool = Field(
        True, description="a local weights file must fit every tensor but the classifier head"
    )
    kwargs: dict[str, Any] = Field({}, description="passed to timm.create_model (drop_path_rate, ...)")


class FinetuneConfig(Strict):
    """Which part of the model trains, and so travels between server and clients; the frozen
    rest stays as built (pretrained) on every side. See fl_sim.models.finetune."""

    trainable: Annotated[float, Field(gt=0, le=1)] | Literal["all", "head"] = Field(
        "all", description="all; head (linear probing); or a fraction f: whole blocks from the "
                           "head backwards holding at least f of the parameter tensors")


class OptimizerConfig(Strict):
    """Name plus the paper's defaults; any value set here overrides the default."""

    name: Literal["sgd", "adam", "adamw", "adagrad", "adadelta"] = "sgd"
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    momentum: float | None = Field(None, ge=0, lt=1, description="sgd only")
    betas: tuple[float, float] | None = Field(None, description="adam/adamw only")

    @model_validator(mode="after")
    def _options_fit_the_optimizer(self) -> OptimizerConfig:
        if self.momentum is not None and self.name != "sgd":
            raise ValueError(f"momentum is an sgd option, not one of {self.name!r}")
        if self.betas is not None and self.name not in ("adam", "adamw"):
            raise ValueError(f"betas is an adam/adamw option, not one of {self.name!r}")
        return self


class StrategyConfig(Strict):
    name: Literal[
        "fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm",
        "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "qfedavg", "fedbn",
        "scaffold", "fedper", "fedrep", "ditto", "pooled", "local",
    ] = Field("fedavg", description="pooled / local: the baselines, trained without "
                                    "Flower; fedper / fedrep / ditto: personalized")
    weighting: Literal["examples", "uniform"] = Field(
        "examples", description="examples: weight by num-examples; uniform: the paper's eq. (3)"
    )
    proximal_mu: float | None = Field(None, ge=0, description="fedprox (default 0.01)")
    ditto_lambda: float | None = Field(
        None, ge=0, description="ditto: how hard each personal model is pulled toward the "
                                "global one, λ/2·‖v − w‖² (default 0.1)")
    head_epochs: int | None = Field(
        None, ge=1, le=1000, description="fedrep: epochs of the private head alone before "
                                         "each round's body training (default 1)")
    fraction_train: float = Field(
        1.0, gt=0, le=1, description="clients sampled to train each round (seeded by seed "
                                     "and round; at least one)")
    fraction_evaluate: float = Field(
        1.0, gt=0, le=1, description="clients sampled to evaluate in rounds between the "
                                     "`eval_every` rounds, which evaluate every client")
    params: dict[str, float | int] = Field(
        {}, description="other constructor arguments of the Flower strategy (eta, beta_1, ...)"
    )

    @model_validator(mode="after")
    def _mu_only_for_fedprox(self) -> StrategyConfig:
        for key, owner in (("proximal_mu", "fedprox"), ("ditto_lambda", "ditto"),
                           ("head_epochs", "fedrep")):
            if getattr(self, key) is not None and self.name != owner:
                raise ValueError(f"{key} is a {owner} parameter, not one of {self.name!r}")
        if self.params and self.name in BASELINES:
            raise ValueError(f"params are Flower strategy arguments; {self.name!r} takes none")
        if (self.fraction_train, self.fraction_evaluate) != (1, 1) and self.name in BASELINES:
            raise ValueError(f"fraction_train and fraction_evaluate sample clients of a "
                             f"federated round; {self.name!r} trains every client's data")
        return self


BASELINES = ("pooled", "local")  # strategy names trained in one process, without Flower
PRIVATE_HEAD = ("fedper", "fedrep")  # each client's classifier head never leaves it
PERSONALIZED = (*PRIVATE_HEAD, "ditto")  # each client trains a model of its own


class LossConfig(Strict):
    """The training loss. Class weights and priors come from the client's own train split,
    or (`class_weights: federation`) from the federation's total class counts."""

    name: Literal["ce", "weighted_ce", "focal", "logit_adjusted"] = Field(
        "ce", description="weighted_ce: weights n / (classes present x n_class); focal: "
                          "(1-p)^gamma CE; logit_adjusted: CE of logits + tau x log(prior), "
                          "the client's own label prior (predictions use the plain logits)")
    gamma: float | None = Field(None, ge=0, description="focal only (default 2)")
    tau: float | None = Field(None, gt=0, description="logit_adjusted only (default 1)")
    class_weights: Literal["client", "federation"] | None = Field(
        None, description="where weighted_ce's weights come from (default client), and focal's "
                          "(default none): the client's own train counts, or the federation's "
                          "total counts, which each client shares with the server")
    label_smoothing: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _options_of_their_loss(self) -> LossConfig:
        if self.gamma is not None and self.name != "focal":
            raise ValueError(f"gamma is a focal option, not one of {self.name!r}")
        if self.tau is not None and self.name != "logit_adjusted":
            raise ValueError(f"tau is a logit_adjusted option, not one of {self.name!r}")
        if self.class_weights is not None and self.name not in ("weighted_ce", "focal"):
            raise ValueError(f"class_weights weighs weighted_ce or focal; {self.name!r} has none")
        return self

    @property
    def weights_from(self) -> str | None:
        """Where the class weights come from: client, federation, or None (unweighted)."""
        return self.class_weights or ("client" if self.name == "weighted_ce" else None)


class LRScheduleConfig(Strict):
    """The learning rate per server round, sent to the clients with each round's message.

    plateau is Algorithm 1 of "Leveraging Modern Vision Model Architectures and Transfer
    Learning for Medical Image Analysis": watch the train accuracy until it passes
    `threshold`, then the validation loss; after `patience` rounds without improvement
    multiply the learning rate by `factor`; at the next plateau after `max_reductions`
    reductions stop the run (the best round is kept).
    """

    name: Literal["constant", "cosine", "plateau"] = "constant"
    warmup_rounds: int | None = Field(None, ge=0, description="cosine: linear warm-up (default 0)")
    min_factor: float | None = Field(
        None, ge=0, le=1, description="cosine: the last round's lr as a fraction of the base (default 0)")
    threshold: float | None = Field(None, gt=0, le=1, description="plateau: T (default 0.9)")
    patience: int | None = Field(None, ge=1, description="plateau: p (default 2)")
    factor: float | None = Field(None, gt=0, lt=1, description="plateau: phi (default 0.5)")
    max_reductions: int | None = Field(None, ge=0, description="plateau: P (default 2)")

    @model_validator(mode="after")
    def _options_fit_the_schedule(self) -> LRScheduleConfig:
        own = {"constant": set(), "cosine": {"warmup_rounds", "min_factor"},
               "plateau": {"threshold", "patience", "factor", "max_reductions"}}[self.name]
        for key in set(type(self).model_fields) - {"name"} - own:
            if getattr(self, key) is not None:
                raise ValueError(f"{key} is not an option of the {self.name!r} schedule")
        return self


class SynthesisConfig(Strict):
    """Rare-class synthesis: before round 1 each client trains a small conditional DCGAN on
    its own train split and adds generated images of `classes` to its train split only. The
    GAN and its images never leave the client (a small sample grid goes to TensorBoard)."""

    method: Literal["dcgan"] = "dcgan"
    classes: Literal["minority"] | list[str] = Field(
        "minority", description="minority: the client's classes with fewer train images than "
                                "its mean per class; or class codes, e.g. [df, vasc]")
    per_class: int = Field(200, ge=1, le=100_000, description="generated images per class")
    steps: int = Field(600, ge=1, le=1_000_000,
                       description="GAN training steps (~2 min for 2,000 images at 64 px, 2 cores)")
    batch_size: int = Field(32, ge=2, le=4096, description="GAN training batch")


class PersonalizeConfig(Strict):
    """After the last round each client fine-tunes the final and the best global model on
    its own train split and reports the personalized model's val/test metrics (the model
    itself stays at the client). BatchNorm trains as in a round: its running statistics
    move to the client's own data."""

    fine_tune_epochs: int = Field(1, ge=1, le=1000)
    steps: int | None = Field(
        None, ge=1, le=100_000, description="optimizer steps in place of fine_tune_epochs "
                                            "(FLamby: 100)")
    lr: float | None = Field(
        None, gt=0, description="the fine-tuning rate (default: the last round's, which a "
                                "cosine schedule has brought near zero)")
    optimizer: OptimizerConfig | None = Field(
        None, description="the fine-tuning optimizer (default: the run's)")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> PersonalizeConfig:
        if self.steps is not None and self.fine_tune_epochs != 1:
            raise ValueError("personalize.steps replaces fine_tune_epochs: leave it at 1")
        return self


class AdaptiveClippingConfig(Strict):
    """The clipping norm follows a quantile of the clients' update norms (Andrew et al.,
    2021): after each round C <- C x exp(lr x (clipped fraction - target_quantile)), the
    fraction counted with Gaussian noise; `clipping_norm` is where C starts."""

    target_quantile: float = Field(0.5, gt=0, lt=1, description="fraction of updates to clip")
    clip_norm_lr: float = Field(0.2, gt=0)
    clipped_count_stddev: float | None = Field(
        None, gt=0, description="noise of the clipped count (default: sampled clients / 20)")


class ClientLevelDPConfig(Strict):
    """Client-level central DP through Flower's clipping wrappers: each sampled client's
    update (its trained arrays minus the round's global ones) is clipped to `clipping_norm`
    in L2 over all its floating-point arrays, and the server adds Gaussian noise of standard
    deviation noise_multiplier x clipping_norm / sampled clients to their plain mean. An
    RDP accountant (Flower's, no amplification by sampling) books every round."""

    noise_multiplier: float = Field(..., gt=0)
    clipping_norm: float = Field(..., gt=0, description="L2 bound of one client's update "
                                                        "(the initial one, if adaptive)")
    clipping: Literal["server", "client"] = Field(
        "server", description="who clips: the server (DifferentialPrivacyServerSide*Clipping) "
                              "or each client before it replies (...ClientSide*Clipping)")
    adaptive: AdaptiveClippingConfig | None = Field(
        None, description="adapt the clipping norm (...AdaptiveClipping); null: fixed")


class SampleLevelDPConfig(Strict):
    """DP-SGD at each client (Opacus): every step samples each train image with probability
    1 / ceil(n / batch_size) (Poisson), clips each image's gradient to `max_grad_norm` and
    adds Gaussian noise of standard deviation noise_multiplier x max_grad_norm. Opacus's RDP
    accountant books each client's steps. BatchNorm layers become GroupNorm (checked by
    Opacus's ModuleValidator): a per-image gradient cannot see the batch."""

    noise_multiplier: float = Field(..., gt=0)
    max_grad_norm: float = Field(1.0, gt=0, description="L2 bound of one image's gradient")


class PrivacyConfig(Strict):
    """Differential privacy and its ledger (docs/privacy.md): client-level (whole clients'
    updates), sample-level (single images at each client), or both. The ε spent is written
    after every round; a run whose next round would pass `target_epsilon` stops before it."""

    client_level: ClientLevelDPConfig | None = None
    sample_level: SampleLevelDPConfig | None = None
    delta: float = Field(1e-5, gt=0, lt=1, description="the δ every ε is reported at")
    target_epsilon: float | None = Field(
        None, gt=0, description="stop before a round that would spend more (each level apart)")

    @model_validator(mode="after")
    def _some_level(self) -> PrivacyConfig:
        if self.client_level is None and self.sample_level is None:
            raise ValueError("privacy needs client_level, sample_level or both "
                             "(or leave privacy out)")
        return self


# Strategies whose aggregate is FedAvg's mean, the one Flower's accounted DP wrappers take.
CLIENT_LEVEL_DP_STRATEGIES = ("fedavg", "fedprox", "fedbn")


# Each attack's `strength` where the study file gives none (docs/robustness.md).
ATTACK_STRENGTH = {"label_flip": 1.0, "sign_flip": 1.0, "gaussian": 10.0, "scale": 10.0,
                   "alie": 1.0}


class AdversaryConfig(Strict):
    """Hostile clients, in simulation: they train or reply as `attack` says (docs/robustness.md)."""

    clients: list[int] | None = Field(
        None, min_length=1, description="the hostile clients' partition ids (or `fraction`)")
    fraction: float | None = Field(
        None, gt=0, lt=1, description="this share of the clients, drawn by seed (at least one)")
    attack: Literal["label_flip", "sign_flip", "gaussian", "scale", "alie"] = Field(
        ..., description="label_flip: train on flipped labels; sign_flip / scale: send "
                         "-strength x / strength x the update; gaussian: noise of strength x "
                         "the update's spread; alie: mean - strength x std of own estimates")
    strength: float | None = Field(None, gt=0, description="see attack (default per attack)")

    @model_validator(mode="after")
    def _who(self) -> AdversaryConfig:
        if (self.clients is None) == (self.fraction is None):
            raise ValueError("adversary names its clients by `clients: [ids]` or "
                             "`fraction: share`, one of the two")
        if self.clients is not None and min(self.clients) < 0:
            raise ValueError("adversary.clients are partition ids, from 0")
        if self.attack == "label_flip" and self.strength is not None and self.strength > 1:
            raise ValueError("label_flip's strength is the share of labels flipped, at most 1")
        return self

    @property
    def resolved_strength(self) -> float:
        return ATTACK_STRENGTH[self.attack] if self.strength is None else self.strength


# Strategies that need each client's update (a distance, a median, a loss-weighted sum),
# which SecAgg+ never shows the server: it sees only the sum.
NEEDS_EACH_UPDATE = ("krum", "multikrum", "bulyan", "fedmedian", "fedtrimmedavg", "qfedavg")


class SecureAggregationConfig(Strict):
    """SecAgg+ (Bell et al. 2020) through Flower's protocol code (docs/privacy.md): the
    server learns the weighted sum of the clients' updates, never one update. Flower's
    defaults where it has them; each client's shares go to `num_shares` of the sampled
    clients (itself included), any `threshold` of which rebuild its secrets, so a round
    survives num_shares - threshold clients that drop out after the key sharing."""

    num_shares: int | float = Field(
        1.0, gt=0, description="a count (> 2), or a share of the sampled clients (1.0: all "
                               "of them, the original SecAgg)")
    threshold: int | float = Field(
        0.5, gt=0, description="shares that rebuild a secret: a count (< num_shares), or a "
                               "share of num_shares (at least 2)")
    clipping_range: float = Field(
        8.0, gt=0, description="each weighted update entry is clipped to +-this, then quantized")
    quantization_range: int = Field(2 ** 22, gt=0, description="integer levels of the quantizer")
    modulus_range: int = Field(2 ** 32, description="the masks' range: a power of 2, at most "
                                                    "2**32, above quantization_range")
    max_weight: float | None = Field(
        None, gt=0, description="the largest client weight: clients scale their update by "
                                "weight / max_weight (default: the largest train split of the "
                                "server's partition; 1 with uniform weighting)")

    @model_validator(mode="after")
    def _flower_takes_it(self) -> SecureAggregationConfig:
        from flwr.server.workflow import SecAggPlusWorkflow

        if self.modulus_range > 2 ** 32:  # Flower's masks are drawn below 2**32
            raise ValueError(f"modulus_range must be at most 2**32, not {self.modulus_range}")
        try:  # Flower's own checks of the protocol's parameters
            SecAggPlusWorkflow(self.num_shares, self.threshold, clipping_range=self.clipping_range,
                               quantization_range=self.quantization_range,
                               modulus_range=self.modulus_range)
        except (TypeError, ValueError) as err:
            raise ValueError(f"SecAgg+: {err}".replace("reconstruction_threshold", "threshold")) from None
        return self


class AvailabilityConfig(Strict):
    """Clients that are sometimes away, in simulation."""

    dropout: float = Field(
        ..., ge=0, lt=1, description="each client sits out a round's training with this "
                                     "probability, seeded by (seed, round); at least one trains")


class ResourcesConfig(Strict):
    """Per simulated client, handed to Flower's Ray backend (scheduling hints, not limits)."""

    num_cpus: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="auto: the clients of a round share this machine's cores in "
        "balanced waves (fl_sim.resources.client_cpus); 1 on a Ray cluster")
    num_gpus: float = Field(0.0, ge=0, description="fractions pack several clients on one GPU")


class ClipConfig(Strict):
    """The CLIP variant: a timm image encoder trained into a frozen open_clip text space."""

    text_model: str = Field("ViT-L-14", description="open_clip model whose text tower is used")
    text_pretrained: str | None = Field(
        "openai", description="open_clip pretrained tag, a local weights file, or null (random)"
    )
    templates: list[str] = Field(["a picture of a {class}"], min_length=1)
    loss: Literal["clip", "class_ce"] = "clip"
    learn_temperature: bool = True

    @model_validator(mode="after")
    def _templates_have_slot(self) -> ClipConfig:
        for t in self.templates:
            if "{class}" not in t:
                raise ValueError(f"template {t!r} has no {{class}} slot")
        return self


class AugmentConfig(Strict):
    """Random, label-preserving changes of each training image, drawn on the batch from the
    run's seed (fl_sim.transforms; docs/augmentation.md). `augment: true` is this model's
    defaults (flips and 90-degree turns), `augment: false` turns everything off; an option
    at 0 (crop_scale: null or 1, flips: false) is off."""

    flips: bool = Field(True, description="one of the 8 flips / 90-degree turns per image")
    crop_scale: float | None = Field(
        None, gt=0, le=1, description="random resized crop: a square of area fraction uniform "
                                      "in [crop_scale, 1], resized to the input size")
    rotation: float = Field(0, ge=0, le=180, description="degrees: a turn uniform in [-rotation, rotation]")
    brightness: float = Field(0, ge=0, le=1, description="factor uniform in [1 - v, 1 + v]")
    contrast: float = Field(0, ge=0, le=1, description="factor uniform in [1 - v, 1 + v]")
    saturation: float = Field(0, ge=0, le=1, description="factor uniform in [1 - v, 1 + v]")
    hue: float = Field(0, ge=0, le=0.5, description="a turn of the YIQ chroma plane, in [-v, v] turns")

    @model_validator(mode="before")
    @classmethod
    def _switch(cls, data: Any) -> Any:
        if isinstance(data, bool):
            return {} if data else {"flips": False}
        if not isinstance(data, (dict, AugmentConfig)):
            raise ValueError("augment takes true, false or options, e.g. {flips: true, rotation: 15}")
        return data

    @property
    def geometric(self) -> bool:
        return self.crop_scale not in (None, 1) or self.rotation > 0

    @property
    def colour(self) -> bool:
        return any((self.brightness, self.contrast, self.saturation, self.hue))

    @property
    def enabled(self) -> bool:
        return self.flips or self.geometric or self.colour


class RunConfig(Strict):
    """Everything one run needs; `defaults` in experiments.yaml, varied by `grid`."""

    rounds: int = Field(3, ge=1, le=10_000)
    local_epochs: int = Field(1, ge=1, le=1000)
    client_state: Literal["fresh", "keep"] = Field(
        "fresh", description="keep: each client's optimizer state (momentum, Adam's moments) "
                             "carried from round to round in its node; fresh: a new optimizer "
                             "each round, as in FedAvg")
    local_steps: int | None = Field(
        None, ge=1, le=100_000, description="optimizer steps a round at every client whatever "
                                            "its size, in place of local_epochs (FLamby: 100)")
    batch_size: int = Field(32, ge=1, le=4096)
    eval_batch_size: int = Field(128, ge=1, le=16_384)
    model: ModelConfig = ModelConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    strategy: StrategyConfig = StrategyConfig()
    training: Literal["supervised", "clip"] = "supervised"
    clip: ClipConfig = ClipConfig()
    augment: AugmentConfig = Field(
        AugmentConfig(), description="true: flips and 90-degree turns; false: none; or options")
    loss: LossConfig = LossConfig()
    personalize: PersonalizeConfig | None = Field(
        None, description="local fine-tuning of the final and best models (null: none)")
    synthesis: SynthesisConfig | None = Field(
        None, description="rare-class synthesis at each client (null: none)")
    privacy: PrivacyConfig | None = Field(
        None, description="differential privacy and its ε ledger (null: none)")
    sampler: Literal["shuffle", "balanced"] = Field(
        "shuffle", description="balanced: draw each epoch's images with probability 1/class count")
    lr_schedule: LRScheduleConfig = LRScheduleConfig()
    eval_every: int = Field(
        1, ge=1, description="every k rounds (and the last) all clients evaluate the global "
                             "model; only those rounds can be the best round")
    selection_metric: Literal["acc", "bacc", "precision", "recall", "f1", "avg", "loss"] = Field(
        "avg", description="validation metric that picks the best round (never test)"
    )
    cross_site_eval: bool = Field(
        False, description="after the last round, every client's model (local runs) and "
                           "personalized model on every client's test split: models travel "
                           "between sites")
    secure_aggregation: SecureAggregationConfig | None = Field(
        None, description="SecAgg+: the server sees only the sum of the updates (null: none)")
    adversary: AdversaryConfig | None = Field(
        None, description="hostile clients, in simulation (null: none)")
    availability: AvailabilityConfig | None = Field(
        None, description="clients that sit out rounds, in simulation (null: all train)")
    resources: ResourcesConfig = ResourcesConfig()
    min_clients: int | None = Field(
        None, ge=1, description="clients that must connect, and reply each round (default: "
                                "all of them, or 1 with availability; of a sample, at most "
                                "its size)"
    )
    round_timeout_s: float = Field(
        3600, gt=0, description="longest wait for replies, or for enough clients to connect"
    )
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _warmup_ends_before_the_last_round(self) -> RunConfig:
        warmup = self.lr_schedule.warmup_rounds or 0
        if warmup >= self.rounds:
            raise ValueError(
                f"lr_schedule.warmup_rounds {warmup} with {self.rounds} rounds: the warm-up "
                f"reaches the base rate at round {warmup + 1}, so no round would train at it; "
                f"use at most {self.rounds - 1} warm-up rounds")
        return self

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> RunConfig:
        if self.local_steps is None:
            return self
        if self.local_epochs != 1:
            raise ValueError(f"local_steps replaces local_epochs: leave local_epochs at 1 "
                             f"(it is {self.local_epochs})")
        if self.privacy and self.privacy.sample_level:
            raise ValueError("local_steps does not combine with privacy.sample_level: DP-SGD "
                             "draws and books whole epochs of Poisson batches")
        return self

    @model_validator(mode="after")
    def _kept_state_is_not_private(self) -> RunConfig:
        if self.client_state == "keep" and self.privacy and self.privacy.sample_level:
            raise ValueError("client_state: keep is not built for privacy.sample_level: Opacus "
                             "wraps the optimizer anew each round")
        return self

    @model_validator(mode="after")
    def _personalize_is_federated(self) -> RunConfig:
        if self.personalize is not None and self.strategy.name in BASELINES:
            raise ValueError(f"personalize fine-tunes a federated model at each client; "
                             f"{self.strategy.name!r} has no global model to personalize")
        return self

    @model_validator(mode="after")
    def _personal_models_fit_the_run(self) -> RunConfig:
        strategy = self.strategy.name
        if strategy not in PERSONALIZED:
            return self
        refused = {
            # FedRep trains head and body by turns, Ditto two models: one optimizer state
            # per client would serve neither.
            "client_state: keep": self.client_state == "keep",
            "cross_site_eval": self.cross_site_eval,  # each client's model needs its own head
            "finetune.trainable: head": self.finetune.trainable == "head" and
            strategy in PRIVATE_HEAD,  # nothing would be shared
            # Ditto's personal model is its personalization; a fine-tuned copy would be a
            # second one in the same rows.
            "personalize": self.personalize is not None and strategy == "ditto",
            "training: clip": self.training == "clip",
            "adversary": self.adversary is not None,
            # The ledger counts one model's training per client a round.
            "privacy": self.privacy is not None,
        }
        clash = [what for what, hit in refused.items() if hit]
        if clash:
            raise ValueError(f"strategy {strategy} does not combine with {clash[0]} "
                             "(docs/personalization.md)")
        return self

    @model_validator(mode="after")
    def _privacy_fits_the_run(self) -> RunConfig:
        if self.privacy is None:
            return self
        strategy = self.strategy.name
        central, dpsgd = self.privacy.client_level, self.privacy.sample_level
        if central is not None:
            if strategy not in CLIENT_LEVEL_DP_STRATEGIES:
                raise ValueError(
                    f"privacy.client_level noises FedAvg's plain mean of clipped updates; "
                    f"strategy {strategy!r} aggregates otherwise. Use one of "
                    f"{', '.join(CLIENT_LEVEL_DP_STRATEGIES)}")
            if self.strategy.weighting != "uniform":
                raise ValueError(
                    "privacy.client_level needs strategy.weighting: uniform: each clipped "
                    "update counts once, so the noise covers any one client; example weights "
                    "would let a large client's update outweigh the noise")
        if dpsgd is not None:
            refused = {
                "strategy fedprox": strategy == "fedprox",  # its term has no per-image gradient
                "strategy scaffold": strategy == "scaffold",  # its correction would skip the noise
                "training: clip": self.training == "clip",  # a batch's contrastive loss
                "sampler: balanced": self.sampler != "shuffle",  # DP-SGD samples by Poisson
                "synthesis": self.synthesis is not None,  # the GAN would see the images unclipped
                # Its mean divides by the batch's weights: one image would scale the others.
                "loss: weighted_ce": self.loss.name == "weighted_ce",
                "strategy fedbn": strategy == "fedbn",  # BatchNorm becomes GroupNorm
            }
            clash = [what for what, hit in refused.items() if hit]
            if clash:
                raise ValueError(
                    f"privacy.sample_level (DP-SGD) does not combine with {clash[0]}: its "
                    "guarantee covers per-image clipped, noised gradients only (docs/privacy.md)")
        return self

    @model_validator(mode="after")
    def _secure_aggregation_fits_the_run(self) -> RunConfig:
        if self.secure_aggregation is None:
            return self
        strategy, central = self.strategy.name, self.privacy and self.privacy.client_level
        if strategy in BASELINES:
            raise ValueError(f"secure_aggregation hides each client's update in a federated "
                             f"round's sum; {strategy!r} aggregates no updates")
        if strategy in NEEDS_EACH_UPDATE:
            raise ValueError(
                f"secure_aggregation gives the server only the sum of the updates, and "
                f"strategy {strategy!r} needs each one (a distance, a median or a loss each). "
                "Use fedavg, fedprox, fedbn, scaffold or the FedOpt family")
        if central and central.clipping == "server":
            raise ValueError("secure_aggregation hides each update, so the server cannot clip "
                             "it: use privacy.client_level.clipping: client")
        if self.cross_site_eval and self.personalize is not None:
            raise ValueError("cross_site_eval sends each personalized model to every site in "
                             "the clear, which secure_aggregation exists to prevent: drop one")
        return self

    @model_validator(mode="after")
    def _clients_are_federated(self) -> RunConfig:
        for key in ("adversary", "availability"):
            if getattr(self, key) is not None and self.strategy.name in BASELINES:
                raise ValueError(f"{key} acts on the clients of a federated round; "
                                 f"{self.strategy.name!r} has none")
        if self.availability and self.privacy and self.privacy.client_level:
            raise ValueError("availability drops clients from rounds, but privacy.client_level "
                             "calibrates its noise to every sampled client replying")
        return self

    @model_validator(mode="after")
    def _loss_is_supervised(self) -> RunConfig:
        if self.training == "clip" and self.loss != LossConfig():
            raise ValueError("`loss` is the supervised head's; the CLIP variant's loss is "
                             "`clip.loss` (clip or class_ce)")
        return self


class StudyConfig(Strict):
    study: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    out: Path = Field(Path("runs"), description="output directory; runs land in <out>/<study>/")
    tracking: list[Literal["tensorboard", "mlflow"]] = Field(
        ["tensorboard"], min_length=1,
        description="where metrics go besides metrics.jsonl: tensorboard (always), and "
                    "mlflow (a local store in <out>/<study>/mlflow.db)")
    data: DataConfig = DataConfig()
    defaults: RunConfig = RunConfig()
    grid: dict[str, list[Any]] | list[dict[str, list[Any]]] = Field(
        {}, description="key of `defaults` -> alternatives; or a list of such grids"
    )

    @property
    def grids(self) -> list[dict[str, list[Any]]]:
        return self.grid if isinstance(self.grid, list) else [self.grid]

    @model_validator(mode="after")
    def _tensorboard_is_written(self) -> StudyConfig:
        if "tensorboard" not in self.tracking:
            raise ValueError("tracking: TensorBoard is always written (fl-sim's figures and "
                             "HParams live there); list it, with mlflow beside it: "
                             "[tensorboard, mlflow]")
        return self

    @model_validator(mode="after")
    def _grid_gives_runs(self) -> StudyConfig:
        if not self.grids:  # `grid: []`: a product over no grid is no run at all
            raise ValueError(
                "grid is an empty list of grids, so the study has no run: leave grid out (or "
                "write `grid: {}`) for one run of the defaults, or list grids of alternatives"
            )
        for grid in self.grids:
            for key, values in grid.items():
                if key not in RunConfig.model_fields:
                    raise ValueError(
                        f"grid key {key!r} is not a run setting; use one of: "
                        + ", ".join(RunConfig.model_fields)
                    )
                if not values:
                    raise ValueError(f"grid.{key} is an empty list")
        return self


class Run(BaseModel):
    """One expanded run of a study: its name and its settings."""

    name: str
    config: RunConfig

    def dir(self, study: StudyConfig) -> Path:
        """`<out>/<study>/<run-name>/`, the run-directory contract of DESIGN.md."""
        return Path(study.out) / study.study / self.name

    def resolved(self, study: StudyConfig) -> dict[str, Any]:
        """The run's config.yaml: everything its results depend on, as written."""
        return {"study": study.study, "run": self.name,
                "data": study.data.model_dump(mode="json"),
                "run_config": self.config.model_dump(mode="json")}
