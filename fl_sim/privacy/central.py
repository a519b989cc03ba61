"""Client-level central DP: Flower 1.39's clipping wrappers (fixed and adaptive) with an
RDP accountant.

Flower's wrappers clip a client's update (its arrays minus the round's global ones) over
every array of the reply, and add noise to every array of the mean. A model's integer
buffers (BatchNorm's `num_batches_tracked`) are neither: scaling an integer array by a
float fails, and rounded noise would be no noise. So here the wrappers see the
floating-point arrays only; integer buffers keep the server's values (they count batches,
and under DP nothing a client sends leaves the server un-noised). Flower's `RdpAccountant`
holds Python modules, so the wrappers pickle it (a checkpoint holds the strategy) as its
own `state_dict` and rebuild it on load.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as fl
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent, NeighboringRelation, PrivacySpent, SamplingMethod,
)
from flwr.supercore.privacy_accounting import PrivacyConfig as AccountingConfig
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fl_sim.arrays import floats_only, is_float
from fl_sim.config import PrivacyConfig
from fl_sim.errors import FlSimError

ACCOUNTING = ("RDP (dp-accounting, Flower's RdpAccountant); add-or-remove-one client, "
              "no amplification by sampling")


class _FloatArraysAccounted:
    """Mixed in before a Flower clipping wrapper: it sees floating-point arrays only, the
    integer ones come back from the round's global arrays; its accountant pickles."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # Clients get every array (their model loads whole); the mean gets the floats.
        self._integers = OrderedDict((k, v) for k, v in arrays.items() if not is_float(v))
        self._sent = floats_only(arrays)
        messages = super().configure_train(server_round, arrays, config, grid)
        self.current_arrays = self._sent  # what the server-side wrappers clip updates from
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            if not reply.has_error():
                reply.content["arrays"] = floats_only(reply.content["arrays"])
        mean, metrics = super().aggregate_train(server_round, replies)
        if mean is None:
            return None, metrics
        # Noise can take a small variance below 0 (NaN in evaluation); clamping a released
        # value is post-processing, which costs no privacy.
        mean = OrderedDict((k, Array(np.maximum(v.numpy(), 0)) if k.endswith("running_var")
                            else v) for k, v in mean.items())
        return ArrayRecord(OrderedDict([*mean.items(), *self._integers.items()])), metrics

    def __getstate__(self) -> dict:
        # A round's arrays come anew with each configure_train.
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("current_arrays", "_integers", "_sent")}
        state["accountant"] = (self.accountant.config, self.accountant.state_dict())
        return state

    def __setstate__(self, state: dict) -> None:
        config, ledger = state["accountant"]
        self.__dict__.update(state)
        self.accountant = RdpAccountant(config)
        self.accountant.load_state_dict(ledger)


class _ClientClipped:
    """Mixed in where the clients clip: a reply whose update is longer than the round's
    clipping norm (a client that did not clip) stops the run, as the noise would not
    cover it. Under secure aggregation the server sees no update to check (`sees_updates`
    False): every reply holds the mean, and the clients' own code clips."""

    sees_updates = True

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies if self.sees_updates else ():
            if not reply.has_error():
                norm = update_norm(self._sent, reply.content["arrays"])
                if norm > self.clipping_norm * (1 + 1e-4) + 1e-6:
                    client = reply.content["metrics"].get("partition-id", "?")
                    raise FlSimError(
                        f"round {server_round}: client {client}'s update has L2 norm "
                        f"{norm:.4g}, above the round's clipping norm {self.clipping_norm:.4g}: "
                        "it did not clip (is its fl-sim older?). The rounds finished before "
                        "are kept.")
        return super().aggregate_train(server_round, replies)


class _AdaptiveAccounted:
    """Mixed in before Flower's adaptive-clipping wrappers, which carry no accountant: every
    round that releases a mean composes one Gaussian release of the run's noise multiplier
    (Flower splits it between the update and the clipped count so that together they cost
    that much: Andrew et al. 2021, Theorem 1). And the norm moves toward the target
    quantile: Flower 1.39 multiplies it by exp(-lr x (clipped fraction - target)), so a
    round with too many clipped updates shrinks it further; Andrew et al.'s rule (their
    fraction counts the unclipped ones) grows it."""

    release_noise: float  # the run's noise_multiplier, set by with_client_level_dp
    accountant: RdpAccountant

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        mean, metrics = super().aggregate_train(server_round, replies)
        if mean is not None:
            self.accountant.compose(GaussianPrivacyEvent(
                noise_multiplier=self.release_noise, sample_size=self.num_sampled_clients,
                population_size=self.accountant.config.population_size))
        return mean, metrics

    def privacy_spent(self) -> PrivacySpent:
        return self.accountant.get_privacy_spent()

    def _geometric_update(self, clipped_fraction: float) -> None:
        self.clipping_norm *= math.exp(
            self.clip_norm_lr * (clipped_fraction - self.target_clipped_quantile))


class ServerSideClipping(_FloatArraysAccounted, fl.DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, on the floating-point arrays (see the module)."""


class ClientSideClipping(_FloatArraysAccounted, _ClientClipped,
                         fl.DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping (the clients clip: `clip_update`), on the
    floating-point arrays (see the module)."""


class AdaptiveServerSideClipping(_FloatArraysAccounted, _AdaptiveAccounted,
                                 fl.DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, accounted, its norm update the paper's."""


class AdaptiveClientSideClipping(_FloatArraysAccounted, _ClientClipped, _AdaptiveAccounted,
                                 fl.DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping (the clients clip and say whether they did:
    `clip_update`), accounted, its norm update the paper's."""


def update_norm(sent: ArrayRecord, trained: ArrayRecord) -> float:
    """L2 norm of `trained` - `sent` over `sent`'s (floating-point) arrays."""
    return float(np.sqrt(sum(
        np.sum((trained[k].numpy().astype(np.float64) - v.numpy()) ** 2)
        for k, v in sent.items())))


def with_client_level_dp(strategy: fl.FedAvg, privacy: PrivacyConfig, num_clients: int,
                         sampled: int, secure: bool = False) -> fl.Strategy:
    """`strategy` inside Flower's clipping wrapper of `privacy.client_level`, with an
    accountant over `num_clients` that refuses a round past `privacy.target_epsilon`;
    `secure`: under secure aggregation (the clients clip, the server sees only the mean)."""
    dp = privacy.client_level
    accountant = RdpAccountant(AccountingConfig(
        target_delta=privacy.delta, population_size=num_clients,
        # No amplification: fl-sim samples a fixed number of clients, not Poisson, and the
        # sample is not secret from the server.
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=privacy.target_epsilon))
    if dp.adaptive is None:
        wrapper = ServerSideClipping if dp.clipping == "server" else ClientSideClipping
        wrapped = wrapper(strategy, dp.noise_multiplier, dp.clipping_norm, sampled,
                          accountant=accountant)
        wrapped.sees_updates = not secure
        return wrapped
    adaptive = (AdaptiveServerSideClipping if dp.clipping == "server"
                else AdaptiveClientSideClipping)
    try:
        wrapped = adaptive(strategy, dp.noise_multiplier, sampled,
                           initial_clipping_norm=dp.clipping_norm,
                           target_clipped_quantile=dp.adaptive.target_quantile,
                           clip_norm_lr=dp.adaptive.clip_norm_lr,
                           clipped_count_stddev=dp.adaptive.clipped_count_stddev)
    except ValueError as err:  # the count's noise cannot carry that noise multiplier
        raise FlSimError(f"privacy.client_level.adaptive: {err}") from None
    wrapped.accountant, wrapped.release_noise = accountant, dp.noise_multiplier
    wrapped.sees_updates = not secure
    return wrapped


def clip_update(received: Mapping[str, torch.Tensor], trained: OrderedDict[str, torch.Tensor],
                config: ConfigRecord) -> tuple[OrderedDict[str, torch.Tensor], bool]:
    """A client's part of client-side clipping: `trained` with its floating-point update
    since `received` scaled down to the server's `clipping_norm` in L2 where longer, and
    whether it was (the FlatClip of Flower's clipping mods; the mods themselves would see
    the packed wire form of a deployed run, and divide by a zero update's norm)."""
    keys = [k for k, v in trained.items() if v.is_floating_point()]
    update = {k: trained[k].detach().cpu().double() - received[k].double() for k in keys}
    norm = float(torch.sqrt(sum((u ** 2).sum() for u in update.values())))
    limit = float(config[KEY_CLIPPING_NORM])
    if norm <= limit:
        return trained, False
    return OrderedDict((k, (received[k].double() + update[k] * (limit / norm)).to(v.dtype)
                        if k in update else v) for k, v in trained.items()), True


NORM_BIT = KEY_NORM_BIT  # a client's reply metric under adaptive client-side clipping


def wants_clipping(config: ConfigRecord) -> bool:
    """Whether the server asks this client to clip its update (client-side clipping)."""
    return KEY_CLIPPING_NORM in config
