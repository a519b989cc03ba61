"""fl-sim's ArrayRecord helpers give exactly what Flower's do, with fewer copies."""

import subprocess
import sys

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fl_sim.arrays import to_state_dict, weighted_mean

TENSORS = {
    "matrix": torch.randn(3, 4),
    "scalar": torch.tensor(7),
    "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
    "half": torch.randn(5).half(),
    "counter": torch.arange(6, dtype=torch.int64),
}


def test_to_state_dict_reads_what_flower_reads_without_copying():
    record = ArrayRecord({k: v.contiguous() for k, v in TENSORS.items()})
    ours, flowers = to_state_dict(record), record.to_torch_state_dict()
    assert list(ours) == list(flowers)
    for k in flowers:
        assert ours[k].dtype == flowers[k].dtype and torch.equal(ours[k], flowers[k])
    data = record["matrix"].data
    view = ours["matrix"].numpy()
    assert np.shares_memory(view, np.frombuffer(data, dtype=np.uint8))  # a view, not a copy


def _replies(weights):
    gen = torch.Generator().manual_seed(0)
    return [RecordDict({
        "arrays": ArrayRecord({"w": torch.randn(10, 3, generator=gen),
                               "n": torch.tensor(10 * (i + 1))}),
        "metrics": MetricRecord({"num-examples": w}),
    }) for i, w in enumerate(weights)]


def test_weighted_mean_equals_flowers_aggregation():
    replies = _replies([10, 30, 60])
    ours, flowers = weighted_mean(replies, "num-examples"), aggregate_arrayrecords(replies, "num-examples")
    for k in flowers:
        assert ours[k].shape == flowers[k].shape
        np.testing.assert_allclose(ours[k].numpy(), flowers[k].numpy(), rtol=1e-6, atol=1e-6)
    assert ours["w"].dtype == flowers["w"].dtype == "float32"
    # A counter stays an integer (Flower's turns into float64): 0.1 x 10 + 0.3 x 20 + 0.6 x 30.
    assert ours["n"].dtype == "int64" and ours["n"].numpy() == 25 and flowers["n"].dtype == "float64"
    odd = weighted_mean(_replies([1, 1, 1]), "num-examples")["n"]
    assert odd.dtype == "int64" and odd.numpy() == 20  # (10 + 20 + 30) / 3, rounded


def test_the_fedavg_family_averages_with_weighted_mean_without_building_a_strategy():
    """A resumed run unpickles its strategy: importing the server loop must be enough."""
    code = ("import fl_sim.server.loop; from flwr.serverapp.strategy import fedavg; "
            "from fl_sim.arrays import weighted_mean; "
            "assert fedavg.aggregate_arrayrecords is weighted_mean")
    subprocess.run([sys.executable, "-c", code], check=True)
