"""Personalized federated learning at the client: models that are partly or wholly its own.

- FedPer (Arivazhagan et al. 2019) and FedRep (Collins et al. 2021): the classifier head is
  private (fl_sim.models.finetune.keep_private): messages carry the body only, and each
  client trains and evaluates the body with its own head, kept in its node's state. FedPer
  trains head and body together; FedRep first the head alone (`head_epochs`), then the
  body alone, each round.
- Ditto (Li et al. 2021): beside the global update, each client trains a personal model v
  of its own, pulled toward the round's global model w by λ/2·‖v − w‖², with the same
  local work. Only the global update travels; v stays in the node's state.

A client's own part starts as built (FedPer/FedRep's head) or from the global model
(Ditto's v) in its first round, and again in a resumed run (a new process has no state).
"""

from __future__ import annotations

import copy
from typing import Callable

from flwr.app import RecordDict
from torch import nn

from fl_sim.client.node_state import keep_own, load_own
from fl_sim.config import PRIVATE_HEAD, RunConfig, ditto_lambda, head_epochs
from fl_sim.models.finetune import training_only

Fit = Callable[..., dict]
"""fit(model, cfg, stream, **train_local's options) -> train_local's result, on the
client's train split at the round's rate."""


def load_own_part(model: nn.Module, state: RecordDict, run_cfg: RunConfig,
                  run_json: str) -> None:
    """FedPer/FedRep: this client's own head over the message's body (none yet: as built)."""
    if run_cfg.strategy.name in PRIVATE_HEAD:
        load_own(model, state, "head", run_json, default=model.private_initial)


def personal_model(model: nn.Module, state: RecordDict, run_json: str) -> nn.Module:
    """Ditto: a copy of `model` (the round's global weights) holding this client's personal
    model where it has one."""
    personal = copy.deepcopy(model)
    load_own(personal, state, "ditto", run_json)
    return personal


def train_personalized(model: nn.Module, fit: Fit, state: RecordDict, run_cfg: RunConfig,
                       run_json: str) -> dict:
    """One round's local training of a personalized method on `model` (the global weights,
    with FedPer/FedRep's own head loaded); keeps the client's own part for its next
    messages. Returns the travelling model's training result, as train_local's."""
    strategy = run_cfg.strategy
    if strategy.name == "ditto":
        personal = personal_model(model, state, run_json)
        anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad]  # w
        result = fit(model, run_cfg, stream=0)
        fit(personal, run_cfg, stream=5, proximal_mu=ditto_lambda(strategy), anchor=anchor)
        keep_own(personal, state, "ditto", run_json, personal.state_dict())
        return result
    if strategy.name == "fedrep":
        with training_only(model, model.private_keys):
            fit(model, run_cfg.model_copy(update={"local_epochs": head_epochs(strategy),
                                                  "local_steps": None}), stream=5)
        with training_only(model, [n for n, _ in model.named_parameters()
                                   if n not in model.private_keys]):
            result = fit(model, run_cfg, stream=0)
    else:
        result = fit(model, run_cfg, stream=0)
    keep_own(model, state, "head", run_json, model.private_keys)
    return result
