"""A round with a paper-sized model over Flower's gRPC Fleet API, on loopback.

    python benchmarks/bench_grpc_large_model.py [--model vit_large_patch16_224] [--nodes 1]
        [--insecure] [--rounds 2]

Starts a SuperLink (TLS + node authentication unless --insecure) and SuperNodes with
`fl_sim.deploy`, then runs this file as a Flower app: the ServerApp sends the model's
weights (random, with the timm model's exact names and shapes) to every node, each ClientApp
adds 1 to every weight and sends them back, and the ServerApp checks what came back. A
round with a tiny payload measures the fixed cost of a message (a `flwr-clientapp` process
start, polling), so the difference is what the weights' transfer costs. Peak memory (RSS)
of the SuperLink's and the SuperNodes' process trees is sampled every 0.2 s.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


def _weights(model: str) -> ArrayRecord:
    """Random float32 weights named and shaped like timm's `model` (built on the meta device)."""
    import timm
    import torch

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in timm.create_model(model).state_dict().items()}
    rng = np.random.default_rng(0)
    return ArrayRecord({k: Array(rng.standard_normal(s, dtype=np.float32))
                        for k, s in shapes.items()})


def _round(grid: Grid, nodes: list[int], arrays: ArrayRecord,
           timeout: float) -> tuple[float, float, list[Message]]:
    """(seconds to push to the SuperLink, seconds until every reply is back, replies).

    Grid.send_and_receive, but polling every 0.2 s instead of 3 s for a sharper time."""
    messages = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({})}),
                        dst_node_id=n, message_type="train") for n in nodes]
    start = time.perf_counter()
    pending = set(grid.push_messages(messages))
    pushed = time.perf_counter() - start
    replies: list[Message] = []
    while pending and time.perf_counter() - start < timeout:
        time.sleep(0.2)
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
    errors = [m.error.reason for m in replies if m.has_error()]
    if pending or errors:
        raise RuntimeError(f"{len(replies)} of {len(nodes)} replies; errors: {errors}")
    return pushed, time.perf_counter() - start, replies


@server.main()
def server_main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    nodes: list[int] = []
    while len(nodes) < int(cfg["nodes"]):
        nodes = sorted(grid.get_node_ids())
        time.sleep(1)
    timeout = float(cfg["timeout"])
    arrays = _weights(str(cfg["model"]))
    tiny = ArrayRecord({"w": Array(np.zeros(1, dtype=np.float32))})
    result: dict[str, Any] = {
        "model": cfg["model"], "nodes": len(nodes),
        "parameters": int(sum(np.prod(a.shape) for a in arrays.values())),
        "payload_bytes": arrays.count_bytes(), "tiny_round_s": [], "large_push_s": [],
        "large_round_s": []}
    for _ in range(int(cfg["rounds"])):
        result["tiny_round_s"].append(_round(grid, nodes, tiny, timeout)[1])
        pushed, seconds, replies = _round(grid, nodes, arrays, timeout)
        result["large_push_s"].append(pushed)
        result["large_round_s"].append(seconds)
        for reply in replies:  # every weight made the trip out and back intact
            back = reply.content.array_records["arrays"]
            assert list(back.keys()) == list(arrays.keys())
            for k, a in arrays.items():
                np.testing.assert_array_equal(back[k].numpy(), a.numpy() + 1)
        result["client_seconds"] = [r.content.metric_records["metrics"]["seconds"]
                                    for r in replies]
        del replies, back  # before the next round brings its own copies
    Path(str(cfg["out"])).write_text(json.dumps(result))


@client.train()
def client_train(msg: Message, context: Context) -> Message:
    start = time.perf_counter()
    received = msg.content.array_records["arrays"]
    back = ArrayRecord({k: Array(a.numpy() + 1) for k, a in received.items()})
    metrics = MetricRecord({"seconds": time.perf_counter() - start})
    return Message(RecordDict({"arrays": back, "metrics": metrics}), reply_to=msg)


# ----------------------------------------------------------------------------- orchestration

PYPROJECT = """[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "bench-grpc"
version = "0.1.0"
dependencies = []

[tool.flwr.app]
publisher = "fl-sim"

[tool.flwr.app.components]
serverapp = "bench_grpc_large_model:server"
clientapp = "bench_grpc_large_model:client"

[tool.flwr.app.config]
model = "vit_large_patch16_224"
nodes = 1
rounds = 2
timeout = 1800.0
out = ""
"""


class MemorySampler:
    """Peak summed RSS of process trees, by role, sampled in a thread."""

    def __init__(self, roles: dict[str, int]) -> None:
        import threading

        self.roles, self.peak = roles, {name: 0 for name in roles}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except (FileNotFoundError, ProcessLookupError):
            pass
        return 0

    def _run(self) -> None:
        from fl_sim.deploy.processes import descendants

        while not self._stop.wait(0.2):
            for name, pid in self.roles.items():
                total = sum(self._rss(p) for p in [pid, *descendants(pid)])
                self.peak[name] = max(self.peak[name], total)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


def main() -> None:
    import argparse
    import os
    import shutil
    import socket
    import subprocess
    import tempfile

    import tomli_w

    from fl_sim.deploy import certs, cli, processes

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_large_patch16_224", help="a timm model name")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--insecure", action="store_true", help="no TLS, no node authentication")
    args = ap.parse_args()

    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    work = Path(tempfile.mkdtemp(prefix="bench-grpc-"))
    os.environ["FLWR_HOME"] = str(work / "flwr-home")
    app = work / "app"
    app.mkdir()
    shutil.copy(__file__, app / "bench_grpc_large_model.py")
    (app / "pyproject.toml").write_text(PYPROJECT)
    fleet, control = f"127.0.0.1:{port()}", port()
    deploy = ["deploy", "superlink", "--fleet-address", fleet, "--port", str(control)]
    try:
        if args.insecure:
            cli.main(deploy + ["--insecure"])
            security: list[list[str]] = [["--insecure"]] * args.nodes
        else:
            ca = certs.make_dev_certs(work / "certs").ca_cert
            cli.main(deploy + ["--certs", str(work / "certs")])
            security = []
            for i in range(args.nodes):
                private, public = certs.make_node_key(work / f"node{i}.key")
                cli.main(["deploy", "register", str(public)])
                security.append(["--ca", str(ca), "--key", str(private)])
        for i in range(args.nodes):
            if cli.main(["deploy", "supernode", "--superlink", fleet, "--partition-id", str(i),
                         "--port", str(port()), *security[i]]) != 0:
                raise SystemExit("a SuperNode did not start")
        roles = {name: int((processes.state_dir() / f"{name}.pid").read_text())
                 for name in ["superlink", *(f"supernode-{i}" for i in range(args.nodes))]}
        sampler = MemorySampler(roles)
        out = work / "result.json"
        overrides = work / "run-config.toml"
        overrides.write_text(tomli_w.dumps({"model": args.model, "nodes": args.nodes,
                                            "rounds": args.rounds, "out": str(out)}))
        start = time.perf_counter()
        subprocess.run([processes.executable("flwr"), "run", str(app), processes.CONNECTION,
                        "--run-config", str(overrides), "--stream"],
                       env=processes.flower_env(), check=True)
        wall = time.perf_counter() - start
        peak = sampler.stop()
        if not out.exists():
            raise SystemExit(f"the run wrote no result; logs in {processes.state_dir()}")
        result = json.loads(out.read_text())
        result.update(tls=not args.insecure, run_wall_s=wall,
                      peak_rss_gb={k: round(v / 1e9, 2) for k, v in peak.items()})
        print(json.dumps(result, indent=1))
    finally:
        processes.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
