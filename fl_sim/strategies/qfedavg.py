"""QFedAvg (Li et al., 2020, fair resource allocation), refusing what it cannot aggregate."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp import strategy as fl

from fl_sim.arrays import is_float
from fl_sim.errors import FlSimError


class QFedAvg(fl.QFedAvg):
    """Flower 1.39's QFedAvg updates every array in place in floating point, so a model with
    an integer array (BatchNorm's `num_batches_tracked`) fails after the first round of
    training with a numpy casting error. This one says so before anything is sent."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        integer = [k for k, a in arrays.items() if not is_float(a)]
        if integer:
            raise FlSimError(
                f"qfedavg cannot aggregate integer arrays ({', '.join(integer[:3])}"
                f"{', ...' if len(integer) > 3 else ''}: BatchNorm's counters): Flower's QFedAvg "
                "steps every array in floating point. Use a model without BatchNorm (ConvNeXt, "
                "ViT, Swin) or another strategy.")
        return super().configure_train(server_round, arrays, config, grid)
