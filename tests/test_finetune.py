"""Partial fine-tuning (issue #15, item 1): which tensors train, that only they change, and
that only they travel."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fl_sim.client.client_app import check_frozen
from fl_sim.client.train import train_local
from fl_sim.config import ModelConfig, RunConfig, expand_grid
from fl_sim.errors import FlSimError
from fl_sim.models import create_model
from fl_sim.models.finetune import (
    freeze, frozen_digest, load_weights, parameter_groups, trainable_names, travelling_keys,
    travelling_state,
)
from fl_sim.task import build_model
from tests.test_strategies import run_study


def model(name: str = "tf_efficientnet_lite0", trainable: float | str = "all"):
    torch.manual_seed(0)
    m = create_model(ModelConfig(name=name), num_classes=7, image_size=32)
    freeze(m, trainable)
    return m


def test_head_is_the_classifier_and_a_fraction_takes_whole_blocks_from_the_head_back():
    m = model()
    assert trainable_names(m, "head") == ["classifier.weight", "classifier.bias"]
    groups = parameter_groups(m)
    total = sum(len(g) for g in groups)
    assert groups[-1] == ["classifier.weight", "classifier.bias"]
    for fraction in (0.05, 0.15, 0.5, 1.0):
        names = trainable_names(m, fraction)
        assert len(names) >= fraction * total
        # whole blocks: the trainable names are exactly the last k groups, for some k
        k = next(k for k in range(1, len(groups) + 1)
                 if sum(len(g) for g in groups[-k:]) == len(names))
        assert names == [n for g in groups[-k:] for n in g]
        assert sum(len(g) for g in groups[-(k - 1):]) < fraction * total if k > 1 else True
    assert len(trainable_names(m, 0.15)) < len(trainable_names(m, 0.5)) < total


def test_only_the_trainable_tensors_change_and_frozen_batchnorm_keeps_its_statistics():
    m = model(trainable=0.15)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    travel = set(travelling_keys(m))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (40, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 7, 40)
    cfg = RunConfig.model_validate({"model": {"name": "tf_efficientnet_lite0"}, "batch_size": 8,
                                    "finetune": {"trainable": 0.15}})
    _, preprocess = build_model(cfg, [str(i) for i in range(7)], 32)
    train_local(m, images, labels, np.arange(40), preprocess, cfg, rng)
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= travel  # trainable weights and their BatchNorm statistics
    assert any("running_mean" in k for k in changed)  # a trainable block's BN still learns
    frozen_bn = [k for k in before if "running_mean" in k and k not in travel]
    assert frozen_bn  # frozen BatchNorm layers exist, and were in eval mode: unchanged
    assert all(torch.equal(before[k], after[k]) for k in frozen_bn)


def test_a_message_carries_the_trainable_part_and_loads_only_into_the_same_setting():
    full, head = model(), model(trainable="head")
    sent = travelling_state(head)
    assert list(sent) == ["classifier.weight", "classifier.bias"]
    assert travelling_keys(full) == list(full.state_dict())
    load_weights(head, sent)  # the trainable part
    load_weights(head, full.state_dict())  # or a whole model (a checkpoint)
    with pytest.raises(FlSimError, match="same model and finetune setting"):
        load_weights(full, sent)  # a whole model cannot take a part
    with pytest.raises(FlSimError, match="not this model's trainable part"):
        load_weights(model(trainable=0.5), sent)


def test_a_client_refuses_frozen_weights_other_than_the_servers():
    a, b = model(trainable="head"), model(trainable="head")
    assert frozen_digest(a) == frozen_digest(b) != ""
    assert frozen_digest(model()) == ""
    with torch.no_grad():
        next(b.parameters()).add_(1.0)  # e.g. another pretrained file
    check_frozen(frozen_digest(a), frozen_digest(a))
    with pytest.raises(FlSimError, match="frozen weights differ from the server's"):
        check_frozen(frozen_digest(a), frozen_digest(b))


def test_finetune_settings_name_their_runs_and_are_checked():
    from fl_sim.config import StudyConfig

    study = StudyConfig.model_validate({"study": "s", "grid": {"finetune": ["all", 0.15, "head"]}})
    assert [r.name for r in expand_grid(study)] == [
        "fedavg_convnext_t_sgd_s0", "fedavg_convnext_t_ft0.15_sgd_s0", "fedavg_convnext_t_head_sgd_s0"]
    for bad in (0, 1.5, "last"):
        with pytest.raises(ValueError, match="finetune.trainable"):
            RunConfig.model_validate({"finetune": {"trainable": bad}})


def test_fedbn_is_refused_where_no_batchnorm_layer_trains(tmp_path):
    from fl_sim.config import StudyConfig
    from fl_sim.server.loop import FederatedRun

    study = StudyConfig.model_validate({
        "study": "s", "out": str(tmp_path),
        "data": {"dataset": "synthetic", "image_size": 32, "synthetic": {"num_images": 140},
                 "cache_dir": str(tmp_path / "cache")},
        "defaults": {"model": {"name": "test_resnet"}, "strategy": {"name": "fedbn"},
                     "finetune": {"trainable": "head"}}})
    [run] = expand_grid(study)
    with pytest.raises(FlSimError, match=r"test_resnet trains none \(finetune.trainable head\)"):
        FederatedRun(study, run, run.dir(study))


@pytest.mark.slow
def test_a_partial_run_sends_and_receives_the_trainable_tensors_only(tmp_path):
    run_study(tmp_path, "test_resnet", [{"name": "fedavg"}], images=210,
              grid={"finetune": ["all", "head"]})
    full, head = (tmp_path / "out/s/fedavg_test_resnet_adamw_s0",
                  tmp_path / "out/s/fedavg_test_resnet_head_adamw_s0")
    summary = json.loads((head / "summary.json").read_text())
    whole = json.loads((full / "summary.json").read_text())
    m = build_model(RunConfig.model_validate({"model": {"name": "test_resnet"},
                                              "finetune": {"trainable": "head"}}),
                    [str(i) for i in range(7)], 32)[0]
    assert summary["finetune"] == {
        "trainable": "head", "trained_tensors": 2, "tensors": len(m.state_dict()),
        "trained_bytes": sum(t.nbytes for t in travelling_state(m).values()),
        "bytes": sum(t.nbytes for t in m.state_dict().values())}
    # As Flower counts them (array data plus each array's name, dtype and shape):
    head_bytes = ArrayRecord(travelling_state(m)).count_bytes()
    model_bytes = ArrayRecord(m.state_dict()).count_bytes()
    messages = 2 * 3 * 2  # rounds x clients x (train, evaluate)
    settings = whole["bytes_sent"] / messages - model_bytes  # the run's settings, sent along
    assert 0 < settings < 5_000
    # Per message: the head's tensors and the settings (a digest longer), nothing else.
    assert abs(summary["bytes_sent"] / messages - (head_bytes + settings)) < 100
    assert abs(summary["bytes_received"] - whole["bytes_received"]
               - 2 * 3 * (head_bytes - model_bytes)) < 100  # train replies carry the head only
    # Checkpoints hold the whole model: the frozen part as built, the trained head.
    best = torch.load(head / "checkpoints/best.pt", weights_only=False)["state_dict"]
    m.load_state_dict(best, strict=True)
    built = build_model(RunConfig.model_validate({"model": {"name": "test_resnet"}}),
                        [str(i) for i in range(7)], 32)[0].state_dict()
    for key, tensor in best.items():
        assert torch.equal(tensor, built[key]) == (key not in ("fc.weight", "fc.bias")), key
