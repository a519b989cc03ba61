"""FedAdam and FedYogi on a model with BatchNorm learn as well as FedAvg (issue #14), where
Flower's own FedAdam, which steps BatchNorm's running statistics too, does not.

What it shows. A small CNN (conv-BN-ReLU x2 + linear, 1.3k parameters) is trained
federatedly, in this process, on an easy synthetic task: 4 classes, each a fixed random 8x8
pattern plus noise. Each of 4 clients mostly holds two of the classes (label skew). Each round
the clients train with plain SGD, send their state dicts in Flower Messages, and the strategy
built by `build_strategy` (`trainable` = the model's parameter names, as fl-sim sets it)
aggregates them with `aggregate_train`, the call fl-sim's server makes. After the last round
the global model is scored on held-out data in eval mode, so with the running statistics the
server sent. For each seed:

- fl-sim's FedAdam and FedYogi end within `MARGIN` of FedAvg's accuracy (measured on seeds
  0-9: never more than 0.006 below it; all reach 0.977-1.0, chance being 0.25);
- Flower's FedAdam with the same eta and tau ends at least `WORSE` below FedAvg (measured on
  seeds 0-9: 0.26-0.84, at least 0.14 below; on the seeds kept, 0.44-0.64). Flower's
  FedAdam here averages with fl-sim's `weighted_mean`, which importing fl_sim.strategies
  patches into Flower (Flower's mean up to rounding); its server step is Flower's own.

Why Flower's does worse. The training is the same: a client trains in train mode, where
BatchNorm normalises with each batch's own statistics, so the running statistics the server
sends do not change what the clients learn, and the trainable parameters of the two FedAdams
end up equal up to float rounding (amplified over the rounds: < 0.002 measured). What differs
is what evaluation uses. Adam's normalised step moves every element by about eta per round
whatever its scale, so the running means and variances that Flower's FedAdam steps creep from
their initial 0 and 1 towards the clients' values at ~eta a round (its `num_batches_tracked`
stays 0); fl-sim's takes them as the clients' weighted mean, as FedAvg does. Given fl-sim's
running means (its own variances kept), Flower's model scores like fl-sim's (measured: within
0.016 of FedAvg): the gap is the statistics alone. If the fix were reverted, fl-sim's FedAdam
would be Flower's and fail the first assertion.

Why these settings. The inputs are not centred (a constant offset of 4, as raw intensities fed
without normalising are), so the clients put the first BatchNorm's running means several
units from their initial 0 (Flower's end 2.2-4.5 away from fl-sim's on seeds 0-9): far more
than 20 steps of eta = 0.01 (a usual FedAdam server rate; the same for all three) can cover.
With centred inputs the true statistics sit near 0 and 1 and Flower's FedAdam loses little on
a model this small (measured with offset 0, seeds 0-4: 0-0.04 below FedAvg), so the offset is
what makes its error visible; fl-sim's FedAdam matches FedAvg either way. 20 rounds of one
local epoch (5 steps of 32) let the server-adaptive methods settle within a point of FedAvg,
and the task is easy enough (FedAvg ~0.99) that the margins hold on every seed tried, not by
luck. Three seeds, one thread: ~15 s.
"""

from __future__ import annotations

import pytest
import torch
from flwr.serverapp import strategy as fl
from toy_federation import CLIENTS, federated_accuracy, make_data, make_model, one_thread  # noqa: F401

from fl_sim.config import StrategyConfig
from fl_sim.strategies import build_strategy

ETA, TAU = 0.01, 1e-3
MARGIN = 0.05  # fl-sim's FedAdam / FedYogi: at least FedAvg's accuracy minus this
WORSE = 0.1  # Flower's FedAdam: at most FedAvg's accuracy minus this


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fedadam_and_fedyogi_with_batchnorm_match_fedavg_where_flowers_fedadam_does_not(
        seed, one_thread):
    trainable = {name for name, _ in make_model(0).named_parameters()}

    def ours(name: str, **params: float) -> fl.FedAvg:
        return build_strategy(StrategyConfig(name=name, params=params), num_clients=CLIENTS,
                              trainable=trainable)

    fedavg, _ = federated_accuracy(ours("fedavg"), seed)
    fedadam, fedadam_model = federated_accuracy(ours("fedadam", eta=ETA, tau=TAU), seed)
    fedyogi, _ = federated_accuracy(ours("fedyogi", eta=ETA, tau=TAU), seed)
    flower, flower_model = federated_accuracy(fl.FedAdam(
        eta=ETA, tau=TAU, min_train_nodes=CLIENTS, min_evaluate_nodes=CLIENTS,
        min_available_nodes=CLIENTS), seed)
    accuracies = f"FedAvg {fedavg:.3f}, FedAdam {fedadam:.3f}, FedYogi {fedyogi:.3f}, " \
                 f"Flower's FedAdam {flower:.3f}"

    assert fedavg >= 0.9, accuracies  # the task is learnable: chance is 0.25
    assert fedadam >= fedavg - MARGIN, accuracies
    assert fedyogi >= fedavg - MARGIN, accuracies
    assert flower <= fedavg - WORSE, accuracies

    # Flower's shortfall is its BatchNorm statistics: its trainable parameters are ours, its
    # first running means far from ours, and with ours it scores like FedAvg
    ours_state, flowers_state = fedadam_model.state_dict(), flower_model.state_dict()
    for name in trainable:
        torch.testing.assert_close(flowers_state[name], ours_state[name], atol=0.02, rtol=0)
    assert (flowers_state["1.running_mean"] - ours_state["1.running_mean"]).abs().max() > 1
    means = {k: v for k, v in ours_state.items() if k.endswith("running_mean")}
    flower_model.load_state_dict({**flowers_state, **means})
    _, (x_test, y_test) = make_data(seed)
    with torch.no_grad():
        fixed = (flower_model(x_test).argmax(1) == y_test).float().mean().item()
    assert fixed >= fedavg - MARGIN, f"{accuracies}; Flower's with our running means {fixed:.3f}"
