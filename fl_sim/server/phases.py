"""The phases of a run besides its rounds, each an object the round loop calls: synthesis
(a `query.synthesize` before round 1), the federation's class counts (`query.class_counts`,
before the first round of a run or of its resumption), then after the last round
personalization (`query.personalize`) and cross-site evaluation (`query.cross_evaluate`).
A phase reaches the clients through the loop's `Query`, which counts the bytes and bounds
the waits as a round's exchanges do."""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fl_sim.arrays import to_state_dict
from fl_sim.config import PersonalizeConfig
from fl_sim.errors import FlSimError
from fl_sim.server.checkpoints import Checkpoints, RunState
from fl_sim.server.rows import mean_row, split_rows
from fl_sim.server.run_log import RunLog
from fl_sim.wire import FEDERATION_COUNTS

log = logging.getLogger(__name__)

Query = Callable[[str, RecordDict, int], list[Message]]
"""(action, content, server_round) -> the replies of every connected client to `content`,
sent as a `query.<action>` message."""

SynthesisReport = tuple[dict[str, Any], np.ndarray | None]
"""A client's synthesis metrics (`partition-id`, `synthesis_s`, `from_cache`,
`generated_<class>`) and its grid of sample images, if any."""


class Synthesis:
    """Rare-class synthesis before round 1: every client trains its GAN on its own train
    split (or reads its cache). What comes back: per client the seconds it took, the
    images generated per class, and a sample grid for TensorBoard."""

    def __init__(self, config: ConfigRecord) -> None:
        self.config = config  # the run's, as every message carries it

    def __call__(self, query: Query, run_log: RunLog) -> dict:
        log.info("synthesis: each client trains its GAN on its own train split (minutes on a "
                 "CPU; a later run or resume reads the client's cache)")
        replies = query("synthesize", RecordDict({"config": self.config}), 0)
        return log_synthesis(
            [(dict(r.content["metrics"]), to_state_dict(r.content["arrays"])["samples"].numpy()
              if "arrays" in r.content else None) for r in replies], run_log)


def log_synthesis(reports: list[SynthesisReport], run_log: RunLog) -> dict:
    """summary.json's `synthesis` (client -> seconds, from_cache, generated per class)
    from the clients' reports (metrics, sample grid); the grids go to TensorBoard."""
    summary = {}
    for metrics, samples in reports:
        client = int(metrics["partition-id"])
        summary[str(client)] = {
            "seconds": metrics["synthesis_s"], "from_cache": bool(metrics["from_cache"]),
            "generated": {k.removeprefix("generated_"): int(v) for k, v in metrics.items()
                          if k.startswith("generated_")}}
        if samples is not None:
            run_log.image(f"synthesis/client{client}", samples, 0)
        made = summary[str(client)]
        log.info("synthesis: client %d %s %s in %.0f s", client,
                 "read" if made["from_cache"] else "generated",
                 ", ".join(f"{n} {c}" for c, n in made["generated"].items()) or "nothing",
                 made["seconds"])
    return summary


class FederationCounts:
    """`loss.class_weights: federation`: before the first round (of a run, and of a resumed
    one), every client sends its own train split's class counts; their sum travels in the
    run's config to every client, whose loss weighs the classes by it (FLamby's pooled
    weighting). The server sees each client's counts (docs/privacy.md)."""

    def __init__(self, config: ConfigRecord, classes: list[str]) -> None:
        self.config, self.classes = config, classes

    def __call__(self, query: Query) -> list[int]:
        total = np.sum(self.client_counts(query), axis=0, dtype=np.int64).tolist()
        self.config[FEDERATION_COUNTS] = total
        log.info("class weights from the federation's counts: %s",
                 ", ".join(f"{c} {n}" for c, n in zip(self.classes, total, strict=True)))
        return total

    def client_counts(self, query: Query) -> list[list[int]]:
        """Each client's counts, as it sent them."""
        out = []
        for reply in query("class_counts", RecordDict({"config": self.config}), 0):
            metrics = reply.content["metrics"]
            counts = metrics.get("class-counts")
            if (not isinstance(counts, list) or len(counts) != len(self.classes)
                    or not all(isinstance(c, int) and c >= 0 for c in counts)):
                raise FlSimError(
                    f"client {metrics.get('partition-id', '?')} sent no class counts of the "
                    f"{len(self.classes)} classes ({counts!r:.80}): the federation's class "
                    "weights would be wrong. Is its fl-sim older than the server's?")
            out.append(counts)
        return out


class Personalization:
    """Every client fine-tunes the final and the best global model on its own train
    split and reports the personalized model's val/test metrics, with the paired test
    against the global model on its test split: rows of scope `personalized` at the model's
    round, and summary.json's `personalized`. With `send_models` (cross-site evaluation)
    the clients send their personalized best models back."""

    def __init__(self, settings: PersonalizeConfig, config: ConfigRecord,
                 checkpoints: Checkpoints, arrays_of: Callable[[dict], ArrayRecord],
                 send_models: bool = False) -> None:
        self.settings, self.config, self.send_models = settings, config, send_models
        # The best model, when it is not the final one, from best.pt's whole model.
        self.checkpoints, self.arrays_of = checkpoints, arrays_of

    def __call__(self, final: ArrayRecord, query: Query, state: RunState,
                 run_log: RunLog) -> tuple[dict, dict[str, ArrayRecord]]:
        """summary.json's `personalized`, and (`send_models`) the personalized best models
        by name (`personalized_<client>`)."""
        tune = self.settings
        log.info("personalize: every client fine-tunes the final and the best model for %s "
                 "on its own train split", f"{tune.steps} steps" if tune.steps
                 else f"{tune.fine_tune_epochs} epoch(s)")
        models = {"final": (state.round, final)}
        if state.best_round != state.round:
            best = self.checkpoints.load_best()
            models["best"] = (state.best_round, self.arrays_of(best["state_dict"]))
        report: dict[str, Any] = {"fine_tune_epochs": tune.fine_tune_epochs,
                                  **({"steps": tune.steps} if tune.steps else {}),
                                  **({"lr": tune.lr} if tune.lr is not None else {})}
        personalized: dict[str, ArrayRecord] = {}
        for which, (server_round, arrays) in models.items():
            send = self.send_models and server_round == state.best_round
            content = RecordDict({"arrays": arrays, "config": ConfigRecord(
                {**self.config, "server-round": server_round, "send-model": send})})
            replies = query("personalize", content, server_round)
            clients = {str(int(m["partition-id"])): split_rows(m)
                       for m in (dict(reply.content["metrics"]) for reply in replies)}
            tests = [c["test"] for c in clients.values()]
            report[which] = {"round": server_round, "clients": clients,  # (not a mean of intervals)
                             "mean_test": mean_row(tests, [k for k in tests[0] if k != "n" and
                                                           not k.endswith(("_lo", "_hi", "_p"))])}
            if send:
                personalized = {f"personalized_{int(r.content['metrics']['partition-id'])}":
                                r.content["arrays"] for r in replies}
        # Rows only once every reply is in: a run cut here personalizes again, whole.
        for which in models:
            for client, splits in report[which]["clients"].items():
                for split, row in splits.items():
                    run_log.row(report[which]["round"], "personalized", int(client), split, row)
        report.setdefault("best", report["final"])  # the best round was the last
        return report, personalized


class CrossSiteEvaluation:
    """After the last round, every model named (a client's personalized model) on every
    client's test split, through the clients: rows of scope `cross_site` (`site_model` the
    model's name, `client` the test split's) at the best round, and summary.json's
    `cross_site`. The global model's row of the matrix is the clients' own evaluation at
    that round (scope `client`)."""

    def __init__(self, config: ConfigRecord, has_global_model: bool = True) -> None:
        self.config, self.has_global_model = config, has_global_model

    def __call__(self, models: dict[str, ArrayRecord], query: Query, state: RunState,
                 run_log: RunLog) -> dict:
        if models:
            log.info("cross-site evaluation: %d models on every client's test split",
                     len(models))
        results = {name: self.evaluate(arrays, query, state.best_round)
                   for name, arrays in models.items()}
        for name, clients in results.items():  # rows once every model is scored
            for client, row in sorted(clients.items()):
                run_log.row(state.best_round, "cross_site", client, "test", row, site_model=name)
        return {"round": state.best_round,
                "models": [*(["global"] if self.has_global_model else []), *models]}

    def evaluate(self, arrays: ArrayRecord, query: Query, server_round: int) -> dict[int, dict]:
        """Client -> the test row of the model `arrays` on the client's test split."""
        content = RecordDict({"arrays": arrays, "config": ConfigRecord(
            {**self.config, "server-round": server_round})})
        return {int(m["partition-id"]): split_rows(m, ("test",))["test"]
                for m in (dict(r.content["metrics"])
                          for r in query("cross_evaluate", content, server_round))}
