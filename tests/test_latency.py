"""What a round and a run cost beyond their work (issue #16): the packed wire format, the
short polls of deployment, and one Ray for a whole simulated study. The warm worker runs in
tests/test_deploy.py's federations."""

import inspect
import json
import re
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity

from fl_sim import arrays
from fl_sim.client.client_app import train
from fl_sim.config import DataConfig, RunConfig, expand_grid, load_study
from fl_sim.data_partition import prepare_data
from fl_sim.deploy import processes, supernode
from fl_sim.server import messaging
from fl_sim.server.failures import Interrupted, stop_requested
from fl_sim.task import build_model

# ----------------------------------------------------------------------------- wire format


@pytest.fixture
def task(monkeypatch):
    """Flower sets the task's identity in a ClientApp process; new messages need it."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def test_a_packed_model_is_one_object_and_unpacks_byte_for_byte():
    model = build_model(RunConfig.model_validate({"model": {"name": "test_convnext"}}),
                        [str(i) for i in range(7)], 32)[0]
    record = ArrayRecord(model.state_dict())
    packed = arrays.pack(record)
    objects = lambda r: len(get_all_nested_objects(r))  # noqa: E731  what Flower moves one by one
    assert objects(record) >= 90  # one per tensor (identical tensors share one)
    assert objects(packed) <= 5  # the record, its two Arrays and their chunks
    back = arrays.unpack(packed)
    assert list(back.keys()) == list(record.keys())
    fields = lambda a: (a.data, a.dtype, a.shape, a.stype)  # noqa: E731
    assert all(fields(back[k]) == fields(record[k]) for k in record)
    assert arrays.unpack(record) is record  # a plain record passes through
    state = arrays.to_state_dict(packed)  # clients read either
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_client_replies_packed_to_a_packed_message(tmp_path, task):
    data = DataConfig.model_validate({"dataset": "synthetic", "image_size": 32,
                                      "synthetic": {"num_images": 210}, "cache_dir": str(tmp_path),
                                      "partition": {"num_clients": 3}})
    run = RunConfig.model_validate({"model": {"name": "test_convnext"},
                                    "optimizer": {"name": "adamw"}})
    model, _ = build_model(run, prepare_data(data, progress=False).class_names, 32)
    context = Context(run_id=1, node_id=0, node_config={"partition-id": 1}, state=RecordDict(),
                      run_config={})
    replies = []
    for wire in (lambda r: r, arrays.pack):
        config = ConfigRecord({"data-config": data.model_dump_json(),
                               "run-config": run.model_dump_json(), "server-round": 1})
        weights = wire(ArrayRecord(model.state_dict()))
        msg = Message(RecordDict({"arrays": weights, "config": config}), dst_node_id=0,
                      message_type="train")
        replies.append(train(msg, context).content["arrays"])
    plain, packed = replies
    assert not arrays.is_packed(plain) and arrays.is_packed(packed)
    assert all(arrays.unpack(packed)[k].data == plain[k].data for k in plain)  # same training


# ----------------------------------------------------------------------------- polls


def test_supernode_waits_are_capped_in_the_flower_code_they_rely_on(monkeypatch):
    from flwr.supernode import start_client_internal

    # Pinned: Flower 1.39's SuperNode loop uses `time` for nothing but these sleeps, the idle
    # one is a fixed 3 s, and it pulls a message's objects with `pull_objects`' default
    # backoff (1 s, doubling). If a Flower upgrade changes these, revisit the caps.
    source = inspect.getsource(start_client_internal)
    assert set(re.findall(r"\btime\.(\w+)", source)) == {"sleep"}
    assert "time.sleep(3)" in source
    assert "= pull_objects(" in source and "backoff" not in source  # Flower's default backoff
    for name in ("time", "pull_objects"):
        monkeypatch.setattr(start_client_internal, name, getattr(start_client_internal, name))
    supernode.cap_sleeps(0.05)
    start = time.perf_counter()
    start_client_internal.time.sleep(3)
    assert time.perf_counter() - start < 0.5
    assert time.sleep is not start_client_internal.time.sleep  # the process's own is untouched
    assert start_client_internal.pull_objects.keywords == {
        "initial_backoff": 0.025, "backoff_cap": 0.05, "max_tries_per_object": None}


def test_a_supernode_leaves_its_tasks_to_the_warm_worker_unless_asked_not_to(tmp_path):
    cmd = processes.supernode_command("h:9092", 9094, tmp_path / "n.toml", None, None, 0.2)
    assert cmd[:5] == [sys.executable, "-m", "fl_sim.deploy.supernode", "--poll-interval", "0.2"]
    assert cmd[5:] == ["--superlink", "h:9092", "--port", "9094", "--node-config",
                       str(tmp_path / "n.toml"), "--isolation", "process", "--insecure"]
    flowers = processes.supernode_command("h:9092", 9094, tmp_path / "n.toml", None, None, 0.2,
                                          worker=False)
    assert "--isolation" not in flowers  # Flower's SuperExec: a process per message
    assert float(processes.flower_env()["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"]) <= 0.1
    assert processes.worker_command(9094, 123, threads=1, poll_interval=0.1) == [
        sys.executable, "-m", "fl_sim.deploy.worker", "--runtime-api", "127.0.0.1:9094",
        "--supernode-pid", "123", "--poll-interval", "0.1", "--threads", "1"]


class SlowGrid:
    """Replies to each message after `delay` seconds; counts the polls."""

    def __init__(self, delay: float) -> None:
        self.delay, self.polls, self.pushed = delay, 0, {}

    def push_messages(self, messages):
        now = time.monotonic()
        for i, _ in enumerate(messages):
            self.pushed[f"m{i}"] = now
        return list(self.pushed)

    def pull_messages(self, ids):
        self.polls += 1
        ready = [i for i in ids if time.monotonic() - self.pushed[i] >= self.delay]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i), content={},
                                has_error=lambda: False) for i in ready]


def messages(n: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(content={}) for _ in range(n)]


def test_exchange_returns_as_soon_as_the_replies_are_there():
    grid = SlowGrid(delay=0.3)
    start = time.perf_counter()
    assert len(messaging.exchange(grid, messages(2), timeout=10)) == 2
    assert time.perf_counter() - start < 0.6  # Flower's deployed grid would wait 3 s


def test_exchange_gives_up_at_the_timeout_with_the_replies_it_has():
    start = time.perf_counter()
    assert messaging.exchange(SlowGrid(delay=60), messages(1), timeout=0.3) == []
    assert 0.3 <= time.perf_counter() - start < 1.5


def test_exchange_ends_when_a_stop_is_requested():
    threading.Timer(0.2, stop_requested.set).start()
    try:
        with pytest.raises(Interrupted):
            messaging.exchange(SlowGrid(delay=60), messages(1), timeout=60)
    finally:
        stop_requested.clear()


# ----------------------------------------------------------------------------- one Ray per study


@pytest.mark.slow
def test_a_four_run_study_starts_ray_once(tmp_path, monkeypatch):
    import ray
    from flwr import simulation

    from fl_sim.bench_latency import quickstart_study
    from fl_sim.simulation import run_study

    starts = {"ray": 0, "engine": 0}

    def counted(fn, key):
        def wrapper(*args, **kwargs):
            starts[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(ray, "init", counted(ray.init, "ray"))
    monkeypatch.setattr(simulation, "run_simulation", counted(simulation.run_simulation, "engine"))
    study = load_study(quickstart_study(tmp_path / "s.yaml", tmp_path / "out", rounds=1, seeds=4))
    dirs = run_study(study, expand_grid(study))

    assert len(dirs) == 4 and starts == {"ray": 1, "engine": 1}
    for d in dirs:
        summary = json.loads((d / "summary.json").read_text())
        assert summary["complete"] and summary["rounds_done"] == 1
        assert yaml.safe_load((d / "config.yaml").read_text())["run"] == d.name
