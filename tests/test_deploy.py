"""`fl-sim deploy`: a real flower-superlink and flower-supernodes on 127.0.0.1 over gRPC.

The slow tests start real processes (a SuperNode and its warm worker per client, or Flower's
`flwr-clientapp` per message with `--no-worker`; a dead node is noticed after Flower's
2 x 30 s heartbeat), on free ports, with a private FLWR_HOME; the `federation` fixture stops
every process they start, also on failure.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fl_sim.cli import main as cli_main
from fl_sim.deploy import certs, cli, processes
from fl_sim.errors import FlSimError

SPLITS = ("train", "val", "test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_study(path: Path, out: Path, rounds: int, min_clients: int | None = None,
                round_timeout_s: float = 300, clients: int = 3, **defaults) -> Path:
    """Synthetic 32 px images, a tiny ConvNeXt, 3 clients: seconds of compute per message.
    `defaults`: more run settings."""
    path.write_text(yaml.safe_dump({
        "study": "deploy", "out": str(out),
        "data": {"dataset": "synthetic", "image_size": 32, "synthetic": {"num_images": 210},
                 "partition": {"num_clients": clients}},
        "defaults": {"rounds": rounds, "batch_size": 32, "model": {"name": "test_convnext"},
                     "min_clients": min_clients, "round_timeout_s": round_timeout_s, **defaults},
    }))
    return path


def deploy(*args: str | int | Path) -> int:
    return cli.main(["deploy", *map(str, args)])


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def client_rows(run_dir: Path) -> set[tuple[int, int, str]]:
    return {(r["round"], r["client"], r["split"]) for r in rows(run_dir) if r["scope"] == "client"}


def run_log(run_id: int) -> str:
    """The run's log as the SuperLink keeps it (what `flwr log` shows)."""
    import subprocess

    return subprocess.run([processes.executable("flwr"), "log", str(run_id), processes.CONNECTION,
                           "--show"], env=processes.flower_env(), capture_output=True,
                          text=True, timeout=60).stdout


# ----------------------------------------------------------------------------- fast


def test_dev_certs_have_the_sans_and_chain_to_the_ca(tmp_path):
    files = certs.make_dev_certs(tmp_path, ["fl.example.org", "10.1.2.3", "localhost"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert files.server_key.stat().st_mode & 0o077 == 0


def test_node_key_is_openssh_ecdsa_p384_and_never_overwritten(tmp_path):
    private, public = certs.make_node_key(tmp_path / "node0.key")
    key = load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    public_key = load_ssh_public_key(public.read_bytes())
    assert public_key.public_numbers() == key.public_key().public_numbers()
    with pytest.raises(FlSimError, match="never overwritten"):
        certs.make_node_key(private)


def test_commands_are_secure_unless_insecure_is_asked_for(tmp_path):
    files = certs.make_dev_certs(tmp_path)
    secure = processes.superlink_command(files, "0.0.0.0:9092", "127.0.0.1", 8000)
    assert "--enable-supernode-auth" in secure and "--insecure" not in secure
    assert secure[secure.index("--ssl-certfile") + 1] == str(files.server_cert)
    assert "--insecure" in processes.superlink_command(None, "127.0.0.1:9092", "127.0.0.1", 8000)
    with pytest.raises(FlSimError, match="missing"):
        processes.superlink_command(certs.CertFiles.in_dir(tmp_path / "none"), "h:1", "h", 1)
    with pytest.raises(FlSimError, match="--key"):
        processes.supernode_command("h:9092", 9094, tmp_path / "n.toml", files.ca_cert, None)


def test_node_config_reaches_the_client_app_as_written(tmp_path):
    from flwr.common.config import parse_config_args  # what flower-supernode does with it

    path = processes.write_node_config(tmp_path / "n.toml", 2, tmp_path / "a b's data")
    assert parse_config_args([str(path)]) == {"partition-id": 2,
                                              "data-root": str(tmp_path / "a b's data")}


def test_submit_refuses_an_unknown_run_before_contacting_anything(tmp_path):
    study = write_study(tmp_path / "s.yaml", tmp_path / "out", rounds=1)
    with pytest.raises(FlSimError, match="'nope' is not in"):
        cli.submit_run(study, run="nope")


def test_connection_entry_for_flwr(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    processes.write_connection("10.0.0.1:8000", tmp_path / "ca.crt")
    processes.write_connection("127.0.0.1:8000", None, name="other")
    config = (tmp_path / "config.toml").read_text()
    assert 'address = "10.0.0.1:8000"' in config
    assert f'root-certificates = "{tmp_path}/ca.crt"' in config
    assert "insecure = true" in config and 'default = "fl-sim"' in config


def test_flower_helpers_come_from_this_environment_when_it_is_not_activated(monkeypatch):
    # flower-supernode starts flower-superexec by name: without the venv's bin on PATH it dies.
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    first = processes.flower_env()["PATH"].split(os.pathsep)[0]
    assert (Path(first) / "flower-superexec").is_file()


def test_messages_quote_flower_s_output_without_colour_codes_or_a_false_exit_code(
        tmp_path, monkeypatch):
    """Issue #25, item 4: "(flwr run exited 0)" for a failed submit; raw ANSI in excerpts."""
    import subprocess

    assert processes.strip_ansi("\x1b[92mINFO \x1b[0m: ready\x1b[?25h") == "INFO : ready"
    study = write_study(tmp_path / "s.yaml", tmp_path / "out", rounds=1)
    answer = subprocess.CompletedProcess([], 0, stdout="\x1b[91mERROR\x1b[0m: no such app")
    monkeypatch.setattr(cli.subprocess, "run", lambda *a, **k: answer)
    with pytest.raises(FlSimError) as err:
        cli.submit_run(study, None, None, None, tmp_path)
    assert str(err.value) == ("the SuperLink did not start the run (flwr run gave no run id): "
                              "ERROR: no such app")


# ----------------------------------------------------------------------------- slow


class Federation:
    """Ports and files of one loopback federation in a private FLWR_HOME."""

    def __init__(self) -> None:
        self.fleet = f"127.0.0.1:{free_port()}"
        self.control_port = free_port()

    def superlink(self, *security: str | Path) -> None:
        assert deploy("superlink", *security, "--fleet-address", self.fleet,
                      "--port", self.control_port) == 0

    def supernode(self, partition_id: int, *security: str | Path) -> int:
        return deploy("supernode", "--superlink", self.fleet, "--partition-id", partition_id,
                      "--port", free_port(), *security)

    def log(self, name: str) -> str:
        return (processes.state_dir() / f"{name}.log").read_text()

    def pid(self, name: str) -> int:
        return int((processes.state_dir() / f"{name}.pid").read_text())

    def node_ids(self, count: int = 3) -> list[str]:
        return [re.findall(r"SuperNode ID: (\d+)", self.log(f"supernode-{i}"))[0]
                for i in range(count)]

    def assert_nodes_used_the_grpc_fleet_api(self) -> None:
        superlink = self.log("superlink")
        assert f"Starting Fleet API (gRPC-rere) on {self.fleet}" in superlink
        for node in self.node_ids():
            assert f"[Fleet.ActivateNode] Activated node_id={node}" in superlink
            assert f"[Fleet.PushMessages] Push replies from node_id={node}" in superlink


@pytest.fixture
def federation(tmp_path, tmp_path_factory, monkeypatch):
    """A private FLWR_HOME; afterwards every process started in it is stopped, and checked."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("FL_SIM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    started: list[int] = []
    fed = Federation()
    try:
        yield fed
    finally:
        for pid_file in processes.state_dir().glob("*.pid"):
            pid = int(pid_file.read_text())
            started += [pid, *processes.descendants(pid)]
        processes.stop_all(grace=5)
        time.sleep(0.5)
        assert not [p for p in started if processes.is_alive(p)], "a process outlived `stop`"


def wait_for_line(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"no {text!r} in {path} after {timeout} s"
        time.sleep(0.2)


def kill_hard(pid: int) -> None:
    """A machine that dies: SIGKILL the SuperNode and its ClientApp, no goodbye to the SuperLink."""
    for p in [pid, *processes.descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_insecure_federation_runs_two_rounds_over_grpc(federation, tmp_path, capfd):
    fed = federation
    fed.superlink("--insecure")
    for i in range(3):
        assert fed.supernode(i, "--insecure") == 0
    # Personalized models travel through the SuperLink to every node (cross-site evaluation).
    after = {"personalize": {"fine_tune_epochs": 1}, "cross_site_eval": True}
    study = write_study(tmp_path / "s.yaml", tmp_path / "out", rounds=2, **after)

    assert deploy("submit", study, "--stream") == 0

    out = capfd.readouterr().out
    assert re.search(r"run \d+ finished:completed", out), out
    assert "fl-sim: round 2/2" in out  # the ServerApp's progress, streamed from the SuperLink
    [run_dir] = (tmp_path / "out" / "deploy").iterdir()
    assert client_rows(run_dir) == {(r, c, s) for r in (1, 2) for c in range(3) for s in SPLITS}
    assert {r["round"] for r in rows(run_dir) if r["scope"] == "global"} == {0, 1, 2}
    deployed = json.loads((run_dir / "summary.json").read_text())
    assert deployed["complete"]
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints/best.pt").exists()
    fed.assert_nodes_used_the_grpc_fleet_api()
    assert f"insecure channel to {fed.fleet}" in fed.log("supernode-0")
    for i in range(3):  # each node's warm worker ran its tasks: no process per message
        assert "Start `flwr-clientapp` process" not in fed.log(f"supernode-{i}")
        assert "fl-sim worker ready for" in fed.log(f"supernode-{i}-worker")
        assert "Traceback" not in fed.log(f"supernode-{i}-worker")

    # The same run simulated gives the same numbers, to the last digit.
    simulated = write_study(tmp_path / "sim.yaml", tmp_path / "sim", rounds=2, **after)
    assert cli_main(["run", str(simulated)]) == 0
    cross_site = [{(r["site_model"], r["client"]): (r["acc"], r["bacc"]) for r in rows(d)
                   if r["scope"] == "cross_site"}
                  for d in (run_dir, tmp_path / "sim/deploy" / run_dir.name)]
    assert len(cross_site[0]) == 9 and cross_site[0] == cross_site[1]
    assert_simulated_as_deployed(tmp_path / "sim/deploy" / run_dir.name, deployed)


def assert_simulated_as_deployed(simulated: Path, deployed: dict, node_ids_sent: bool = False
                                 ) -> None:
    """The simulated run's summary.json has the deployed one's numbers. `node_ids_sent`:
    the messages name nodes (SecAgg+'s stages), whose ids differ in length as text."""
    summary = json.loads((simulated / "summary.json").read_text())
    for when in ("final", "best"):
        assert summary[when].keys() == deployed[when].keys()
        for scope, value in summary[when].items():
            if not isinstance(value, dict):
                assert value == deployed[when][scope]
                continue
            assert value.keys() == deployed[when][scope].keys(), scope
            for key, number in value.items():
                # Decisions and loss to the last digit; the probability-based clinical
                # metrics (AUROC, ECE) rest on float32 probabilities, whose last bits differ between processes.
                exact = key in ("n", "loss", "acc", "bacc", "precision", "recall", "f1", "avg") or (
                    number is None or deployed[when][scope][key] is None)  # null: an absent class
                assert number == (deployed[when][scope][key] if exact else pytest.approx(
                    deployed[when][scope][key], rel=1e-6, abs=1e-9)), (scope, key)
    # The packed wire counts as unpacked.
    assert summary["bytes_sent"] == (pytest.approx(deployed["bytes_sent"], rel=1e-5)
                                     if node_ids_sent else deployed["bytes_sent"])


@pytest.mark.slow
def test_secure_aggregation_over_a_superlink_gives_the_simulations_results(federation,
                                                                          tmp_path, capfd):
    """SecAgg+'s four stages through a SuperLink and 3 SuperNodes: the masks cancel exactly
    and the quantization is seeded, so the simulation gives the same numbers."""
    federation.superlink("--insecure")
    for i in range(3):
        assert federation.supernode(i, "--insecure") == 0
    secure = {"secure_aggregation": {}}
    study = write_study(tmp_path / "s.yaml", tmp_path / "out", rounds=2, **secure)
    assert deploy("submit", study, "--stream") == 0
    assert re.search(r"run \d+ finished:completed", capfd.readouterr().out)
    [run_dir] = (tmp_path / "out" / "deploy").iterdir()
    deployed = json.loads((run_dir / "summary.json").read_text())
    assert deployed["complete"]
    for i in range(3):
        assert "Traceback" not in federation.log(f"supernode-{i}-worker")
    simulated = write_study(tmp_path / "sim.yaml", tmp_path / "sim", rounds=2, **secure)
    assert cli_main(["run", str(simulated)]) == 0
    assert_simulated_as_deployed(tmp_path / "sim/deploy" / run_dir.name, deployed,
                                 node_ids_sent=True)


@pytest.mark.slow
def test_modified_supernodes_malformed_replies_are_refused_naming_them(federation, tmp_path,
                                                                      monkeypatch, capfd):
    """Four SuperNodes run other code (tests/malformed_worker.py): their train replies have
    a renamed array, a wrong shape, NaN, or three models' worth of padding. The SuperLink's
    run goes on with the two honest nodes, naming each modified one and why."""
    kinds = {"keys": "its arrays are not the model's", "shape": "is float32 [",
             "nan": "holds non-finite values", "oversized": "bytes, more than the"}
    federation.superlink("--insecure")
    for i in range(2):
        assert federation.supernode(i, "--insecure") == 0
    honest_worker = processes.worker_command
    for i, kind in enumerate(kinds, start=2):
        monkeypatch.setattr(processes, "worker_command", lambda *args, kind=kind: [
            sys.executable, str(Path(__file__).with_name("malformed_worker.py")), kind,
            *honest_worker(*args)[3:]])
        assert federation.supernode(i, "--insecure") == 0
    study = write_study(tmp_path / "s.yaml", tmp_path / "out", rounds=1, min_clients=2,
                        clients=6)
    assert deploy("submit", study, "--stream") == 0
    [run_dir] = (tmp_path / "out" / "deploy").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["complete"]
    log = run_log(int(re.search(r"as run (\d+)", capfd.readouterr().out)[1]))
    nodes = federation.node_ids(6)
    trained = {r["client"] for r in rows(run_dir) if r["scope"] == "client"
               and r["split"] == "train"}
    assert trained == {0, 1}
    for node, why in zip(nodes[2:], kinds.values(), strict=True):
        assert re.search(rf"node {node}: refused: [^\n]*{re.escape(why)}", log), (node, why, log)


@pytest.mark.slow
def test_a_supernode_without_its_superlink_says_so_and_gives_up_when_bounded(
        federation, tmp_path, capfd):
    """Issue #25, item 1: the foreground form retried forever, the background one gave up
    after 60 s; both now say at start how long they wait, and take --max-wait-s."""
    fleet = f"127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    code = deploy("supernode", "--insecure", "--superlink", fleet, "--partition-id", 0,
                  "--port", free_port(), "--max-wait-s", 3, "--foreground")
    assert code != 0 and time.monotonic() - start < 60
    out = capfd.readouterr().out
    assert (f"supernode-0: connecting to the SuperLink at {fleet}; Flower retries with a "
            "growing backoff, for at most 3 s (--max-wait-s)") in out
    start = time.monotonic()
    assert deploy("supernode", "--insecure", "--superlink", fleet, "--partition-id", 1,
                  "--port", free_port(), "--max-wait-s", 3) == 2
    assert time.monotonic() - start < 60
    captured = capfd.readouterr()
    assert "for at most 3 s (--max-wait-s)" in captured.out
    assert "supernode-1 exited with code" in captured.err and "Giving up reconnection" in captured.err
    assert "\x1b[" not in captured.err  # Flower's colours stripped from the excerpt


@pytest.mark.slow
def test_tls_with_node_authentication_refuses_an_unregistered_node(federation, tmp_path):
    fed = federation
    ca = certs.make_dev_certs(tmp_path / "certs", ["localhost", "127.0.0.1"]).ca_cert
    keys = [certs.make_node_key(tmp_path / f"keys/node{i}.key") for i in range(4)]
    fed.superlink("--certs", tmp_path / "certs")
    for _, public in keys[:3]:
        assert deploy("register", public) == 0

    assert fed.supernode(3, "--ca", ca, "--key", keys[3][0]) == 2  # key 3 was never registered
    assert "No SuperNode found with the given public key" in fed.log("superlink")
    assert "Exit Code: 305" in fed.log("supernode-3")
    other_ca = certs.make_dev_certs(tmp_path / "other").ca_cert  # TLS verifies the server
    assert fed.supernode(0, "--ca", other_ca, "--key", keys[0][0]) == 2
    assert "CERTIFICATE_VERIFY_FAILED" in fed.log("supernode-0")

    for i in range(3):  # node 2 as Flower runs it: a flwr-clientapp process per message
        assert fed.supernode(i, "--ca", ca, "--key", keys[i][0],
                             *(["--no-worker"] if i == 2 else [])) == 0
    # Partial fine-tuning and rare-class synthesis over the SuperLink: the synthesis query
    # before round 1, then messages that carry the head only.
    study = write_study(tmp_path / "s.yaml", tmp_path / "out", rounds=2,
                        finetune={"trainable": "head"},
                        synthesis={"classes": ["df", "vasc"], "per_class": 8, "steps": 5})
    run_id, _ = cli.submit_run(study)
    assert cli.wait_finished(run_id, timeout=600)[0] == "finished:completed"

    [run_dir] = (tmp_path / "out" / "deploy").iterdir()
    assert client_rows(run_dir) == {(r, c, s) for r in (1, 2) for c in range(3) for s in SPLITS}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["finetune"]["trained_tensors"] == 2
    assert {c: s["generated"] for c, s in summary["synthesis"].items()} == {
        str(c): {"df": 8, "vasc": 8} for c in range(3)}
    fed.assert_nodes_used_the_grpc_fleet_api()
    assert "insecure" not in fed.log("supernode-0") + fed.log("superlink")
    assert "Start `flwr-clientapp` process" in fed.log("supernode-2")
    assert not (processes.state_dir() / "supernode-2-worker.pid").exists()


def start_and_kill_one_node(fed: Federation, study: Path) -> tuple[int, float]:
    """Three nodes; node 2 is killed once it holds its first (train) message."""
    fed.superlink("--insecure")
    for i in range(3):
        assert fed.supernode(i, "--insecure") == 0
    victim, worker = fed.pid("supernode-2"), fed.pid("supernode-2-worker")
    run_id, _ = cli.submit_run(study)
    wait_for_line(processes.state_dir() / "supernode-2.log", "Received successfully", 300)
    kill_hard(victim)
    killed_at = time.monotonic()
    while processes.is_alive(worker):  # its worker leaves with it
        assert time.monotonic() - killed_at < 10, "the worker outlived its SuperNode"
        time.sleep(0.2)
    return run_id, killed_at


@pytest.mark.slow
def test_a_dead_node_is_left_behind_when_enough_remain(federation, tmp_path):
    study = write_study(tmp_path / "s.yaml", tmp_path / "out", rounds=1, min_clients=2,
                        round_timeout_s=300)
    run_id, _ = start_and_kill_one_node(federation, study)

    assert cli.wait_finished(run_id, timeout=400)[0] == "finished:completed"
    [run_dir] = (tmp_path / "out" / "deploy").iterdir()
    assert client_rows(run_dir) == {(1, c, s) for c in (0, 1) for s in SPLITS}
    assert json.loads((run_dir / "summary.json").read_text())["complete"]
    assert "continuing without a client" in run_log(run_id)


@pytest.mark.slow
def test_below_the_minimum_the_run_stops_within_the_timeout(federation, tmp_path):
    timeout = 40  # below Flower's ~60 s dead-node detection: fl-sim's own bound stops it
    study = write_study(tmp_path / "s.yaml", tmp_path / "out", rounds=2, min_clients=3,
                        round_timeout_s=timeout)
    run_id, killed_at = start_and_kill_one_node(federation, study)

    status, details = cli.wait_finished(run_id, timeout=timeout + 120)
    assert status == "finished:failed", (status, details)
    assert time.monotonic() - killed_at < timeout + 30
    assert "round 1 (train)" in details and "min_clients" in details and "kept" in details
    [run_dir] = (tmp_path / "out" / "deploy").iterdir()
    assert [r["round"] for r in rows(run_dir)] == [0]  # the global model's round 0, kept
    assert (run_dir / "config.yaml").exists() and (run_dir / "partition.csv").exists()


@pytest.mark.slow
def test_a_foreground_supernode_and_its_worker_end_together_on_sigterm(federation, tmp_path):
    import subprocess
    import sys

    fed = federation
    fed.superlink("--insecure")
    proc = subprocess.Popen([sys.executable, "-m", "fl_sim.cli", "deploy", "supernode",
                             "--insecure", "--superlink", fed.fleet, "--partition-id", "0",
                             "--port", str(free_port()), "--foreground"],
                            env=processes.flower_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    pid_file = processes.state_dir() / "supernode-0-worker.pid"
    node: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.exists() and "ready for" in fed.log("supernode-0-worker")):
            assert proc.poll() is None and time.monotonic() < deadline, "no worker started"
            time.sleep(0.5)
        time.sleep(1)  # fl-sim sees the worker ready too
        worker = int(pid_file.read_text())
        node = [p for p in processes.descendants(proc.pid) if processes.is_alive(p)]
        # systemd's stop (SIGTERM; Ctrl-C's SIGINT takes the same path, but a test run in the
        # background may have SIGINT ignored, and its children inherit that)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 15
        while any(processes.is_alive(p) for p in [worker, *node]):
            assert time.monotonic() < deadline, "the node or its worker outlived the command"
            time.sleep(0.2)
    finally:  # nothing left behind, whatever failed
        for pid in [proc.pid, *node]:
            processes.stop_process(pid, grace=2)
