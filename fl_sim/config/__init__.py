"""The study file: its schema (schema.py), its loading and grid expansion (study.py), and
the names and labels of its runs (naming.py)."""

from fl_sim.config.naming import (
    ditto_lambda, head_epochs, proximal_mu, recipe_label, run_labels, run_name,
)
from fl_sim.config.schema import (
    BASELINES, PERSONALIZED, PRIVATE_HEAD, AdversaryConfig, AugmentConfig, AvailabilityConfig,
    ClipConfig, DataConfig, FinetuneConfig, GlobalTestConfig, LossConfig, LRScheduleConfig,
    ModelConfig, OptimizerConfig, PartitionConfig, PersonalizeConfig, PrivacyConfig,
    ResourcesConfig, Run, RunConfig, SecureAggregationConfig, StrategyConfig, StudyConfig,
    SynthesisConfig,
)
from fl_sim.config.study import expand_grid, flatten, format_validation_error, load_study

__all__ = [
    "BASELINES", "PERSONALIZED", "PRIVATE_HEAD", "AdversaryConfig", "AugmentConfig",
    "AvailabilityConfig", "ClipConfig", "DataConfig", "FinetuneConfig", "GlobalTestConfig",
    "LossConfig", "LRScheduleConfig", "ModelConfig", "OptimizerConfig", "PartitionConfig",
    "PersonalizeConfig", "PrivacyConfig", "ResourcesConfig", "Run", "RunConfig",
    "SecureAggregationConfig", "StrategyConfig", "StudyConfig", "SynthesisConfig",
    "ditto_lambda", "expand_grid", "flatten", "format_validation_error", "head_epochs",
    "load_study", "proximal_mu", "recipe_label", "run_labels", "run_name",
]
