"""The bootstrap of fl_sim.stats against scikit-learn, by hand, and on known answers."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fl_sim.metrics import classification_metrics, clinical_metrics, expected_calibration_error
from fl_sim.stats import (
    METRICS, ImageDraws, combine_seeds, draw_seeds, holm, interval, p_value,
    paired_split_difference, replicate_metrics, split_intervals,
)

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def predictions(n: int, skill: float, seed: int, missing: int | None = None):
    """Labels of HAM10000's mix and float16-rounded probabilities that favour the true
    class by `skill`; class `missing` never occurs in the labels."""
    rng = np.random.default_rng(seed)
    mix = np.array([.03, .05, .11, .01, .11, .67, .02])
    if missing is not None:
        mix[missing] = 0
    labels = rng.choice(7, n, p=mix / mix.sum())
    return labels, scores(labels, skill, rng)


def scores(labels: np.ndarray, skill: float, rng: np.random.Generator) -> np.ndarray:
    logits = rng.normal(size=(len(labels), 7))
    logits[np.arange(len(labels)), labels] += skill
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs.astype(np.float16).astype(np.float32)


class Identity(ImageDraws):
    """One 'draw' that is the test set itself, or given draws."""

    def __init__(self, indices: np.ndarray) -> None:
        self.n, self.replicates, self.indices, self._counts = indices.shape[1], len(indices), indices, None


def test_a_draw_of_every_image_once_gives_the_metrics_of_fl_sim_metrics():
    labels, probs = predictions(900, 1.5, 0, missing=3)
    one = replicate_metrics(labels, probs.argmax(1), probs, Identity(np.arange(900)[None]), 7)
    expected = classification_metrics(labels, probs.argmax(1), 7, probs=probs, classes=CLASSES)
    for metric in METRICS:
        assert one[metric][0] == pytest.approx(expected[metric], abs=1e-12), metric


def test_each_replicate_equals_scikit_learn_on_the_resampled_images():
    labels, probs = predictions(400, 1.0, 1)
    draws = ImageDraws(400, replicates=50)
    reps = replicate_metrics(labels, probs.argmax(1), probs, draws, 7)
    for b in (0, 17, 49):
        y, p = labels[draws.indices[b]], probs[draws.indices[b]]
        expected = classification_metrics(y, p.argmax(1), 7, probs=p, classes=CLASSES)
        for metric in METRICS:
            assert reps[metric][b] == pytest.approx(expected[metric], abs=1e-9), (b, metric)


def test_auroc_per_class_is_scikit_learns_and_absent_where_a_class_is():
    labels, probs = predictions(600, 1.0, 2, missing=3)
    got = clinical_metrics(labels, probs, CLASSES)
    for k in range(7):
        if k == 3:
            assert math.isnan(got["auroc_c3"])  # no df image: no positives
        else:
            assert got[f"auroc_c{k}"] == pytest.approx(roc_auc_score(labels == k, probs[:, k]))
    present = [k for k in range(7) if k != 3]
    assert got["auroc"] == pytest.approx(np.mean([roc_auc_score(labels == k, probs[:, k])
                                                  for k in present]))
    # scikit-learn's own macro one-vs-rest, on the classes present
    assert got["auroc"] == pytest.approx(roc_auc_score(
        labels, probs[:, present] / probs[:, present].sum(1, keepdims=True), multi_class="ovr",
        labels=present), abs=0.02)


def test_melanoma_sensitivity_and_specificity_at_the_arg_max():
    labels = np.array([4, 4, 4, 4, 5, 5, 5, 0])
    decided = np.array([4, 4, 4, 5, 4, 5, 5, 0])
    probs = np.eye(7)[decided] * 0.9 + 0.1 / 7
    got = clinical_metrics(labels, probs, CLASSES)
    assert got["mel_sens"] == 0.75 and got["mel_spec"] == 0.75
    assert "mel_sens" not in clinical_metrics(labels, probs, [str(k) for k in range(7)])


def test_expected_calibration_error_by_hand():
    # Confidence 0.9 on every image, 6 of 10 right: one bin, |0.6 - 0.9| = 0.3.
    probs = np.full((10, 2), 0.1)
    probs[:, 0] = 0.9
    labels = np.array([0] * 6 + [1] * 4)
    assert expected_calibration_error(labels, probs) == pytest.approx(0.3)
    # Confident and always right: 0.
    assert expected_calibration_error(np.zeros(5, int), np.tile([1.0, 0.0], (5, 1))) == 0


def test_the_draws_are_seeded_by_size_alone_and_intervals_repeat_exactly():
    labels, probs = predictions(500, 1.0, 3)
    first, second = split_intervals(labels, probs), split_intervals(labels, probs)
    assert first == second
    assert np.array_equal(ImageDraws(500).indices, ImageDraws(500).indices)
    assert not np.array_equal(ImageDraws(500).indices[:, :10], ImageDraws(501).indices[:, :10])
    point = classification_metrics(labels, probs.argmax(1), 7)["bacc"]
    assert first["bacc_lo"] < point < first["bacc_hi"]


def test_the_interval_narrows_with_more_test_images():
    small = split_intervals(*predictions(150, 1.0, 4))
    large = split_intervals(*predictions(3000, 1.0, 4))
    assert (large["acc_hi"] - large["acc_lo"]) < 0.5 * (small["acc_hi"] - small["acc_lo"])


def test_paired_difference_of_two_equal_models_and_of_a_better_one():
    labels, probs = predictions(800, 1.0, 5)
    twin = scores(labels, 1.0, np.random.default_rng(6))  # as good, its own mistakes
    untrained = scores(labels, 0.0, np.random.default_rng(7))
    draws = ImageDraws(800)
    reps = {name: replicate_metrics(labels, p.argmax(1), p, draws, 7)["bacc"]
            for name, p in (("model", probs), ("twin", twin), ("untrained", untrained))}
    same = reps["model"] - reps["twin"]
    lo, hi = interval(same)
    assert lo < 0 < hi and p_value(same) > 0.05
    better = reps["model"] - reps["untrained"]
    lo, hi = interval(better)
    assert lo > 0.1 and p_value(better) < 0.001


def test_a_clear_difference_survives_holm_over_a_large_table():
    """A p-value counted from 2,000 draws could not go under 2 / 2,001, so Holm over a
    63-cell table (9 comparisons x 7 metrics) called nothing, whatever the intervals."""
    differences = np.random.default_rng(0).normal(-0.133, 0.030, size=2000)
    assert interval(differences)[1] < 0
    assert p_value(differences) < 1e-4
    assert max(holm([p_value(differences)] * 63)) < 0.05
    noise = np.random.default_rng(1).normal(0.0, 0.030, size=2000)
    assert p_value(noise) > 0.5


def test_a_split_s_paired_difference_is_that_of_the_shared_draws():
    """What a client sends about personalized vs global on its test split."""
    labels, probs = predictions(600, 1.0, 11)
    untrained = scores(labels, 0.0, np.random.default_rng(12))
    got = paired_split_difference(labels, probs, untrained)
    draws = ImageDraws(600)
    a, b = (replicate_metrics(labels, p.argmax(1), p, draws, 7)["bacc"] for p in (probs, untrained))
    assert (got["bacc_delta_lo"], got["bacc_delta_hi"]) == interval(a - b)
    assert got["bacc_delta_lo"] > 0.1 and got["bacc_delta_p"] < 0.001
    same = paired_split_difference(labels, probs, probs)
    assert same["bacc_delta_lo"] == same["bacc_delta_hi"] == 0 and same["bacc_delta_p"] == 1
    empty = paired_split_difference(np.empty(0, int), np.empty((0, 0)), np.empty((0, 0)))
    assert len(empty) == 3 * len(METRICS) and all(math.isnan(v) for v in empty.values())


def test_two_level_bootstrap_over_seeds():
    per_seed = np.array([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])  # 2 seeds x 3 replicates
    assert combine_seeds(per_seed, None).tolist() == [2.0, 3.0, 4.0]
    draws = np.array([[0, 0], [1, 1], [0, 1]])
    assert combine_seeds(per_seed, draws).tolist() == [1.0, 4.0, 4.0]
    assert draw_seeds(3).shape == (2000, 3) and np.array_equal(draw_seeds(3), draw_seeds(3))


def test_holm_step_down():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.2, 0.01]) == pytest.approx([0.2, 0.02])
    adjusted = holm([0.01, float("nan")])
    assert adjusted[0] == 0.01 and math.isnan(adjusted[1])


def test_an_empty_split_gives_no_interval():
    empty = split_intervals(np.empty(0, int), np.empty((0, 0)))
    assert set(empty) == {f"{m}_{e}" for m in METRICS for e in ("lo", "hi")}
    assert all(math.isnan(v) for v in empty.values())


def test_a_model_with_non_finite_outputs_gets_no_auroc_and_no_error():
    labels, probs = predictions(300, 1.0, 8)
    probs[5, 2] = np.nan
    assert math.isnan(clinical_metrics(labels, probs, CLASSES)["auroc"])
    got = split_intervals(labels, probs)
    assert math.isnan(got["auroc_lo"]) and not math.isnan(got["acc_lo"])
