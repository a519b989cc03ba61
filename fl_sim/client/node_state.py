"""What a client keeps in its node's `context.state` from round to round: FedBN's own layers,
SCAFFOLD's c_i, and under `client_state: keep` its optimizer's state. One record per run, as
a study's runs share the simulation's nodes; a resumed run (a new simulation, or a new
Flower run on a SuperNode) starts without them."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from flwr.app import ArrayRecord, RecordDict

from fl_sim.arrays import to_state_dict


def state_key(kind: str, run_json: str) -> str:
    """The node-state record of `kind` for the run whose settings are `run_json`."""
    return f"{kind}-" + hashlib.sha256(run_json.encode()).hexdigest()[:16]


class KeptOptimizer:
    """`client_state: keep`: the optimizer's per-parameter state (momentum buffers, Adam's
    moments and step counts) carried from one round to the next. The learning rate and
    the other hyperparameters come from the round, as without it."""

    def __init__(self, state: RecordDict, run_json: str) -> None:
        self.state, self.key = state, state_key("optimizer", run_json)

    def load(self, optimizer: torch.optim.Optimizer) -> None:
        """The kept state into a fresh `optimizer` (nothing the first round)."""
        if self.key not in self.state:
            return
        kept: dict[int, dict[str, torch.Tensor]] = {}
        for name, tensor in to_state_dict(self.state[self.key]).items():
            index, field = name.split("/", 1)
            kept.setdefault(int(index), {})[field] = tensor.clone()
        optimizer.load_state_dict({"state": kept,
                                   "param_groups": optimizer.state_dict()["param_groups"]})

    def save(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer's state after the round, for the next."""
        self.state[self.key] = ArrayRecord(OrderedDict(
            (f"{index}/{field}", torch.as_tensor(value).detach().cpu())
            for index, fields in optimizer.state_dict()["state"].items()
            for field, value in fields.items()))
