"""Hostile and absent clients, in simulation: what a robust aggregation rule is tested against.

A hostile client is an ordinary ClientApp that the run's `adversary` names (by partition
id): it trains on flipped labels (`label_flip`), or trains honestly and replies with a
poisoned model (`sign_flip`, `scale`, `gaussian`, `alie`). The poison touches the model's
parameters only: BatchNorm's statistics travel as trained (a flipped running variance
would turn negative and crash the evaluation rather than poison the model).

`availability.dropout` makes each client sit out a round's training, drawn from (seed,
round) alone, so every process agrees on who sits out without asking the others.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fl_sim.config import AdversaryConfig, AvailabilityConfig
from fl_sim.errors import FlSimError

# ALIE's attacker estimates the honest clients' mean and spread from this many models it
# trains on disjoint shares of its own train split (the same images as one honest pass).
ALIE_SHARDS = 4


# The metric of a reply from a client that sits the round out: it sends nothing else, and
# the server carries on without it (no error: absence is expected, not a failure).
SAT_OUT = "sat-out"


def hostile_clients(adversary: AdversaryConfig, num_clients: int, seed: int) -> list[int]:
    """The partition ids of the hostile clients: those named, or round(fraction x clients)
    of them (at least one) drawn by the run's seed."""
    if adversary.clients is not None:
        outside = [c for c in adversary.clients if c >= num_clients]
        if outside:
            raise FlSimError(f"adversary.clients {outside} are not among the partition's "
                             f"{num_clients} clients (ids 0..{num_clients - 1}).")
        return sorted(set(adversary.clients))
    k = max(1, round(adversary.fraction * num_clients))
    return sorted(np.random.default_rng([seed, 7]).choice(num_clients, k, replace=False).tolist())


def sitting_out(availability: AvailabilityConfig, seed: int, server_round: int,
                num_clients: int) -> list[int]:
    """The clients that sit out `server_round`'s training; never all of them (the one with
    the highest draw stays)."""
    draws = np.random.default_rng([seed, server_round, 3]).random(num_clients)
    out = draws < availability.dropout
    if out.all():
        out[draws.argmax()] = False
    return np.flatnonzero(out).tolist()


def flip_labels(labels: np.ndarray, rows: np.ndarray, num_classes: int, share: float,
                rng: np.random.Generator) -> np.ndarray:
    """A copy of `labels` in which a `share` of the train `rows` carry class C - 1 - y."""
    flipped = np.array(labels, copy=True)
    chosen = rng.choice(rows, round(share * len(rows)), replace=False) if share < 1 else rows
    flipped[chosen] = num_classes - 1 - flipped[chosen]
    return flipped


def alie_shards(rows: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint shares of the attacker's train rows, one model trained on each."""
    return [np.sort(s) for s in np.array_split(rng.permutation(rows), ALIE_SHARDS)]


def poisoned_reply(sent: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor],
                   parameters: Sequence[str], adversary: AdversaryConfig,
                   rng: np.random.Generator,
                   estimates: Sequence[Mapping[str, torch.Tensor]] = ()
                   ) -> OrderedDict[str, torch.Tensor]:
    """The hostile reply: `trained` with each parameter's update u = trained - sent replaced.

    sign_flip: -s u; scale: s u; gaussian: noise of s x the tensor's update spread (std);
    alie (Baruch et al. 2019): mean - s x std over the `estimates` (models trained on
    shares of the attacker's data), coordinate-wise. Tensors outside `parameters` (BatchNorm
    statistics, SCAFFOLD's variates) are returned as trained, and so is all of it under
    label_flip, which changes training, not the reply.
    """
    if adversary.attack == "label_flip":
        return OrderedDict(trained)
    strength = adversary.resolved_strength
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    reply = OrderedDict(trained)
    for name in parameters:
        base, new = sent[name].detach().cpu().double(), trained[name].detach().cpu().double()
        update = new - base
        if adversary.attack == "sign_flip":
            poisoned = -strength * update
        elif adversary.attack == "scale":
            poisoned = strength * update
        elif adversary.attack == "gaussian":
            spread = update.std() if update.numel() > 1 else update.abs().sum()
            poisoned = strength * spread * torch.randn(update.shape, generator=generator,
                                                       dtype=torch.float64)
        else:  # alie
            shards = torch.stack([e[name].detach().cpu().double() - base for e in estimates])
            poisoned = shards.mean(0) - strength * shards.std(0)
        reply[name] = (base + poisoned).to(trained[name].dtype)
    return reply
