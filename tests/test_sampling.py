"""Client sampling for many clients (issue #14, item 5): a seeded fraction of the clients
trains each round, every client evaluates every `eval_every` rounds, and only those rounds
can be the best."""

import json

import numpy as np
import pytest
import yaml

from fl_sim.config import RunConfig, StrategyConfig
from fl_sim.server.messaging import SampledGrid, sample_nodes
from fl_sim.server.run_log import read_metrics
from fl_sim.strategies import build_strategy


class Nodes:
    def __init__(self, n: int) -> None:
        self.ids = [2**63 + 7 * i for i in range(n)]  # unsigned 64-bit, as Flower makes them

    def get_node_ids(self) -> list[int]:
        return self.ids


def test_a_sample_is_seeded_by_round_and_fits_the_strategys_minimums():
    grid = Nodes(100)
    a = sample_nodes(grid, 0.1, np.random.default_rng([0, 1, 0]))
    b = sample_nodes(grid, 0.1, np.random.default_rng([0, 1, 0]))
    c = sample_nodes(grid, 0.1, np.random.default_rng([0, 2, 0]))
    assert isinstance(a, SampledGrid) and len(a.get_node_ids()) == 10
    assert a.get_node_ids() == b.get_node_ids() != c.get_node_ids()
    assert sample_nodes(grid, 1.0, np.random.default_rng(0)) is grid
    assert len(sample_nodes(Nodes(3), 0.01, np.random.default_rng(0)).get_node_ids()) == 1
    strategy = build_strategy(StrategyConfig(fraction_train=0.1, fraction_evaluate=0.2), 100)
    # Flower waits for its minimums: they must not exceed what a sample shows it.
    assert strategy.min_train_nodes == strategy.min_available_nodes == 10


def test_fractions_are_for_federated_runs():
    with pytest.raises(ValueError, match="'pooled' trains every client's data"):
        RunConfig.model_validate({"strategy": {"name": "pooled", "fraction_train": 0.5}})
    with pytest.raises(ValueError, match="fraction_train"):
        RunConfig.model_validate({"strategy": {"fraction_train": 0}})


@pytest.mark.slow
def test_a_tenth_of_100_clients_trains_each_round_and_all_evaluate_every_second(tmp_path):
    from fl_sim.cli import main

    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({
        "study": "s", "out": str(tmp_path / "out"),
        "data": {"dataset": "synthetic", "image_size": 32, "synthetic": {"num_images": 2000},
                 "cache_dir": str(tmp_path / "cache"),
                 "partition": {"num_clients": 100}},
        "defaults": {"rounds": 3, "batch_size": 8, "model": {"name": "test_convnext"},
                     "eval_every": 2, "resources": {"num_cpus": 1},
                     "strategy": {"name": "fedavg", "fraction_train": 0.1,
                                  "fraction_evaluate": 0.2}},
    }))
    assert main(["run", str(study)]) == 0
    run_dir = tmp_path / "out/s/fedavg-frac0.1-evalfrac0.2_test_convnext_sgd_s0"
    rows = read_metrics(run_dir)

    def clients(server_round: int, split: str) -> set[int]:
        return {r["client"] for r in rows if r["round"] == server_round
                and r["scope"] == "client" and r["split"] == split}

    trained = [clients(r, "train") for r in (1, 2, 3)]
    assert [len(t) for t in trained] == [10, 10, 10]
    assert len(set.union(*trained)) > 10  # another sample each round
    assert [len(clients(r, "val")) for r in (1, 2, 3)] == [20, 100, 100]  # 2: eval_every; 3: last
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best"]["round"] in (2, 3)  # a round that every client evaluated
