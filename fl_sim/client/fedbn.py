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


from flwr.app import ArrayRecord, RecordDict
from torch import nn

from fl_sim.arrays import to_state_dict
from fl_sim.client.node_state import state_key

GLOBAL_BATCHNORM = "the mean of the clients' BatchNorm statistics (FedBN: each client uses its own)"


def batchnorm_keys(model: nn.Module) -> list[str]:
    """The state_dict keys of every BatchNorm layer (timm's BatchNormAct too)."""
    return [f"{name}.{key}" for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            for key in module.state_dict()]


def load_own(model: nn.Module, state: RecordDict, run_json: str) -> None:
    """This client's BatchNorm layers into `model` (after the global weights), if it has any."""
    key = state_key("fedbn", run_json)
    if key in state:
        model.load_state_dict(to_state_dict(state[key]), strict=False)


def keep_own(model: nn.Module, state: RecordDict, run_json: str) -> None:
    """This client's BatchNorm layers after training, for its next messages."""
    own = model.state_dict()
    state[state_key("fedbn", run_json)] = ArrayRecord({k: own[k] for k in batchnorm_keys(model)})
