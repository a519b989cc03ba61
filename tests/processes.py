"""Processes a test starts and must see gone: fl-sim in a process group of its own (Ray's
processes start in it), what of that group is still alive, the processes a command
line names, and a free port for a server a test starts."""

import os
import socket
import subprocess
from pathlib import Path


def run_in_own_group(argv: list[str], timeout: float = 300):
    """`argv` as a process group of its own; (its CompletedProcess, the group id) once it
    exits."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), proc.pid


def left_in_group(pgid: int) -> list[str]:
    """The live processes of process group `pgid`."""
    return [p for p in subprocess.run(["ps", "-eo", "pgid=,stat=,args="], capture_output=True,
                                      text=True).stdout.splitlines()
            if p.split()[0] == str(pgid) and p.split()[1][0] != "Z"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def processes_naming(text: str) -> list[int]:
    """The pids (not this one) whose command line holds `text` (arguments NUL-separated)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes() and int(cmdline.parent.name) != os.getpid():
                pids.append(int(cmdline.parent.name))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return pids
