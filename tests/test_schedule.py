"""Learning-rate schedules driven by the server round, and the plateau schedule's early stop."""

import math

import pytest

from fl_sim.config import LRScheduleConfig
from fl_sim.server.schedule import LRSchedule


def test_constant_and_cosine_with_warmup():
    assert [LRSchedule(LRScheduleConfig(), 0.1, 5).lr(r) for r in (1, 5)] == [0.1, 0.1]
    cosine = LRSchedule(LRScheduleConfig(name="cosine", warmup_rounds=2, min_factor=0.1), 1.0, 10)
    lrs = [cosine.lr(r) for r in range(1, 11)]
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # ramp, then the base rate
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))  # then it only falls
    t = 7 / 8  # the last round: (10 - 2 - 1) / (10 - 2)
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    assert lrs[-1] > 0.1  # the last round still trains


def test_schedule_options_belong_to_their_schedule():
    with pytest.raises(ValueError, match="patience is not an option of the 'cosine' schedule"):
        LRScheduleConfig(name="cosine", patience=3)


def test_plateau_watches_train_accuracy_then_validation_loss_and_stops():
    s = LRSchedule(LRScheduleConfig(name="plateau", threshold=0.9, patience=2, factor=0.5,
                                    max_reductions=1), 0.01, 100)
    # train accuracy below T: it is what is watched; two rounds without a better one halve lr
    assert s.after_round(0.5, 9.0) is None
    assert s.after_round(0.5, 1.0) is None and s.lr(3) == 0.01  # val loss is not watched yet
    assert s.after_round(0.4, 1.0) is None and s.lr(4) == 0.005
    # passing T switches to the validation loss, with a fresh best
    assert s.after_round(0.95, 2.0) is None
    assert s.after_round(0.96, 1.5) is None  # better val loss
    assert s.after_round(0.99, 1.6) is None
    stop = s.after_round(0.99, 1.7)  # two rounds without a better val loss, 1 reduction done
    assert stop and "validation loss did not improve for 2 rounds" in stop
    assert s.state()["reductions"] == 1 and s.lr(8) == 0.005


def test_plateau_state_survives_a_resume():
    cfg = LRScheduleConfig(name="plateau", patience=1)
    s = LRSchedule(cfg, 1.0, 10)
    s.after_round(0.5, 1.0)
    s.after_round(0.4, 1.0)
    resumed = LRSchedule(cfg, 1.0, 10, s.state())
    assert resumed.lr(3) == s.lr(3) == 0.5
    assert resumed.after_round(0.3, 1.0) == s.after_round(0.3, 1.0)
