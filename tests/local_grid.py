"""A federation in this process: `LocalGrid` hands each message (a copy, as a real transport
does) to fl-sim's real ClientApp, its mods included, with a Context per node that persists,
as a SuperNode's does. FederatedRun.execute(LocalGrid(n)) runs a whole run without Ray."""

import copy
import itertools

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from fl_sim.client.client_app import app


class LocalGrid:
    """Nodes 10, 11, ... holding partitions 0, 1, ... run fl-sim's ClientApp on copies of the
    messages. `drop`: (node, stage) pairs at which that node fails instead of replying.
    `sent`: every message pushed, as a node got it; `seen`: every message the server pulled,
    as it got it."""

    def __init__(self, clients: int, drop: tuple[tuple[int, str], ...] = ()) -> None:
        self.contexts = {10 + c: Context(run_id=1, node_id=10 + c, node_config={"partition-id": c},
                                         state=RecordDict(), run_config={})
                         for c in range(clients)}
        self.drop, self.sent, self.seen, self.replies = set(drop), [], [], {}
        self.ids = itertools.count()

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            ids.append(f"m{next(self.ids)}")
            m.metadata.__dict__["_message_id"] = ids[-1]
            inbound = copy.deepcopy(m)
            self.sent.append(copy.deepcopy(m))
            node = m.metadata.dst_node_id
            stage = (m.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
                     if RECORD_KEY_CONFIGS in m.content.config_records else None)
            if (node, stage) in self.drop:
                self.replies[ids[-1]] = Message(Error(code=1, reason="node lost"), reply_to=m)
                continue
            try:
                self.replies[ids[-1]] = app(inbound, self.contexts[node])
            except Exception as err:  # as Flower turns a ClientApp's exception into a reply
                self.replies[ids[-1]] = Message(Error(code=1, reason=str(err)), reply_to=m)
        return ids

    def pull_messages(self, message_ids):
        pulled = [self.replies.pop(i) for i in list(message_ids) if i in self.replies]
        self.seen += pulled  # as they came: the server gets copies
        return [copy.deepcopy(m) for m in pulled]
