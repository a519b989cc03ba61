"""Flower ArrayRecords -> model weights and their weighted mean, without needless copies.

Flower stores each array as `.npy` bytes. Its `Array.numpy()` parses them into a new array
(a full copy per message), and its weighted mean copies every reply once more and
allocates a temporary per term. Here the bytes are read in place and the mean is one fused
multiply-add per reply, on torch's threads. (Packing, `ArrayRecord(state_dict)`, is left to
Flower: a one-copy variant measured no faster, both being bound by allocating the bytes.)
"""

from __future__ import annotations

import io
import json
import warnings
from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.serverapp.strategy import fedavg


def is_float(array: Array | np.ndarray) -> bool:
    """Whether an Array (or ndarray) holds floating-point numbers, not integer counters."""
    return np.issubdtype(np.dtype(array.dtype), np.floating)


def npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """The (shape, Fortran order, dtype, data offset) of `.npy` bytes, from their header."""
    stream = io.BytesIO(data[:1024])  # the .npy header is far shorter
    fmt = np.lib.format
    read_header = fmt.read_array_header_1_0 if fmt.read_magic(stream) == (1, 0) else fmt.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    return shape, fortran_order, dtype, stream.tell()


def floats_only(arrays: ArrayRecord) -> ArrayRecord:
    """The record's floating-point arrays (no integer counters)."""
    return ArrayRecord(OrderedDict((k, v) for k, v in arrays.items() if is_float(v)))


def array_view(array: Array) -> np.ndarray:
    """A read-only ndarray over the Array's bytes (no copy)."""
    shape, fortran_order, dtype, offset = npy_header(array.data)
    view = np.frombuffer(array.data, dtype=dtype, count=int(np.prod(shape)), offset=offset)
    return view.reshape(shape, order="F" if fortran_order else "C")


# to_state_dict's views are read-only on purpose; torch's warning about it says nothing new.
# Set once: warnings.catch_warnings() per call would swap the global filters, which is not
# thread-safe (the server's figure thread runs beside it).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def to_state_dict(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """Tensors viewing the record's bytes, for `load_state_dict` or `torch.save` (both copy).
    They must not be written to: the memory belongs to immutable bytes. A packed record is
    unpacked first."""
    return OrderedDict((k, torch.from_numpy(array_view(v))) for k, v in unpack(record).items())


# ----------------------------------------------------------------------------- wire format

PACKED, LAYOUT = "fl-sim.packed", "fl-sim.layout"  # the two Arrays of a packed record


def pack(record: ArrayRecord) -> ArrayRecord:
    """The record as two Arrays: every Array's bytes back to back, and their layout (JSON).

    Flower moves each Array of a message as its own object, one request per object per hop
    (ServerApp -> SuperLink -> SuperNode -> ClientApp and back): ~200 requests for a model of
    100 tensors, seconds per message on loopback. Packed, a model is one object (Flower still
    cuts it into 5 MB chunks). Lossless: `unpack` gives back the same Arrays, byte for byte."""
    layout, offset = [], 0
    for name, array in record.items():
        layout.append([name, array.dtype, list(array.shape), array.stype, offset, len(array.data)])
        offset += len(array.data)
    blob = b"".join(array.data for array in record.values())
    text = json.dumps(layout).encode()
    return ArrayRecord({PACKED: Array(dtype="uint8", shape=(len(blob),), stype=PACKED, data=blob),
                        LAYOUT: Array(dtype="uint8", shape=(len(text),), stype=LAYOUT, data=text)})


def is_packed(record: ArrayRecord) -> bool:
    return PACKED in record and record[PACKED].stype == PACKED


def unpack(record: ArrayRecord) -> ArrayRecord:
    """The record `pack` was given (views into the packed bytes); any other record as it is."""
    if not is_packed(record):
        return record
    blob = memoryview(record[PACKED].data)
    return ArrayRecord({name: Array(dtype=dtype, shape=tuple(shape), stype=stype,
                                    data=bytes(blob[offset:offset + size]))
                        for name, dtype, shape, stype, offset, size
                        in json.loads(bytes(record[LAYOUT].data))})


def layout(record: ArrayRecord) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each array's (dtype, shape) by name, of a packed record read from its layout alone."""
    if is_packed(record):
        return {name: (dtype, tuple(shape))
                for name, dtype, shape, *_ in json.loads(bytes(record[LAYOUT].data))}
    return {name: (array.dtype, tuple(array.shape)) for name, array in record.items()}


# ----------------------------------------------------------------------------- aggregation


def weighted_mean(records: list[RecordDict], weighting_metric_name: str) -> ArrayRecord:
    """Flower's `aggregate_arrayrecords`, equal to float rounding: the mean of every reply's
    arrays, weighted by `weighting_metric_name` of its MetricRecord. Integer arrays (e.g.
    BatchNorm's `num_batches_tracked`) are averaged in float64 and rounded back to their own
    dtype, where Flower's turn into float64: every array keeps its dtype on the wire."""
    weights = [float(next(iter(r.metric_records.values()))[weighting_metric_name]) for r in records]
    total = sum(weights)
    states = [to_state_dict(next(iter(r.array_records.values()))) for r in records]
    mean = OrderedDict()
    for key, first in states[0].items():
        dtype = first.dtype if first.is_floating_point() else torch.float64
        acc = torch.mul(first.to(dtype), weights[0] / total)
        for state, w in zip(states[1:], weights[1:], strict=True):
            acc.add_(state[key], alpha=w / total)
        mean[key] = acc if acc.dtype == first.dtype else acc.round_().to(first.dtype)
    return ArrayRecord(mean)


def use_weighted_mean() -> None:
    """Make FedAvg, and every strategy built on it (FedProx, FedAdam, FedYogi, FedAdagrad,
    FedAvgM), average with `weighted_mean`: they call the name from fedavg's module."""
    if not hasattr(fedavg, "aggregate_arrayrecords"):
        raise RuntimeError("flwr.serverapp.strategy.fedavg no longer has aggregate_arrayrecords")
    fedavg.aggregate_arrayrecords = weighted_mean
