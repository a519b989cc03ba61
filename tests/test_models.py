"""The backbone registry over timm."""

import pickle

import pytest
import timm
import torch

from fl_sim.config import ModelConfig
from fl_sim.errors import FlSimError
from fl_sim.models import PAPER_BACKBONES, create_model, normalization, timm_name


def test_paper_short_names_are_timm_models():
    assert len(PAPER_BACKBONES) == 12
    for short, name in PAPER_BACKBONES.items():
        assert timm.is_model(name), short


def test_any_timm_name_and_a_clear_error_for_a_typo():
    assert timm_name("convnext_t") == "convnext_tiny"
    assert timm_name("resnet18") == "resnet18"
    with pytest.raises(FlSimError, match="'convnxt_t' is neither a short name"):
        timm_name("convnxt_t")


def test_head_has_the_dataset_classes_and_local_weights_load(tmp_path):
    cfg = ModelConfig(name="test_convnext")
    model = create_model(cfg, num_classes=7, image_size=32)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    # a donor with another head loads strictly (the head is not counted), as a plain state
    # dict or inside a checkpoint like fl-sim's last.pt; the head stays fresh
    donor = create_model(cfg, num_classes=3, image_size=32)
    torch.save(donor.state_dict(), tmp_path / "w.pt")
    torch.save({"round": 3, "strategy": pickle.dumps({"m": 1}), "state_dict": donor.state_dict()},
               tmp_path / "last.pt")
    for path in (tmp_path / "w.pt", tmp_path / "last.pt"):
        loaded = create_model(ModelConfig(name="test_convnext", pretrained=path, strict=True),
                              7, 32)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in donor.state_dict().items()
                   if not k.startswith("head.fc."))
        assert loaded.state_dict()["head.fc.weight"].shape == (7, donor.num_features)
    with pytest.raises(FlSimError, match="not found"):
        create_model(ModelConfig(name="test_convnext", pretrained=tmp_path / "nope.pt"), 7, 32)


def test_transformer_input_size_and_normalisation_from_the_pretrained_config():
    model = create_model(ModelConfig(name="test_vit"), num_classes=7, image_size=64)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 7)
    mean, std = normalization(ModelConfig(name="convnext_t"))
    assert mean == pytest.approx((0.485, 0.456, 0.406))
    assert normalization(ModelConfig(name="convnext_t", normalize="none")) is None


def test_a_bad_keyword_gets_a_hint_about_the_keywords_not_the_network():
    """Issue #25, item 4: `pretrained: false` was suggested where it already was."""
    from fl_sim.config import ModelConfig
    from fl_sim.errors import FlSimError
    from fl_sim.models import create_model

    cfg = ModelConfig(name="resnet18", pretrained=False, kwargs={"no_such_arg": 1})
    with pytest.raises(FlSimError) as err:
        create_model(cfg, 7, 32)
    assert "Check model.kwargs {'no_such_arg': 1}" in str(err.value)
    assert "pretrained: false" not in str(err.value)

