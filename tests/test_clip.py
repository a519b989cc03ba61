"""The CLIP variant: a tiny open_clip text tower (random init) with a tiny timm backbone."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord

import fl_sim.models.clip as clip
from fl_sim.config import ClipConfig, ModelConfig
from fl_sim.data_partition import CLASS_NAMES
from fl_sim.errors import FlSimError
from fl_sim.models.clip import (
    ClipClassifier, class_ce_loss, clip_batch_loss, clip_loss, create_clip_model,
)

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(autouse=True)
def fresh_cache():
    clip.class_text_features.cache_clear()
    yield
    clip.class_text_features.cache_clear()


@pytest.fixture
def tiny_text_model(tmp_path) -> str:
    """An open_clip model in a local folder (config, no weights: random init), any process."""
    folder = tmp_path / "tiny-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    return f"local-dir:{folder}"


@pytest.fixture
def towers(monkeypatch) -> list[torch.nn.Module]:
    """Keeps every text tower built, with a copy of its weights as built (`tower.snapshot`)
    and the number of its encode_text calls (`tower.calls`)."""
    built = []
    load = clip.load_text_tower

    def spy(text_model, pretrained):
        tower = load(text_model, pretrained)
        tower.snapshot = {k: v.clone() for k, v in tower.state_dict().items()}
        tower.calls = 0
        encode = tower.encode_text

        def counting_encode(*args, **kwargs):
            tower.calls += 1
            return encode(*args, **kwargs)

        tower.encode_text = counting_encode
        built.append(tower)
        return tower

    monkeypatch.setattr(clip, "load_text_tower", spy)
    return built


def tiny_model(text_model: str, **clip_kwargs) -> ClipClassifier:
    torch.manual_seed(0)
    clip_cfg = ClipConfig(text_model=text_model, text_pretrained=None, **clip_kwargs)
    return create_clip_model(ModelConfig(name="test_convnext"), clip_cfg, CLASS_NAMES, 32)


def learnable_batches(n_batches: int = 4, batch: int = 14) -> list[tuple[torch.Tensor, ...]]:
    """Noise plus a class-specific pattern: learnable in a few steps."""
    gen = torch.Generator().manual_seed(1)
    patterns = torch.randn(len(CLASS_NAMES), 3, 32, 32, generator=gen)
    batches = []
    for _ in range(n_batches):
        y = torch.arange(batch) % len(CLASS_NAMES)
        x = patterns[y] + 0.5 * torch.randn(batch, 3, 32, 32, generator=gen)
        batches.append((x, y))
    return batches


def train(model: ClipClassifier, kind: str, steps: int) -> list[float]:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batches, losses = learnable_batches(), []
    model.train()
    for step in range(steps):
        x, y = batches[step % len(batches)]
        loss, _ = clip_batch_loss(model, x, y, kind)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------- prompts


def test_prompts_use_readable_names_and_templates_are_averaged(tiny_text_model, towers):
    names = tuple(CLASS_NAMES)
    assert set(names) == {"melanocytic nevus", "melanoma", "benign keratosis",
                          "basal cell carcinoma", "actinic keratosis", "vascular lesion",
                          "dermatofibroma"}
    assert clip.prompts(["a picture of a {class}"], names[:2]) == [
        "a picture of a actinic keratosis", "a picture of a basal cell carcinoma"]
    templates = ("a picture of a {class}", "a dermoscopic image of a {class}")
    text = clip.class_text_features(tiny_text_model, None, templates, names)
    tower, tokenizer = towers[0], clip.open_clip.get_tokenizer(tiny_text_model)
    with torch.no_grad():
        per_template = [F.normalize(tower.encode_text(tokenizer(clip.prompts([t], names))), dim=-1)
                        for t in templates]
    expected = F.normalize((per_template[0] + per_template[1]) / 2, dim=-1)
    assert text.features.shape == (7, 32)
    torch.testing.assert_close(text.features, expected)
    assert text.logit_scale == pytest.approx(math.log(1 / 0.07))  # open_clip's initial value


def test_a_random_tower_is_the_same_in_every_process(tiny_text_model):
    """Server and clients build their own text side: random init must agree across them."""
    torch.manual_seed(1)
    first = clip.class_text_features(tiny_text_model, None, ("a {class}",), tuple(CLASS_NAMES))
    rng_after = torch.get_rng_state()
    clip.class_text_features.cache_clear()
    torch.manual_seed(2)  # another process, another RNG state
    second = clip.class_text_features(tiny_text_model, None, ("a {class}",), tuple(CLASS_NAMES))
    assert torch.equal(first.features, second.features)
    torch.manual_seed(1)
    assert torch.equal(rng_after, torch.get_rng_state())  # the caller's RNG is left alone


# ----------------------------------------------------------------------------- what travels


def test_state_dict_holds_the_image_side_only(tiny_text_model, towers):
    model = tiny_model(tiny_text_model)
    state = model.state_dict()
    assert all(k.startswith(("encoder.", "projection.")) or k == "logit_scale" for k in state)
    assert "text_features" not in state and model.text_features.shape == (7, 32)
    assert isinstance(model.logit_scale, torch.nn.Parameter)

    record = ArrayRecord(state)
    assert set(record.keys()) == set(state)
    image_side = {**{f"encoder.{k}": v for k, v in model.encoder.state_dict().items()},
                  **{f"projection.{k}": v for k, v in model.projection.state_dict().items()},
                  "logit_scale": model.logit_scale}
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in image_side.items()}
    image_bytes = sum(v.numel() * v.element_size() for v in image_side.values())
    tower_bytes = sum(v.numel() * v.element_size() for v in towers[0].state_dict().values())
    assert image_bytes <= record.count_bytes() < image_bytes + 300 * len(state)  # + array headers
    assert record.count_bytes() < tower_bytes  # the tiny tower (1.6 M token embeddings) is larger

    # a received ArrayRecord loads strictly, and the class prompts stay as they are
    features = model.text_features.clone()
    model.load_state_dict(record.to_torch_state_dict(), strict=True)
    assert torch.equal(model.text_features, features)


def test_fixed_temperature_is_a_buffer_that_does_not_train(tiny_text_model):
    model = tiny_model(tiny_text_model, learn_temperature=False)
    assert "logit_scale" in dict(model.named_buffers()) and "logit_scale" in model.state_dict()
    before = model.logit_scale.clone()
    train(model, "clip", steps=2)
    assert torch.equal(model.logit_scale, before)


# ----------------------------------------------------------------------------- frozen, once


def test_text_tower_is_built_and_run_once_and_stays_bit_identical(tiny_text_model, towers):
    model = tiny_model(tiny_text_model)
    assert len(towers) == 1 and towers[0].calls == 1  # all T*K prompts in one call
    tower = towers[0]
    features = model.text_features.clone()
    scale = model.logit_scale.detach().clone()

    losses = train(model, "clip", steps=6)
    with torch.no_grad():
        model.eval()(torch.zeros(2, 3, 32, 32))
    tiny_model(tiny_text_model)  # a second model in this process: cached features

    assert len(towers) == 1 and tower.calls == 1  # not once per batch, nor per model
    assert not torch.equal(model.logit_scale.detach(), scale) and math.isfinite(losses[-1])
    assert all(torch.equal(v, tower.snapshot[k]) for k, v in tower.state_dict().items())
    assert not any(p.requires_grad for p in tower.parameters())
    tower_storage = {p.data_ptr() for p in tower.parameters()}
    assert not any(p.data_ptr() in tower_storage for p in model.parameters())
    assert torch.equal(model.text_features, features)
    tokenizer = clip.open_clip.get_tokenizer(tiny_text_model)
    recomputed = clip.encode_class_prompts(tower, tokenizer, ClipConfig().templates, CLASS_NAMES)
    assert torch.equal(model.text_features, recomputed)  # still what the frozen tower gives


# ----------------------------------------------------------------------------- losses


def test_clip_loss_matches_eq2_by_hand():
    s = 2.0
    image = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    text = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=-1)

    # distinct classes: the diagonal of eq. 2. sim[i][j] = <image_i, text_j>
    labels = torch.tensor([0, 1, 2])
    sim = [[1.0, 0.0, -1.0], [0.6, 0.8, -0.6], [0.0, 1.0, 0.0]]

    def ce(row, j):
        return -(s * row[j] - math.log(sum(math.exp(s * v) for v in row)))

    by_rows = sum(ce(sim[i], i) for i in range(3)) / 3
    cols = [[sim[i][j] for i in range(3)] for j in range(3)]
    by_cols = sum(ce(cols[j], j) for j in range(3)) / 3
    loss = clip_loss(image, labels, text, torch.tensor(s))
    assert loss.item() == pytest.approx((by_rows + by_cols) / 2, rel=1e-6)

    # images 0 and 1 share class 0, so their texts are one: both are positives of each other
    labels = torch.tensor([0, 0, 1])
    t = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]  # text of each image's class
    im = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
    sim = [[sum(a * b for a, b in zip(im[i], t[j])) for j in range(3)] for i in range(3)]
    positives = [[0, 1], [0, 1], [2]]

    def multi_positive_ce(row, pos):
        log_z = math.log(sum(math.exp(s * v) for v in row))
        return -sum(s * row[j] - log_z for j in pos) / len(pos)

    by_rows = sum(multi_positive_ce(sim[i], positives[i]) for i in range(3)) / 3
    cols = [[sim[i][j] for i in range(3)] for j in range(3)]
    by_cols = sum(multi_positive_ce(cols[j], positives[j]) for j in range(3)) / 3
    loss = clip_loss(image, labels, text, torch.tensor(s))
    assert loss.item() == pytest.approx((by_rows + by_cols) / 2, rel=1e-6)


def test_clip_loss_counts_every_same_class_pair_as_a_positive():
    """Eq. 2's diagonal equals uniform targets over same-class pairs (identical texts)."""
    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(16, 8, generator=gen), dim=-1)
    text = F.normalize(torch.randn(4, 8, generator=gen), dim=-1)
    labels = torch.randint(0, 4, (16,), generator=gen)
    assert len(labels.unique()) < len(labels)
    logits = 10.0 * image @ text[labels].T
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    multi_positive = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    torch.testing.assert_close(clip_loss(image, labels, text, torch.tensor(10.0)), multi_positive)


def test_class_ce_loss_and_predictions_are_over_the_class_prompts(tiny_text_model):
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 1])
    row0 = -(2.0 - math.log(math.exp(2.0) + 1 + math.exp(-1.0)))
    row1 = -(0.5 - math.log(2 * math.exp(0.5) + math.exp(3.0)))
    assert class_ce_loss(logits, labels).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)

    model = tiny_model(tiny_text_model).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        image = model.image_features(x)
        logits = model(x)
    assert logits.shape == (3, 7)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    cosine = image @ model.text_features.T
    torch.testing.assert_close(logits, model.logit_scale.exp() * cosine)
    assert torch.equal(logits.argmax(1), cosine.argmax(1))


@pytest.mark.parametrize("kind", ["clip", "class_ce"])
def test_training_lowers_the_loss(tiny_text_model, kind):
    model = tiny_model(tiny_text_model)
    losses = train(model, kind, steps=20)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, losses


# ----------------------------------------------------------------------------- errors, weights


def test_bad_text_model_or_weights_are_clear_errors(tmp_path):
    with pytest.raises(FlSimError, match="'ViT-L-15' is not an open_clip model"):
        clip.load_text_tower("ViT-L-15", None)
    with pytest.raises(FlSimError, match="nope.pt' is neither a pretrained tag of RN50x16"):
        clip.load_text_tower("RN50x16", str(tmp_path / "nope.pt"))
    with pytest.raises(FlSimError, match="text_pretrained: null"):
        clip.load_text_tower(f"local-dir:{tmp_path}", "openai")


def test_local_weights_file_is_loaded(tmp_path, monkeypatch):
    (tmp_path / "fl-sim-tiny.json").write_text(json.dumps(TINY_CLIP))
    factory = clip.open_clip.factory  # registered for this test only
    monkeypatch.setattr(factory, "_MODEL_CONFIGS", dict(factory._MODEL_CONFIGS))
    monkeypatch.setattr(factory, "_MODEL_CONFIG_PATHS", list(factory._MODEL_CONFIG_PATHS))
    clip.open_clip.add_model_config(tmp_path / "fl-sim-tiny.json")
    donor = clip.load_text_tower("fl-sim-tiny", None)
    with torch.no_grad():
        donor.logit_scale.fill_(math.log(50.0))
    torch.save(donor.state_dict(), tmp_path / "tiny.pt")

    weights = str(tmp_path / "tiny.pt")
    text = clip.class_text_features("fl-sim-tiny", weights, ("a {class}",), ("melanoma",))
    tokens = clip.open_clip.get_tokenizer("fl-sim-tiny")(["a melanoma"])
    with torch.no_grad():
        expected = F.normalize(donor.encode_text(tokens), dim=-1)
    torch.testing.assert_close(text.features, expected)
    assert text.logit_scale == pytest.approx(math.log(50.0))


# ----------------------------------------------------------------------------- issue #14, item 7


def test_the_contrastive_loss_is_fp32_inside_bf16_autocast():
    gen = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(3, 8, generator=gen), dim=-1)
    labels, scale = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor(100.0)
    exact = clip_loss(image, labels, text, scale)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):  # as CUDA runs training
        mixed = clip_loss(image, labels, text, scale)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, exact)


def test_a_temperature_at_clips_bound_still_learns_and_stays_bounded(tiny_text_model):
    model = tiny_model(tiny_text_model, learn_temperature=True)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100))  # where OpenAI's towers leave it
    x, y = learnable_batches()[0]
    loss, _ = clip_batch_loss(model, x, y, "clip")
    loss.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
    with torch.no_grad():  # a step that pushes it past the bound
        model.logit_scale += 1.0
    model.clamp_temperature()
    assert model.logit_scale.item() == pytest.approx(math.log(100)) and model.scale() <= 100.0001
    with torch.no_grad():  # and one below it stays where the optimizer put it
        model.logit_scale.fill_(2.0)
    model.clamp_temperature()
    assert model.logit_scale.item() == 2.0
