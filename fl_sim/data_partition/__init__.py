"""Datasets, the decoded-image cache and the lesion-grouped federated partition.

    data = prepare_data(cfg.data)          # build the cache once, then cheap in every process
    rows = data.indices(0, "train")        # client 0's training rows
    x, y = data.images[rows], data.labels[rows]
    data.indices("global", "test")         # the server's global test set
    data.write_manifest(run_dir / "partition.csv")

See docs/data.md for the datasets, the cache and the partitioners.
"""

from fl_sim.data_partition.federated import FederatedData, prepare_data
from fl_sim.data_partition.ham10000 import CLASS_NAMES, CLASSES
from fl_sim.data_partition.inspect import inspect_data
from fl_sim.data_partition.partitioners import PARTITIONERS

__all__ = [
    "CLASSES",
    "CLASS_NAMES",
    "PARTITIONERS",
    "FederatedData",
    "inspect_data",
    "prepare_data",
]
