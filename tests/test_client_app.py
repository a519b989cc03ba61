"""The ClientApp as a SuperNode runs it: its data chosen by the node's own config."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_sim.client.client_app import node_data_config, train
from fl_sim.config import DataConfig, RunConfig
from fl_sim.data_partition import prepare_data
from fl_sim.task import build_model


@pytest.fixture
def study_data(tmp_path):
    return DataConfig.model_validate({"dataset": "synthetic", "image_size": 32,
                                      "synthetic": {"num_images": 210}, "cache_dir": str(tmp_path),
                                      "partition": {"num_clients": 3}})


def test_a_partition_of_a_shared_copy(study_data, tmp_path):
    cfg, partition = node_data_config(study_data, {"partition-id": 2, "data-root": str(tmp_path)})
    assert partition == 2 and cfg.partition.num_clients == 3 and cfg.root == tmp_path


def test_local_data_is_all_the_nodes_own_images(study_data):
    cfg, partition = node_data_config(study_data, {"partition-id": 5, "local-data": True})
    assert partition == 0
    data = prepare_data(cfg, progress=False)
    assert data.num_clients == 1 and len(data.indices("global", "test")) == 0
    sizes = [len(data.indices(0, s)) for s in ("train", "val", "test")]
    assert sum(sizes) == 210 and sizes[0] > sizes[1] > 0


@pytest.mark.parametrize("lr", [None, 0.0])
def test_train_reply_of_a_local_data_node(study_data, monkeypatch, lr):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    run = RunConfig.model_validate({"model": {"name": "test_convnext"}, "optimizer": {"name": "adamw"}})
    model, _ = build_model(run, prepare_data(study_data, progress=False).class_names, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = {"data-config": study_data.model_dump_json(), "run-config": run.model_dump_json(),
              "server-round": 1}
    if lr is not None:  # the round's learning rate from the server's schedule
        config["lr"] = lr
    msg = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "config": ConfigRecord(config)}), dst_node_id=0, message_type="train")
    context = Context(run_id=1, node_id=0, node_config={"partition-id": 5, "local-data": True},
                      state=RecordDict(), run_config={})
    reply = train(msg, context)
    metrics = reply.content["metrics"]
    local, _ = node_data_config(study_data, {"local-data": True})
    assert metrics["partition-id"] == 5
    assert metrics["num-examples"] == len(prepare_data(local, progress=False).indices(0, "train"))
    after = reply.content["arrays"].to_torch_state_dict()
    # It trained, unless the server's rate for the round was 0.
    assert any(not torch.equal(before[k], after[k]) for k in before) == (lr is None)
    assert np.isfinite(metrics["train_loss"])
    assert metrics["cuda_device"] == (0 if torch.cuda.is_available() else -1)  # where it trained


def test_a_node_whose_partition_differs_from_the_servers_refuses(study_data, monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    data = prepare_data(study_data, progress=False)
    other = prepare_data(DataConfig.model_validate(
        {**study_data.model_dump(), "synthetic": {"num_images": 280}}), progress=False)
    assert data.digest == prepare_data(study_data, progress=False).digest != other.digest
    run = RunConfig.model_validate({"model": {"name": "test_convnext"}, "optimizer": {"name": "adamw"}})
    model, _ = build_model(run, data.class_names, 32)

    def message(digest):
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({
            "data-config": study_data.model_dump_json(), "run-config": run.model_dump_json(),
            "server-round": 1, "partition-digest": digest})}), dst_node_id=0, message_type="train")

    shared = Context(run_id=1, node_id=0, node_config={"partition-id": 2}, state=RecordDict(),
                     run_config={})
    with pytest.raises(RuntimeError, match="client 2: RuntimeError: this node's partition of its "
                       f"data copy .* differs from the server's .*server {other.digest}"):
        train(message(other.digest), shared)
    assert train(message(data.digest), shared).content["metrics"]["partition-id"] == 2
    own = Context(run_id=1, node_id=0, node_config={"partition-id": 2, "local-data": True},
                  state=RecordDict(), run_config={})
    train(message(other.digest), own)  # its own data: nothing to compare
