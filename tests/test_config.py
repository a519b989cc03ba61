"""The experiments.yaml schema: validation, grid expansion, run names, CLI errors."""

from pathlib import Path

import pytest
import yaml

from fl_sim.cli import main
from fl_sim.config import expand_grid, load_study
from fl_sim.errors import FlSimError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, obj: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(obj))
    return path


def test_the_shipped_paper_study_expands_to_its_192_named_runs():
    study = load_study(ROOT / "experiments.yaml")
    runs = expand_grid(study)
    assert len(runs) == 12 * 5 * 2 + 12 * 3 * 2
    names = [r.name for r in runs]
    assert "fedprox-mu0.01_convnext_t_sgd_s0" in names
    assert "fedavg_vit_l_16_adadelta_s0" in names
    assert len(set(names)) == len(names)
    run = runs[names.index("fedprox-mu0.01_swin_b_adamw_s0")].config
    assert (run.strategy.name, run.strategy.proximal_mu, run.model.name, run.optimizer.name) == (
        "fedprox", 0.01, "swin_b", "adamw")
    assert run.rounds == 50 and run.batch_size == 32 and run.model.pretrained is True
    clip = [r.config for r in runs if r.config.training == "clip"]
    assert len(clip) == 72 and {c.clip.text_model for c in clip} == {"ViT-L-14", "RN50x16", "RN50x64"}
    assert {(c.batch_size, c.optimizer.name, c.clip.text_pretrained) for c in clip} == {(16, "adagrad", "openai")}
    assert "fedprox-mu0.01_swin_t_adagrad_clip-RN50x64_s0_batch_size16" in names


def test_grid_values_beyond_the_named_keys_enter_the_run_name(tmp_path):
    path = write(tmp_path, {"study": "s", "grid": {"local_epochs": [1, 2], "seed": [0, 1]}})
    names = [r.name for r in expand_grid(load_study(path))]
    assert names == ["fedavg_convnext_t_sgd_s0_local_epochs1", "fedavg_convnext_t_sgd_s1_local_epochs1",
                     "fedavg_convnext_t_sgd_s0_local_epochs2", "fedavg_convnext_t_sgd_s1_local_epochs2"]


@pytest.mark.parametrize("obj, message", [
    ({"study": "s", "defaults": {"rouns": 3}}, "defaults.rouns: unknown key"),
    ({"study": "s", "data": {"partition": {"methd": "random"}}}, "data.partition.methd: unknown key"),
    ({"study": "s", "defaults": {"rounds": 0}}, "defaults.rounds: Input should be greater than or equal to 1"),
    ({"study": "s", "defaults": {"optimizer": {"name": "lion"}}}, "defaults.optimizer.name"),
    ({"study": "s", "grid": {"strategy": ["fedsgd"]}}, "grid.strategy.name"),
    ({"study": "s", "grid": {"epochs": [1, 2]}}, "grid key 'epochs' is not a run setting"),
    ({"study": "s", "data": {"partition": {"splits": {"train": 0.7, "val": 0.2, "test": 0.2}}}},
     "must sum to 1"),
    ({"study": "s", "data": {"dataset": "ham10000"}}, "needs `root`"),
    ({"study": "s", "defaults": {"strategy": {"name": "fedavg", "proximal_mu": 0.1}}},
     "proximal_mu is a fedprox parameter"),
])
def test_bad_configs_name_the_key(tmp_path, obj, message):
    path = write(tmp_path, obj)
    with pytest.raises(FlSimError, match="is not a valid study") as info:
        load_study(path)
    assert message in str(info.value)


def test_cli_exits_non_zero_with_the_message(tmp_path, capsys):
    path = write(tmp_path, {"study": "s", "defaults": {"rouns": 3}})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "defaults.rouns: unknown key" in err and str(path) in err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_overrides_and_dry_run(tmp_path, capsys):
    assert main(["run", str(ROOT / "experiments.yaml"), "--data-root", str(tmp_path),
                 "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "192 runs" in out and "fedprox-mu0.01_convnext_t_sgd_s0" in out
    study = load_study(ROOT / "experiments.yaml", data_root=tmp_path, out=tmp_path / "o")
    assert study.data.root == tmp_path and study.out == tmp_path / "o"


def test_data_root_for_a_dataset_that_reads_none_is_refused(tmp_path, capsys):
    """Issue #25, item 2: not ignored without a word."""
    assert main(["run", str(ROOT / "examples/quickstart.yaml"), "--data-root", str(tmp_path),
                 "--dry-run"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--data-root {tmp_path}:" in err and "dataset is synthetic" in err


def test_unknown_strategy_params_are_named(tmp_path):
    from fl_sim.strategies import build_strategy

    study = load_study(write(tmp_path, {"study": "s", "defaults": {
        "strategy": {"name": "fedadam", "params": {"eta": 0.01, "etta": 1}}}}))
    with pytest.raises(FlSimError, match=r"\['etta'\], which fedadam does not take"):
        build_strategy(study.defaults.strategy, num_clients=3)
    study.defaults.strategy.params = {"eta": 0.01}
    assert build_strategy(study.defaults.strategy, num_clients=3).eta == 0.01


def test_baselines_and_recipes_are_grid_keys_named_in_the_run(tmp_path):
    path = write(tmp_path, {"study": "s", "defaults": {"lr_schedule": {"name": "cosine"}},
                            "grid": {"strategy": ["pooled", "local", "fedavg"],
                                     "loss": ["ce", {"name": "focal", "gamma": 1}],
                                     "sampler": ["shuffle", "balanced"]}})
    names = [r.name for r in expand_grid(load_study(path))]
    assert len(names) == len(set(names)) == 12
    assert "pooled_convnext_t_sgd_cosine_s0" in names
    assert "local_convnext_t_sgd_focal-g1_balanced_cosine_s0" in names


@pytest.mark.parametrize("defaults, message", [
    ({"loss": {"name": "ce", "gamma": 2}}, "gamma is a focal option, not one of 'ce'"),
    ({"lr_schedule": {"name": "constant", "warmup_rounds": 2}},
     "warmup_rounds is not an option of the 'constant' schedule"),
    ({"strategy": {"name": "pooled", "params": {"eta": 0.1}}}, "'pooled' takes none"),
    ({"training": "clip", "loss": {"name": "weighted_ce"}}, "the CLIP variant's loss is `clip.loss`"),
    ({"sampler": "balance"}, "sampler: Input should be 'shuffle' or 'balanced'"),
    ({"rounds": 2, "lr_schedule": {"name": "cosine", "warmup_rounds": 2}},
     "the warm-up reaches the base rate at round 3, so no round would train at it"),
])
def test_recipe_mistakes_are_named(tmp_path, defaults, message):
    with pytest.raises(FlSimError, match=message.replace("(", r"\(").replace("`", ".")):
        load_study(write(tmp_path, {"study": "s", "defaults": defaults}))


def test_augment_is_a_switch_or_options_and_grids_name_it(tmp_path):
    path = write(tmp_path, {"study": "s", "defaults": {"augment": {"rotation": 10, "hue": 0.02}},
                            "grid": {"augment": [False, True, {"crop_scale": 0.7},
                                                 {"flips": False, "brightness": 0.2}]}})
    study = load_study(path)
    assert study.defaults.augment.rotation == 10 and study.defaults.augment.flips
    runs = expand_grid(study)
    assert [r.name for r in runs] == [
        "fedavg_convnext_t_sgd_s0_augmentFalse", "fedavg_convnext_t_sgd_s0_augmentTrue",
        "fedavg_convnext_t_sgd_aug-crop0.7-rot10-h0.02_s0",  # a mapping updates the defaults
        "fedavg_convnext_t_sgd_aug-noflip-rot10-b0.2-h0.02_s0"]
    off, flips = runs[0].config.augment, runs[1].config.augment
    assert not off.enabled and flips.flips and not (flips.geometric or flips.colour)


@pytest.mark.parametrize("obj, message", [
    ({"defaults": {"augment": {"rotation": 200}}},
     "defaults.augment.rotation: Input should be less than or equal to 180 (got 200)"),
    ({"defaults": {"augment": {"crop_scale": 0}}}, "defaults.augment.crop_scale: Input should be greater than 0"),
    ({"defaults": {"augment": {"rotate": 15}}}, "defaults.augment.rotate: unknown key"),
    ({"grid": {"augment": [{"hue": 0.7}]}}, "grid.augment.hue: Input should be less than or equal to 0.5"),
    ({"defaults": {"augment": "yes"}}, "defaults.augment: augment takes true, false or options"),
])
def test_bad_augment_values_name_the_key(tmp_path, obj, message):
    with pytest.raises(FlSimError) as info:
        load_study(write(tmp_path, {"study": "s", **obj}))
    assert message in str(info.value)


@pytest.mark.parametrize("text, key, lines", [
    ("study: x\ndata: {dataset: synthetic}\nstudy: y\n", "'study'", "lines 1 and 3"),
    ("study: x\ndata:\n  dataset: synthetic\n  image_size: 32\n  image_size: 64\n",
     "'image_size'", "lines 4 and 5"),
])
def test_a_key_given_twice_is_refused_not_overwritten(tmp_path, capsys, text, key, lines):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(FlSimError, match=f"the key {key} is given twice in one mapping \\({lines}\\)"):
        load_study(path)
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "given twice" in capsys.readouterr().err
    # The same key in two different mappings is fine.
    path.write_text("study: x\ndata: {dataset: synthetic, root: null}\n"
                    "defaults: {model: {name: test_convnext}, optimizer: {name: adamw}}\n")
    assert load_study(path).study == "x"


def test_runs_that_differ_only_in_strategy_params_get_distinct_stable_names():
    from fl_sim.config import StudyConfig, expand_grid

    def names(strategies):
        study = StudyConfig.model_validate({"study": "s", "grid": {"strategy": strategies}})
        return [r.name for r in expand_grid(study)]

    tuned = names([{"name": "fedadam"}, {"name": "fedadam", "params": {"eta": 0.01}},
                   {"name": "fedadam", "params": {"eta": 0.001, "tau": 0.01}}])
    assert tuned == ["fedadam_convnext_t_sgd_s0", "fedadam-eta0.01_convnext_t_sgd_s0",
                     "fedadam-eta0.001-tau0.01_convnext_t_sgd_s0"]
    # A run whose name collided with none keeps the name it always had.
    assert names([{"name": "fedadam", "params": {"eta": 0.01}}]) == ["fedadam_convnext_t_sgd_s0"]
