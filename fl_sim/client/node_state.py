"""What a client keeps in its node's `context.state` from round to round: FedBN's own layers,
FedPer's and FedRep's own head, Ditto's personal model, SCAFFOLD's c_i, and under
`client_state: keep` its optimizer's state. One record per run, as
a study's runs share the simulation's nodes; a resumed run (a new simulation, or a new
Flower run on a SuperNode) starts without them."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Collection, Mapping

import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

from fl_sim.arrays import to_state_dict


def state_key(kind: str, run_json: str) -> str:
    """The node-state record of `kind` for the run whose settings are `run_json`."""
    return f"{kind}-" + hashlib.sha256(run_json.encode()).hexdigest()[:16]


def load_own(model: nn.Module, state: RecordDict, kind: str, run_json: str,
             default: Mapping[str, torch.Tensor] | None = None) -> None:
    """This client's own tensors of `kind` into `model`, over the message's weights; where it
    has none yet (its first round, a resumed run), `default` (None: the message's)."""
    key = state_key(kind, run_json)
    own = to_state_dict(state[key]) if key in state else default
    if own:
        model.load_state_dict(own, strict=False)


def keep_own(model: nn.Module, state: RecordDict, kind: str, run_json: str,
             keys: Collection[str]) -> None:
    """`model`'s tensors `keys` as this client's own of `kind`, for its next messages."""
    current = model.state_dict()
    state[state_key(kind, run_json)] = ArrayRecord(OrderedDict(
        (k, current[k].detach().cpu()) for k in current if k in keys))


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
