"""SCAFFOLD (Karimireddy et al., 2020) on Flower's message API: control variates on the
server and on every client correct the clients' drift on heterogeneous data.

Flower 1.39 ships no SCAFFOLD. Its strategies take exactly one ArrayRecord per message, so
the control variates travel in it beside the weights, under prefixed keys:
- server -> client (train): the weights and the server control c (`scaffold.c.<param>`);
- client -> server: its trained weights y_i and the change of its control, Δc_i
  (`scaffold.dc.<param>`; the client's own c_i stays at the client, fl_sim.client.scaffold).
FedAvg's weighted mean of the replies then gives the new weights (global step size 1, as in
the paper's experiments) and the mean Δc, and the server control moves by
c <- c + (|S| / N) * mean(Δc_i), for |S| sampled of N clients. Control variates cover the
trainable parameters only (not BatchNorm statistics, not frozen tensors); c lives in the
strategy, so a checkpoint (which pickles the strategy) resumes it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fl_sim.arrays import array_view

CONTROL, DELTA = "scaffold.c.", "scaffold.dc."  # key prefixes of c and Δc_i in a record


class Scaffold(FedAvg):
    """FedAvg's sampling and weighted mean, plus the server control variate."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.trainable: frozenset[str] | None = None  # set by build_strategy
        self.num_clients = 0  # N, set by build_strategy
        self.control: OrderedDict[str, np.ndarray] = OrderedDict()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if not self.control:  # c starts at zero
            self.control = OrderedDict(
                (k, np.zeros_like(array_view(v))) for k, v in arrays.items()
                if self.trainable is None or k in self.trainable)
        with_control = ArrayRecord(OrderedDict([
            *arrays.items(), *((CONTROL + k, Array(v)) for k, v in self.control.items())]))
        return super().configure_train(server_round, with_control, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        mean, metrics = super().aggregate_train(server_round, replies)
        if mean is None:
            return None, metrics
        sampled = sum(not r.has_error() for r in replies)
        for key, value in self.control.items():
            self.control[key] = value + (sampled / self.num_clients) * array_view(mean[DELTA + key])
        return ArrayRecord(OrderedDict((k, v) for k, v in mean.items()
                                       if not k.startswith(DELTA))), metrics
