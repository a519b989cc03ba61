"""The server's round loop: the strategy's configure/aggregate steps, with fl-sim's bookkeeping.

fl-sim drives the strategy itself rather than calling `Strategy.start`, so that it can
record every client's reply before aggregation averages it away, bound every wait, select
the best round on validation, and write each finished round to disk at once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import pickle
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.superlink.grid import InMemoryGrid
from sklearn.metrics import confusion_matrix

from fl_sim.adversary import hostile_clients
from fl_sim.arrays import to_state_dict
from fl_sim.client.fedbn import batchnorm_keys
from fl_sim.client.train import optimizer_kwargs
from fl_sim.client.train_split import synthesis_classes
from fl_sim.config import PERSONALIZED, PRIVATE_HEAD, Run, StudyConfig
from fl_sim.errors import FlSimError
from fl_sim.evaluation import metrics_of, predict
from fl_sim.models.finetune import frozen_digest, is_partial, load_weights, travelling_state
from fl_sim.predictions import CLIENTS, clear_predictions, save_predictions
from fl_sim.privacy.central import with_client_level_dp
from fl_sim.privacy.ledger import PrivacyLedger, trainer_key
from fl_sim.server.checkpoints import Checkpoints, RunState, keep_rows_up_to
from fl_sim.server.failures import WRITE_ERRORS, RunFailed, check_finite
from fl_sim.server.messaging import (
    exchange, payload_bytes, sample_nodes, send_and_check, wait_for_clients,
)
from fl_sim.server.phases import (
    CrossSiteEvaluation, FederationCounts, Personalization, Synthesis,
)
from fl_sim.server.rows import log_clients, log_privacy, mean_row, train_row
from fl_sim.server.run_log import RunLog
from fl_sim.server.schedule import LRSchedule
from fl_sim.server.secure_aggregation import SecureAggregation
from fl_sim.server.summary import hparam_metrics, hparams_of, run_facts, write_summary
from fl_sim.strategies import build_strategy
from fl_sim.strategies.registry import sample_size
from fl_sim.task import build_model, check_input_size, load_data
from fl_sim.tracking import open_mirror
from fl_sim.wire import CLIENT_STORE, WEIGHT_KEY


logger = logging.getLogger(__name__)  # (`log` is a RunLog throughout)


class PhaseTimer:
    """Logs `time/<phase>_s` for each phase of a round, so slow parts show in TensorBoard."""

    def __init__(self, log: RunLog, server_round: int) -> None:
        self.log, self.server_round, self.last = log, server_round, time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.log.scalar(f"time/{phase}_s", now - self.last, self.server_round)
        self.last = now


@dataclass
class RoundReport:
    """What a progress display needs after each round."""

    server_round: int
    rounds: int
    seconds: float
    global_test: dict[str, float]  # empty: no global model (FedPer / FedRep)
    federated_val: dict[str, float]
    best_round: int

    def global_text(self) -> str:
        """e.g. `global test acc 0.512 bacc 0.433 avg 0.471`."""
        g = self.global_test
        return (f"global test acc {g['acc']:.3f} bacc {g['bacc']:.3f} avg {g['avg']:.3f}" if g
                else "no global model")


class FederatedRun:
    """One run of a study: strategy, global model, rounds, outputs in `run_dir`.

    The baselines (fl_sim.server.baselines) are subclasses that train in this process
    instead of through Flower: they override `_initial`, `_train`, `_evaluate_clients`,
    `_synthesis` and (local) `_global_eval`, and share everything else (rows, checkpoints,
    resume, summary).

    After every round, `checkpoints/last.pt` holds the global weights, the pickled strategy
    (FedAdam's moments, FedAvgM's momentum, ...) and the RunState, written atomically
    (fl_sim.server.checkpoints); a run restarted after a crash continues from there. Clients
    draw their randomness from (seed, client, round), so a resumed run repeats the
    uninterrupted one exactly on CPU. The phases before round 1 and after the last are
    objects the loop calls (fl_sim.server.phases); the baselines run them in process.
    """

    def __init__(self, study: StudyConfig, run: Run, run_dir: Path,
                 on_round: Callable[[RoundReport], None] | None = None) -> None:
        self.study, self.run, self.cfg = study, run, run.config
        self.run_dir = run_dir
        self.on_round = on_round
        data_json = study.data.model_dump_json()
        self.data = load_data(data_json)
        self.num_classes = len(self.data.classes)
        self.model, self.preprocess = build_model(self.cfg, self.data.class_names,
                                                 self.data.images.shape[1])
        # The digest lets a SuperNode check that its copy of the data splits as ours does.
        self.config = ConfigRecord({"data-config": data_json, "partition-digest": self.data.digest,
                                    "run-config": self.cfg.model_dump_json()})
        # Partial fine-tuning: messages carry the trainable part; the frozen rest is what
        # every process builds, which clients check against this digest.
        sent = travelling_state(self.model)
        self.frozen = OrderedDict((k, v.detach().cpu().clone())  # as checkpoints hold them
                                  for k, v in self.model.state_dict().items() if k not in sent)
        trained_part = None  # summary.json: what trains (and travels, in a federated run)
        if is_partial(self.model):
            self.config["frozen-digest"] = frozen_digest(self.model)
            trained_part = {"trained_tensors": len(sent), "tensors": len(sent) + len(self.frozen),
                            "trained_bytes": sum(t.nbytes for t in sent.values()),
                            "bytes": sum(t.nbytes for t in self.model.state_dict().values())}
        if len(self.data.indices("global", "test")) == 0:
            raise FlSimError("the server has no global test set (data.global_test.source: none "
                             "is for a SuperNode's own data): use holdout or isic2018.")
        # With availability, a round carries on with whoever trains (at least one does).
        self.min_clients = self.cfg.min_clients or (
            1 if self.cfg.availability else self.data.num_clients)
        hostile = (hostile_clients(self.cfg.adversary, self.data.num_clients, self.cfg.seed)
                   if self.cfg.adversary else [])
        self.client_of_node: dict[int, int] = {}
        if self.cfg.strategy.name == "fedbn" and not set(batchnorm_keys(self.model)) & set(sent):
            why = (f"trains none (finetune.trainable {self.cfg.finetune.trainable})"
                   if batchnorm_keys(self.model) else
                   "has none (ConvNeXt, ViT and Swin use LayerNorm)")
            raise FlSimError(f"strategy fedbn keeps each client's BatchNorm layers, but "
                             f"{self.cfg.model.name} {why}: it would be FedAvg. Use fedavg, or "
                             "a model with BatchNorm (resnet, efficientnet, "
                             "tf_efficientnet_lite0) that trains some.")
        self.facts = run_facts(self.cfg, hostile, trained_part)
        if self.cfg.synthesis is not None:
            synthesis_classes(self.cfg.synthesis, self.data.classes)  # names known classes
        if (self.cfg.privacy and self.cfg.privacy.client_level
                and self.min_clients != self.data.num_clients):
            raise FlSimError(
                f"privacy.client_level calibrates its noise to a fixed sample of the "
                f"{self.data.num_clients} clients, so every client must connect: leave "
                f"min_clients out (it is {self.min_clients}).")
        if self.min_clients > self.data.num_clients:
            raise FlSimError(f"min_clients {self.min_clients} exceeds the partition's "
                             f"{self.data.num_clients} clients: lower it.")
        self.resolved = run.resolved(study)
        self.checkpoints = Checkpoints(run_dir, self.resolved, run.name, self.data.classes)
        self.synthesis = self._synthesis() if self.cfg.synthesis is not None else None
        self.personalization = (
            Personalization(self.cfg.personalize, self.config,
                            self.checkpoints, self._arrays_of,
                            send_models=self.cfg.cross_site_eval)
            if self.cfg.personalize is not None else None)
        self.cross_site = self._cross_site() if self.cfg.cross_site_eval else None
        self.federation_counts = (self._federation_counts()
                                  if self.cfg.loss.weights_from == "federation" else None)
        self.secure = self._secure_aggregation() if self.cfg.secure_aggregation else None
        # Last: a forward pass, after the cheap refusals.
        check_input_size(self.model, self.preprocess.input_size, self.cfg.model.name)

    # ------------------------------------------------------------------ start or resume

    def _start_or_resume(self, ckpt: dict | None) -> tuple[ArrayRecord, Any, RunState]:
        """Fresh weights and strategy, or those of the last completed round on disk; first
        clears what a crash may have left (see `Checkpoints.save`)."""
        self.checkpoints.clear_temporaries()
        if ckpt is not None:
            state = self.checkpoints.restore(ckpt)
            self._write_summary(state, done=False)  # it may lag the checkpoints by a round
            name = self.cfg.strategy.name
            kept = ("fresh client optimizers (client_state: keep)"
                    if self.cfg.client_state == "keep" else
                    "the clients' heads as built" if name in PRIVATE_HEAD else
                    "the personal models at the global one" if name in PERSONALIZED else None)
            if kept and state.round < self.cfg.rounds:
                logger.warning("%s resumes after round %d with %s: they live in the nodes' "
                               "state, which a new run does not have", self.run.name,
                               state.round, kept)
            return (self._arrays_of(ckpt["state_dict"]), pickle.loads(ckpt["strategy"]), state)
        # A fresh start keeps nothing of an earlier one cut before its first checkpoint.
        for stale in (*self.run_dir.glob("events.out.tfevents.*"), self.checkpoints.best,
                      self.run_dir / "summary.json"):
            stale.unlink(missing_ok=True)
        clear_predictions(self.run_dir)
        self.checkpoints.folder.mkdir(parents=True, exist_ok=True)
        config = self.run_dir / "config.yaml"
        with RunLog.writing(config):
            config.write_text(yaml.safe_dump(self.resolved, sort_keys=False))
        with RunLog.writing(self.run_dir / "partition.csv"):
            self.data.write_manifest(self.run_dir / "partition.csv")
        keep_rows_up_to(self.run_dir, -1)
        return *self._initial(), RunState()

    def _synthesis(self) -> Synthesis:
        """The synthesis phase (before round 1), through the clients."""
        return Synthesis(self.config)

    def _cross_site(self) -> CrossSiteEvaluation:
        """The cross-site evaluation phase (after the last round), through the clients."""
        return CrossSiteEvaluation(self.config)

    def _federation_counts(self) -> FederationCounts:
        """The federation's class counts (before the first round), through the clients."""
        return FederationCounts(self.config, self.data.classes)

    def _secure_aggregation(self) -> SecureAggregation:
        """SecAgg+ for each round's training; clients weight their update by the metric it
        names, up to `max_weight` (by default the server partition's largest train split)."""
        cfg = self.cfg.secure_aggregation
        sampled = sample_size(self.data.num_clients, self.cfg.strategy.fraction_train)
        if sampled < 2 or isinstance(cfg.threshold, int) and cfg.threshold > sampled:
            raise FlSimError(
                f"secure_aggregation needs at least 2 clients in a round's sample, and at "
                f"least its threshold ({cfg.threshold}); a round samples {sampled} (clients x "
                "fraction_train).")
        uniform = self.cfg.strategy.weighting == "uniform"
        max_weight = cfg.max_weight or (1.0 if uniform else float(max(
            len(self.data.indices(c, "train")) for c in range(self.data.num_clients))))
        weight_key = "unit-weight" if uniform else "num-examples"
        self.config[WEIGHT_KEY] = weight_key
        return SecureAggregation(cfg, max_weight, weight_key)

    def _initial(self) -> tuple[ArrayRecord, Any]:
        """The initial weights (the run's seeded model) and the strategy."""
        params = self.model.named_parameters(remove_duplicate=False)
        strategy = build_strategy(self.cfg.strategy, self.data.num_clients, self.min_clients,
                                  trainable=[name for name, p in params if p.requires_grad],
                                  client_lr=optimizer_kwargs(self.cfg.optimizer)["lr"])
        if self.cfg.privacy and self.cfg.privacy.client_level:
            strategy = with_client_level_dp(
                strategy, self.cfg.privacy, self.data.num_clients,
                sample_size(self.data.num_clients, self.cfg.strategy.fraction_train),
                secure=self.cfg.secure_aggregation is not None)
        return ArrayRecord(travelling_state(self.model)), strategy

    def _trainers(self) -> dict[str, int]:
        """Who trains in a round (every client, at most), with their own train images: what
        the privacy ledger foresees the next round's cost by."""
        return {trainer_key(c): len(self.data.indices(c, "train"))
                for c in range(self.data.num_clients)}

    def _arrays_of(self, state_dict: dict[str, torch.Tensor]) -> ArrayRecord:
        """The round's arrays from a checkpoint's whole model: its travelling tensors."""
        return ArrayRecord(OrderedDict((k, v) for k, v in state_dict.items()
                                       if k not in self.frozen))

    def _checkpoint_state(self, arrays: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
        """The whole model for a checkpoint: the round's arrays beside the frozen part, so
        best.pt and last.pt load into a model as they are."""
        return OrderedDict({**self.frozen, **to_state_dict(arrays)})

    # ------------------------------------------------------------------ steps

    def _global_eval(self, server_round: int, arrays: ArrayRecord, log: RunLog) -> dict:
        if self.cfg.strategy.name in PRIVATE_HEAD:
            return {}  # no global model: the server never sees a head
        load_weights(self.model, to_state_dict(arrays))
        probs, loss = self._predict_global()
        y_true = self.data.labels[self.data.indices("global", "test")]
        metrics = metrics_of(y_true, probs, self.data.classes, loss)
        log.row(server_round, "global", None, "test", metrics)
        cm = confusion_matrix(y_true, probs.argmax(1), labels=np.arange(self.num_classes))
        log.confusion("global/test/confusion", cm, self.data.classes, server_round)
        self._keep_predictions(server_round, [probs])
        return metrics

    def _predict_global(self) -> tuple[np.ndarray, float]:
        """The loaded model's probabilities on the global test set, and its mean loss."""
        return predict(self.model, self.data.images, self.data.labels,
                       self.data.indices("global", "test"), self.preprocess,
                       self.cfg.eval_batch_size)

    def _keep_predictions(self, server_round: int, probs: list[np.ndarray]) -> None:
        """The round's per-image predictions on the global test set (one array per model)."""
        rows = self.data.indices("global", "test")
        save_predictions(self.run_dir, server_round,
                         self.data.manifest["image_id"].to_numpy()[rows], self.data.labels[rows],
                         probs)

    def _exchange(self, messages: list[Message], grid: Grid, kind: str,
                  server_round: int, state: RunState) -> list[Message]:
        state.bytes_sent += sum(payload_bytes(m) for m in messages)
        # Of a sample (fraction_train / fraction_evaluate), at most all must reply.
        replies = send_and_check(grid, messages, kind, server_round, self.cfg.round_timeout_s,
                                 min(self.min_clients, len(messages)), self.client_of_node)
        self._learn_clients(replies)
        state.bytes_received += sum(payload_bytes(m) for m in replies)
        return replies

    def _relay(self, grid: Grid, state: RunState, messages: list[Message]) -> list[Message]:
        """One exchange of a secure-aggregation stage, counted; the stage checks the replies."""
        state.bytes_sent += sum(payload_bytes(m) for m in messages)
        replies = exchange(grid, messages, self.cfg.round_timeout_s)
        state.bytes_received += sum(payload_bytes(m) for m in replies if m.has_content())
        return replies

    def _learn_clients(self, replies: list[Message]) -> None:
        """Which partition each replying node holds, to name a failed one later."""
        self.client_of_node.update({
            m.metadata.src_node_id: int(m.content["metrics"]["partition-id"]) for m in replies})

    def _query(self, grid: Grid, action: str, content: RecordDict, server_round: int,
               state: RunState) -> list[Message]:
        """`content` to every connected client as a `query.<action>` message; the replies."""
        wait_for_clients(grid, self.min_clients, self.cfg.round_timeout_s, server_round)
        messages = [Message(content=content, message_type=f"query.{action}", dst_node_id=node)
                    for node in grid.get_node_ids()]
        return self._exchange(messages, grid, action, server_round, state)

    def _train(self, server_round: int, arrays: ArrayRecord, strategy: Any, grid: Grid,
               state: RunState, phase: PhaseTimer) -> tuple[ArrayRecord, dict[int | None, dict]]:
        """One round of training: the new weights and a train row per client (key None: a
        row of all clients' data together, as the pooled baseline trains)."""
        wait_for_clients(grid, self.min_clients, self.cfg.round_timeout_s, server_round)
        sample = sample_nodes(grid, self.cfg.strategy.fraction_train,
                              np.random.default_rng([self.cfg.seed, server_round, 0]))
        messages = list(strategy.configure_train(server_round, arrays, self.config, sample))
        if self.secure is None:
            replies = self._exchange(messages, grid, "train", server_round, state)
        else:
            replies = self.secure.train(messages, functools.partial(self._relay, grid, state),
                                        server_round, min(self.min_clients, len(messages)),
                                        self.client_of_node)
            self._learn_clients(replies)
        phase("train")
        rows = {int(m["partition-id"]): train_row(m, int(m["num-examples"]))
                for m in (reply.content["metrics"] for reply in replies)}
        arrays, _ = strategy.aggregate_train(server_round, replies)
        if arrays is None:
            why = (" Under privacy.client_level every sampled client must reply: the noise is "
                   "calibrated to them." if self.cfg.privacy and self.cfg.privacy.client_level
                   else "")
            if self.cfg.strategy.name == "bulyan":
                f = int(self.cfg.strategy.params.get("num_malicious_nodes", 0))
                why = (f" {len(replies)} updates arrived, and Bulyan needs 4f + 3 = {4 * f + 3} "
                       f"(num_malicious_nodes {f}): clients failed or sat out.")
            raise FlSimError(f"round {server_round}: {self.cfg.strategy.name} aggregated "
                             f"nothing.{why}")
        phase("aggregate")
        return arrays, rows

    def _evaluate_clients(self, server_round: int, arrays: ArrayRecord, strategy: Any,
                          grid: Grid, state: RunState) -> list[dict]:
        """The `val_*` / `test_*` metrics of the round's model(s) of every client, or of a
        `fraction_evaluate` sample between the `eval_every` rounds."""
        wait_for_clients(grid, self.min_clients, self.cfg.round_timeout_s, server_round)
        fraction = 1.0 if self._evaluates_all(server_round) else self.cfg.strategy.fraction_evaluate
        sample = sample_nodes(grid, fraction,
                              np.random.default_rng([self.cfg.seed, server_round, 1]))
        messages = list(strategy.configure_evaluate(server_round, arrays, self.config, sample))
        replies = self._exchange(messages, grid, "evaluate", server_round, state)
        return [dict(reply.content["metrics"]) for reply in replies]

    def _evaluates_all(self, server_round: int) -> bool:
        """Whether every client evaluates this round's model: only such a round's federated
        validation compares with another's, so only such a round can be the best."""
        return (self.cfg.strategy.fraction_evaluate == 1 or server_round == self.cfg.rounds
                or server_round % self.cfg.eval_every == 0)

    def _round(self, server_round: int, arrays: ArrayRecord, strategy: Any, grid: Grid,
               log: RunLog, state: RunState, lr: float) -> tuple[ArrayRecord, dict, dict, dict]:
        phase = PhaseTimer(log, server_round)
        self.config["lr"] = lr  # the clients train this round at the schedule's rate
        log.scalar("train/lr", lr, server_round)
        arrays, rows = self._train(server_round, arrays, strategy, grid, state, phase)
        check_finite(server_round, rows, arrays, lr)
        if self.ledger is not None:
            self.ledger.book({client: row["n"] for client, row in rows.items()})
            state.privacy = self.ledger.summary(strategy)
            log_privacy(server_round, state.privacy, log)
        for client, row in rows.items():
            if client is not None:
                log.row(server_round, "client", client, "train", row)
        federated_train = {**mean_row(list(rows.values()), ["loss", "acc"]), "lr": lr,
                           "clients": len(rows)}  # who trained (fewer: dropout, failures)
        log.row(server_round, "federated", None, "train", federated_train)

        evaluations = self._evaluate_clients(server_round, arrays, strategy, grid, state)
        federated_val = log_clients(server_round, evaluations, log)
        phase("client_eval")
        global_test = self._global_eval(server_round, arrays, log)
        phase("global_eval")
        return arrays, federated_train, federated_val, global_test

    # ------------------------------------------------------------------ the loop

    def execute(self, grid: Grid | None = None) -> dict:
        """All rounds not on disk yet. A diverged round stops the run (RunFailed; the run is
        marked failed in summary.json); an error writing a file (a full disk, a read-only
        folder) stops it with a paragraph that says what is intact, and leaves no temporary
        file. Whatever stops it (also Ctrl-C: `stop_requested`, a failed client) takes back
        the rows of the round it cut: a rerun resumes from the last saved round."""
        if isinstance(grid, InMemoryGrid):  # simulated clients share this disk
            self.config[CLIENT_STORE] = str(self.run_dir / CLIENTS)
        ckpt = self.checkpoints.load_last()
        # The round last.pt holds, and the one being written and not saved yet (if any).
        saved = ckpt["state"] if ckpt else {"round": 0, "stopped": None}
        self.checkpoints.saved_round = saved["round"]
        self.checkpoints.pending_round = (
            None if saved["round"] == self.cfg.rounds or saved["stopped"] else saved["round"] + 1)
        try:
            arrays, strategy, state = self._start_or_resume(ckpt)
            mirror = (open_mirror(self.run_dir, self.study.study, self.resolved)
                      if "mlflow" in self.study.tracking else None)
            log = RunLog(self.run_dir, purge_step=state.round + 1 if state.round else None,
                         mirror=mirror)
            try:
                summary = self._rounds(arrays, strategy, state, grid, log)
            except BaseException:
                # metrics.jsonl keeps the saved rounds only (and the phases after the last
                # round once all are done: a rerun repeats them); the error in flight is the
                # one to report, not one of these.
                with contextlib.suppress(OSError):
                    log.rollback()
                with contextlib.suppress(OSError):
                    log.close()
                raise
            log.close(finished=True)
            return summary
        except OSError as err:
            if err.errno not in WRITE_ERRORS:
                raise
            raise FlSimError(self.checkpoints.write_error(err)) from None

    def _rounds(self, arrays: ArrayRecord, strategy: Any, state: RunState, grid: Grid | None,
                log: RunLog) -> dict:
        metric = self.cfg.selection_metric
        schedule = LRSchedule(self.cfg.lr_schedule, optimizer_kwargs(self.cfg.optimizer)["lr"],
                              self.cfg.rounds, state.schedule)
        self.ledger = (PrivacyLedger(self.cfg, self._trainers(), state.privacy)
                       if self.cfg.privacy else None)
        if self.ledger is not None and not state.privacy:
            state.privacy = self.ledger.summary(strategy)  # nothing spent yet
        query = functools.partial(self._query, grid, state=state)  # a phase's way to the clients
        if self.federation_counts is not None:  # in the config of every round's messages
            self.federation_counts(query)
        if state.round == 0:
            if self.synthesis is not None:
                state.synthesis = self.synthesis(query, log)
            self._global_eval(0, arrays, log)
            log.commit()  # round 0 (the initial model) stays, whatever stops round 1
        for server_round in range(state.round + 1, self.cfg.rounds + 1):
            if state.stopped:  # early stop (also when resuming a run that stopped)
                break
            if self.ledger is not None and (overspend := self.ledger.overspend(strategy)):
                state.stopped = {"round": server_round - 1, "reason": overspend}
                break
            self.checkpoints.pending_round = server_round
            t0 = time.perf_counter()
            sent, received = state.bytes_sent, state.bytes_received
            try:
                arrays, federated_train, federated_val, global_test = self._round(
                    server_round, arrays, strategy, grid, log, state, schedule.lr(server_round))
            except RunFailed as failure:
                self._write_summary(state, done=False, failed=failure.failed)
                raise
            stop = schedule.after_round(federated_train["acc"], federated_val["loss"])
            state.schedule = schedule.state()
            if stop:
                state.stopped = {"round": server_round, "reason": stop}
            score = -federated_val[metric] if metric == "loss" else federated_val[metric]
            record = {"round": server_round, "federated_val": federated_val,
                      "global_test": global_test}
            state.round, state.final = server_round, record
            is_best = self._evaluates_all(server_round) and score > state.best_score  # not NaN
            if is_best:
                state.best_round, state.best_score, state.best = server_round, score, record
            state.round_seconds.append(time.perf_counter() - t0)
            self.checkpoints.save(self._checkpoint_state(arrays), strategy, state, is_best)
            log.commit()
            # The round's time includes its checkpoint (a resumed run keeps the time
            # measured just before the write).
            seconds = state.round_seconds[-1] = time.perf_counter() - t0
            log.scalar("time/round_s", seconds, server_round)
            log.scalar("comm/bytes_sent", state.bytes_sent - sent, server_round)
            log.scalar("comm/bytes_received", state.bytes_received - received, server_round)
            self._write_summary(state, done=False)
            if self.on_round:
                self.on_round(RoundReport(server_round, self.cfg.rounds, seconds, global_test,
                                          federated_val, state.best_round))
        self.checkpoints.pending_round = None  # an early stop's next round never starts
        if state.round:  # the phases after the last round
            personalized: dict[str, ArrayRecord] = {}
            if self.personalization is not None:
                state.personalized, personalized = self.personalization(arrays, query, state,
                                                                        log)
            if self.cross_site is not None:
                state.cross_site = self.cross_site(personalized, query, state, log)
            log.commit()
        summary = self._write_summary(state, done=True)
        log.hparams(hparams_of(self.cfg), hparam_metrics(summary))
        return summary

    def _write_summary(self, state: RunState, done: bool,
                       failed: dict[str, Any] | None = None) -> dict:
        return write_summary(self.run_dir, self.run.name, self.cfg, state, done, self.facts,
                             failed)
