"""A toy federation trained in this process, as fl-sim's server drives a strategy: small
CNNs (conv-BN-ReLU x2 + linear, 1.3k parameters) on an easy synthetic task, 4 classes each a
fixed random 8x8 pattern plus noise, each client mostly holding two of the classes (label
skew). Each round the clients train with plain SGD, send their state dicts in Flower
Messages, and the strategy aggregates them with `aggregate_train`. See
test_fedopt_accuracy.py for why these settings."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as fl
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

CLASSES, SIZE, CLIENTS = 4, 8, 4  # CLIENTS: the default
ROUNDS, LOCAL_STEPS, BATCH, CLIENT_LR = 20, 5, 32, 0.05
OFFSET, SIGNAL, NOISE, SKEW = 4.0, 0.25, 1.5, 0.15  # x = OFFSET + SIGNAL * (pattern + NOISE * z)
TRAIN_PER_CLIENT, TEST = 160, 1000


def make_data(seed: int, clients: int = CLIENTS
              ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple]:
    """Each client's (x, y), mostly its two classes; and an iid held-out set."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(CLASSES, 1, SIZE, SIZE, generator=g)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, CLASSES, (n,), generator=g)
        x = OFFSET + SIGNAL * (patterns[y] + NOISE * torch.randn(n, 1, SIZE, SIZE, generator=g))
        return x, y

    data = []
    for i in range(clients):
        x, y = draw(3 * TRAIN_PER_CLIENT)
        keep_p = torch.full((CLASSES,), SKEW)
        keep_p[[i % CLASSES, (i + 1) % CLASSES]] = 1.0
        keep = torch.rand(len(y), generator=g) < keep_p[y]
        assert keep.sum() >= TRAIN_PER_CLIENT
        data.append((x[keep][:TRAIN_PER_CLIENT], y[keep][:TRAIN_PER_CLIENT]))
    return data, draw(TEST)


def make_model(seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Flatten(), nn.Linear(8 * (SIZE // 2) ** 2, CLASSES))


class Grid:
    """All that `configure_train` asks of a grid."""

    def __init__(self, clients: int) -> None:
        self.clients = clients

    def get_node_ids(self) -> list[int]:
        return list(range(self.clients))


# A client's reply: (node, the state it was sent, the state it trained) -> the state it sends.
Reply = Callable[[int, dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def federated_accuracy(strategy: fl.FedAvg, seed: int, clients: int = CLIENTS,
                       reply: Reply | None = None) -> tuple[float, nn.Module]:
    """ROUNDS rounds of `strategy` over the `clients` of `seed`, each replying what `reply`
    makes of its trained state (default: that state): the global model's held-out accuracy
    (eval mode: the running statistics the server sent) and the model."""
    n_clients = clients
    clients, (x_test, y_test) = make_data(seed, n_clients)
    model, local = make_model(seed), make_model(seed)
    batches = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.SGD(local.parameters(), lr=CLIENT_LR)
    arrays = ArrayRecord(model.state_dict())
    for rnd in range(1, ROUNDS + 1):
        list(strategy.configure_train(rnd, arrays, ConfigRecord(), Grid(n_clients)))  # FedOpt keeps x_t
        sent = arrays.to_torch_state_dict()
        replies = []
        for node, (x, y) in enumerate(clients):
            local.load_state_dict(sent)
            local.train()
            for _ in range(LOCAL_STEPS):
                idx = torch.randint(0, len(y), (BATCH,), generator=batches)
                optimizer.zero_grad()
                nn.functional.cross_entropy(local(x[idx]), y[idx]).backward()
                optimizer.step()
            state = local.state_dict()
            replies.append(Message(RecordDict({
                "arrays": ArrayRecord(reply(node, sent, state) if reply else state),
                "metrics": MetricRecord({"num-examples": len(y), "unit-weight": 1.0})}),
                reply_to=Message(RecordDict(), dst_node_id=node, message_type="train")))
        arrays, _ = strategy.aggregate_train(rnd, replies)
    model.load_state_dict(arrays.to_torch_state_dict())
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item(), model


@pytest.fixture
def one_thread(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # Messages are built outside a ServerApp
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
