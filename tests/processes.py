"""Processes a test starts and must see gone: fl-sim in a process group of its own (Ray's
processes start in it), what of that group is still alive, the tree under a detached
process, and a free port for a server a test starts."""

import socket
import subprocess


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


def descendants(pid: int) -> list[int]:
    """`pid` and every process under it, by parent id."""
    children: dict[int, list[int]] = {}
    for line in subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True,
                               text=True).stdout.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree
