"""The ε ledger of a run: what each privacy level has spent after every round, and whether
the next round would pass `privacy.target_epsilon` (then the run stops before it).

- Client-level (central DP): Flower's accountant inside the strategy wrapper books one
  Gaussian release per round (fl_sim.privacy.central); the ledger reads it and asks it
  about the next release.
- Sample-level (DP-SGD): each trainer (a client; `pooled`, the pooled baseline) books
  its steps, Poisson-sampled at rate 1 / ceil(n / batch_size), in Opacus's RDP accountant.
  Its steps per round are fixed by n (fl_sim.privacy.dpsgd), so the next round's cost is
  known before it runs. Each trainer's ε concerns its own images; the run's is the largest.

Neither covers the metrics clients report (losses, accuracies on their val/test splits),
nor the class weights of `weighted_ce` (from each client's label counts): docs/privacy.md.
"""

from __future__ import annotations

import copy
from typing import Any

from flwr.supercore.privacy_accounting import GaussianPrivacyEvent
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fl_sim.config import RunConfig
from fl_sim.privacy.central import ACCOUNTING
from fl_sim.privacy.dpsgd import sample_rate, steps_per_epoch

SAMPLE_ACCOUNTING = "RDP (Opacus); Poisson sampling, add-or-remove-one image, per client"


def dpsgd_epsilon(rate: float, noise_multiplier: float, steps: int, delta: float) -> float:
    """ε after `steps` Poisson-sampled Gaussian steps (Opacus's RDP analysis)."""
    if steps == 0:
        return 0.0
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=rate, noise_multiplier=noise_multiplier, steps=steps, orders=orders)
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


class PrivacyLedger:
    """Books a run's privacy spending. `last` is its summary after the last saved round (a
    resumed run's books continue from it; the client-level accountant is the strategy's)."""

    def __init__(self, cfg: RunConfig, trainers: dict[str, int], last: dict[str, Any]) -> None:
        self.cfg, self.privacy = cfg, cfg.privacy
        self.trainers = trainers  # who trains each round -> own train images
        self.booked: dict[str, dict[str, Any]] = copy.deepcopy(  # trainer -> rate, steps
            last.get("sample_level", {}).get("booked", {}))

    def _dpsgd_round(self, n: int) -> tuple[float, int]:
        """(sample rate, steps) of one round of a trainer with `n` train images."""
        return (sample_rate(n, self.cfg.batch_size),
                self.cfg.local_epochs * steps_per_epoch(n, self.cfg.batch_size))

    def _dpsgd_epsilon(self, booking: dict[str, Any], extra_steps: int = 0) -> float:
        return dpsgd_epsilon(booking["sample_rate"], self.privacy.sample_level.noise_multiplier,
                             booking["steps"] + extra_steps, self.privacy.delta)

    def book(self, trained: dict[int | None, int]) -> None:
        """A round's DP-SGD steps of every trainer that trained (key: client, None for the
        pooled baseline; value: its own train images)."""
        if self.privacy.sample_level is None:
            return
        for client, n in trained.items():
            rate, steps = self._dpsgd_round(n)
            self.booked.setdefault(trainer_key(client), {"sample_rate": rate, "steps": 0})
            self.booked[trainer_key(client)]["steps"] += steps

    def spent(self, strategy: Any) -> dict[str, dict[str, Any]]:
        """ε by level so far: {"client_level": {"epsilon", "releases"},
        "sample_level": {"epsilon" (the largest), "clients": {trainer: epsilon}}}."""
        out: dict[str, dict[str, Any]] = {}
        if self.privacy.client_level is not None:
            spent = strategy.privacy_spent()
            out["client_level"] = {"epsilon": spent.epsilon, "releases": spent.num_releases}
        if self.privacy.sample_level is not None:
            clients = {k: self._dpsgd_epsilon(b) for k, b in self.booked.items()}
            out["sample_level"] = {"epsilon": max(clients.values(), default=0.0),
                                   "clients": clients}
        return out

    def overspend(self, strategy: Any) -> str | None:
        """Why the next round would pass target_epsilon (None if it would not, or no target
        is set). Every trainer is assumed to train (a sampled one may not)."""
        target = self.privacy.target_epsilon
        if target is None:
            return None
        if (dp := self.privacy.client_level) is not None:
            event = GaussianPrivacyEvent(noise_multiplier=dp.noise_multiplier,
                                         sample_size=strategy.num_sampled_clients,
                                         population_size=strategy.accountant.config.population_size)
            if strategy.accountant.would_exceed(event, max_epsilon=target):
                now = strategy.privacy_spent().epsilon
                return (f"privacy: another round would take client-level ε from {now:.3g} past "
                        f"target_epsilon {target:g} (δ {self.privacy.delta:g})")
        if self.privacy.sample_level is not None:
            for trainer, n in self.trainers.items():
                rate, steps = self._dpsgd_round(n)
                booking = self.booked.get(trainer, {"sample_rate": rate, "steps": 0})
                after = self._dpsgd_epsilon(booking, steps)
                if after > target:
                    who = "the pooled model" if trainer == "pooled" else f"client {trainer}"
                    return (f"privacy: another round would take {who}'s sample-level ε "
                            f"from {self._dpsgd_epsilon(booking):.3g} to {after:.3g}, past "
                            f"target_epsilon {target:g} (δ {self.privacy.delta:g})")
        return None

    def summary(self, strategy: Any) -> dict[str, Any]:
        """summary.json's `privacy`: the settings, the accountants and the ε spent."""
        spent = self.spent(strategy)
        out: dict[str, Any] = {"delta": self.privacy.delta,
                               "target_epsilon": self.privacy.target_epsilon}
        if (dp := self.privacy.client_level) is not None:
            out["client_level"] = {**spent["client_level"], **dp.model_dump(),
                                   "sampled_clients": strategy.num_sampled_clients,
                                   "accountant": ACCOUNTING}
            if dp.adaptive is not None:  # where the adaptive norm has got to
                out["client_level"]["clipping_norm_now"] = strategy.clipping_norm
        if (dp := self.privacy.sample_level) is not None:
            out["sample_level"] = {**spent["sample_level"], **dp.model_dump(),
                                   "booked": copy.deepcopy(self.booked),
                                   "accountant": SAMPLE_ACCOUNTING}
        return out


def trainer_key(client: int | None) -> str:
    """A trainer's name in the ledger: its client id, or `pooled` (the pooled baseline)."""
    return "pooled" if client is None else str(client)
