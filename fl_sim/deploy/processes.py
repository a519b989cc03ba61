"""Flower's SuperLink and SuperNodes as background processes that `fl-sim deploy stop` ends.

Each process runs in its own session (process group) with its log in
`$FLWR_HOME/fl-sim/<name>.log` and its pid in `<name>.pid`. Flower's processes spawn helpers
(`flower-superexec`, and a `flwr-serverapp` / `flwr-clientapp` per run or message); some of
them start their own session, so stopping signals the group and every descendant.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fl_sim.deploy.certs import CertFiles
from fl_sim.deploy.supernode import DEFAULT_POLL_INTERVAL
from fl_sim.errors import FlSimError

CONNECTION = "fl-sim"  # the entry that `fl-sim deploy` writes into $FLWR_HOME/config.toml
FLEET_PORT = 9092  # Flower's default Fleet API (gRPC) port
CONTROL_PORT = 8000  # Flower's default Control + Runtime API (HTTP) port
SUPERLINK_READY = re.compile(r"Starting Fleet API \(gRPC-rere\) on (\S+)")
SUPERNODE_READY = re.compile(r"SuperNode ID: (\d+)")
WORKER_READY_TEXT = "fl-sim worker ready for "
WORKER_READY = re.compile(WORKER_READY_TEXT + r"(\S+)")


def flwr_home() -> Path:
    """Flower's home: $FLWR_HOME, else ~/.flwr (as every Flower command reads it)."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def state_dir() -> Path:
    return flwr_home() / "fl-sim"


def flower_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")  # logs reach the file as they happen
    # SuperExec (which starts each ServerApp and ClientApp process) asks for work every 1 s
    # by default; Flower's own knob, a small local HTTP request.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.05")
    # Flower's processes start their helpers (flower-superexec, flwr-clientapp) by name:
    # find this environment's first, also when it is not activated.
    env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
    return env


def executable(name: str) -> str:
    """A Flower command from this environment: the one beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise FlSimError(f"`{name}` not found beside {sys.executable} nor on PATH: install "
                         "fl-sim (it brings flwr 1.39) in this environment.")
    return found


# ----------------------------------------------------------------------------- commands


def superlink_command(certs: CertFiles | None, fleet_address: str, host: str, port: int,
                      database: Path | None = None) -> list[str]:
    """flower-superlink: TLS and SuperNode authentication, or neither when `certs` is None."""
    cmd = [executable("flower-superlink"),
           # The app's dependencies are this environment's: never `uv sync` at run time.
           "--disable-runtime-dependency-installation",
           "--fleet-api-address", fleet_address, "--host", host, "--port", str(port)]
    if certs is None:
        cmd.append("--insecure")
    else:
        certs.check_server_side()
        cmd += ["--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
                "--ssl-keyfile", str(certs.server_key), "--enable-supernode-auth"]
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def supernode_command(superlink: str, port: int, node_config: Path,
                      ca_cert: Path | None, auth_key: Path | None,
                      poll_interval: float = DEFAULT_POLL_INTERVAL, worker: bool = True) -> list[str]:
    """flower-supernode, polling every `poll_interval` s (fl_sim.deploy.supernode): insecure
    when `ca_cert` is None, else TLS with the node's key. With `worker`, its ClientApp tasks
    are left to fl-sim's warm worker (`--isolation process`), else Flower starts a process
    per message."""
    cmd = [sys.executable, "-m", "fl_sim.deploy.supernode", "--poll-interval", str(poll_interval),
           "--superlink", superlink, "--port", str(port), "--node-config", str(node_config)]
    if worker:
        cmd += ["--isolation", "process"]
    if ca_cert is None:
        return cmd + ["--insecure"]
    for path, what in ((ca_cert, "CA certificate"), (auth_key, "node private key")):
        if path is None or not Path(path).is_file():
            raise FlSimError(f"{what} {path} not found: a secure SuperNode needs --ca (the "
                             "SuperLink's CA certificate) and --key (its registered private key).")
    return cmd + ["--root-certificates", str(ca_cert),
                  "--auth-supernode-private-key", str(auth_key)]


def worker_command(runtime_port: int, supernode_pid: int, threads: int | None = None,
                   poll_interval: float = DEFAULT_POLL_INTERVAL) -> list[str]:
    """The node's warm worker (fl_sim.deploy.worker): the executor of the SuperNode whose
    Runtime API listens on `runtime_port`."""
    cmd = [sys.executable, "-m", "fl_sim.deploy.worker", "--runtime-api",
           f"127.0.0.1:{runtime_port}", "--supernode-pid", str(supernode_pid),
           "--poll-interval", str(poll_interval)]
    return cmd + ["--threads", str(threads)] if threads else cmd


def write_node_config(path: Path, partition_id: int, data_root: Path | None,
                      local_data: bool = False) -> Path:
    """The node's own config as a TOML file (Flower's --node-config takes one), so that any
    path survives quoting. The ClientApp reads `partition-id`, `data-root` and `local-data`."""
    config: dict[str, int | str | bool] = {"partition-id": partition_id}
    if local_data:
        config["local-data"] = True
    if data_root is not None:
        config["data-root"] = str(Path(data_root).expanduser().resolve())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


def write_connection(address: str, ca_cert: Path | None, name: str = CONNECTION) -> Path:
    """`[superlink.<name>]` in $FLWR_HOME/config.toml: how `flwr` reaches the Control API."""
    path = flwr_home() / "config.toml"
    config = tomllib.loads(path.read_text()) if path.exists() else {}
    entry: dict[str, str | bool] = {"address": address}
    if ca_cert is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(ca_cert).expanduser().resolve())
    config.setdefault("superlink", {})[name] = entry
    config["superlink"].setdefault("default", name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


# ----------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Started:
    name: str
    pid: int
    log: Path
    ready: str  # what the readiness line said: the Fleet address, or the SuperNode ID


def is_alive(pid: int) -> bool:
    """Running (not exited, not a zombie)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return True  # no /proc (macOS): kill(0) is all we know


def start(name: str, cmd: list[str], ready: re.Pattern[str], timeout: float = 60.0) -> Started:
    """Start `cmd` in the background and wait for its readiness line in the log."""
    directory = state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    pid_file, log = directory / f"{name}.pid", directory / f"{name}.log"
    if pid_file.exists() and is_alive(int(pid_file.read_text())):
        raise FlSimError(f"{name} already runs (pid {pid_file.read_text().strip()}, log {log}); "
                         "`fl-sim deploy stop` ends it.")
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=flower_env(), start_new_session=True)
    pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if match := ready.search(log.read_text(errors="replace")):
            return Started(name, proc.pid, log, match.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    code = proc.poll()
    stop_started(name, proc.pid)
    tail = "\n".join(strip_ansi(log.read_text(errors="replace")).splitlines()[-15:])
    why = f"exited with code {code}" if code is not None else f"was not ready after {timeout:g} s"
    raise FlSimError(f"{name} {why}; the end of its log {log}:\n{tail}")


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """Flower's colour codes out of a log excerpt quoted in a message."""
    return ANSI.sub("", text)


def stop_started(name: str, pid: int) -> None:
    """Stop a process `start` started and forget its pid file."""
    stop_process(pid)
    (state_dir() / f"{name}.pid").unlink(missing_ok=True)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        for kill in (os.killpg, os.kill):  # the group (where pid leads one), then the process
            try:
                kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def stop_process(pid: int, grace: float = 10.0) -> bool:
    """SIGTERM the process, its group and its descendants; SIGKILL what is left after `grace`
    seconds (a SuperNode whose SuperLink is gone may never exit on its own). True if it ran."""
    pids = [pid, *descendants(pid)]
    if not any(is_alive(p) for p in pids):
        return False
    _signal(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(is_alive(p) for p in pids):
        time.sleep(0.2)
    pids += descendants(pid)  # helpers started during shutdown
    _signal([p for p in pids if is_alive(p)], signal.SIGKILL)
    try:  # reap it when this process started it, so no zombie is left behind
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return True


def stop_all(grace: float = 10.0) -> list[str]:
    """Stop every process `fl-sim deploy` started from this FLWR_HOME: SuperNodes first, so
    that they can leave the SuperLink cleanly. Returns the names of those that ran."""
    pid_files = sorted(state_dir().glob("*.pid"), key=lambda p: p.stem == "superlink")
    stopped = []
    for pid_file in pid_files:
        pid = int(pid_file.read_text())
        if _is_flower(pid) and stop_process(pid, grace):
            stopped.append(pid_file.stem)
        pid_file.unlink()
    return stopped


def _is_flower(pid: int) -> bool:
    """Guards against a stale pid file whose pid now belongs to an unrelated process."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        return b"flower-super" in cmdline or b"fl_sim.deploy." in cmdline
    except FileNotFoundError:
        return is_alive(pid) and not Path("/proc/self").exists()  # no /proc (macOS): trust the file
