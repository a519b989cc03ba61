"""Client-level central DP: Flower 1.39's fixed-clipping wrappers with their accountant.

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

from collections import OrderedDict
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as fl
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_clip_model_update
from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod
from flwr.supercore.privacy_accounting import PrivacyConfig as AccountingConfig
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fl_sim.config import PrivacyConfig
from fl_sim.errors import FlSimError

ACCOUNTING = ("RDP (dp-accounting, Flower's RdpAccountant); add-or-remove-one client, "
              "no amplification by sampling")


def is_float(array: Array | np.ndarray) -> bool:
    return np.issubdtype(np.dtype(array.dtype), np.floating)


def floats_only(arrays: ArrayRecord) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, v) for k, v in arrays.items() if is_float(v)))


class _FloatArraysAccounted:
    """Mixed in before a Flower fixed-clipping wrapper: it sees floating-point arrays only,
    the integer ones come back from the round's global arrays; its accountant pickles."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        # Clients get every array (their model loads whole); the mean gets the floats.
        self._integers = OrderedDict((k, v) for k, v in arrays.items() if not is_float(v))
        self._sent = floats_only(arrays)  # what a reply's update is measured from
        return super().configure_train(server_round, arrays, config, grid)

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
        # A round's arrays (current_arrays, _integers) come anew with each configure_train.
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("current_arrays", "_integers", "_sent")}
        state["accountant"] = (self.accountant.config, self.accountant.state_dict())
        return state

    def __setstate__(self, state: dict) -> None:
        config, ledger = state["accountant"]
        self.__dict__.update(state)
        self.accountant = RdpAccountant(config)
        self.accountant.load_state_dict(ledger)


class ServerSideClipping(_FloatArraysAccounted, fl.DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, on the floating-point arrays (see the module)."""

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)
        self.current_arrays = self._sent  # Flower clips each reply's update from these
        return messages


class ClientSideClipping(_FloatArraysAccounted, fl.DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping (the clients clip: `clip_update`), on the
    floating-point arrays (see the module). A reply whose update is longer than the
    clipping norm (a client that did not clip) stops the run: the noise would not cover it."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            if not reply.has_error():
                norm = update_norm(self._sent, reply.content["arrays"])
                if norm > self.clipping_norm * (1 + 1e-4) + 1e-6:
                    client = reply.content["metrics"].get("partition-id", "?")
                    raise FlSimError(
                        f"round {server_round}: client {client}'s update has L2 norm "
                        f"{norm:.4g}, above privacy.client_level.clipping_norm "
                        f"{self.clipping_norm:g}: it did not clip (is its fl-sim older?). "
                        "The rounds finished before are kept.")
        return super().aggregate_train(server_round, replies)


def update_norm(sent: ArrayRecord, trained: ArrayRecord) -> float:
    """L2 norm of `trained` - `sent` over `sent`'s (floating-point) arrays."""
    return float(np.sqrt(sum(
        np.sum((trained[k].numpy().astype(np.float64) - v.numpy()) ** 2)
        for k, v in sent.items())))


def with_client_level_dp(strategy: fl.FedAvg, privacy: PrivacyConfig, num_clients: int,
                         sampled: int) -> fl.Strategy:
    """`strategy` inside Flower's fixed-clipping wrapper, with an accountant over
    `num_clients` that refuses a round past `privacy.target_epsilon`."""
    dp = privacy.client_level
    accountant = RdpAccountant(AccountingConfig(
        target_delta=privacy.delta, population_size=num_clients,
        # Flower's wrappers account without amplification: fl-sim samples a fixed number
        # of clients, not Poisson, and the sample is not secret from the server.
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=privacy.target_epsilon))
    wrapper = ServerSideClipping if dp.clipping == "server" else ClientSideClipping
    return wrapper(strategy, dp.noise_multiplier, dp.clipping_norm, sampled,
                   accountant=accountant)


def clip_update(received: Mapping[str, torch.Tensor], trained: OrderedDict[str, torch.Tensor],
                config: ConfigRecord) -> OrderedDict[str, torch.Tensor]:
    """A client's part of client-side clipping: `trained` with its floating-point update
    since `received` clipped to the server's `clipping_norm` in L2 (Flower's
    compute_clip_model_update, as its `fixedclipping_mod` does; the mod itself would see
    the packed wire form of a deployed run)."""
    keys = [k for k, v in trained.items() if v.is_floating_point()]
    after = [trained[k].detach().cpu().numpy().copy() for k in keys]
    compute_clip_model_update(after, [received[k].numpy() for k in keys],
                              float(config[KEY_CLIPPING_NORM]))
    clipped = dict(zip(keys, after))
    return OrderedDict((k, torch.from_numpy(clipped[k]) if k in clipped else v)
                       for k, v in trained.items())


def wants_clipping(config: ConfigRecord) -> bool:
    """Whether the server asks this client to clip its update (client-side clipping)."""
    return KEY_CLIPPING_NORM in config
