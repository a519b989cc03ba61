"""How the server reaches its clients: bounded waits for nodes and replies, checked
exchanges that carry on without a failed client, and fl-sim's own seeded sampling."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid
from flwr.superlink.grid import InMemoryGrid

from fl_sim.adversary import SAT_OUT
from fl_sim.arrays import is_packed, pack, unpack
from fl_sim.errors import FlSimError
from fl_sim.server.failures import stop_if_requested, stop_requested
from fl_sim.server.vetting import payload_bytes, refusal
from fl_sim.strategies.registry import sample_size

log = logging.getLogger(__name__)


WAITING_NOTE_S = 10.0  # after this long short of clients, the server says what it waits for


def wait_for_clients(grid: Grid, needed: int, timeout: float, server_round: int) -> None:
    """Flower's samplers wait for nodes forever; fl-sim waits at most `timeout` seconds, and
    says after WAITING_NOTE_S what it waits for (too few SuperNodes started, otherwise a
    silent wait; a simulated federation's size is checked at start, `server_app`)."""
    start = time.monotonic()
    deadline, noted = start + timeout, False
    while (connected := len(list(grid.get_node_ids()))) < needed:
        stop_if_requested()
        now = time.monotonic()
        if now > deadline:
            raise FlSimError(
                f"round {server_round}: only {connected} clients connected, {needed} needed "
                f"(min_clients), after waiting {timeout:g} s (round_timeout_s). Start more "
                "clients or lower min_clients; the rounds finished before are kept.")
        if not noted and now - start >= WAITING_NOTE_S:
            log.warning(
                "round %d: waiting for %d clients, %d connected; waiting up to %g s "
                "(round_timeout_s). Each client is a SuperNode: start more (fl-sim deploy "
                "supernode), or lower min_clients.",
                server_round, needed, connected, timeout)
            noted = True
        stop_requested.wait(1.0)


def exchange(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """Flower's `send_and_receive`, polling for replies often and ending the wait once a stop
    is requested. Flower polls every 3 s on a SuperLink (half a round's work on average, per
    exchange, on loopback) and every 0.1 s in simulation; an in-memory poll costs nothing, a
    SuperLink poll one small local HTTP request. Through a SuperLink the weights travel
    packed (`arrays.pack`: one object instead of one per tensor), and replies are unpacked."""
    simulated = isinstance(grid, InMemoryGrid)
    poll = 0.01 if simulated else 0.05
    if not simulated:
        for m in messages:  # (the clients of a round may share one RecordDict)
            if "arrays" in m.content and not is_packed(m.content["arrays"]):
                m.content["arrays"] = pack(m.content["arrays"])
    waiting = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while True:
        stop_if_requested()
        pulled = list(grid.pull_messages(waiting))
        replies += pulled
        waiting -= {m.metadata.reply_to_message_id for m in pulled}
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    for reply in replies:
        if not reply.has_error() and "arrays" in reply.content:
            with contextlib.suppress(Exception):  # a malformed packing stays packed: refused
                reply.content["arrays"] = unpack(reply.content["arrays"])
    return replies


def node_name(node: int, names: dict[int, int]) -> str:
    """`client 7 (node ...)` where the node's partition id is known (`names`), else `node ...`."""
    return f"client {names[node]} (node {node})" if node in names else f"node {node}"


def send_and_check(grid: Grid, messages: list[Message], kind: str, server_round: int,
                   timeout: float, min_replies: int,
                   client_of_node: dict[int, int] | None = None) -> list[Message]:
    """Send, wait at most `timeout` seconds; carry on without failed clients while at least
    `min_replies` replied, else stop the run with the clients' reasons.

    `client_of_node` (node id -> partition id, learnt from earlier replies) names a failed
    client by its partition id where known.
    """
    if not messages:
        raise FlSimError(f"round {server_round}: the strategy sampled no client to {kind}.")
    replies = exchange(grid, messages, timeout)
    # A dead node's error reply comes from the SuperLink: name the node the message went to.
    sent = {m.metadata.message_id: m for m in messages}
    names = client_of_node or {}

    def culprit(reply: Message) -> str:
        to = sent.get(reply.metadata.reply_to_message_id)
        node = to.metadata.dst_node_id if to else reply.metadata.src_node_id
        return node_name(node, names)

    ok, reasons, sat_out = [], [], []
    for reply in replies:
        if reply.has_error():
            reasons.append(f"{culprit(reply)}: {reply.error.reason.strip()}")
        # A client that sits the round out (availability.dropout) replies with that alone.
        elif SAT_OUT in reply.content.get("metrics", {}):
            sat_out.append(reply)
        elif why := refusal(reply, sent[reply.metadata.reply_to_message_id], kind):
            reasons.append(f"{culprit(reply)}: refused: {why}")
        else:
            ok.append(reply)
    if len(replies) < len(messages):
        reasons.append(f"{len(messages) - len(replies)} gave no reply within {timeout:g} s")
    absent = [f"{len(sat_out)} sat the round out (availability)"] if sat_out else []
    if len(ok) < min_replies:
        raise FlSimError(
            f"round {server_round} ({kind}): {len(ok)} of {len(messages)} clients replied, "
            f"{min_replies} needed (min_clients). {'; '.join(reasons + absent)}. The rounds "
            "finished before are kept.")
    if sat_out:
        log.info("round %d (%s): %d clients sat out (availability)", server_round, kind,
                 len(sat_out))
    for reason in reasons:
        log.warning("round %d (%s): continuing without a client. %s", server_round, kind, reason)
    # A fixed order makes aggregation's floating-point sums independent of arrival order.
    return sorted(ok, key=lambda m: m.content["metrics"]["partition-id"])


class SampledGrid:
    """The grid as a strategy sees it in a sampled round: only the sampled nodes connected.
    fl-sim samples, seeded by (seed, round), rather than Flower (unseeded `random.sample`)."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid, self._node_ids = grid, node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def sample_nodes(grid: Grid, fraction: float, rng: np.random.Generator) -> Grid:
    """`grid`, or a SampledGrid of round(fraction x connected) of its nodes (at least one)."""
    node_ids = sorted(grid.get_node_ids())
    k = sample_size(len(node_ids), fraction)
    if k == len(node_ids):
        return grid
    # By position: node ids are unsigned 64-bit, which numpy would turn into floats.
    chosen = sorted(rng.choice(len(node_ids), k, replace=False))
    return SampledGrid(grid, [node_ids[i] for i in chosen])
