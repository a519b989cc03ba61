"""SecAgg+ (issue #24, item 1): the server-side code never holds a client's unmasked update,
the aggregate is plain FedAvg's within the quantization error, and clients that drop out after
the key sharing are survived down to the threshold, below which the round fails naming them.

The rounds here run in this process through tests/local_grid.py: fl-sim's real ClientApp,
Flower's SecAgg+ mod included."""

import json
import pickle

import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity
from pydantic import ValidationError

from local_grid import LocalGrid

from fl_sim.arrays import to_state_dict
from fl_sim.config import Run, RunConfig, StudyConfig
from fl_sim.errors import FlSimError
from fl_sim.server.loop import FederatedRun


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def federated_run(tmp_path, secure: dict | None, clients: int = 3, rounds: int = 1,
                  name: str = "r", **run) -> FederatedRun:
    study = StudyConfig.model_validate({
        "study": "s", "out": str(tmp_path / "out"),
        "data": {"dataset": "synthetic", "image_size": 32, "synthetic": {"num_images": 300},
                 "cache_dir": str(tmp_path / "cache"), "partition": {"num_clients": clients}}})
    cfg = RunConfig.model_validate({"rounds": rounds, "model": {"name": "test_resnet"},
                                    "optimizer": {"name": "adamw"}, "augment": False,
                                    "secure_aggregation": secure, **run})
    return FederatedRun(study, Run(name=name, config=cfg), tmp_path / name)


def final_state(tmp_path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(tmp_path / name / "checkpoints/last.pt", weights_only=False)["state_dict"]


def test_the_server_sees_only_masked_updates_and_the_aggregate_is_fedavgs(tmp_path,
                                                                          monkeypatch):
    plain_grid, secure_grid = LocalGrid(3), LocalGrid(3)
    federated_run(tmp_path, None, name="plain").execute(plain_grid)
    updates = [to_state_dict(m.content["arrays"]) for m in plain_grid.seen
               if m.metadata.message_type == "train"]
    assert len(updates) == 3  # each client's own trained arrays, in the clear

    reaching = []
    from flwr.serverapp.strategy import FedAvg

    original = FedAvg.aggregate_train
    monkeypatch.setattr(FedAvg, "aggregate_train", lambda self, r, replies: (
        reaching.extend(replies), original(self, r, replies))[1])
    summary = federated_run(tmp_path, {}, name="secure").execute(secure_grid)
    assert summary["complete"]

    # What the server pulled: four stages x three clients; no reply of the collect stage
    # carries arrays, and its masked integers are nothing like a client's weights.
    stages = [m for m in secure_grid.seen if m.metadata.message_type == "train"]
    assert len(stages) == 12
    for reply in stages:
        assert not any(len(record) for record in reply.content.array_records.values())
    masked = [m for m in stages if Key.MASKED_PARAMETERS in m.content[RECORD_KEY_CONFIGS]]
    assert len(masked) == 3
    # What reached aggregation: three replies (so SCAFFOLD's and DP's counts hold), each the
    # same arrays: the mean, no client's own.
    assert len(reaching) == 3
    arrays = [to_state_dict(r.content["arrays"]) for r in reaching]
    floats = [k for k, v in arrays[0].items() if v.is_floating_point()]
    for other in arrays[1:]:
        assert all(torch.equal(arrays[0][k], other[k]) for k in floats)
    for own in updates:
        assert not any(torch.equal(arrays[0][k], own[k]) for k in floats if "weight" in k)
    # The secure aggregate is FedAvg's within the quantization error (2 x 8 / 2**22 per
    # client, scaled by its weight).
    plain, secure = final_state(tmp_path, "plain"), final_state(tmp_path, "secure")
    worst = max(float((plain[k].double() - secure[k].double()).abs().max()) for k in floats)
    assert 0 < worst < 1e-4, worst


@pytest.mark.parametrize("strategy, tolerance", [
    ({"name": "fedprox", "proximal_mu": 0.1}, 1e-4),
    ({"name": "fedbn"}, 1e-4),
    ({"name": "scaffold"}, 1e-4),  # its Δc summed beside the weights
    # The server's Adam step divides by the root of its second moment (tau 1e-3 by default):
    # a step of a quantization error's size can move an entry by about eta x 1e-3.
    ({"name": "fedadam", "params": {"eta": 0.01}}, 1e-3),
])
def test_the_fedavg_family_and_scaffold_aggregate_as_without_it(strategy, tolerance, tmp_path):
    # One round: a second one trains from weights that differ by the quantization error,
    # and training amplifies that (to ~1e-3 after two rounds here).
    for name, secure in (("plain", None), ("secure", {})):
        federated_run(tmp_path, secure, name=name, strategy=strategy).execute(LocalGrid(3))
    plain, secure = final_state(tmp_path, "plain"), final_state(tmp_path, "secure")
    floats = [k for k, v in plain.items() if v.is_floating_point()]
    worst = max(float((plain[k].double() - secure[k].double()).abs().max()) for k in floats)
    assert 0 < worst < tolerance, worst
    if strategy["name"] == "scaffold":  # the server control moved by the mean Δc alike
        plain, secure = (pickle.loads(torch.load(tmp_path / name / "checkpoints/last.pt",
                                                 weights_only=False)["strategy"]).control
                         for name in ("plain", "secure"))
        assert any(np.abs(v).max() > 0 for v in plain.values())
        worst = max(float(np.abs(plain[k] - secure[k]).max()) for k in plain)
        assert worst < 1e-5, worst


def test_client_side_dp_under_secure_aggregation_books_every_round(tmp_path):
    privacy = {"client_level": {"noise_multiplier": 0.5, "clipping_norm": 1.0,
                                "clipping": "client"}}
    summary = federated_run(tmp_path, {}, name="secure", rounds=2, privacy=privacy,
                            strategy={"weighting": "uniform"}).execute(LocalGrid(3))
    assert summary["complete"]
    assert summary["privacy"]["client_level"]["releases"] == 2


def test_a_secure_run_repeats_exactly_despite_random_masks(tmp_path):
    # The masks cancel exactly (integers modulo 2**32); the stochastic rounding is seeded.
    for name in ("a", "b"):
        federated_run(tmp_path, {}, name=name, rounds=2).execute(LocalGrid(3))
    a, b = final_state(tmp_path, "a"), final_state(tmp_path, "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_client_lost_after_the_key_sharing_is_survived_above_the_threshold(tmp_path):
    grid = LocalGrid(3, drop=((11, Stage.COLLECT_MASKED_VECTORS),))
    summary = federated_run(tmp_path, {}, name="secure", min_clients=2).execute(grid)
    assert summary["complete"]
    # The others' shares removed the lost client's masks: the mean is that of clients 0 and 2.
    two = LocalGrid(3)
    two.contexts.pop(11)
    federated_run(tmp_path, None, name="plain", min_clients=2).execute(two)
    secure, plain = final_state(tmp_path, "secure"), final_state(tmp_path, "plain")
    floats = [k for k, v in plain.items() if v.is_floating_point()]
    worst = max(float((plain[k].double() - secure[k].double()).abs().max()) for k in floats)
    assert worst < 1e-4, worst


def test_below_the_threshold_the_round_fails_naming_the_lost_clients(tmp_path):
    grid = LocalGrid(3, drop=((11, Stage.COLLECT_MASKED_VECTORS),))
    run = federated_run(tmp_path, {"threshold": 3}, name="secure", min_clients=2)
    with pytest.raises(FlSimError, match=r"(?s)round 1 \(train, secure aggregation\).*threshold"
                                         r".*node 11: collect_masked_vectors stage: "
                                         r"node lost.*finished before are kept"):
        run.execute(grid)


def test_a_malformed_masked_update_is_refused_naming_the_node_and_the_round_goes_on(
        tmp_path, monkeypatch, caplog):
    from fl_sim.client import secure_aggregation

    original = secure_aggregation.secaggplus_mod

    def truncating(msg, context, call_next):  # client 2 masks one array too few
        reply = original(msg, context, call_next)
        if context.node_config["partition-id"] == 2 and Key.MASKED_PARAMETERS in reply.content[
                RECORD_KEY_CONFIGS]:
            record = reply.content[RECORD_KEY_CONFIGS]
            record[Key.MASKED_PARAMETERS] = record[Key.MASKED_PARAMETERS][:-1]
        return reply

    monkeypatch.setattr(secure_aggregation, "secaggplus_mod", truncating)
    summary = federated_run(tmp_path, {}, name="secure", min_clients=2).execute(LocalGrid(3))
    assert summary["complete"]
    assert "continuing without node 12: collect_masked_vectors stage: its masked update holds " \
           "77 arrays, not 78" in caplog.text


def test_clients_that_sit_out_drop_after_the_key_sharing(tmp_path):
    summary = federated_run(tmp_path, {}, clients=5, rounds=2, name="secure",
                            availability={"dropout": 0.4}).execute(LocalGrid(5))
    assert summary["complete"]
    rows = [json.loads(line) for line in (tmp_path / "secure/metrics.jsonl").open()]
    counts = [r["clients"] for r in rows if r["scope"] == "federated" and r["split"] == "train"]
    assert len(counts) == 2 and min(counts) < 5, counts


@pytest.mark.parametrize("run, message", [
    ({"strategy": {"name": "krum"}}, "needs each one"),
    ({"strategy": {"name": "qfedavg"}}, "needs each one"),
    ({"strategy": {"name": "pooled"}}, "aggregates no updates"),
    ({"privacy": {"client_level": {"noise_multiplier": 1.0, "clipping_norm": 1.0}},
      "strategy": {"weighting": "uniform"}}, "clipping: client"),
    ({"personalize": {}, "cross_site_eval": True}, "in the clear"),
])
def test_what_secure_aggregation_cannot_do_is_refused_at_config_time(run, message):
    with pytest.raises(ValidationError, match=message):
        RunConfig.model_validate({"secure_aggregation": {}, **run})


def test_flowers_own_checks_of_the_protocols_parameters_apply():
    with pytest.raises(ValidationError, match="threshold` must be less than `num_shares"):
        RunConfig.model_validate({"secure_aggregation": {"num_shares": 3, "threshold": 3}})
    RunConfig.model_validate({"secure_aggregation": {"num_shares": 3, "threshold": 2}})
