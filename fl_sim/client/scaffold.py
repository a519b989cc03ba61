"""SCAFFOLD's client side (fl_sim.strategies.scaffold holds the server's): each client keeps
its own control variate c_i in its node's state (one record per run, as FedBN's layers), and
corrects every local gradient by c - c_i.

After K local steps at learning rate lr from the global weights x to y_i, option II of the
paper: c_i+ = c_i - c + (x - y_i) / (K lr); the reply carries Δc_i = c_i+ - c_i. With plain
SGD, c_i+ is the mean of the gradients the client computed (tested); with other optimizers
it is the same estimate of the client's drift.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

from fl_sim.arrays import to_state_dict
from fl_sim.client.node_state import state_key
from fl_sim.strategies.scaffold import CONTROL, DELTA

Tensors = OrderedDict[str, torch.Tensor]


def split(state: Tensors) -> tuple[Tensors, Tensors]:
    """A received state: (the model's tensors, the server control c by parameter name)."""
    weights = OrderedDict((k, v) for k, v in state.items() if not k.startswith(CONTROL))
    control = OrderedDict((k[len(CONTROL):], v) for k, v in state.items() if k.startswith(CONTROL))
    return weights, control


class ClientControl:
    """One client's SCAFFOLD round: the gradient correction before training, Δc_i after."""

    def __init__(self, model: nn.Module, server: Tensors, state: RecordDict, run_json: str) -> None:
        device = next(model.parameters()).device
        self.state, self.key = state, state_key("scaffold", run_json)
        self.server = OrderedDict((k, v.to(device, torch.float32)) for k, v in server.items())
        own = to_state_dict(state[self.key]) if self.key in state else {}
        self.own = OrderedDict((k, own[k].to(device) if k in own else torch.zeros_like(v))
                               for k, v in self.server.items())
        params = dict(model.named_parameters())
        self.start = OrderedDict((k, params[k].detach().clone()) for k in self.server)

    def correction(self) -> Tensors:
        """c - c_i, added to each local gradient."""
        return OrderedDict((k, self.server[k] - self.own[k]) for k in self.server)

    def finish(self, model: nn.Module, steps: int, lr: float) -> Tensors:
        """Keep c_i+ in the node's state; return Δc_i under the reply's keys."""
        params = dict(model.named_parameters())
        delta = OrderedDict()
        for k in self.server:
            drift = (self.start[k] - params[k].detach()) / (max(steps, 1) * lr)
            delta[k] = drift - self.server[k]  # c_i+ - c_i = -c + (x - y_i) / (K lr)
        self.state[self.key] = ArrayRecord(OrderedDict(
            (k, (self.own[k] + delta[k]).cpu()) for k in self.server))
        return OrderedDict((DELTA + k, v.cpu()) for k, v in delta.items())
