"""`flower-supernode`, polling the SuperLink every `--poll-interval` seconds instead of 3.

Flower 1.39's SuperNode sleeps a fixed 3 s whenever the SuperLink has no message for it,
checks for its ClientApp's reply every 0.5 s, and, when it asks for a message's objects
before the ServerApp has finished uploading them, retries after 1 s, then 2 s, ... A round
sends each node two messages, each of which arrives while the node is idle: seconds of
every round spent asleep. No option sets these waits, so this entry point caps them in
Flower's SuperNode loop (flwr.supernode.start_client_internal, nothing else: its `time`,
whose only use there is `sleep`, and its `pull_objects`' backoff) and then runs Flower's own
`flower-supernode` with the remaining arguments. A poll is one small gRPC request: at 0.1 s
a node asks the SuperLink ten times a second while idle. tests/test_latency.py pins the
Flower code this relies on.

    python -m fl_sim.deploy.supernode --poll-interval 0.1 [flower-supernode arguments]
"""

from __future__ import annotations

import functools
import sys
import time
from types import SimpleNamespace

DEFAULT_POLL_INTERVAL = 0.1


def cap_sleeps(seconds: float) -> None:
    """Every wait of Flower's SuperNode loop lasts at most `seconds`."""
    from flwr.supernode import start_client_internal

    start_client_internal.time = SimpleNamespace(  # the module's only use of `time` is sleep
        sleep=lambda s: time.sleep(min(s, seconds)))
    start_client_internal.pull_objects = functools.partial(  # bounded by max_time (2 h)
        start_client_internal.pull_objects, initial_backoff=seconds / 2, backoff_cap=seconds,
        max_tries_per_object=None)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    poll = DEFAULT_POLL_INTERVAL
    if args[:1] == ["--poll-interval"]:
        poll = float(args[1])
        del args[:2]
    cap_sleeps(poll)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args]
    flower_supernode()


if __name__ == "__main__":
    main()
