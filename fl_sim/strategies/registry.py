"""Flower's message-API strategies by name, configured from experiments.yaml."""

from __future__ import annotations

import inspect
from collections.abc import Iterable

from flwr.serverapp import strategy as fl

from fl_sim.arrays import use_weighted_mean
from fl_sim.config import StrategyConfig, proximal_mu
from fl_sim.errors import FlSimError
from fl_sim.strategies import fedopt
from fl_sim.strategies.qfedavg import QFedAvg
from fl_sim.strategies.scaffold import Scaffold

STRATEGIES: dict[str, type[fl.FedAvg]] = {
    "fedavg": fl.FedAvg,
    "fedprox": fl.FedProx,
    "fedadam": fedopt.FedAdam,
    "fedyogi": fedopt.FedYogi,
    "fedadagrad": fedopt.FedAdagrad,
    "fedavgm": fedopt.FedAvgM,
    "fedmedian": fl.FedMedian,
    "fedtrimmedavg": fl.FedTrimmedAvg,
    "krum": fl.Krum,
    "multikrum": fl.MultiKrum,
    "bulyan": fl.Bulyan,
    "qfedavg": QFedAvg,  # its client_learning_rate: the run's optimizer lr unless given
    # FedAvg on the server; each client keeps its own BatchNorm layers (fl_sim.client.fedbn)
    "fedbn": fl.FedAvg,
    "scaffold": Scaffold,  # control variates beside the weights (fl_sim.client.scaffold)
    # FedAvg of what travels; each client's own part stays with it (fl_sim.client.personal)
    "fedper": fl.FedAvg,
    "fedrep": fl.FedAvg,
    "ditto": fl.FedAvg,
}

# At import, not when a strategy is built: a resumed run unpickles its strategy and must
# aggregate as before the interruption (also in a ServerApp process that builds none).
use_weighted_mean()

# The server optimizers' defaults where Flower's fail a real model (FedAdam's eta 0.1 moves
# every weight about 0.1 a round): FLamby's tuned server rates (eta 0.0032 for FedAdam and
# FedYogi, 0.032 for FedAdagrad) with Reddi et al. 2021's tau 1e-3; FedAvgM with Hsu et al.
# 2019's momentum 0.9 at a server rate of 0.1, so that its steady step is FedAvg's
# (0.1 / (1 - 0.9) = 1). `strategy.params` overrides each.
SERVER_DEFAULTS: dict[str, dict[str, float]] = {
    "fedadam": {"eta": 0.0032, "tau": 1e-3},
    "fedyogi": {"eta": 0.0032, "tau": 1e-3},
    "fedadagrad": {"eta": 0.032, "tau": 1e-3},
    "fedavgm": {"server_learning_rate": 0.1, "server_momentum": 0.9},
}

# Set by fl-sim itself, so not accepted in `strategy.params`.
_MANAGED = {
    "fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
    "min_available_nodes", "weighted_by_key", "arrayrecord_key", "configrecord_key",
    "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn", "proximal_mu",
    "train_loss_key",  # QFedAvg's: fl-sim's clients report `train_loss`
}


def strategy_params(name: str) -> set[str]:
    """The constructor arguments a user may set for strategy `name`."""
    return set(inspect.signature(STRATEGIES[name]).parameters) - _MANAGED


def sample_size(num_clients: int, fraction: float) -> int:
    """Clients in a round's sample: round(fraction x clients), at least one."""
    return min(num_clients, max(1, round(num_clients * fraction)))


def check_bounds(cfg: StrategyConfig, n: int) -> None:
    """Refuse a robust rule's settings that `n` updates a round cannot satisfy: Flower would
    clamp them in silence (Krum) or aggregate nothing (Bulyan)."""
    f = int(cfg.params.get("num_malicious_nodes", 0))
    need = {"krum": (2 * f + 3, "n > 2f + 2 (Blanchard et al. 2017)", (n - 3) // 2),
            "multikrum": (2 * f + 3, "n > 2f + 2 (Blanchard et al. 2017)", (n - 3) // 2),
            "bulyan": (4 * f + 3, "n >= 4f + 3 (El Mhamdi et al. 2018)", (n - 3) // 4)}
    if cfg.name in need and n < need[cfg.name][0]:
        least, rule, most = need[cfg.name]
        fix = (f"lower num_malicious_nodes to {most}, or " if most >= 0 else "")
        raise FlSimError(
            f"strategy {cfg.name} with num_malicious_nodes {f} needs {rule}, at least {least} "
            f"updates a round, and a round has {n} (clients x fraction_train): {fix}use "
            "more clients.")
    selected = int(cfg.params.get("num_nodes_to_select", 1))
    if cfg.name == "multikrum" and not 1 <= selected <= n - f:
        raise FlSimError(f"strategy multikrum averages num_nodes_to_select updates, at least 1 "
                         f"and at most n - f = {n - f} of a round's {n}; it is {selected}.")


def build_strategy(cfg: StrategyConfig, num_clients: int, min_clients: int | None = None,
                   trainable: Iterable[str] | None = None,
                   client_lr: float | None = None) -> fl.FedAvg:
    """A strategy that messages every client it is shown (fl-sim shows it a sample under
    `fraction_train` / `fraction_evaluate`) and waits for `min_clients` of them;
    the FedAvg family averages with fl-sim's `weighted_mean`. `trainable`: the model's
    parameter names, the only arrays a server optimizer (FedAdam, ...) steps; `client_lr`:
    the clients' learning rate (QFedAvg's `client_learning_rate` unless params set it)."""
    unknown = set(cfg.params) - strategy_params(cfg.name)
    if unknown:
        raise FlSimError(
            f"strategy.params has {sorted(unknown)}, which {cfg.name} does not take; "
            f"it takes: {sorted(strategy_params(cfg.name)) or 'nothing'}."
        )
    check_bounds(cfg, sample_size(num_clients, cfg.fraction_train))
    kwargs = {**SERVER_DEFAULTS.get(cfg.name, {}), **cfg.params}
    if cfg.name == "fedprox":
        kwargs["proximal_mu"] = proximal_mu(cfg)
    if cfg.name == "qfedavg" and "client_learning_rate" not in kwargs:
        if client_lr is None:
            raise FlSimError("qfedavg needs the clients' learning rate: set "
                             "strategy.params.client_learning_rate.")
        kwargs["client_learning_rate"] = client_lr
    # fl-sim samples the clients itself (fl_sim.server.messaging.sample_nodes) and shows the
    # strategy only those: its minimums must fit the smallest sample, or Flower waits forever.
    needed = min(num_clients if min_clients is None else min_clients,
                 sample_size(num_clients, cfg.fraction_train),
                 sample_size(num_clients, cfg.fraction_evaluate))
    try:
        strategy = STRATEGIES[cfg.name](
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=needed,
            min_evaluate_nodes=needed,
            min_available_nodes=needed,
            weighted_by_key="unit-weight" if cfg.weighting == "uniform" else "num-examples",
            **kwargs,
        )
    except ValueError as err:  # Flower's own checks (FedTrimmedAvg's beta, ...)
        raise FlSimError(f"strategy {cfg.name}: {err} (strategy.params {cfg.params})") from None
    if isinstance(strategy, (fedopt.ParametersOnly, Scaffold)) and trainable is not None:
        strategy.trainable = frozenset(trainable)
    if isinstance(strategy, Scaffold):
        strategy.num_clients = num_clients
    return strategy
