"""Recipes for imbalanced data: class weights, weighted CE, focal loss, balanced sampling,
each shown to change what training does."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fl_sim.client.recipe import class_weights, epoch_order, make_loss
from fl_sim.client.train import train_local
from fl_sim.config import LossConfig, RunConfig
from fl_sim.transforms import BatchPreprocessor


def test_class_weights_from_the_split_only_and_absent_classes_do_not_divide_by_zero():
    labels = np.array([0] * 8 + [1] * 2)  # classes 2 and 3 absent
    w = class_weights(np.bincount(labels, minlength=4))
    assert w.tolist() == pytest.approx([10 / (2 * 8), 10 / (2 * 2), 1.0, 1.0])
    assert np.isfinite(w).all()
    assert w[labels].mean() == pytest.approx(1.0)  # the mean weight over the split's images


def test_focal_loss_is_the_formula_and_gamma_zero_is_cross_entropy():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    p = logits.softmax(1)[torch.arange(6), y]
    focal = make_loss(LossConfig(name="focal", gamma=2.0), y.numpy())
    assert focal(logits, y).item() == pytest.approx(((1 - p) ** 2 * -p.log()).mean().item(), rel=1e-5)
    zero = make_loss(LossConfig(name="focal", gamma=0.0), y.numpy())
    assert zero(logits, y).item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)


def test_logit_adjustment_differs_from_ce_exactly_by_the_prior_offsets():
    """Issue #23 item 2: the loss is CE of logits + tau x log(prior of the client's own
    split), a missing class at the floor; the logits the model predicts with are its own."""
    labels = np.array([0] * 6 + [1] * 3 + [2])  # class 3 absent
    torch.manual_seed(0)
    logits, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    prior = torch.tensor([0.6, 0.3, 0.1, 1e-6]).log()
    for tau in (None, 0.5):
        loss = make_loss(LossConfig(name="logit_adjusted", tau=tau), labels)(logits, y)
        expected = F.cross_entropy(logits + (1.0 if tau is None else tau) * prior, y)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        assert loss.item() != pytest.approx(F.cross_entropy(logits, y).item())


def test_federation_weights_come_from_the_total_counts_not_the_clients_own():
    own = np.array([0] * 9 + [1])
    federation = np.array([50, 50])  # balanced overall: every weight 1
    logits, y = torch.tensor([[2.0, 0.0], [0.5, 0.0]]), torch.tensor([0, 1])
    cfg = LossConfig(name="weighted_ce", class_weights="federation")
    loss = make_loss(cfg, own, federation_counts=federation)(logits, y)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y).item())
    with pytest.raises(ValueError, match="federation's class counts did not come"):
        make_loss(cfg, own)


def test_weighted_focal_weighs_each_image_by_its_class():
    labels = np.array([0] * 9 + [1])
    torch.manual_seed(1)
    logits, y = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    w = torch.tensor(class_weights(np.bincount(labels)), dtype=torch.float32)
    p = logits.softmax(1)[torch.arange(4), y]
    loss = make_loss(LossConfig(name="focal", class_weights="client"), labels)(logits, y)
    assert loss.item() == pytest.approx((w[y] * (1 - p) ** 2 * -p.log()).mean().item(), rel=1e-5)


def test_weighted_ce_weights_each_class_by_the_split_counts():
    labels = np.array([0] * 9 + [1])
    logits, y = torch.tensor([[2.0, 0.0], [0.5, 0.0]]), torch.tensor([0, 1])  # class 1 is hard
    loss = make_loss(LossConfig(name="weighted_ce"), labels)(logits, y)
    w = torch.tensor(class_weights(np.bincount(labels, minlength=2)), dtype=torch.float32)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y, weight=w).item())
    assert loss.item() != pytest.approx(F.cross_entropy(logits, y).item())


def test_balanced_sampler_draws_each_class_about_equally():
    labels = np.array([0] * 900 + [1] * 100)
    order = epoch_order(np.arange(1000), labels, "balanced", np.random.default_rng(0))
    assert len(order) == 1000
    assert 0.45 < (labels[order] == 1).mean() < 0.55
    shuffled = epoch_order(np.arange(1000), labels, "shuffle", np.random.default_rng(0))
    assert sorted(shuffled) == list(range(1000))


def minority_recall(recipe: dict, shift: float) -> float:
    """A linear model trained on 95:5 data whose classes overlap (less as `shift` grows):
    the share of the minority class it predicts right afterwards."""
    rng = np.random.default_rng(0)
    labels = (np.arange(400) % 20 == 0).astype(np.int64)
    images = np.clip(rng.normal(128, 40, (400, 4, 4, 3)) + shift * labels[:, None, None, None],
                     0, 255).astype(np.uint8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    cfg = RunConfig.model_validate({"local_epochs": 20, "batch_size": 32, "augment": False,
                                    "optimizer": {"name": "sgd", "lr": 0.05}, **recipe})
    pre = BatchPreprocessor(4, ((0.5,) * 3, (0.25,) * 3), torch.device("cpu"))
    train_local(model, images, labels, np.arange(400), pre, cfg, np.random.default_rng(1))
    with torch.no_grad():
        pred = model(pre(images[labels == 1])).argmax(1)
    return float((pred == 1).float().mean())


# Measured: plain CE finds 0.0 of the minority at shift 12 (weighted 0.85, balanced 0.95)
# and 0.55 at shift 25, where focal's down-weighting of easy images gives 0.70.
@pytest.mark.parametrize("recipe, shift, gain", [
    ({"loss": {"name": "weighted_ce"}}, 12, 0.5),
    ({"sampler": "balanced"}, 12, 0.5),
    ({"loss": {"name": "focal", "gamma": 2}}, 25, 0.1),
    # Trained on logits + log(prior), predicting with the plain logits: the minority's
    # logit is no longer held down by its 5 % prior.
    ({"loss": {"name": "logit_adjusted"}}, 12, 0.5),
], ids=["weighted_ce", "balanced", "focal", "logit_adjusted"])
def test_each_recipe_finds_more_of_the_minority_class_than_plain_ce(recipe, shift, gain):
    plain = minority_recall({}, shift)
    assert minority_recall(recipe, shift) > plain + gain, (plain, recipe)


def test_local_steps_make_every_client_take_exactly_k_steps_whatever_its_size():
    """Issue #23 item 4: a 20-image site and a 300-image site, batches of 8, K = 7 and 45
    (more than the small site's epoch, fewer than the large one's)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, 300)
    pre = BatchPreprocessor(4, ((0.5,) * 3, (0.25,) * 3), torch.device("cpu"))
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    for k in (7, 45):
        cfg = RunConfig.model_validate({"local_steps": k, "batch_size": 8, "augment": False})
        for size in (20, 300):
            result = train_local(model, images, labels, np.arange(size), pre, cfg,
                                 np.random.default_rng(1))
            assert result["steps"] == k, (k, size)
    epochs = RunConfig.model_validate({"local_epochs": 2, "batch_size": 8, "augment": False})
    assert train_local(model, images, labels, np.arange(20), pre, epochs,
                       np.random.default_rng(1))["steps"] == 6  # 3 batches (8, 8, 4) x 2


def test_local_steps_replace_local_epochs_and_say_so():
    with pytest.raises(ValueError, match="leave local_epochs at 1"):
        RunConfig.model_validate({"local_steps": 10, "local_epochs": 3})
