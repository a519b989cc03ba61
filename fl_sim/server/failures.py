"""How a run stops short: on request (Ctrl-C, SIGTERM), on divergence, on a write error.

Each gets one paragraph that says what is intact and what to do; a diverged run is marked
failed in summary.json and never resumed as if unfinished.
"""

from __future__ import annotations

import errno
import math
import threading
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from fl_sim.arrays import to_state_dict
from fl_sim.errors import FlSimError
from fl_sim.server.run_log import read_summary

# Write errors that stop a run with a paragraph (not a traceback), and what to do about each.
WRITE_ERRORS = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space or raise the quota",
                errno.EROFS: "make that file system writable", errno.EACCES: "fix its permissions",
                errno.EPERM: "fix its permissions", errno.EFBIG: "raise the file size limit",
                errno.EIO: "check the disk"}
# Set by `fl-sim run` on Ctrl-C or SIGTERM: the server loop then stops at its next wait.
stop_requested = threading.Event()


class Interrupted(Exception):
    """The server loop stopping on request (an Exception: Flower's ServerApp thread ends
    quietly on one; the user sees the interrupt that caused it)."""


def stop_if_requested() -> None:
    if stop_requested.is_set():
        raise Interrupted


class RunFailed(FlSimError):
    """Training diverged: the run stops, summary.json marks it failed, and it is not resumed."""

    def __init__(self, server_round: int, client: int | None, reason: str, lr: float) -> None:
        self.failed = {"round": server_round, "client": client, "reason": reason}
        super().__init__(
            f"round {server_round}: {reason}: training diverged (lr {lr:g}). The run stops and "
            f"is marked failed in summary.json, so fl-sim will not resume it; "
            f"{rounds_kept(server_round - 1)}. Lower optimizer.lr (or warm up with "
            "lr_schedule) and run again: another lr gives the run another name and folder.")


def rounds_kept(saved: int) -> str:
    return (f"rounds 1..{saved} are intact" if saved > 1 else "round 1 is intact" if saved
            else "no round had finished before")


def failed_before(run_dir: Path) -> dict[str, Any] | None:
    """summary.json's `failed` record ({round, client, reason}) of a run that diverged."""
    return read_summary(run_dir).get("failed")


def finite_or_null(obj: Any) -> Any:
    """`obj` with every non-finite float as None: what strict JSON can hold."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_null(v) for v in obj]
    return obj


def check_finite(server_round: int, rows: dict[int | None, dict], arrays: ArrayRecord,
                 lr: float) -> None:
    """Stop a run whose training diverged: a non-finite train loss (naming the clients) or
    non-finite weights after training (naming the first such tensor)."""
    bad = [client for client, row in rows.items() if not math.isfinite(row["loss"])]
    if bad:
        first = "the pooled model" if bad[0] is None else f"client {bad[0]}"
        others = f" (also client {', '.join(map(str, bad[1:]))})" if bad[1:] else ""
        raise RunFailed(server_round, bad[0],
                        f"{first}'s training loss is {rows[bad[0]]['loss']}{others}", lr)
    for name, tensor in to_state_dict(arrays).items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise RunFailed(server_round, None, "the weights after training hold non-finite "
                            f"values (first in {name})", lr)


def not_resumed(run_dir: Path, failed: dict[str, Any]) -> str:
    """What to do about a run that failed before."""
    return (f"{run_dir} failed in round {failed['round']} ({failed['reason']}) and is not "
            "resumed: change the settings that made it fail (e.g. a lower optimizer.lr, which "
            "gives the run another name and folder) or delete that folder to run it again.")
