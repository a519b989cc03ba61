"""FedProx: the squared-norm term, and its pull toward the global model."""

import numpy as np
import pytest
import torch
from torch import nn

from fl_sim.strategies.fedprox import proximal_term


def test_term_is_half_mu_times_squared_distance():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.copy_(torch.tensor([3.0]))
    global_params = [torch.tensor([[0.0, 0.0]]), torch.tensor([1.0])]
    # squared distance = 1 + 4 + 4 = 9; (0.1 / 2) * 9 = 0.45 (the plain norm would give 0.15)
    assert proximal_term(model, global_params, mu=0.1).item() == pytest.approx(0.45)
    model.zero_grad()
    proximal_term(model, global_params, mu=0.1).backward()
    # gradient mu * (w - w_g)
    assert model.weight.grad[0].tolist() == pytest.approx([0.1, 0.2])
    assert model.bias.grad.tolist() == pytest.approx([0.2])


def _local_update_distance(mu: float) -> float:
    from fl_sim.client.train import train_local
    from fl_sim.config import RunConfig
    from fl_sim.transforms import BatchPreprocessor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    start = [p.detach().clone() for p in model.parameters()]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (64, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 64)
    cfg = RunConfig.model_validate({"local_epochs": 5, "batch_size": 16, "augment": False,
                                    "optimizer": {"name": "sgd", "lr": 0.5}})
    train_local(model, images, labels, np.arange(64), BatchPreprocessor(8, None, torch.device("cpu")),
                cfg, np.random.default_rng(1), proximal_mu=mu)
    return sum((p.detach() - s).pow(2).sum().item() for p, s in zip(model.parameters(), start)) ** 0.5


def test_mu_keeps_the_local_update_closer_to_the_global_model():
    free, prox = _local_update_distance(0.0), _local_update_distance(1.0)
    assert prox < 0.8 * free, (free, prox)
