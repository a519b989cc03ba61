"""A SuperNode's warm worker: the node's executor, running every ClientApp task in one process.

Flower 1.39 runs a node's ClientApp in a new `flwr-clientapp` process per message, started
by the node's SuperExec: Python, Flower's imports and the app's (torch, timm: ~8 s here) for
every message, then the data opened and the model built again. With `--isolation process`
a SuperNode leaves that to an executor of one's own; `fl-sim deploy supernode` starts this
one beside it. It asks the node's Runtime API for tasks as Flower's SuperExec does and runs
each one as `flwr-clientapp` would (Flower's own functions pull the message and push the
reply), but in this process, where imports, the decoded data and the built model stay warm
from message to message, as in a simulation's client actors. The ClientApp is fl-sim's,
installed beside this worker: the node runs its own fl-sim, not the code a run submits.

    python -m fl_sim.deploy.worker --runtime-api 127.0.0.1:9094 --supernode-pid PID
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

import httpx
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from fl_sim.deploy.processes import WORKER_READY_TEXT, is_alive
from fl_sim.deploy.supernode import DEFAULT_POLL_INTERVAL

log = logging.getLogger("fl_sim.deploy.worker")


def retry_invoker() -> RetryInvoker:
    """Retries when the node cannot be reached (it may be starting or restarting); gives up
    on an HTTP error status. Flower's own (`make_simple_http_retry_invoker`) answers a 401, a
    task the node has cancelled, by sending SIGINT to its own process: right for a
    flwr-clientapp, which lives for one task, fatal for a worker that serves them all."""
    return RetryInvoker(wait_gen_factory=lambda: exponential(max_delay=10),
                        recoverable_exceptions=(httpx.TransportError,), max_tries=None,
                        max_time=None)


def pull_task_input(client: RuntimeHttpClient, backoff: float) -> tuple[Message, Context]:
    """Flower's `run_clientapp.pull_task_input`, retrying unavailable objects after `backoff`
    seconds instead of 1, 2, 4, ...: the worker often asks for a message that its SuperNode
    is still receiving (a task is listed as soon as the message's header is in)."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node,
                                                  context.run_id),
        return_type=Message, initial_backoff=backoff, backoff_cap=backoff,
        max_tries_per_object=None)  # bounded by Flower's max_time (2 h), not by the tries
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower sets it
    return message, context


def run_task(app: ClientApp, address: str, token: str, poll: float) -> None:
    """One ClientApp task, as Flower's `run_clientapp` runs it, without leaving the process:
    pull the message, call the ClientApp, push the reply (or the error) and the status."""
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=retry_invoker())
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context, status, details = None, SubStatus.FAILED, "the worker failed before the ClientApp ran"
    try:
        message, context = pull_task_input(client, poll)
        try:
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as err:  # as flwr-clientapp reports it: the server names the client
            log.exception("the ClientApp raised")
            details = str(type(err)) + ":<'" + str(err) + "'>"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                            reply_to=message)
        push_message(client, reply, context)
    finally:
        push_task_output(client=client, context=context, sub_status=status, details=details)
        heartbeat.stop()
        client.close()


def serve(address: str, supernode_pid: int | None, threads: int | None, poll: float) -> None:
    """Run the node's ClientApp tasks one at a time (a SuperNode sends one at a time) until
    SIGTERM or SIGINT, or until the SuperNode `supernode_pid` is gone."""
    import torch

    from fl_sim.client.client_app import app  # torch, timm: paid once, here

    if threads:
        torch.set_num_threads(threads)

    def stop(signum: int, frame: object) -> None:
        # At once, wherever the main thread waits (Flower's retries sleep under locks that
        # an exception from a signal handler does not reliably break): nothing to flush.
        log.info("stopping (signal %d)", signum)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if supernode_pid is not None:  # no orphan: leave with the node

        def watch() -> None:
            while is_alive(supernode_pid):
                time.sleep(0.5)
            log.info("the SuperNode (pid %d) is gone: stopping", supernode_pid)
            os._exit(0)

        threading.Thread(target=watch, daemon=True).start()
    tasks = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=retry_invoker())
    print(f"{WORKER_READY_TEXT}{address}", flush=True)
    while True:
        try:
            res = tasks.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if res.HasField("task") and res.token:
                run_task(app, address, res.token, poll)
                continue
        except Exception:  # a failed task (the node was told) or request: carry on serving
            log.exception("the worker's request to its SuperNode failed")
        time.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fl_sim.deploy.worker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime-api", required=True,
                    help="the SuperNode's Runtime API, HOST:PORT (its --port)")
    ap.add_argument("--supernode-pid", type=int, help="exit when this process is gone")
    ap.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    ap.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL,
                    help="seconds between requests for a task while idle, and between tries "
                         f"of an object not there yet (default {DEFAULT_POLL_INTERVAL})")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per poll otherwise
    serve(args.runtime_api, args.supernode_pid, args.threads, args.poll_interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
