"""`loss.class_weights: federation` (issue #23, item 2): before the first round every client
sends its train split's class counts (and only those), the server sums them, and every train
message carries the sum, which the clients' loss weighs the classes by."""

import numpy as np
import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from local_grid import LocalGrid

from fl_sim.client.train_split import own_class_counts
from fl_sim.config import Run, RunConfig, StudyConfig
from fl_sim.server.baselines import BASELINE_RUNS
from fl_sim.server.loop import FederatedRun
from fl_sim.wire import FEDERATION_COUNTS


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def study(tmp_path) -> StudyConfig:
    return StudyConfig.model_validate({
        "study": "s", "out": str(tmp_path / "out"),
        "data": {"dataset": "synthetic", "image_size": 32, "synthetic": {"num_images": 300},
                 "cache_dir": str(tmp_path / "cache"),
                 "partition": {"method": "dirichlet", "alpha": 0.3, "num_clients": 3}}})


def config(**loss) -> RunConfig:
    return RunConfig.model_validate({"rounds": 2, "model": {"name": "test_convnext"},
                                     "optimizer": {"name": "adamw"}, "augment": False,
                                     "loss": loss})


def test_the_clients_counts_are_summed_and_sent_with_every_round(tmp_path):
    s, grid = study(tmp_path), LocalGrid(3)
    run = FederatedRun(s, Run(name="r", config=config(name="weighted_ce",
                                                      class_weights="federation")),
                       tmp_path / "r")
    run.execute(grid)
    own = [own_class_counts(run.data, c) for c in range(3)]
    assert len({tuple(c) for c in own}) == 3  # label skew: the clients' counts differ
    total = np.sum(own, axis=0).tolist()
    asked = [m for m in grid.sent if m.metadata.message_type == "query.class_counts"]
    assert len(asked) == 3
    replies = [m for m in grid.seen if m.metadata.message_type == "query.class_counts"]
    assert sorted(list(r.content["metrics"]["class-counts"]) for r in replies) == sorted(
        c.tolist() for c in own)
    assert not any(r.content.array_records for r in replies)  # counts, nothing else
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(trains) == 6
    assert all(list(m.content["config"][FEDERATION_COUNTS]) == total for m in trains)


def test_pooled_federation_weights_are_its_own_and_a_local_clients_are_not(tmp_path):
    s = study(tmp_path)
    weights = {}
    for strategy in ("pooled", "local"):
        for source in ("client", "federation"):
            cfg = config(name="weighted_ce", class_weights=source).model_copy(
                update={"strategy": RunConfig().strategy.model_copy(update={"name": strategy})})
            name = f"{strategy}-{source}"
            BASELINE_RUNS[strategy](s, Run(name=name, config=cfg), tmp_path / name).execute()
            weights[name] = torch.load(tmp_path / name / "checkpoints/last.pt",
                                       weights_only=False)["state_dict"]
    pooled = [weights["pooled-client"], weights["pooled-federation"]]
    assert all(torch.equal(pooled[0][k], pooled[1][k]) for k in pooled[0])  # the same counts
    local = [weights["local-client"], weights["local-federation"]]
    assert not all(torch.equal(local[0][k], local[1][k]) for k in local[0])
