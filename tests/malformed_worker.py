"""A modified SuperNode's worker, for tests/test_deploy.py: fl-sim's warm worker whose
ClientApp corrupts every train reply as its first argument says (keys, shape, nan,
oversized), then serves as the real worker does.

    python tests/malformed_worker.py KIND --runtime-api HOST:PORT ...
"""

import sys
from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord

import fl_sim.client.client_app as client_app
from fl_sim.arrays import array_view, is_float, is_packed, pack, unpack
from fl_sim.deploy import worker

KIND = sys.argv.pop(1)
HONEST = client_app.app


def corrupt(arrays: ArrayRecord) -> ArrayRecord:
    items = OrderedDict(unpack(arrays).items())
    name = next(k for k, v in items.items() if is_float(v) and v.shape)
    value = array_view(items[name])
    if KIND == "keys":
        items[name + ".renamed"] = items.pop(name)
    elif KIND == "shape":
        items[name] = Array(np.zeros((*value.shape, 2), value.dtype))
    elif KIND == "nan":
        items[name] = Array(np.full_like(value, np.nan))
    elif KIND == "oversized":  # another model's worth of bytes, three times over
        size = sum(len(v.data) for v in items.values())
        items["padding"] = Array(np.zeros(3 * size, np.uint8))
    return pack(ArrayRecord(items)) if is_packed(arrays) else ArrayRecord(items)


def modified(message, context):
    reply = HONEST(message=message, context=context)
    if message.metadata.message_type == "train" and reply.has_content():
        reply.content["arrays"] = corrupt(reply.content["arrays"])
    return reply


client_app.app = modified  # the worker imports it when it starts serving
sys.exit(worker.main())
