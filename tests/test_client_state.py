"""`client_state: keep` (issue #23, item 3): a client's optimizer state after round r is the
state it starts round r+1 with, in its node's state; without it every round starts afresh."""

import copy

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_sim.client import client_app, train
from fl_sim.config import DataConfig, RunConfig
from fl_sim.data_partition import prepare_data
from fl_sim.task import build_model


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def two_rounds(tmp_path, monkeypatch, client_state: str) -> tuple[list, list]:
    """Client 0 trains rounds 1 and 2 in one node: each round's optimizer state at its first
    step (before it) and after its last."""
    data = DataConfig.model_validate({"dataset": "synthetic", "image_size": 32,
                                      "synthetic": {"num_images": 210}, "cache_dir": str(tmp_path),
                                      "partition": {"num_clients": 3}})
    run = RunConfig.model_validate({"model": {"name": "test_resnet"}, "augment": False,
                                    "optimizer": {"name": "adamw"}, "client_state": client_state})
    model, _ = build_model(run, prepare_data(data, progress=False).class_names, 32)
    starts, ends, real = [], [], train.make_optimizer

    def watched(*args, **kwargs):
        optimizer = real(*args, **kwargs)
        first = []

        def before_step(opt, args, kwargs):
            if not first:
                first.append(copy.deepcopy(opt.state_dict()["state"]))
        optimizer.register_step_pre_hook(before_step)
        starts.append(first)
        ends.append(optimizer)
        return optimizer

    monkeypatch.setattr(train, "make_optimizer", watched)
    context = Context(run_id=1, node_id=0, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    for server_round in (1, 2):
        config = ConfigRecord({"data-config": data.model_dump_json(),
                               "run-config": run.model_dump_json(), "server-round": server_round})
        client_app.train(Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                             "config": config}), dst_node_id=0,
                                 message_type="train"), context)
    return [s[0] for s in starts], [copy.deepcopy(o.state_dict()["state"]) for o in ends]


def test_kept_optimizer_state_carries_from_one_round_to_the_next(tmp_path, monkeypatch):
    starts, ends = two_rounds(tmp_path, monkeypatch, "keep")
    assert starts[0] == {}  # round 1: a fresh optimizer
    after_first, start_of_second = ends[0], starts[1]
    assert after_first and start_of_second.keys() == after_first.keys()
    for index, fields in after_first.items():
        for name, value in fields.items():  # Adam's step count and both moments
            assert torch.equal(start_of_second[index][name], value), (index, name)
    assert float(ends[1][0]["step"]) == 2 * float(after_first[0]["step"])


def test_without_it_each_round_starts_a_fresh_optimizer(tmp_path, monkeypatch):
    starts, _ = two_rounds(tmp_path, monkeypatch, "fresh")
    assert starts == [{}, {}]


def test_kept_state_is_refused_with_dp_sgd():
    with pytest.raises(ValueError, match="client_state: keep is not built for"):
        RunConfig.model_validate({"client_state": "keep",
                                  "privacy": {"sample_level": {"noise_multiplier": 1.0}}})
