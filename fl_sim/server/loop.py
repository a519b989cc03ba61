"""The server's round loop: the strategy's configure/aggregate steps, with fl-sim's bookkeeping.

fl-sim drives the strategy itself rather than calling `Strategy.start`, so that it can
record every client's reply before aggregation averages it away, bound every wait, select
the best round on validation, and write each finished round to disk at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fl_sim.config import Run, StudyConfig
from fl_sim.errors import FlSimError
from fl_sim.evaluation import evaluate
from fl_sim.metrics import HEADLINE
from fl_sim.server.run_log import RunLog, write_json_atomic
from fl_sim.strategies import build_strategy
from fl_sim.task import load_data, load_model

SPLITS = ("val", "test")
log = logging.getLogger(__name__)


def payload_bytes(msg: Message) -> int:
    """Bytes of a message's records as Flower counts them (array data, metric and config values)."""
    return sum(record.count_bytes() for record in msg.content.values())


def wait_for_clients(grid: Grid, needed: int, timeout: float, server_round: int) -> None:
    """Flower's samplers wait for nodes forever; fl-sim waits at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < needed:
        if time.monotonic() > deadline:
            raise FlSimError(
                f"round {server_round}: only {connected} clients connected, {needed} needed "
                f"(min_clients), after waiting {timeout:g} s (round_timeout_s). Start more "
                "clients or lower min_clients; the rounds finished before are kept.")
        time.sleep(1.0)


def send_and_check(grid: Grid, messages: list[Message], kind: str, server_round: int,
                   timeout: float, min_replies: int) -> list[Message]:
    """Send, wait at most `timeout` seconds; carry on without failed clients while at least
    `min_replies` replied, else stop the run with the clients' reasons."""
    if not messages:
        raise FlSimError(f"round {server_round}: the strategy sampled no client to {kind}.")
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    ok = [m for m in replies if not m.has_error()]
    reasons = [f"node {m.metadata.src_node_id}: {m.error.reason.strip()}"
               for m in replies if m.has_error()]
    if len(replies) < len(messages):
        reasons.append(f"{len(messages) - len(replies)} gave no reply within {timeout:g} s")
    if len(ok) < min_replies:
        raise FlSimError(
            f"round {server_round} ({kind}): {len(ok)} of {len(messages)} clients replied, "
            f"{min_replies} needed (min_clients). {'; '.join(reasons)}. The rounds finished "
            "before are kept.")
    for reason in reasons:
        log.warning("round %d (%s): continuing without a client. %s", server_round, kind, reason)
    # A fixed order makes aggregation's floating-point sums independent of arrival order.
    return sorted(ok, key=lambda m: m.content["metrics"]["partition-id"])


@dataclass
class RoundReport:
    """What a progress display needs after each round."""

    server_round: int
    rounds: int
    seconds: float
    global_test: dict[str, float]
    federated_val: dict[str, float]
    best_round: int


@dataclass
class _Best:
    round: int = -1
    score: float = float("nan")
    record: dict = field(default_factory=dict)


class FederatedRun:
    """One run of a study: strategy, global model, rounds, outputs in `run_dir`."""

    def __init__(self, study: StudyConfig, run: Run, run_dir: Path,
                 on_round: Callable[[RoundReport], None] | None = None) -> None:
        self.study, self.run, self.cfg = study, run, run.config
        self.run_dir = run_dir
        self.on_round = on_round
        data_json = study.data.model_dump_json()
        self.data = load_data(data_json)
        self.num_classes = len(self.data.classes)
        self.model, self.preprocess = load_model(
            self.cfg.model_dump_json(), self.num_classes, self.data.images.shape[1])
        self.config = ConfigRecord({"data-config": data_json,
                                    "run-config": self.cfg.model_dump_json()})
        self.min_clients = self.cfg.min_clients or self.data.num_clients
        if self.min_clients > self.data.num_clients:
            raise FlSimError(f"min_clients {self.min_clients} exceeds the partition's "
                             f"{self.data.num_clients} clients: lower it.")
        self.bytes_sent = 0
        self.bytes_received = 0

    # ------------------------------------------------------------------ outputs

    def _write_run_files(self) -> None:
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        resolved = {"study": self.study.study, "run": self.run.name,
                    "data": self.study.data.model_dump(mode="json"),
                    "run_config": self.cfg.model_dump(mode="json")}
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        self.data.write_manifest(self.run_dir / "partition.csv")

    def _checkpoint(self, name: str, server_round: int, arrays: ArrayRecord) -> None:
        path = self.run_dir / "checkpoints" / f"{name}.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save({"round": server_round, "run": self.run.name, "classes": self.data.classes,
                    "state_dict": arrays.to_torch_state_dict()}, tmp)
        tmp.replace(path)

    # ------------------------------------------------------------------ steps

    def _global_eval(self, server_round: int, arrays: ArrayRecord, log: RunLog) -> dict:
        self.model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        metrics = evaluate(self.model, self.data.images, self.data.labels,
                           self.data.indices("global", "test"), self.preprocess,
                           self.cfg.eval_batch_size, self.num_classes)
        log.row(server_round, "global", None, "test", metrics)
        return metrics

    def _exchange(self, messages: list[Message], grid: Grid, kind: str,
                  server_round: int) -> list[Message]:
        self.bytes_sent += sum(payload_bytes(m) for m in messages)
        replies = send_and_check(grid, messages, kind, server_round,
                                 self.cfg.round_timeout_s, self.min_clients)
        self.bytes_received += sum(payload_bytes(m) for m in replies)
        return replies

    def _log_clients(self, server_round: int, replies: list[Message], log: RunLog) -> dict:
        """Per-client rows; returns the example-weighted mean of the clients' val metrics."""
        val_rows = []
        for reply in replies:
            metrics = dict(reply.content["metrics"])
            client = int(metrics["partition-id"])
            for split in SPLITS:
                prefix = f"{split}_"
                row = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
                row["n"] = int(row["n"])
                log.row(server_round, "client", client, split, row)
                if split == "val":
                    val_rows.append(row)
        weights = np.array([r["n"] for r in val_rows], dtype=float)
        keys = [k for k in val_rows[0] if k != "n"]
        federated = {k: float(np.average([r[k] for r in val_rows], weights=weights)) for k in keys}
        federated["n"] = int(weights.sum())
        log.row(server_round, "federated", None, "val", federated)
        return federated

    # ------------------------------------------------------------------ the loop

    def execute(self, grid: Grid) -> dict:
        cfg = self.cfg
        self._write_run_files()
        strategy = build_strategy(cfg.strategy, self.data.num_clients, self.min_clients)
        arrays = ArrayRecord(self.model.state_dict())
        log = RunLog(self.run_dir)
        start = time.perf_counter()
        best, final = _Best(), {}
        try:
            final_global = self._global_eval(0, arrays, log)
            for server_round in range(1, cfg.rounds + 1):
                t0 = time.perf_counter()
                wait_for_clients(grid, self.min_clients, cfg.round_timeout_s, server_round)
                train_msgs = list(strategy.configure_train(server_round, arrays, self.config, grid))
                replies = self._exchange(train_msgs, grid, "train", server_round)
                for reply in replies:
                    m = reply.content["metrics"]
                    log.row(server_round, "client", int(m["partition-id"]), "train",
                            {"n": int(m["num-examples"]), "loss": float(m["train_loss"]),
                             "steps": int(m["steps"]), "time_s": float(m["train_time_s"])})
                aggregated, _ = strategy.aggregate_train(server_round, replies)
                if aggregated is None:
                    raise FlSimError(f"round {server_round}: {cfg.strategy.name} aggregated nothing.")
                arrays = aggregated

                wait_for_clients(grid, self.min_clients, cfg.round_timeout_s, server_round)
                eval_msgs = list(strategy.configure_evaluate(server_round, arrays, self.config, grid))
                replies = self._exchange(eval_msgs, grid, "evaluate", server_round)
                federated_val = self._log_clients(server_round, replies, log)
                final_global = self._global_eval(server_round, arrays, log)

                self._checkpoint("last", server_round, arrays)
                score = federated_val[cfg.selection_metric]
                if cfg.selection_metric == "loss":
                    score = -score
                if best.round < 0 or score > best.score:
                    best = _Best(server_round, score, {"federated_val": federated_val,
                                                       "global_test": final_global})
                    self._checkpoint("best", server_round, arrays)
                final = {"round": server_round, "federated_val": federated_val,
                         "global_test": final_global}
                seconds = time.perf_counter() - t0
                log.scalar("time/round_s", seconds, server_round)
                self._write_summary(best, final, time.perf_counter() - start, done=False)
                if self.on_round:
                    self.on_round(RoundReport(server_round, cfg.rounds, seconds, final_global,
                                              federated_val, best.round))
        finally:
            log.close()
        return self._write_summary(best, final, time.perf_counter() - start, done=True)

    def _write_summary(self, best: _Best, final: dict, wall: float, done: bool) -> dict:
        summary = {
            "run": self.run.name,
            "complete": done,
            "rounds": self.cfg.rounds,
            "selection": f"federated val {self.cfg.selection_metric} (mean of clients, by n)",
            "best": {"round": best.round, **best.record},
            "final": final,
            "headline_metrics": list(HEADLINE) + ["avg"],
            "wall_time_s": wall,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
        }
        write_json_atomic(self.run_dir / "summary.json", summary)
        return summary
