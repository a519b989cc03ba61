"""`fl-sim deploy`: a real federation of Flower's SuperLink and SuperNodes over gRPC.

    fl-sim deploy certs DIR --san server.example.org          # development CA + server cert
    fl-sim deploy node-key node.key                           # on each client machine
    fl-sim deploy superlink --certs DIR                       # on the server machine
    fl-sim deploy register node.key.pub                       # on the server, per client key
    fl-sim deploy supernode --superlink HOST:9092 --partition-id 0 --data-root /data \\
        --ca ca.crt --key node.key                             # on each client machine
    fl-sim deploy submit experiments.yaml --run NAME --stream # run one run, follow it
    fl-sim deploy connect HOST:8000 --ca ca.crt               # to submit from elsewhere
    fl-sim deploy stop                                        # on every machine

Secure by default: TLS and SuperNode authentication unless `--insecure` is given. See
docs/deployment.md. Runs alone as `python -m fl_sim.deploy.cli ...`.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

from fl_sim.config import expand_grid, load_study
from fl_sim.deploy import certs, processes
from fl_sim.deploy.processes import CONNECTION, CONTROL_PORT, FLEET_PORT, strip_ansi
from fl_sim.errors import FlSimError

BACKGROUND_WAIT_S = 60.0  # how long a background SuperNode waits for its SuperLink
STARTUP_S = 30.0  # a SuperNode's own start (imports), before it first asks the SuperLink
FINISHED = "finished"


def add_deploy_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `deploy` and its subcommands to the `fl-sim` parser."""
    deploy = subparsers.add_parser(
        "deploy", help="a real federation: SuperLink and SuperNodes over gRPC (docs/deployment.md)")
    sub = deploy.add_subparsers(dest="deploy_command", required=True)

    p = sub.add_parser("certs", help="a development CA and a SuperLink certificate")
    p.add_argument("dir", type=Path, help="writes ca.crt, ca.key, server.pem, server.key here")
    p.add_argument("--san", action="append", default=[], metavar="NAME",
                   help="a host name or IP address SuperNodes dial (repeat); "
                        + ", ".join(certs.DEFAULT_SANS) + " are always added for local commands")
    p.add_argument("--days", type=int, default=365, help="validity (default 365)")

    p = sub.add_parser("node-key", help="a SuperNode's authentication key pair (ECDSA P-384)")
    p.add_argument("path", type=Path, help="private key; the public one goes to PATH.pub")

    p = sub.add_parser("superlink", help="start the SuperLink (server machine)")
    _security(p, "--certs", "DIR", "folder with ca.crt, server.pem, server.key")
    p.add_argument("--fleet-address", default=f"0.0.0.0:{FLEET_PORT}",
                   help=f"where SuperNodes connect, gRPC (default 0.0.0.0:{FLEET_PORT})")
    p.add_argument("--host", default="127.0.0.1",
                   help="Control API host for `flwr`/`submit` (default 127.0.0.1; 0.0.0.0 to "
                        "submit from other machines)")
    p.add_argument("--port", type=int, default=CONTROL_PORT,
                   help=f"Control API port (default {CONTROL_PORT})")
    p.add_argument("--database", type=Path,
                   help="SQLite file for the SuperLink's state (registered nodes survive a "
                        "restart)")
    p.add_argument("--foreground", action="store_true", help="run in this terminal (for systemd)")

    p = sub.add_parser("supernode", help="start a SuperNode (client machine) on its local data")
    _security(p, "--ca", "CA_CERT", "the SuperLink's CA certificate (ca.crt)")
    p.add_argument("--key", type=Path, help="this node's registered private key (node-key)")
    p.add_argument("--superlink", default=f"127.0.0.1:{FLEET_PORT}",
                   help=f"the SuperLink's Fleet API, HOST:PORT (default 127.0.0.1:{FLEET_PORT})")
    p.add_argument("--partition-id", type=int, required=True,
                   help="which client of the study's partition this node is (0, 1, ...)")
    p.add_argument("--data-root", type=Path, help="this machine's copy of the dataset")
    p.add_argument("--local-data", action="store_true",
                   help="train on all of --data-root (this hospital's own data, split "
                        "train/val/test by lesion), not on a partition of a shared copy")
    p.add_argument("--port", type=int, default=9094,
                   help="local port for Flower's ClientApp API; one per SuperNode on a machine")
    p.add_argument("--name", help="for its log and pid files (default supernode-<partition-id>)")
    p.add_argument("--no-worker", action="store_true",
                   help="no warm worker: Flower starts a flwr-clientapp process per message, "
                        "which imports torch, opens the data and builds the model (seconds)")
    p.add_argument("--threads", type=int,
                   help="torch threads of the node's worker (default: all cores); nodes that "
                        "share a machine should split its cores")
    p.add_argument("--poll-interval", type=float, default=processes.DEFAULT_POLL_INTERVAL,
                   help="seconds between the idle node's requests for work (Flower: 3; "
                        f"default {processes.DEFAULT_POLL_INTERVAL})")
    p.add_argument("--max-wait-s", type=float,
                   help="give up after this many seconds without the SuperLink (default: "
                        f"{BACKGROUND_WAIT_S:g} s in the background, no bound with --foreground)")
    p.add_argument("--foreground", action="store_true", help="run in this terminal (for systemd)")

    p = sub.add_parser("connect", help="point `register`/`submit` on this machine at a SuperLink")
    p.add_argument("address",
                   help=f"the SuperLink's Control API, HOST:PORT (port {CONTROL_PORT} by default)")
    _security(p, "--ca", "CA_CERT", "the SuperLink's CA certificate (ca.crt)")

    p = sub.add_parser("register", help="allow a SuperNode's public key (SuperLink with auth)")
    p.add_argument("public_key", type=Path, help="the node's PATH.pub from `node-key`")

    p = sub.add_parser("submit", help="run one run of a study on the federation")
    p.add_argument("config", type=Path, help="a study file such as experiments.yaml")
    p.add_argument("--run", help="the run's name (`fl-sim run CONFIG --dry-run` lists them); "
                                 "needed when the study has several")
    p.add_argument("--out", help="output directory on the SuperLink's machine (a relative one "
                                 "is relative to where the SuperLink was started)")
    p.add_argument("--data-root",
                   help="the dataset copy on the SuperLink's machine (global test set)")
    p.add_argument("--stream", action="store_true", help="follow the run's log until it ends")
    p.add_argument("--app", type=Path, help="the Flower app folder (default: fl-sim's source tree)")

    sub.add_parser("stop", help="stop the SuperLink and SuperNodes started on this machine")


def _security(p: argparse.ArgumentParser, flag: str, metavar: str, what: str) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument(flag, type=Path, metavar=metavar, help=what)
    group.add_argument("--insecure", action="store_true",
                       help="no TLS and no node authentication (loopback tests only)")


def run_deploy(args: argparse.Namespace) -> int:
    """Run one `fl-sim deploy` subcommand; FlSimError reaches the caller."""
    command = args.deploy_command
    if command == "certs":
        sans = list(dict.fromkeys([*args.san, *certs.DEFAULT_SANS]))
        files = certs.make_dev_certs(args.dir, sans, args.days)
        print(f"wrote {files.ca_cert} (to every SuperNode), {files.server_cert} and "
              f"{files.server_key} (SuperLink only); keep {files.ca_key} offline")
    elif command == "node-key":
        private, public = certs.make_node_key(args.path)
        print(f"wrote {private} (stays on this machine) and {public} (register it on the "
              "SuperLink)")
    elif command == "superlink":
        return _superlink(args)
    elif command == "supernode":
        return _supernode(args)
    elif command == "connect":
        path = processes.write_connection(args.address, None if args.insecure else args.ca)
        print(f"connection {CONNECTION!r} -> {args.address} written to {path}")
    elif command == "register":
        return _flwr(["supernode", "register", str(args.public_key), CONNECTION])
    elif command == "submit":
        return _submit(args)
    elif command == "stop":
        stopped = processes.stop_all()
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _superlink(args: argparse.Namespace) -> int:
    files = None if args.insecure else certs.CertFiles.in_dir(args.certs)
    cmd = processes.superlink_command(files, args.fleet_address, args.host, args.port,
                                      args.database)
    control = f"{'127.0.0.1' if args.host == '0.0.0.0' else args.host}:{args.port}"
    processes.write_connection(control, None if files is None else files.ca_cert)
    if args.insecure:
        print("warning: --insecure: no TLS, no node authentication; for loopback tests only",
              file=sys.stderr)
    if args.foreground:
        return subprocess.call(cmd, env=processes.flower_env())
    started = processes.start("superlink", cmd, processes.SUPERLINK_READY)
    print(f"SuperLink running (pid {started.pid}): Fleet API (gRPC) on {started.ready}, Control "
          f"API on {control}; log {started.log}")
    return 0


def _supernode(args: argparse.Namespace) -> int:
    name = args.name or f"supernode-{args.partition_id}"
    node_config = processes.write_node_config(
        processes.state_dir() / f"{name}.node-config.toml", args.partition_id, args.data_root,
        args.local_data)
    cmd = processes.supernode_command(args.superlink, args.port, node_config,
                                      None if args.insecure else args.ca, args.key,
                                      args.poll_interval, worker=not args.no_worker)
    wait = args.max_wait_s if args.max_wait_s is not None else (
        None if args.foreground else BACKGROUND_WAIT_S)
    if wait is not None:
        cmd += ["--max-wait-time", f"{wait:g}"]  # Flower's SuperNode gives up by itself
    print(f"{name}: connecting to the SuperLink at {args.superlink}; Flower retries with a "
          "growing backoff, " + (f"for at most {wait:g} s (--max-wait-s)" if wait is not None
                                 else "until it answers (bound it with --max-wait-s)"),
          flush=True)
    if args.foreground:
        # systemd stops a service with SIGTERM: clean up as on Ctrl-C (the worker runs in its
        # own session, so only this process can stop it).
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        node = subprocess.Popen(cmd, env=processes.flower_env())
        worker = None
        try:
            worker = None if args.no_worker else _start_worker(name, args, node.pid)
            return node.wait()
        finally:
            if node.poll() is None:
                processes.stop_process(node.pid)
            if worker:
                processes.stop_started(worker.name, worker.pid)
    started = processes.start(name, cmd, processes.SUPERNODE_READY,
                              timeout=wait + STARTUP_S)  # wait: not None in the background
    worker = None
    if not args.no_worker:
        try:
            worker = _start_worker(name, args, started.pid)
        except BaseException:
            processes.stop_started(name, started.pid)
            raise
    print(f"{name} running (pid {started.pid}), connected to the SuperLink at {args.superlink} "
          f"as node {started.ready}"
          + (f"; its warm worker: pid {worker.pid}, log {worker.log}" if worker else "")
          + f"; log {started.log}")
    return 0


def _start_worker(name: str, args: argparse.Namespace, supernode_pid: int) -> processes.Started:
    """The node's warm worker (fl_sim.deploy.worker): it imports torch and timm once."""
    return processes.start(f"{name}-worker",
                           processes.worker_command(args.port, supernode_pid, args.threads,
                                                    args.poll_interval),
                           processes.WORKER_READY, timeout=120)


def _flwr(argv: list[str]) -> int:
    flwr = processes.executable("flwr")
    return subprocess.run([flwr, *argv], env=processes.flower_env()).returncode


def default_app_dir() -> Path:
    """fl-sim's source tree: its pyproject.toml declares the Flower app."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if not (pyproject.is_file() and "[tool.flwr.app]" in pyproject.read_text()):
        raise FlSimError("no Flower app beside the fl_sim package: pass --app with the fl-sim "
                         "source folder (its pyproject.toml declares [tool.flwr.app]).")
    return root


def submit_run(config: Path, run: str | None = None, out: str | None = None,
               data_root: str | None = None, app: Path | None = None) -> tuple[int, str]:
    """Start one run of a study on the federation; returns (Flower's run id, run name)."""
    # Validated here, so that a bad file is reported with its own path, before anything starts.
    study = load_study(config, data_root=data_root, out=out)
    names = [r.name for r in expand_grid(study)]
    if run is None and len(names) > 1:
        raise FlSimError(f"{config} has {len(names)} runs; name one with --run: "
                         + ", ".join(names))
    name = run or names[0]
    if name not in names:
        raise FlSimError(f"run {name!r} is not in {config}; its runs: " + ", ".join(names))
    run_config = {"study-config": str(config), "study-yaml": Path(config).read_text(),
                  "run-name": name, "data-root": data_root or "", "out": out or ""}
    with tempfile.TemporaryDirectory() as tmp:
        overrides = Path(tmp) / "run-config.toml"  # a file: the study text needs no quoting
        overrides.write_text(tomli_w.dumps(run_config))
        proc = subprocess.run(
            [processes.executable("flwr"), "run", str(app or default_app_dir()), CONNECTION,
             "--run-config", str(overrides), "--format", "json"],
            env=processes.flower_env(), stdout=subprocess.PIPE, text=True)
    run_id = _run_id(proc.stdout)
    if proc.returncode != 0 or run_id is None:
        how = (f"flwr run exited {proc.returncode}" if proc.returncode != 0
               else "flwr run gave no run id")
        raise FlSimError(f"the SuperLink did not start the run ({how}): "
                         f"{strip_ansi(proc.stdout).strip()}")
    return run_id, name


def _submit(args: argparse.Namespace) -> int:
    run_id, name = submit_run(args.config, args.run, args.out, args.data_root, args.app)
    print(f"submitted {name} as run {run_id}; follow it with `flwr log {run_id} {CONNECTION}`",
          flush=True)
    if not args.stream:
        return 0
    _flwr(["log", str(run_id), CONNECTION, "--stream"])
    status, details = wait_finished(run_id)
    print(f"run {run_id} {status}" + (f": {details}" if details not in ("", "N/A") else ""))
    return 0 if status == f"{FINISHED}:completed" else 1


def _run_id(stdout: str) -> int | None:
    try:
        return int(json.loads(stdout)["run-id"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def run_status(run_id: int) -> tuple[str, str]:
    """(status, details) of a run, e.g. ("finished:failed", "ServerApp failed with ...")."""
    proc = subprocess.run([processes.executable("flwr"), "list", "--run-id", str(run_id),
                           CONNECTION, "--format", "json"],
                          env=processes.flower_env(), capture_output=True, text=True)
    try:
        row = json.loads(proc.stdout)["runs"][0]
    except (json.JSONDecodeError, KeyError, IndexError):
        raise FlSimError(f"cannot read the status of run {run_id}: "
                         f"{proc.stdout}{proc.stderr}") from None
    return str(row["status"]), str(row.get("status-details") or "")


def wait_finished(run_id: int, timeout: float = 60.0) -> tuple[str, str]:
    """Poll until the run has finished or `timeout` s passed; the last (status, details).
    (`flwr log --stream` may end a moment before the SuperLink records the final status.)"""
    deadline = time.monotonic() + timeout
    while True:
        status, details = run_status(run_id)
        if status.startswith(FINISHED) or time.monotonic() > deadline:
            return status, details
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fl-sim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_deploy_commands(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    try:
        return run_deploy(args)
    except FlSimError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
