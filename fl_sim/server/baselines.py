"""The baselines a federated result is read against, as runs of the grid:

- `pooled`: one model trained on the union of all clients' train splits (what no hospital
  may do), `local_epochs` epochs (or `local_steps` steps) per round;
- `local`: every client trains its own model on its own train split only.

Both train in this process with the same `train_local` and recipe as a federated client
(no Flower, no Ray), and write the same run directory: per-client val/test rows, the
federated val row that picks the best round, global test rows, checkpoints and resume.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

from fl_sim.arrays import to_state_dict
from fl_sim.client.node_state import KeptOptimizer
from fl_sim.client.recipe import federation_counts
from fl_sim.client.train import train_local
from fl_sim.client.train_split import (
    client_synthesis, own_class_counts, synthesis_report, train_split,
)
from fl_sim.evaluation import evaluate_splits, metrics_of
from fl_sim.predictions import SplitStore, client_folder
from fl_sim.privacy.ledger import trainer_key
from fl_sim.server.checkpoints import RunState
from fl_sim.server.loop import FederatedRun, PhaseTimer
from fl_sim.server.phases import CrossSiteEvaluation, FederationCounts, Query, log_synthesis
from fl_sim.server.rows import split_rows, train_row
from fl_sim.server.run_log import RunLog
from fl_sim.task import client_rng


class BaselineRun(FederatedRun):
    """What both baselines share: training a model on some rows, evaluating every client.
    `node_states`: what each trainer keeps between rounds (client_state: keep), as a node's
    state would hold it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.node_states: dict[int, RecordDict] = {}

    def _initial(self) -> tuple[ArrayRecord, Any]:
        return ArrayRecord(self.model.state_dict()), None  # no strategy

    # Nothing travels: the arrays are whole models (LocalRun: one per client), as saved.
    def _arrays_of(self, state_dict: dict[str, torch.Tensor]) -> ArrayRecord:
        return ArrayRecord(state_dict)

    def _checkpoint_state(self, arrays: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
        return to_state_dict(arrays)

    def _synthesis(self) -> InProcessSynthesis:
        return InProcessSynthesis(self)

    def _federation_counts(self) -> InProcessFederationCounts:
        return InProcessFederationCounts(self)

    def _train_on(self, clients: list[int], rng_client: int, server_round: int) -> dict:
        """train_local on the train splits of `clients` (with their generated images, under
        synthesis) at the round's learning rate; its train row."""
        images, labels, indices = train_split(self.data, clients, self.cfg, self.study.data,
                                              self.preprocess.device)
        start = time.perf_counter()
        kept = (KeptOptimizer(self.node_states.setdefault(rng_client, RecordDict()),
                              self.cfg.model_dump_json())
                if self.cfg.client_state == "keep" else None)
        result = train_local(self.model, images, labels, indices, self.preprocess, self.cfg,
                             rng=client_rng(self.cfg.seed, rng_client, server_round, stream=0),
                             lr=float(self.config["lr"]), kept=kept,
                             federation_counts=federation_counts(self.config))
        result["train_time_s"] = time.perf_counter() - start
        # `n` counts the clients' own images, as a federated client's reply does.
        return train_row(result, int((indices < len(self.data.images)).sum()))

    def _metrics_of(self, client: int, server_round: int) -> dict:
        """The loaded model on `client`'s val and test splits, as a client would report them
        (and keep its test split's predictions)."""
        return {"partition-id": client, **evaluate_splits(
            self.model, self.data, client, self.preprocess, self.cfg.eval_batch_size,
            keep=SplitStore(client_folder(self.run_dir, client), server_round))}

    @property
    def clients(self) -> range:
        return range(self.data.num_clients)


class InProcessSynthesis:
    """Each client's synthesis, in this process (as its own client would do it)."""

    def __init__(self, run: BaselineRun) -> None:
        self.run = run

    def __call__(self, query: Query, run_log: RunLog) -> dict:
        run, reports = self.run, []
        for c in run.clients:
            made = client_synthesis(run.data, c, run.cfg, run.study.data, run.preprocess.device)
            metrics, samples = synthesis_report(made, run.data.classes)
            reports.append(({"partition-id": c, **metrics}, samples))
        return log_synthesis(reports, run_log)


class InProcessFederationCounts(FederationCounts):
    """The federation's class counts, counted here (as each client would count its own)."""

    def __init__(self, run: BaselineRun) -> None:
        super().__init__(run.config, run.data.classes)
        self.run = run

    def client_counts(self, query: Query) -> list[list[int]]:
        return [own_class_counts(self.run.data, c).tolist() for c in self.run.clients]


class PooledRun(BaselineRun):
    def _trainers(self) -> dict[str, int]:
        return {trainer_key(None): sum(len(self.data.indices(c, "train")) for c in self.clients)}

    def _train(self, server_round: int, arrays: ArrayRecord, strategy: Any, grid: Any,
               state: RunState, phase: PhaseTimer) -> tuple[ArrayRecord, dict]:
        self.model.load_state_dict(to_state_dict(arrays), strict=True)
        row = self._train_on(list(self.clients), 0, server_round)
        phase("train")
        return ArrayRecord(self.model.state_dict()), {None: row}

    def _evaluate_clients(self, server_round: int, arrays: ArrayRecord, strategy: Any,
                          grid: Any, state: RunState) -> list[dict]:
        self.model.load_state_dict(to_state_dict(arrays), strict=True)
        return [self._metrics_of(c, server_round) for c in self.clients]


def client_prefix(client: int) -> str:
    return f"client{client}/"


def pack_clients(states: list[dict[str, torch.Tensor]]) -> ArrayRecord:
    """Every client's own weights in one record (one checkpoint), keys `client<k>/<name>`."""
    return ArrayRecord(OrderedDict((client_prefix(k) + name, t)
                                   for k, state in enumerate(states) for name, t in state.items()))


def client_state(arrays: ArrayRecord, client: int) -> OrderedDict[str, torch.Tensor]:
    prefix = client_prefix(client)
    return OrderedDict((k[len(prefix):], v) for k, v in to_state_dict(arrays).items()
                       if k.startswith(prefix))


class LocalRun(BaselineRun):
    """Each client alone. The `global` test row is the mean over the clients' models (each
    client's own model on the global test set is a `client` row of split `global_test`)."""

    def _initial(self) -> tuple[ArrayRecord, Any]:
        # Every client starts from the same seeded model, as in a federated run.
        return pack_clients([self.model.state_dict()] * self.data.num_clients), None

    def _load(self, arrays: ArrayRecord, client: int) -> nn.Module:
        self.model.load_state_dict(client_state(arrays, client), strict=True)
        return self.model

    def _train(self, server_round: int, arrays: ArrayRecord, strategy: Any, grid: Any,
               state: RunState, phase: PhaseTimer) -> tuple[ArrayRecord, dict]:
        rows, states = {}, []
        for c in self.clients:
            self._load(arrays, c)
            rows[c] = self._train_on([c], c, server_round)
            states.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        phase("train")
        return pack_clients(states), rows

    def _evaluate_clients(self, server_round: int, arrays: ArrayRecord, strategy: Any,
                          grid: Any, state: RunState) -> list[dict]:
        evaluations = []
        for c in self.clients:
            self._load(arrays, c)
            evaluations.append(self._metrics_of(c, server_round))
        return evaluations

    def _cross_site(self) -> LocalCrossSite:
        return LocalCrossSite(self)

    def _global_eval(self, server_round: int, arrays: ArrayRecord, log: RunLog) -> dict:
        rows, probs = [], []
        y_true = self.data.labels[self.data.indices("global", "test")]
        for c in self.clients:
            self._load(arrays, c)
            client_probs, loss = self._predict_global()
            probs.append(client_probs)
            rows.append(metrics_of(y_true, client_probs, self.data.classes, loss))
            log.row(server_round, "client", c, "global_test", rows[-1])
        self._keep_predictions(server_round, probs)
        # The same test set for every model: an unweighted mean over the clients.
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "n"}
        mean["n"] = rows[0]["n"]
        log.row(server_round, "global", None, "test", mean)
        return mean


class LocalCrossSite(CrossSiteEvaluation):
    """Every client's own model at the best round (`local_<client>`) on every client's
    test split, in this process (as each client would evaluate it)."""

    def __init__(self, run: LocalRun) -> None:
        super().__init__(run.config, has_global_model=False)
        self.run = run

    def __call__(self, models: dict[str, ArrayRecord], query: Query, state: RunState,
                 run_log: RunLog) -> dict:
        best = ArrayRecord(self.run.checkpoints.load_best()["state_dict"])
        return super().__call__({f"local_{c}": ArrayRecord(client_state(best, c))
                                 for c in self.run.clients}, query, state, run_log)

    def evaluate(self, arrays: ArrayRecord, query: Query, server_round: int) -> dict[int, dict]:
        run = self.run
        run.model.load_state_dict(to_state_dict(arrays), strict=True)
        return {c: split_rows(evaluate_splits(run.model, run.data, c, run.preprocess,
                                              run.cfg.eval_batch_size, splits=("test",)),
                              ("test",))["test"] for c in run.clients}


BASELINE_RUNS: dict[str, type[BaselineRun]] = {"pooled": PooledRun, "local": LocalRun}
