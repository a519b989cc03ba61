"""The FedOpt family (FedAdam, FedYogi, FedAdagrad, FedAvgM) made right for real models.

Flower 1.39's server optimizers step every array of the model, in float64: BatchNorm's
running statistics are pulled by the adaptive step (a running variance far from the clients'
wrecks evaluation), `num_batches_tracked` becomes a fraction, and every tensor leaves the
server as float64, twice the bytes. Here the server step applies to the model's trainable
parameters only; every other array (BatchNorm statistics, counters, fixed buffers) is the
clients' weighted mean, as FedAvg makes it; and each array keeps the dtype the clients sent.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp import strategy as fl

from fl_sim.arrays import is_float


class ParametersOnly:
    """Mixed in before a Flower FedOpt strategy: its step for `trainable` arrays only (all
    floating-point arrays when None), the FedAvg mean for the rest, the clients' dtypes."""

    trainable: frozenset[str] | None = None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        stepped, metrics = super().aggregate_train(  # type: ignore[misc]
            server_round, self._stepped_replies(replies))
        if stepped is None:
            return stepped, metrics
        mean, _ = fl.FedAvg.aggregate_train(self, server_round, replies)  # type: ignore[arg-type]
        return ArrayRecord({
            key: (Array(np.asarray(stepped[key].numpy(), dtype=array.dtype))
                  if self._steps(key, array) else array)
            for key, array in mean.items()}), metrics

    def _steps(self, key: str, array: Array) -> bool:
        return is_float(array) and (self.trainable is None or key in self.trainable)

    def _stepped_replies(self, replies: list[Message]) -> list[Message]:
        """The replies the server step sees (all of them; QFedAvg: their float arrays)."""
        return replies


class FedAdam(ParametersOnly, fl.FedAdam):
    """Flower's FedAdam, its step on the trainable parameters only (see the module)."""


class FedYogi(ParametersOnly, fl.FedYogi):
    """Flower's FedYogi, its step on the trainable parameters only (see the module)."""


class FedAdagrad(ParametersOnly, fl.FedAdagrad):
    """Flower's FedAdagrad, its step on the trainable parameters only (see the module)."""


class FedAvgM(ParametersOnly, fl.FedAvgM):
    """Flower's FedAvgM, its momentum on the trainable parameters only (see the module)."""
