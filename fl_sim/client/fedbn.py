"""FedBN (Li et al., 2021): each client keeps its own BatchNorm layers.

The global model arrives whole; a FedBN client then puts back its own BatchNorm weights,
biases and running statistics (kept in the node's `context.state`, one record per run), so
it trains and evaluates with them, and after training keeps the new ones. Its reply still
carries them: the server averages them for its own global model only, whose global
evaluation therefore uses the mean of the clients' statistics (summary.json says so).
A client that has none yet (its first round, or a resumed run in a new process) starts from
the global model's.
"""

from __future__ import annotations

from flwr.app import RecordDict
from torch import nn

from fl_sim.client import node_state

GLOBAL_BATCHNORM = "the mean of the clients' BatchNorm statistics (FedBN: each client uses its own)"


def batchnorm_keys(model: nn.Module) -> list[str]:
    """The state_dict keys of every BatchNorm layer (timm's BatchNormAct too)."""
    return [f"{name}.{key}" for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            for key in module.state_dict()]


def load_own(model: nn.Module, state: RecordDict, run_json: str) -> None:
    """This client's BatchNorm layers into `model` (after the global weights), if it has any."""
    node_state.load_own(model, state, "fedbn", run_json)


def keep_own(model: nn.Module, state: RecordDict, run_json: str) -> None:
    """This client's BatchNorm layers after training, for its next messages."""
    node_state.keep_own(model, state, "fedbn", run_json, batchnorm_keys(model))
