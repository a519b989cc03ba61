"""QFedAvg (Li et al., 2020, fair resource allocation) on models with BatchNorm."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp import strategy as fl

from fl_sim.arrays import floats_only
from fl_sim.strategies.fedopt import ParametersOnly


class QFedAvg(ParametersOnly, fl.QFedAvg):
    """Flower 1.39's QFedAvg steps every array in place in floating point, so a model with
    an integer array (BatchNorm's `num_batches_tracked`) fails after the first round with a
    numpy casting error. Here its step sees the floating-point arrays and applies to the
    trainable parameters; BatchNorm's statistics and counters are the clients' FedAvg mean,
    as in the FedOpt family (fl_sim.strategies.fedopt)."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)
        self.current_arrays = floats_only(arrays)  # the weights Flower's step moves
        return messages

    def _stepped_replies(self, replies: list[Message]) -> list[Message]:
        return [reply if reply.has_error() else Message(
            RecordDict({"arrays": floats_only(reply.content["arrays"]),
                        "metrics": reply.content["metrics"]}), metadata=reply.metadata)
                for reply in replies]
