"""The server loop's failure policy, with a fake grid standing in for Flower's."""

import copy

import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_sim.config import RunConfig
from fl_sim.errors import FlSimError
from fl_sim.server.checkpoints import changed_settings, results_config
from fl_sim.server.messaging import send_and_check, wait_for_clients
from fl_sim.server.rows import TRAIN_METRICS


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class FakeGrid:
    """Replies to node n with partition id n, except the nodes in `fail` (error replies)
    and `silent` (no reply)."""

    def __init__(self, nodes=(0, 1, 2), fail=(), silent=()):
        self.nodes, self.fail, self.silent = list(nodes), set(fail), set(silent)

    def get_node_ids(self):
        return self.nodes

    def push_messages(self, messages):
        self.replies = {}
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{i}"  # as a real grid does when it pushes
            node = m.metadata.dst_node_id
            if node in self.fail:
                self.replies[f"m{i}"] = Message(Error(code=1, reason="RuntimeError: broken image"),
                                                reply_to=m)
            elif node not in self.silent:
                self.replies[f"m{i}"] = Message(RecordDict({"metrics": MetricRecord(
                    {"partition-id": node, "num-examples": 10, **dict.fromkeys(TRAIN_METRICS, 0)})}),
                    reply_to=m)
        return [f"m{i}" for i in range(len(messages))]

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def messages(nodes=(2, 0, 1)):
    return [Message(RecordDict({"config": ConfigRecord({"a": 1})}), dst_node_id=n, message_type="train")
            for n in nodes]


def test_all_replies_come_back_in_partition_order():
    replies = send_and_check(FakeGrid(), messages(), "train", 1, timeout=5, min_replies=3)
    assert [m.content["metrics"]["partition-id"] for m in replies] == [0, 1, 2]


def test_a_failed_client_is_dropped_while_enough_remain(caplog):
    replies = send_and_check(FakeGrid(fail={1}), messages(), "train", 4, timeout=5, min_replies=2)
    assert [m.content["metrics"]["partition-id"] for m in replies] == [0, 2]
    assert "round 4 (train): continuing without a client" in caplog.text
    assert "node 1: RuntimeError: broken image" in caplog.text


def test_below_the_minimum_the_run_stops_naming_the_culprits():
    with pytest.raises(FlSimError) as info:
        send_and_check(FakeGrid(fail={1}, silent={2}), messages(), "evaluate", 3, timeout=7,
                       min_replies=3, client_of_node={1: 4})
    text = str(info.value)
    assert "round 3 (evaluate): 1 of 3 clients replied, 3 needed (min_clients)" in text
    assert "client 4 (node 1): RuntimeError: broken image" in text
    assert "1 gave no reply within 7 s" in text
    assert "finished before are kept" in text


def test_a_server_short_of_clients_says_what_it_waits_for(caplog, monkeypatch):
    """Issue #25, item 5: a SuperLink short of SuperNodes waited in silence."""
    monkeypatch.setattr("fl_sim.server.messaging.WAITING_NOTE_S", 0.5)
    with pytest.raises(FlSimError):
        wait_for_clients(FakeGrid(nodes=(0, 1)), 3, timeout=2, server_round=1)
    assert "round 1: waiting for 3 clients, 2 connected" in caplog.text
    assert "start more (fl-sim deploy supernode)" in caplog.text
    assert caplog.text.count("waiting for 3 clients") == 1  # said once, not every second


def test_waiting_for_clients_is_bounded():
    wait_for_clients(FakeGrid(nodes=(0, 1, 2)), 3, timeout=1, server_round=1)
    with pytest.raises(FlSimError, match="only 2 clients connected, 3 needed"):
        wait_for_clients(FakeGrid(nodes=(0, 1)), 3, timeout=0.5, server_round=2)


def test_a_run_resumes_under_other_resources_but_not_another_configuration():
    saved = {"study": "s", "run": "r", "data": {"dataset": "synthetic"},
             "run_config": {"rounds": 5, "optimizer": {"name": "sgd", "lr": 0.01},
                            "resources": {"num_cpus": 1.0, "num_gpus": 0.0}}}
    now = copy.deepcopy(saved)
    now["run_config"]["resources"] = {"num_cpus": "auto", "num_gpus": 0.5}
    assert results_config(now) == results_config(saved)
    now["run_config"]["optimizer"]["lr"] = 0.1
    assert results_config(now) != results_config(saved)


def test_the_changed_settings_are_named_and_the_cache_folder_is_not_one():
    saved = {"study": "s", "run": "r", "data": {"dataset": "synthetic", "cache_dir": "/a"},
             "run_config": {"rounds": 5, "optimizer": {"name": "sgd", "lr": 0.01}}}
    now = copy.deepcopy(saved)
    now["data"]["cache_dir"] = "/b"
    assert changed_settings(saved, now) == []
    now["data"]["max_images"] = 20
    now["run_config"]["rounds"] = 6
    assert changed_settings(saved, now) == ["data.max_images", "run_config.rounds"]


def test_a_run_saved_before_a_key_was_added_resumes_under_its_default():
    saved = {"study": "s", "run": "r", "data": {"dataset": "synthetic"},
             "run_config": {"rounds": 5, "augment": True}}  # no finetune, no synthesis yet
    now = {**saved,
           "run_config": RunConfig.model_validate(saved["run_config"]).model_dump(mode="json")}
    assert "finetune" in now["run_config"] and isinstance(now["run_config"]["augment"], dict)
    assert results_config(now) == results_config(saved)
    now["run_config"]["finetune"] = {"trainable": "head"}
    assert results_config(now) != results_config(saved)
