"""SCAFFOLD (issue #14, item 2): control variates on the server and the clients, tested on
cases with a known answer, and end to end."""

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_sim.arrays import to_state_dict
from fl_sim.client.scaffold import ClientControl
from fl_sim.client.train import train_local
from fl_sim.config import RunConfig, StrategyConfig
from fl_sim.strategies import build_strategy
from fl_sim.strategies.scaffold import CONTROL, DELTA
from fl_sim.transforms import BatchPreprocessor
from tests.test_strategies import run_study


def test_a_clients_new_control_is_the_mean_of_its_raw_gradients():
    """Option II with plain SGD: c_i+ = c_i - c + (x - y)/(K lr) = the mean gradient, whatever
    c and c_i were (the correction c - c_i cancels out)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    names = [n for n, _ in model.named_parameters()]
    server = OrderedDict((n, torch.randn_like(p)) for n, p in model.named_parameters())
    state = RecordDict()
    own = OrderedDict((n, torch.randn_like(p)) for n, p in model.named_parameters())
    state[ClientControl(model, server, state, "run").key] = ArrayRecord(own)
    control = ClientControl(model, server, state, "run")
    raw = {n: [] for n in names}
    for n, p in model.named_parameters():
        p.register_hook(lambda g, n=n: raw[n].append(g.clone()))  # before the correction
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (20, 2, 2, 3), dtype=np.uint8)
    cfg = RunConfig.model_validate({"batch_size": 5, "augment": False,
                                    "optimizer": {"name": "sgd", "weight_decay": 0}})
    result = train_local(model, images, rng.integers(0, 3, 20), np.arange(20),
                         BatchPreprocessor(2, None, torch.device("cpu")), cfg, rng, lr=0.1,
                         gradient_correction=control.correction())
    delta = control.finish(model, result["steps"], 0.1)
    assert result["steps"] == 4
    for n in names:
        mean_gradient = torch.stack(raw[n]).mean(0)
        torch.testing.assert_close(own[n] + delta[DELTA + n], mean_gradient, rtol=1e-4,
                                   atol=1e-5)
        kept = to_state_dict(state[control.key])[n]  # c_i+, for the client's next round
        torch.testing.assert_close(kept, mean_gradient, rtol=1e-4, atol=1e-5)


def test_the_server_control_moves_by_the_sampled_share_of_the_mean_delta(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    strategy = build_strategy(StrategyConfig(name="scaffold"), num_clients=4, trainable={"w"})
    def record(**arrays: np.ndarray) -> ArrayRecord:
        return ArrayRecord(OrderedDict((k, Array(v)) for k, v in arrays.items()))

    initial = record(w=np.ones(3, np.float32), bn=np.zeros(2, np.float32))
    grid = type("Grid", (), {"get_node_ids": lambda self: [0, 1, 2, 3]})()
    sent = list(strategy.configure_train(1, initial, ConfigRecord(), grid))[0]
    assert set(sent.content["arrays"]) == {"w", "bn", CONTROL + "w"}  # c beside the weights
    replies = [Message(RecordDict({
        "arrays": record(w=np.full(3, w, np.float32), bn=np.zeros(2, np.float32),
                         **{DELTA + "w": np.full(3, dc, np.float32)}),
        "metrics": MetricRecord({"num-examples": n, "unit-weight": 1.0})}),
        reply_to=Message(RecordDict(), dst_node_id=i, message_type="train"))
        for i, (w, dc, n) in enumerate([(2.0, 1.0, 10), (4.0, 4.0, 30)])]  # 2 of 4 replied
    arrays, _ = strategy.aggregate_train(1, replies)
    assert set(arrays) == {"w", "bn"}  # the control's change stays on the server
    np.testing.assert_allclose(arrays["w"].numpy(), 3.5)  # (2 x 10 + 4 x 30) / 40
    np.testing.assert_allclose(strategy.control["w"], 2 / 4 * 3.25)  # |S|/N x mean Δc


@pytest.mark.slow
def test_scaffold_runs_end_to_end_and_resumes_its_control(tmp_path):
    run_dir = run_study(tmp_path, "test_convnext", [{"name": "scaffold"}])["scaffold"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and np.isfinite(summary["final"]["global_test"]["loss"])
    import pickle

    ckpt = torch.load(run_dir / "checkpoints/last.pt", weights_only=False)
    strategy = pickle.loads(ckpt["strategy"])
    assert strategy.control and any(np.abs(v).sum() > 0 for v in strategy.control.values())
    assert set(strategy.control) <= set(ckpt["state_dict"])  # parameters only
