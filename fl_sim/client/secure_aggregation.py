"""A client's part of SecAgg+ (Bell et al. 2020): Flower's `secaggplus_mod`, as it is, around
fl-sim's train handler (docs/privacy.md).

The protocol's four stages each reach the client as a train message carrying a
`secaggplus_configs` record; only the third (collect masked vectors) trains. There Flower's
mod reads the handler's reply in the legacy FitRes layout, so this module hands it one:
- `fitres.parameters`: the update, the trained floating-point arrays minus the ones received
  (SCAFFOLD's Δc as it is). Updates are small, so clipping_range clips less and quantizes
  finer than whole weights would. Integer arrays (BatchNorm's counters) are not sent: the
  server keeps its own;
- `num_examples`: the client's aggregation weight, the metric the server names
  (num-examples, or unit-weight with uniform weighting).
Flower's mod then scales the update by weight / max_weight (so the sum is FedAvg's weighted
one), quantizes it stochastically, adds the masks and sends only that: the arrays leave the
reply. fl-sim's metrics travel beside them in the clear, as in every round, and the names of
the masked arrays in order (`secagg-names`). A client that sits the round out (availability)
drops out after the key sharing: it forgets the protocol's state, and the others' shares
remove its masks.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage,
)

from fl_sim.adversary import SAT_OUT
from fl_sim.arrays import to_state_dict
from fl_sim.config import RunConfig
from fl_sim.errors import ClientFailure
from fl_sim.wire import NAMES, WEIGHT_KEY


class _SatOut(Exception):
    """The handler's reply of a client that sits the round out."""

    def __init__(self, reply: Message) -> None:
        super().__init__("sat out")
        self.reply = reply


def secure_aggregation_mod(msg: Message, context: Context,
                           call_next: ClientAppCallable) -> Message:
    """Flower's SecAgg+ mod for a message of a SecAgg+ round; other messages pass."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
    if stage == Stage.COLLECT_MASKED_VECTORS:
        _seed_stochastic_rounding(msg, context)
    try:
        return secaggplus_mod(msg, context, functools.partial(_legacy_reply, call_next))
    except _SatOut as out:
        context.state.config_records.pop(RECORD_KEY_STATE, None)
        return out.reply
    except ClientFailure:
        raise
    except Exception as err:
        client = context.node_config.get("partition-id", "?")
        raise ClientFailure(f"client {client}: secure aggregation, stage {stage}: "
                            f"{type(err).__name__}: {err}") from err


def _seed_stochastic_rounding(msg: Message, context: Context) -> None:
    """Flower quantizes with NumPy's global generator: seeded by (seed, client, round), a
    run repeats (and resumes) as it ran."""
    config = msg.content["config"]
    seed = RunConfig.model_validate_json(str(config["run-config"])).seed
    rng = np.random.default_rng([seed, int(context.node_config["partition-id"]),
                                 int(config["server-round"]), 5])
    np.random.seed(int(rng.integers(2 ** 32)))


def _legacy_reply(call_next: ClientAppCallable, msg: Message, context: Context) -> Message:
    """fl-sim's train reply as Flower's mod reads it (see the module)."""
    reply = call_next(msg, context)
    metrics = reply.content["metrics"]
    if SAT_OUT in metrics:
        raise _SatOut(reply)
    received, trained = to_state_dict(msg.content["arrays"]), to_state_dict(reply.content["arrays"])
    update = OrderedDict()
    for name, tensor in trained.items():
        if not tensor.is_floating_point():
            continue
        delta = tensor.double() - received[name].double() if name in received else tensor.double()
        update[name] = delta.numpy()
        if not np.isfinite(update[name]).all():  # it would quantize to noise
            raise ValueError(f"its update's {name} holds non-finite values: it is not sent")
    weight = metrics[str(msg.content["config"][WEIGHT_KEY])]
    return Message(RecordDict({
        "metrics": metrics,
        NAMES: ConfigRecord({"names": list(update)}),
        "fitres.parameters": ArrayRecord(OrderedDict((k, Array(v)) for k, v in update.items())),
        "fitres.num_examples": MetricRecord({"num_examples": weight}),
        "fitres.metrics": ConfigRecord({}),
        "fitres.status": ConfigRecord({"code": 0, "message": "Success"}),
    }), reply_to=msg)
