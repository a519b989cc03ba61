"""A server that distrusts replies (issue #24, item 3): a train or evaluate reply whose
arrays differ from what was sent, hold non-finite values, or that is far larger than the
model, is refused with the node named, and the round goes on without it where min_clients
allows; below it, the run stops naming every refused node. Also in the packed wire format
of a deployed run."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_sim.arrays import pack
from fl_sim.errors import FlSimError
from fl_sim.server.messaging import send_and_check
from fl_sim.server.rows import TRAIN_METRICS
from fl_sim.strategies.scaffold import CONTROL, DELTA

MODEL = {"conv.weight": np.ones((4, 3, 3, 3), np.float32), "bn.num_batches_tracked": np.array(3)}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def metrics(node: int, **changes) -> MetricRecord:
    values = {"partition-id": node, "num-examples": 10, **dict.fromkeys(TRAIN_METRICS, 0.5),
              **changes}
    return MetricRecord({k: v for k, v in values.items() if v is not None})


def honest(node: int) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in MODEL.items()}),
                       "metrics": metrics(node)})


def with_array(node: int, name: str, value) -> RecordDict:
    content = honest(node)
    arrays = {k: Array(v) for k, v in MODEL.items() if k != name}
    if value is not None:
        arrays[name] = Array(value)
    content["arrays"] = ArrayRecord(arrays)
    return content


MALFORMED = {
    "unexpected key": (lambda n: with_array(n, "extra.weight", np.ones(2, np.float32)),
                       "its arrays are not the model's: 1 unexpected (e.g. ['extra.weight'])"),
    "missing key": (lambda n: with_array(n, "conv.weight", None),
                    "1 missing (e.g. ['conv.weight'])"),
    "wrong shape": (lambda n: with_array(n, "conv.weight", np.ones((4, 3, 3), np.float32)),
                    "its array conv.weight is float32 [4, 3, 3], sent as float32 [4, 3, 3, 3]"),
    "wrong dtype": (lambda n: with_array(n, "bn.num_batches_tracked", np.array(3.0)),
                    "its array bn.num_batches_tracked is float64 [], sent as int64 []"),
    "NaN": (lambda n: with_array(n, "conv.weight", np.full((4, 3, 3, 3), np.nan, np.float32)),
            "its array conv.weight holds non-finite values"),
    "oversized": (lambda n: RecordDict({**honest(n), "junk": ArrayRecord(
        {"x": Array(np.zeros(1 << 19))})}), "more than the"),
    "no metrics": (lambda n: RecordDict({"arrays": honest(n)["arrays"]}),
                   "its reply has no metrics record"),
    "NaN weight": (lambda n: RecordDict({"arrays": honest(n)["arrays"],
                                         "metrics": metrics(n, **{"num-examples": float("nan")})}),
                   "its metrics ['num-examples'] are not finite"),
    "no arrays": (lambda n: RecordDict({"metrics": metrics(n)}), "its reply has no arrays"),
}


class Grid:
    """Replies to node n with `reply(n)`: honest, or malformed for the nodes in `bad`."""

    def __init__(self, bad: dict[int, object], packed: bool = False):
        self.bad, self.packed = bad, packed

    def get_node_ids(self):
        return [0, 1, 2]

    def push_messages(self, messages):
        self.replies = {}
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{i}"
            node = m.metadata.dst_node_id
            content = self.bad.get(node, honest)(node)
            if self.packed and isinstance(content.get("arrays"), ArrayRecord):
                content["arrays"] = pack(content["arrays"])
            self.replies[f"m{i}"] = Message(content, reply_to=m)
        return list(self.replies)

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def train_messages(arrays=None):
    arrays = arrays or ArrayRecord({k: Array(v) for k, v in MODEL.items()})
    return [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"a": 1})}),
                    dst_node_id=n, message_type="train") for n in (0, 1, 2)]


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_malformed_reply_is_refused_naming_the_node_and_the_round_goes_on(kind, caplog):
    reply, why = MALFORMED[kind]
    replies = send_and_check(Grid({1: reply}), train_messages(), "train", 2, timeout=5,
                             min_replies=2, client_of_node={1: 7})
    assert [m.content["metrics"]["partition-id"] for m in replies] == [0, 2]
    assert "round 2 (train): continuing without a client. client 7 (node 1): refused: " \
           in caplog.text
    assert why in caplog.text


def test_below_the_minimum_the_run_stops_naming_every_refused_node():
    with pytest.raises(FlSimError) as info:
        send_and_check(Grid({0: MALFORMED["NaN"][0], 2: MALFORMED["wrong shape"][0]}),
                       train_messages(), "train", 3, timeout=5, min_replies=2)
    text = str(info.value)
    assert "round 3 (train): 1 of 3 clients replied, 2 needed (min_clients)" in text
    assert "node 0: refused: its array conv.weight holds non-finite values" in text
    assert "node 2: refused: its array conv.weight is float32 [4, 3, 3]" in text


def test_the_packed_wire_format_is_vetted_after_unpacking(caplog):
    """A deployed run's replies come packed: they are checked as the arrays they unpack to,
    and a packing that does not unpack is refused, not a crash."""
    def broken_packing(node):
        content = honest(node)
        packed = pack(content["arrays"])
        content["arrays"] = ArrayRecord({k: packed[k] for k in list(packed)[:1]} | {
            k: Array(np.frombuffer(b"not json", np.uint8)) for k in list(packed)[1:]})
        return content

    bad = {1: MALFORMED["wrong shape"][0], 2: broken_packing}
    replies = send_and_check(Grid(bad, packed=True), train_messages(pack(
        ArrayRecord({k: Array(v) for k, v in MODEL.items()}))), "train", 1, timeout=5,
        min_replies=1)
    assert [m.content["metrics"]["partition-id"] for m in replies] == [0]
    assert "node 1: refused: its array conv.weight is float32 [4, 3, 3]" in caplog.text
    assert "node 2: refused: its packed arrays do not unpack" in caplog.text


def test_scaffold_replies_answer_the_control_variates_with_their_deltas(caplog):
    sent = ArrayRecord({**{k: Array(v) for k, v in MODEL.items()},
                        CONTROL + "conv.weight": Array(MODEL["conv.weight"])})

    def scaffold_reply(node):
        content = honest(node)
        content["arrays"] = ArrayRecord({**{k: Array(v) for k, v in MODEL.items()},
                                         DELTA + "conv.weight": Array(MODEL["conv.weight"])})
        return content

    replies = send_and_check(Grid({0: scaffold_reply, 1: scaffold_reply}),
                             train_messages(sent), "train", 1, timeout=5, min_replies=2)
    assert [m.content["metrics"]["partition-id"] for m in replies] == [0, 1]
    assert "node 2: refused: its arrays are not the model's" in caplog.text  # no Δc


def test_a_diverged_client_is_not_refused_its_run_fails_as_diverged():
    """Non-finite weights with a non-finite train loss: the client diverged. Its reply
    reaches the server loop, whose divergence check stops the run (RunFailed), as before."""
    def diverged(node):
        content = MALFORMED["NaN"][0](node)
        content["metrics"] = metrics(node, train_loss=float("nan"))
        return content

    replies = send_and_check(Grid({1: diverged}), train_messages(), "train", 1, timeout=5,
                             min_replies=3)
    assert len(replies) == 3
