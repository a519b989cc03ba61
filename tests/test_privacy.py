"""Differential privacy and its ε ledger (issue #14, item 4): client-level central DP through
Flower's fixed-clipping wrappers, sample-level DP-SGD with Opacus, the ledger that books both
and stops a run before it overspends."""

import json
import pickle

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import RDPAccountant
from torch import nn

from fl_sim.config import RunConfig, StrategyConfig
from fl_sim.privacy.central import clip_update, with_client_level_dp
from fl_sim.privacy.dpsgd import poisson_batches, prepare_for_dpsgd, sample_rate
from fl_sim.privacy.ledger import PrivacyLedger, dpsgd_epsilon
from fl_sim.server.run_log import read_metrics
from fl_sim.strategies import build_strategy
from tests.test_strategies import bn_model

CENTRAL = {"client_level": {"noise_multiplier": 1.0, "clipping_norm": 0.5}}
DPSGD = {"sample_level": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}


def run_config(**settings) -> RunConfig:
    return RunConfig.model_validate(settings)


@pytest.mark.parametrize("settings, refusal", [
    ({"strategy": {"name": "fedavg"}, "privacy": CENTRAL}, "needs strategy.weighting: uniform"),
    ({"strategy": {"name": "fedadam", "weighting": "uniform"}, "privacy": CENTRAL},
     "'fedadam' aggregates otherwise"),
    ({"strategy": {"name": "pooled"}, "privacy": CENTRAL}, "'pooled' aggregates otherwise"),
    ({"strategy": {"name": "scaffold"}, "privacy": DPSGD}, "does not combine with strategy scaffold"),
    ({"sampler": "balanced", "privacy": DPSGD}, "does not combine with sampler: balanced"),
    ({"synthesis": {}, "privacy": DPSGD}, "does not combine with synthesis"),
    ({"loss": {"name": "weighted_ce"}, "privacy": DPSGD}, "does not combine with loss: weighted_ce"),
    ({"strategy": {"name": "fedbn"}, "privacy": DPSGD}, "does not combine with strategy fedbn"),
    ({"privacy": {"target_epsilon": 8}}, "privacy needs client_level, sample_level or both"),
])
def test_privacy_refuses_what_its_guarantee_does_not_cover(settings, refusal):
    with pytest.raises(ValueError, match=refusal):
        run_config(**settings)


def test_the_dpsgd_ledger_is_opacus_rdp_accountant_and_stops_before_the_target():
    # Known answer: Opacus's own accountant after the same steps.
    opacus = RDPAccountant()
    opacus.history = [(1.1, 0.25, 40)]
    assert dpsgd_epsilon(0.25, 1.1, 40, 1e-5) == pytest.approx(opacus.get_epsilon(1e-5))

    # 100 and 10 train images, batch 32: rates 1/4 and 1; 4 and 1 steps a round.
    cfg = run_config(batch_size=32, privacy={**DPSGD, "target_epsilon": 5.0})
    ledger = PrivacyLedger(cfg, {"0": 100, "1": 10}, {})
    assert ledger.overspend(None) is None  # one round of either client stays under 5
    ledger.book({0: 100})  # client 1 was not sampled this round
    assert ledger.booked == {"0": {"sample_rate": 0.25, "steps": 4}}
    spent = ledger.spent(None)["sample_level"]
    assert spent["clients"]["0"] == pytest.approx(dpsgd_epsilon(0.25, 1.0, 4, 1e-5))
    rounds = 1
    while not (why := ledger.overspend(None)) or "client 0" not in why:
        ledger.book({0: 100})
        rounds += 1
        assert rounds < 1000
    assert ledger.spent(None)["sample_level"]["clients"]["0"] <= 5.0  # booked: under target
    assert dpsgd_epsilon(0.25, 1.0, 4 * (rounds + 1), 1e-5) > 5.0  # the next would pass it
    assert "past target_epsilon 5" in why
    resumed = PrivacyLedger(cfg, {"0": 100, "1": 10}, ledger.summary(None))
    assert resumed.spent(None) == ledger.spent(None)


def test_poisson_batches_sample_each_image_at_the_rate_for_a_fixed_number_of_steps():
    indices = np.arange(1000, 1100)
    batches = list(poisson_batches(indices, 32, epochs=2, rng=np.random.default_rng(0)))
    assert len(batches) == 2 * 4 and sample_rate(100, 32) == 0.25
    sizes = [len(b) for b in batches]
    assert 15 < np.mean(sizes) < 35 and len(set(sizes)) > 1  # Poisson: 25 expected, varying
    assert all(set(b) <= set(indices) and list(b) == sorted(b) for b in batches)


def test_dpsgd_models_trade_batchnorm_for_groupnorm_with_the_same_affine():
    model = bn_model(0)
    bn = model.get_submodule("1")
    weight, bias = bn.weight.detach().clone(), bn.bias.detach().clone()
    model.get_submodule("2").inplace = True
    prepare_for_dpsgd(model, 6)
    norm = model.get_submodule("1")
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 4  # gcd(32, 4 channels)
    assert torch.equal(norm.weight, weight) and torch.equal(norm.bias, bias)
    assert model.get_submodule("2").inplace is False


def test_dpsgd_clips_each_image_gradient():
    """One DP-SGD step of plain SGD (lr 1) with almost no noise moves the weights by the
    mean of per-image gradients clipped to max_grad_norm: at most max_grad_norm, although
    the raw gradients are far larger."""
    from fl_sim.client.train import train_local
    from fl_sim.transforms import BatchPreprocessor

    torch.manual_seed(0)
    model = prepare_for_dpsgd(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                            nn.Flatten(), nn.Linear(4 * 6 * 6, 3)), 8)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    cfg = run_config(batch_size=64, augment=False,
                     optimizer={"name": "sgd", "lr": 1.0, "weight_decay": 0.0},
                     privacy={"sample_level": {"noise_multiplier": 1e-6, "max_grad_norm": 0.01}})
    images = (np.random.default_rng(0).random((64, 8, 8, 3)) * 255).astype(np.uint8)
    labels = np.arange(64) % 3
    result = train_local(model, images, labels, np.arange(64), BatchPreprocessor(8, None,
                         torch.device("cpu")), cfg, np.random.default_rng(1))
    assert result["steps"] == 1
    moved = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    assert 0 < moved.norm() <= 0.01 * 1.0001
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # hooks are off


def test_dpsgd_refuses_a_model_without_per_image_gradients_at_build_time():
    from fl_sim.errors import FlSimError
    from fl_sim.task import build_model

    cfg = run_config(model={"name": "test_convnext"}, privacy=DPSGD)  # LayerScale
    with pytest.raises(FlSimError, match="no per-image gradients through this model"):
        build_model(cfg, ["a", "b"], 32)


def test_dpsgd_trains_in_fp32_under_autocast(monkeypatch):
    """On CUDA the loop runs in bf16 autocast, which per-image gradients cannot take: DP-SGD
    turns it off (forced on here, on the CPU)."""
    import fl_sim.client.train as train

    real = train.autocast
    monkeypatch.setattr(train, "autocast", lambda device, enabled=True: torch.autocast(
        "cpu", dtype=torch.bfloat16, enabled=enabled))
    model = prepare_for_dpsgd(bn_model(0), 6)
    cfg = run_config(batch_size=8, augment=False, privacy=DPSGD)
    from fl_sim.transforms import BatchPreprocessor
    images = (np.random.default_rng(0).random((16, 6, 6, 3)) * 255).astype(np.uint8)
    result = train.train_local(model, images, np.arange(16) % 2, np.arange(16),
                               BatchPreprocessor(6, None, torch.device("cpu")), cfg,
                               np.random.default_rng(1))
    assert result["steps"] >= 1 and real is not train.autocast


def _replies(models: list[nn.Module]) -> list[Message]:
    return [Message(RecordDict({"arrays": ArrayRecord(m.state_dict()),
                                "metrics": MetricRecord({"num-examples": 10 * (i + 1),
                                                         "unit-weight": 1.0})}),
                    reply_to=Message(RecordDict(), dst_node_id=i, message_type="train"))
            for i, m in enumerate(models)]


def test_central_dp_clips_each_update_noises_the_mean_and_books_epsilon(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    cfg = run_config(strategy={"name": "fedavg", "weighting": "uniform"},
                     privacy={"client_level": {"noise_multiplier": 1e-9, "clipping_norm": 0.5}})
    strategy = with_client_level_dp(build_strategy(StrategyConfig(name="fedavg",
                                                                  weighting="uniform"), 3),
                                    cfg.privacy, num_clients=3, sampled=3)
    start = bn_model(0)
    initial = ArrayRecord(start.state_dict())
    grid = type("Grid", (), {"get_node_ids": lambda self: [0, 1, 2]})()
    messages = list(strategy.configure_train(1, initial, ConfigRecord(), grid))
    assert "1.num_batches_tracked" in messages[0].content["arrays"]  # clients get everything
    clients = [bn_model(i + 1) for i in range(3)]
    for i, c in enumerate(clients):
        c.get_submodule("1").num_batches_tracked.fill_(5 + i)
    arrays, _ = strategy.aggregate_train(1, _replies(clients))

    floats = [k for k, t in start.state_dict().items() if t.is_floating_point()]
    base = {k: start.state_dict()[k].numpy() for k in floats}

    def clipped(model):  # the update, scaled to norm 0.5
        update = {k: model.state_dict()[k].numpy() - base[k] for k in floats}
        norm = np.sqrt(sum((u ** 2).sum() for u in update.values()))
        return {k: u * min(1, 0.5 / norm) for k, u in update.items()}

    updates = [clipped(c) for c in clients]
    for k in floats:  # the plain mean of clipped updates (noise of std 1e-9 x 0.5 / 3)
        np.testing.assert_allclose(arrays[k].numpy(), base[k] + np.mean([u[k] for u in updates],
                                   axis=0), atol=1e-5, err_msg=k)
    assert arrays["1.num_batches_tracked"].numpy() == start.get_submodule("1").num_batches_tracked
    spent = strategy.privacy_spent()
    assert spent.num_releases == 1 and spent.epsilon > 0
    restored = pickle.loads(pickle.dumps(strategy))  # checkpoints pickle the strategy
    assert restored.privacy_spent() == spent


def test_the_server_refuses_a_client_side_update_that_was_not_clipped(monkeypatch):
    from fl_sim.errors import FlSimError

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    cfg = run_config(strategy={"name": "fedavg", "weighting": "uniform"}, privacy={
        "client_level": {"noise_multiplier": 1.0, "clipping_norm": 0.1, "clipping": "client"}})
    strategy = with_client_level_dp(build_strategy(StrategyConfig(name="fedavg",
                                                                  weighting="uniform"), 2),
                                    cfg.privacy, num_clients=2, sampled=2)
    start = bn_model(0)
    grid = type("Grid", (), {"get_node_ids": lambda self: [0, 1]})()
    messages = list(strategy.configure_train(1, ArrayRecord(start.state_dict()), ConfigRecord(),
                                             grid))
    assert messages[0].content["config"]["clipping_norm"] == 0.1  # the clients are told
    clipped, was_clipped = clip_update(start.state_dict(), bn_model(1).state_dict(),
                                       ConfigRecord({"clipping_norm": 0.1}))
    assert was_clipped
    replies = _replies([start, start])
    replies[0].content["arrays"] = ArrayRecord(clipped)
    replies[1].content["arrays"] = ArrayRecord(bn_model(2).state_dict())  # not clipped
    replies[1].content["metrics"]["partition-id"] = 1
    with pytest.raises(FlSimError, match="client 1's update has L2 norm .* it did not clip"):
        strategy.aggregate_train(1, replies)


def test_adaptive_clipping_is_accounted_and_moves_the_norm_toward_the_target(monkeypatch):
    """Andrew et al.: too many clipped updates grow the norm, too few shrink it (Flower
    1.39 has the sign the other way round); each released round costs one Gaussian
    release of the run's noise multiplier."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    cfg = run_config(strategy={"name": "fedavg", "weighting": "uniform"}, privacy={
        "client_level": {"noise_multiplier": 0.5, "clipping_norm": 1e-3,
                         "adaptive": {"clipped_count_stddev": 1.0}}})
    strategy = with_client_level_dp(build_strategy(StrategyConfig(name="fedavg",
                                                                  weighting="uniform"), 3),
                                    cfg.privacy, num_clients=3, sampled=3)
    strategy._geometric_update(1.0)  # every update clipped, target 0.5: grow
    assert strategy.clipping_norm == pytest.approx(1e-3 * np.exp(0.2 * 0.5))
    strategy._geometric_update(0.0)
    strategy._geometric_update(0.0)  # none clipped: shrink
    assert strategy.clipping_norm < 1e-3
    grid = type("Grid", (), {"get_node_ids": lambda self: [0, 1, 2]})()
    list(strategy.configure_train(1, ArrayRecord(bn_model(0).state_dict()), ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(1, _replies([bn_model(i + 1) for i in range(3)]))
    assert arrays["1.num_batches_tracked"].dtype == "int64"
    alone = RDPAccountant()  # not Flower's, but the same RDP of one Gaussian release
    alone.history = [(0.5, 1.0, 1)]
    spent = strategy.privacy_spent()
    assert spent.num_releases == 1
    assert spent.epsilon == pytest.approx(alone.get_epsilon(1e-5), rel=0.05)
    assert pickle.loads(pickle.dumps(strategy)).privacy_spent() == spent
    with pytest.raises(Exception, match="privacy.client_level.adaptive"):  # default σ_b: 3/20
        with_client_level_dp(build_strategy(StrategyConfig(name="fedavg", weighting="uniform"),
                                            3), run_config(
            strategy={"name": "fedavg", "weighting": "uniform"}, privacy={"client_level": {
                "noise_multiplier": 1.0, "clipping_norm": 1.0, "adaptive": {}}}).privacy, 3, 3)


def test_client_side_clipping_bounds_the_float_update_and_keeps_integers():
    received = bn_model(0).state_dict()
    trained = bn_model(1).state_dict()
    trained["1.num_batches_tracked"].fill_(9)
    out, was_clipped = clip_update(received, trained, ConfigRecord({"clipping_norm": 0.1}))
    assert was_clipped and not clip_update(received, received, ConfigRecord(
        {"clipping_norm": 0.1}))[1]
    norm = np.sqrt(sum(((out[k] - received[k]) ** 2).sum().item()
                       for k in out if out[k].is_floating_point()))
    assert norm == pytest.approx(0.1, rel=1e-5)
    assert out["1.num_batches_tracked"].item() == 9 and list(out) == list(trained)


def _study(tmp_path, grid: list[dict], rounds: int = 3) -> dict:
    from fl_sim.cli import main

    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({
        "study": "s", "out": str(tmp_path / "out"),
        "data": {"dataset": "synthetic", "image_size": 32, "synthetic": {"num_images": 240},
                 "cache_dir": str(tmp_path / "cache"), "partition": {"num_clients": 3}},
        "defaults": {"rounds": rounds, "batch_size": 32, "model": {"name": "test_resnet"},
                     "optimizer": {"name": "adamw"},
                     "strategy": {"name": "fedavg", "weighting": "uniform"}},
        "grid": grid}))
    assert main(["run", str(study)]) == 0
    return {d.name: d for d in (tmp_path / "out/s").iterdir() if d.is_dir()}


@pytest.mark.slow
def test_dp_runs_write_epsilon_everywhere_and_a_target_stops_them(tmp_path):
    from fl_sim.report import write_report

    runs = _study(tmp_path, [
        {"privacy": [{"client_level": {"noise_multiplier": 2.0, "clipping_norm": 1.0,
                                       "clipping": "client",
                                       "adaptive": {"clipped_count_stddev": 2.0}}},
                     {"sample_level": {"noise_multiplier": 1.5}, "target_epsilon": 4.0}]},
        {"strategy": [{"name": "pooled"}], "privacy": [DPSGD]}])
    central = next(d for n, d in runs.items() if "cdpca" in n)
    stopped = next(d for n, d in runs.items() if "eps4" in n)
    pooled = next(d for n, d in runs.items() if n.startswith("pooled"))

    summary = json.loads((central / "summary.json").read_text())
    assert summary["complete"] and summary["rounds_done"] == 3
    privacy = summary["privacy"]["client_level"]
    assert privacy["releases"] == 3 and privacy["clipping"] == "client"
    assert privacy["clipping_norm_now"] != 1.0  # adapted from the clients' clipped count
    rows = [r for r in read_metrics(central) if r["scope"] == "privacy"]
    assert [r["round"] for r in rows] == [1, 2, 3]  # rising, and the last is the summary's
    assert rows[0]["epsilon"] < rows[1]["epsilon"] < rows[2]["epsilon"] == privacy["epsilon"]

    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["complete"] and 1 <= summary["stopped"]["round"] < 3  # ~2.8 ε a round
    assert "past target_epsilon 4" in summary["stopped"]["reason"]
    spent = summary["privacy"]["sample_level"]
    assert 0 < spent["epsilon"] <= 4.0 and set(spent["clients"]) == {"0", "1", "2"}
    state = torch.load(stopped / "checkpoints/last.pt", weights_only=False)["state_dict"]
    assert not any("running_var" in k for k in state)  # GroupNorm: no batch statistics

    pooled_privacy = json.loads((pooled / "summary.json").read_text())["privacy"]
    assert set(pooled_privacy["sample_level"]["clients"]) == {"pooled"}

    report = write_report(tmp_path / "out/s").read_text()
    assert "## Privacy" in report and "past target_epsilon 4" in report
