"""Strategies: the registry over Flower's strategies and FedProx's client term."""

from fl_sim.strategies.fedprox import proximal_term
from fl_sim.strategies.registry import STRATEGIES, build_strategy

__all__ = ["STRATEGIES", "build_strategy", "proximal_term"]
