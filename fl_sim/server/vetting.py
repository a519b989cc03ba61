"""A server that distrusts replies: each train or evaluate reply (and a personalization or
cross-site evaluation reply) is checked against the message it answers before anything
reads it, so that a broken or modified client (a SuperNode running other code) is refused,
named, and the round goes on without it.

A train reply must carry the arrays it was sent, by name, shape and dtype (a float for a
float; SCAFFOLD's control variates c answered by its Δc), finite, and the metrics the server
reads; no reply may be much larger than the message it answers. A client whose own train loss is
non-finite is not refused: it diverged, which stops the run as before (RunFailed).
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fl_sim.arrays import array_view, is_float, is_packed, layout, npy_header
from fl_sim.server.rows import TRAIN_METRICS
from fl_sim.strategies.scaffold import CONTROL, DELTA
from fl_sim.wire import NAMES, SIMULATION_ONLY

# A reply may be this many times the bytes of the message it answers, plus a slack for
# metrics: a train reply is the model's size, an evaluate reply a few numbers.
SIZE_FACTOR, SIZE_SLACK = 2, 1 << 20
# Synthesis's reply (a sample grid, shown in TensorBoard only) is not.
VETTED = ("train", "evaluate", "personalize", "cross_evaluate", "masked")
REPLY_METRICS = ("partition-id", "num-examples")
Layout = dict[str, tuple[str, tuple[int, ...]]]  # each array's (dtype, shape) by name


def refusal(reply: Message, sent: Message, kind: str) -> str | None:
    """Why `reply` (to `sent`, an exchange of `kind`) is refused; None if it is not."""
    if kind not in VETTED:
        return None
    size, limit = payload_bytes(reply), SIZE_FACTOR * payload_bytes(sent) + SIZE_SLACK
    if size > limit:
        return f"its reply holds {size:,} bytes, more than the {limit:,} allowed"
    metrics = reply.content.get("metrics")
    if not isinstance(metrics, MetricRecord):
        return "its reply has no metrics record"
    needed = (*REPLY_METRICS, *TRAIN_METRICS) if kind in ("train", "masked") else REPLY_METRICS
    missing = [k for k in needed if k not in metrics]
    if missing:
        return f"its reply lacks the metrics {missing}"
    bad = [k for k in needed if not isinstance(metrics[k], (int, float))
           or not math.isfinite(metrics[k]) and k != "train_loss"]
    if bad or metrics["num-examples"] < 0:
        return f"its metrics {bad or ['num-examples']} are not finite non-negative numbers"
    # A personalized model asked for travels on to every other client.
    returns_model = kind == "train" or kind == "personalize" and bool(
        sent.content["config"].get("send-model", False))
    if returns_model and "arrays" in sent.content:
        return _array_refusal(reply, layout(sent.content["arrays"]),
                              diverged=not math.isfinite(metrics.get("train_loss", 0.0)))
    return None


def _array_refusal(reply: Message, sent: Layout,
                   diverged: bool) -> str | None:
    arrays = reply.content.get("arrays")
    if not isinstance(arrays, ArrayRecord):
        return "its reply has no arrays"
    if is_packed(arrays):  # still packed: its layout did not unpack (arrays.unpack)
        return "its packed arrays do not unpack"
    expected = reply_layout(sent)
    if set(arrays) != set(expected):
        extra, missing = sorted(set(arrays) - set(expected)), sorted(set(expected) - set(arrays))
        return (f"its arrays are not the model's: {len(extra)} unexpected (e.g. {extra[:3]}), "
                f"{len(missing)} missing (e.g. {missing[:3]})")
    for name, array in arrays.items():
        dtype, shape = expected[name]
        # Some of Flower's rules (Krum, Bulyan, QFedAvg) send float64 and get the model's float32.
        same_kind = array.dtype == dtype or is_float(array) and np.issubdtype(dtype, np.floating)
        if tuple(array.shape) != shape or not same_kind:
            return (f"its array {name} is {array.dtype} {list(array.shape)}, sent as "
                    f"{dtype} {list(shape)}")
    if not diverged:
        for name, array in arrays.items():
            if is_float(array) and not np.isfinite(array_view(array)).all():
                return f"its array {name} holds non-finite values"
    return None


def reply_layout(sent: Layout) -> Layout:
    """The arrays a train reply answers `sent` with: the same, SCAFFOLD's c by its Δc."""
    return {DELTA + k[len(CONTROL):] if k.startswith(CONTROL) else k: kind
            for k, kind in sent.items()}


def masked_layout(sent: ArrayRecord) -> dict[str, tuple[int, ...]]:
    """The arrays a SecAgg+ client masks in answer to `sent`, in order, by shape: its
    update's floating-point ones (integer counters are not sent)."""
    return {k: shape for k, (dtype, shape) in reply_layout(layout(sent)).items()
            if np.issubdtype(np.dtype(dtype), np.floating)}


def masked_refusal(reply: Message, sent: Message, weight_key: str,
                   max_weight: float) -> str | None:
    """Why a SecAgg+ client's masked update (its reply to the collect stage) is refused: its
    metrics as a train reply's, then the masked arrays, by name and shape, of the update's
    floating-point arrays (secure_aggregation's client module), and a weight within
    max_weight (a larger one would be clipped, and skew the mean)."""
    if why := refusal(reply, sent, "masked"):
        return why
    expected = masked_layout(sent.content["arrays"])
    names = reply.content.config_records.get(NAMES, {}).get("names")
    if names != list(expected):
        return (f"its masked update names {len(names or [])} arrays, not the model's "
                f"{len(expected)} floating-point ones in order")
    masked = reply.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.MASKED_PARAMETERS)
    shapes = [(1,), *expected.values()]  # Flower's weight factor first
    if not isinstance(masked, list) or len(masked) != len(shapes):
        return f"its masked update holds {len(masked or [])} arrays, not {len(shapes)}"
    for name, data, shape in zip(["weight", *expected], masked, shapes, strict=True):
        try:
            got, _, dtype, _ = npy_header(data)
        except (TypeError, ValueError, OSError):
            return f"its masked array {name} is not an array"
        if tuple(got) != tuple(shape) or not np.issubdtype(dtype, np.integer):
            return f"its masked array {name} is {dtype} {list(got)}, not integers {list(shape)}"
    weight = reply.content["metrics"][weight_key]
    if weight > max_weight:
        return (f"its weight {weight:g} ({weight_key}) exceeds secure_aggregation.max_weight "
                f"{max_weight:g}: its scaled update would be clipped")
    return None


def payload_bytes(msg: Message) -> int:
    """Bytes of a message's records as Flower counts them (array data, metric and config
    values), less a simulation's own keys (SIMULATION_ONLY): what a deployment sends."""
    return sum(_record_bytes(record) for record in msg.content.values())


def _record_bytes(record: ArrayRecord | MetricRecord | ConfigRecord) -> int:
    # Flower's count fails on an empty list, which SecAgg+'s stages send (no dead node).
    if isinstance(record, ConfigRecord):
        counted = {k: v for k, v in record.items() if v != [] and k not in SIMULATION_ONLY}
        if len(counted) < len(record):
            record = ConfigRecord(counted)
    return record.count_bytes()
