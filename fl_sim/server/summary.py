"""summary.json of a run, and the numbers TensorBoard's HParams table compares runs by.

`run_facts` is what the file says of the run's settings (made once, when the run is
built); `write_summary` adds what the run state says after each round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fl_sim.client.fedbn import GLOBAL_BATCHNORM
from fl_sim.config import PRIVATE_HEAD, RunConfig, proximal_mu
from fl_sim.metrics import HEADLINE
from fl_sim.server.checkpoints import RunState
from fl_sim.server.failures import finite_or_null
from fl_sim.server.run_log import write_json_atomic

NO_GLOBAL_MODEL = ("none: each client keeps its own classifier head (FedPer / FedRep), so there "
                   "is no global test row; the clients' rows are their own models'")


def run_facts(cfg: RunConfig, hostile: list[int], trained_part: dict[str, int] | None
              ) -> dict[str, Any]:
    """The settings summary.json states: the hostile clients and their attack, the clients'
    availability, what trains under partial fine-tuning (`trained_part`, None where all
    does), and what the global model is where clients keep some of it."""
    name = cfg.strategy.name
    return {
        **({"adversary": {"clients": hostile, "attack": cfg.adversary.attack,
                          "strength": cfg.adversary.resolved_strength}}
           if cfg.adversary else {}),
        **({"availability": cfg.availability.model_dump()} if cfg.availability else {}),
        **({"finetune": {"trainable": cfg.finetune.trainable, **trained_part}}
           if trained_part is not None else {}),
        **({"global_model": NO_GLOBAL_MODEL} if name in PRIVATE_HEAD else {}),
        # What the global evaluation's model holds where clients keep their own layers.
        **({"global_batchnorm": GLOBAL_BATCHNORM} if name == "fedbn" else {}),
    }


def write_summary(run_dir: Path, run: str, cfg: RunConfig, state: RunState, done: bool,
                  facts: dict[str, Any], failed: dict[str, Any] | None = None) -> dict:
    """summary.json from `state` and the run's `facts`, strict JSON (a non-finite metric is
    null); `failed`: {round, client, reason} of a diverged run. Returns what it wrote."""
    summary = finite_or_null({
        "run": run,
        "complete": done,
        "failed": failed,
        "rounds": cfg.rounds,
        "rounds_done": state.round,
        "selection": f"federated val {cfg.selection_metric} (mean of clients, by n)",
        "stopped": state.stopped,
        "best": state.best,
        "final": state.final,
        "wall_time_s": sum(state.round_seconds),
        "round_seconds": state.round_seconds,
        "bytes_sent": state.bytes_sent,
        "bytes_received": state.bytes_received,
        **({"synthesis": state.synthesis} if state.synthesis else {}),
        **({"personalized": state.personalized} if state.personalized else {}),
        **({"cross_site": state.cross_site} if state.cross_site else {}),
        **({"privacy": state.privacy} if state.privacy else {}),
        **facts,
    })
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


def hparams_of(cfg: RunConfig) -> dict[str, Any]:
    """The settings TensorBoard's HParams table compares runs by."""
    return {"strategy": cfg.strategy.name, "weighting": cfg.strategy.weighting,
            "mu": proximal_mu(cfg.strategy) if cfg.strategy.name == "fedprox" else 0.0,
            "model": cfg.model.name,
            "optimizer": cfg.optimizer.name, "training": cfg.training, "seed": cfg.seed,
            "local_epochs": cfg.local_epochs, "local_steps": cfg.local_steps or 0,
            "batch_size": cfg.batch_size}


def hparam_metrics(summary: dict) -> dict[str, float]:
    """The best and final rounds' headline metrics (and AVG), global test and federated
    val, under `hparams/<when>_<scope>_<metric>`."""
    return {f"hparams/{when}_{scope}_{k}": value
            for when in ("best", "final") for scope in ("global_test", "federated_val")
            for k in (*HEADLINE, "avg")
            if (value := summary[when].get(scope, {}).get(k)) is not None}
