"""Tests of covidcxr.metrics: against scikit-learn on random data, edge cases, calibration and the patient bootstrap."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from covidcxr import metrics as M


def _random_scores(seed: int, n: int = 500, n_patients: int = 120) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, informative scores with ties, and patient ids (several images per patient)."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, n_patients, size=n)
    patient_label = rng.random(n_patients) < 0.4
    y = patient_label[groups].astype(int)
    score = np.clip(0.5 + 0.25 * (2 * y - 1) + rng.normal(0, 0.25, n), 0, 1)
    return y, np.round(score, 2), groups  # rounding makes ties, which the ranking metrics must handle


def _confusion_rates(y: np.ndarray, s: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """Sensitivity, specificity and F1 at ``score >= threshold``, computed independently of the module."""
    pred = s >= threshold
    tp, fp = np.sum(pred & (y == 1)), np.sum(pred & (y == 0))
    fn, tn = np.sum(~pred & (y == 1)), np.sum(~pred & (y == 0))
    return tp / (tp + fn), tn / (tn + fp), 2 * tp / (2 * tp + fp + fn)


def _disk_masks(n: int, size: int, radii: list[int]) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.stack([((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r**2) for r in radii[:n]]).astype(np.uint8)


# ---------------------------------------------------------------- segmentation


def test_dice_iou_known_values_and_shapes():
    t = np.zeros((1, 4, 4))
    p = np.zeros((1, 4, 4))
    t[0, :2] = 1  # 8 pixels
    p[0, 1:3] = 1  # 8 pixels, 4 shared
    assert M.dice(t, p)[0] == pytest.approx(2 * 4 / 16)
    assert M.iou(t, p)[0] == pytest.approx(4 / 12)
    assert M.dice(t[..., None], p[..., None])[0] == pytest.approx(0.5)
    assert M.dice(t * 255, p * 255).shape == (1,)


@pytest.mark.parametrize("fn", [M.dice, M.iou])
def test_overlap_edge_cases(fn):
    empty = np.zeros((3, 8, 8))
    full = np.ones((3, 8, 8))
    assert np.all(fn(empty, empty) == 1.0)
    assert np.all(fn(full, full) == 1.0)
    assert np.all(fn(full, empty) == 0.0)
    assert np.all(fn(full, 1 - full) == 0.0)


def test_dice_threshold_is_inclusive():
    t = np.ones((1, 2, 2))
    p = np.full((1, 2, 2), 0.5)
    assert M.dice(t, p, threshold=0.5)[0] == 1.0
    assert M.dice(t, p - 1e-6, threshold=0.5)[0] == 0.0


@pytest.mark.parametrize(
    ("t_shape", "p_shape"), [((4, 4), (4, 4)), ((1, 4, 4, 3), (1, 4, 4, 3)), ((1, 4, 4), (1, 4, 5))]
)
def test_dice_rejects_bad_shapes(t_shape, p_shape):
    with pytest.raises(ValueError):
        M.dice(np.zeros(t_shape), np.zeros(p_shape))


def test_dice_iou_relation_random():
    rng = np.random.default_rng(0)
    t = rng.random((20, 16, 16)) > 0.5
    p = rng.random((20, 16, 16)) > 0.5
    d, j = M.dice(t, p), M.iou(t, p)
    np.testing.assert_allclose(d, 2 * j / (1 + j))


def test_paper_pixel_dice_flatten_rewards_missing_small_lungs():
    """Batch-pooled Dice hides an image whose small lungs were missed; per-image Dice does not."""
    truth = _disk_masks(2, 64, [24, 5]).astype(float)  # a large and a small lung field
    pred = truth.copy()
    pred[1] = 0.0  # the small lungs are missed entirely
    per_image = M.dice(truth, pred)
    assert per_image.tolist() == [1.0, 0.0]
    pooled = M.paper_pixel_dice(truth, pred)
    big, small = truth[0].sum(), truth[1].sum()
    assert pooled == pytest.approx((2 * big + 1) / (2 * big + small + 1))
    assert pooled > 0.95 > 0.5 == per_image.mean()


def test_paper_pixel_dice_per_pixel_scores_empty_mask_high():
    """Per-pixel averaging (DESIGN.md's ~0.79): an empty prediction scores 1 - f/2 where standard Dice is 0."""
    truth = np.zeros((1, 100, 100, 1))
    truth[0, :42] = 1.0  # lung fraction 0.42
    empty = np.zeros_like(truth)
    assert M.paper_pixel_dice(truth, empty, per_pixel=True) == pytest.approx(0.79)
    assert M.dice(truth, empty)[0] == 0.0
    assert M.paper_pixel_dice(truth, truth, per_pixel=True) == pytest.approx(1.0)


def test_paper_pixel_dice_all_empty_batch_is_one():
    z = np.zeros((2, 8, 8))
    assert M.paper_pixel_dice(z, z) == 1.0


# ---------------------------------------------------------------- classification


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.71])
def test_classification_metrics_match_sklearn(seed, threshold):
    y, s, _ = _random_scores(seed)
    m = M.classification_metrics(y, s, threshold=threshold)
    pred = (s >= threshold).astype(int)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(1 - y, 1 - pred))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, s))
    assert m["average_precision"] == pytest.approx(average_precision_score(y, s))
    assert m["tp"] + m["fp"] + m["tn"] + m["fn"] == m["n"] == len(y)
    assert m["n_positive"] == int(y.sum())


def test_threshold_boundary_is_positive():
    m = M.classification_metrics([1, 0], [0.5, 0.4999], threshold=0.5)
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (1, 0, 1, 0)


def test_perfect_and_inverted_predictions():
    y = np.array([0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.8, 0.9, 0.95])
    perfect = M.classification_metrics(y, s)
    assert all(perfect[k] == 1.0 for k in ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc"))
    inverted = M.classification_metrics(y, 1 - s)
    assert inverted["accuracy"] == 0.0 and inverted["roc_auc"] == 0.0
    assert inverted["precision"] == 0.0 and inverted["f1"] == 0.0


@pytest.mark.parametrize("label", [0, 1])
def test_single_class_gives_nan_not_crash(label):
    y = np.full(6, label)
    s = np.linspace(0, 1, 6)
    m = M.classification_metrics(y, s)
    assert math.isnan(m["roc_auc"])
    assert not math.isnan(m["accuracy"])
    if label == 0:
        assert math.isnan(m["sensitivity"]) and math.isnan(m["average_precision"])
        assert m["specificity"] == pytest.approx(0.5)
    else:
        assert math.isnan(m["specificity"]) and m["average_precision"] == 1.0


def test_no_predicted_positive_precision_nan():
    m = M.classification_metrics([0, 1, 0], [0.1, 0.2, 0.3])
    assert math.isnan(m["precision"]) and m["f1"] == 0.0 and m["sensitivity"] == 0.0


@pytest.mark.parametrize(
    ("y", "s"),
    [([0, 2], [0.1, 0.2]), ([0, 1], [0.1]), ([0, 1], [0.1, np.nan]), ([], []), ([[0, 1]], [[0.1, 0.2]])],
)
def test_classification_metrics_rejects_bad_input(y, s):
    with pytest.raises(ValueError):
        M.classification_metrics(np.array(y), np.array(s))


def test_accepts_column_vectors_and_bools():
    y, s, _ = _random_scores(3, n=50)
    a = M.classification_metrics(y.astype(bool)[:, None], s[:, None])
    b = M.classification_metrics(y, s)
    assert a == b


def test_roc_and_pr_points_finite_and_consistent():
    y, s, _ = _random_scores(4)
    roc = M.roc_curve_points(y, s)
    assert len(roc["fpr"]) == len(roc["tpr"]) == len(roc["thresholds"])
    assert np.isfinite(roc["thresholds"]).all() and roc["thresholds"][0] > s.max()
    assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(roc_auc_score(y, s))
    # every threshold reproduces its point with the >= rule
    for fpr, tpr, thr in list(zip(roc["fpr"], roc["tpr"], roc["thresholds"]))[::7]:
        m = M.classification_metrics(y, s, threshold=thr)
        assert m["sensitivity"] == pytest.approx(tpr) and 1 - m["specificity"] == pytest.approx(fpr)
    pr = M.pr_curve_points(y, s)
    assert len(pr["precision"]) == len(pr["recall"]) == len(pr["thresholds"])
    assert np.isfinite(pr["thresholds"]).all()
    assert (pr["precision"][-1], pr["recall"][-1]) == (1.0, 0.0)
    ap = -np.sum(np.diff(pr["recall"]) * np.array(pr["precision"][:-1]))
    assert ap == pytest.approx(average_precision_score(y, s))


def test_curves_with_one_class_are_empty():
    assert M.roc_curve_points([1, 1], [0.2, 0.3]) == {"fpr": [], "tpr": [], "thresholds": []}
    assert M.pr_curve_points([0, 0], [0.2, 0.3])["precision"] == []
    assert len(M.pr_curve_points([1, 1], [0.2, 0.3])["precision"]) > 0


# ---------------------------------------------------------------- calibration


def test_ece_calibrated_small_overconfident_large():
    rng = np.random.default_rng(0)
    p = rng.random(20_000)
    y = (rng.random(20_000) < p).astype(int)
    assert M.expected_calibration_error(y, p) < 0.03
    overconfident = np.where(p > 0.5, 0.99, 0.01)  # says 99% where the truth is 50-100%
    assert M.expected_calibration_error(y, overconfident) > 0.2


def test_ece_hand_computed():
    y = np.array([0, 1, 1, 1])
    p = np.array([0.05, 0.05, 0.95, 1.0])
    # bin 0: mean p 0.05, freq 0.5 (2 samples); bin 9: mean p 0.975, freq 1 (2 samples)
    assert M.expected_calibration_error(y, p) == pytest.approx(0.5 * 0.45 + 0.5 * 0.025)


def test_reliability_diagram_layout():
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.0, 0.1, 0.55, 0.6, 1.0])
    d = M.reliability_diagram(y, p, n_bins=5)
    assert d["bin_edges"] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert d["counts"] == [2, 0, 1, 1, 1]  # 0.6 falls in [0.6, 0.8); 1.0 in the last bin
    assert sum(d["counts"]) == len(y)
    assert math.isnan(d["mean_predicted"][1]) and d["observed_frequency"][0] == 0.5
    assert d["bin_centers"] == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])


def test_calibration_rejects_non_probabilities():
    with pytest.raises(ValueError):
        M.expected_calibration_error([0, 1], [0.2, 1.3])


# ---------------------------------------------------------------- bootstrap


def test_vectorised_ranking_metrics_match_sklearn_with_repeats():
    y, s, groups = _random_scores(5, n=200, n_patients=40)
    codes, n_groups = M._group_codes(groups, len(y))
    counts = M._draw_group_counts(n_groups, 5, seed=1)
    values = M._bootstrap_named(y, s, codes, counts, list(M.BOOTSTRAP_METRICS), 0.5)
    for b in range(5):
        idx = np.repeat(np.arange(len(y)), counts[b, codes])
        ref = M.classification_metrics(y[idx], s[idx])
        for name in M.BOOTSTRAP_METRICS:
            assert values[name][b] == pytest.approx(ref[name]), name


def test_resampled_ranking_metrics_are_the_bootstraps_own():
    """On patient_resample_weights of a seed, the AUC and AP of each resample equal scikit-learn's on the images the
    resample repeats, and bootstrap_ci's interval of that seed."""
    y, s, groups = _random_scores(7, n=120, n_patients=30)
    weights = M.patient_resample_weights(groups, n_boot=200, seed=2)
    values = M.resampled_ranking_metrics(y, s, weights)
    for b in range(3):
        idx = np.repeat(np.arange(len(y)), weights[b])
        assert values["roc_auc"][b] == pytest.approx(roc_auc_score(y[idx], s[idx]))
        assert values["average_precision"][b] == pytest.approx(average_precision_score(y[idx], s[idx]))
    ci = M.bootstrap_ci(y, s, groups, metric="roc_auc", n_boot=200, seed=2)
    assert (ci.low, ci.high) == pytest.approx(tuple(np.percentile(values["roc_auc"], [2.5, 97.5])))
    one_class = np.zeros((1, len(y)))
    one_class[0, np.flatnonzero(y == 1)[:3]] = 1
    assert np.isnan(M.resampled_ranking_metrics(y, s, one_class)["roc_auc"][0])
    with pytest.raises(ValueError, match="weights must be"):
        M.resampled_ranking_metrics(y, s, weights[:, :-1])


def test_bootstrap_contains_point_estimate_and_is_reproducible():
    y, s, groups = _random_scores(6)
    ci = M.bootstrap_ci(y, s, groups, metric="roc_auc", n_boot=300, seed=3)
    value, low, high = ci
    assert low <= value <= high and low < high
    assert value == pytest.approx(roc_auc_score(y, s))
    assert M.bootstrap_ci(y, s, groups, metric="roc_auc", n_boot=300, seed=3) == ci
    assert M.bootstrap_ci(y, s, groups, metric="roc_auc", n_boot=300, seed=4) != ci


def test_bootstrap_narrower_with_more_patients():
    widths = []
    for n_patients in (30, 600):
        y, s, groups = _random_scores(7, n=n_patients * 3, n_patients=n_patients)
        _, low, high = M.bootstrap_ci(y, s, groups, metric="accuracy", n_boot=400)
        widths.append(high - low)
    assert widths[1] < widths[0] / 2


def test_bootstrap_resamples_patients_not_images():
    """Ten patients with 50 identical-outcome images each: image resampling would give a far too narrow interval."""
    rng = np.random.default_rng(8)
    groups = np.repeat(np.arange(10), 50)
    y = np.repeat(rng.integers(0, 2, 10), 50)
    correct = np.repeat(np.arange(10) < 7, 50)  # 7 patients right, 3 wrong: accuracy 0.7
    s = np.where(correct, y, 1 - y).astype(float)
    _, low, high = M.bootstrap_ci(y, s, groups, metric="accuracy", n_boot=500)
    assert high - low > 0.3  # image-level bootstrap of n=500 would be about 0.08 wide
    # the same patients with one image each give the same resamples, hence the same interval
    ci_one = M.bootstrap_ci(y[::50], s[::50], groups[::50], metric="accuracy", n_boot=500)
    assert (ci_one.low, ci_one.high) == pytest.approx((low, high))


def test_bootstrap_one_patient_owns_all_positives():
    """Sensitivity is either the same value (that patient drawn) or undefined (skipped): a degenerate interval."""
    rng = np.random.default_rng(9)
    groups = np.concatenate([np.zeros(20, int), np.arange(1, 41)])
    y = np.concatenate([np.ones(20, int), np.zeros(40, int)])
    s = rng.random(60)
    ci = M.bootstrap_ci(y, s, groups, metric="sensitivity", n_boot=500)
    assert ci.low == ci.high == ci.value
    expected_skip = 500 * (1 - 1 / 41) ** 41  # P(patient 0 never drawn) is about 0.37
    assert 0.25 * 500 < ci.n_skipped < 0.5 * 500 and abs(ci.n_skipped - expected_skip) < 60
    auc = M.bootstrap_ci(y, s, groups, metric="roc_auc", n_boot=500)
    assert auc.n_skipped == ci.n_skipped and auc.low <= auc.value <= auc.high


def test_f1_without_positives_is_undefined_like_sensitivity():
    """False positives alone made F1 0: a split of negatives reported F1 0.0, and a resample without a COVID-19
    patient counted as a defined 0 in F1's interval while sensitivity's skipped it."""
    negatives = M.classification_metrics([0, 0, 0], [0.1, 0.6, 0.7])
    assert negatives["fp"] == 2 and math.isnan(negatives["f1"]) and math.isnan(negatives["sensitivity"])
    rng = np.random.default_rng(9)
    groups = np.concatenate([np.zeros(20, int), np.arange(1, 41)])  # patient 0 holds every positive
    y = np.concatenate([np.ones(20, int), np.zeros(40, int)])
    s = rng.random(60)  # about half the negatives are false positives at 0.5
    cis = M.confidence_intervals(y, s, groups, names=("sensitivity", "f1"), n_boot=500)
    assert cis["f1"]["n_skipped"] == cis["sensitivity"]["n_skipped"] > 0
    assert cis["f1"]["low"] > 0  # every defined resample holds patient 0's true positives
    missed = M.classification_metrics([1, 0, 0], [0.1, 0.6, 0.7])  # positives, none called: F1 is a real 0
    assert missed["f1"] == 0.0


def test_bootstrap_all_undefined_gives_nan():
    ci = M.bootstrap_ci([0, 0, 0], [0.1, 0.6, 0.9], [1, 2, 3], metric="sensitivity", n_boot=50)
    assert math.isnan(ci.value) and math.isnan(ci.low) and math.isnan(ci.high) and ci.n_skipped == 50


def test_bootstrap_callable_matches_named():
    y, s, groups = _random_scores(10, n=150, n_patients=50)
    named = M.bootstrap_ci(y, s, groups, metric="roc_auc", n_boot=200, seed=2)
    called = M.bootstrap_ci(y, s, groups, metric=roc_auc_score, n_boot=200, seed=2)
    assert called.value == pytest.approx(named.value)
    assert (called.low, called.high) == pytest.approx((named.low, named.high))
    assert called.n_skipped == named.n_skipped


def test_confidence_intervals_equal_bootstrap_ci():
    y, s, groups = _random_scores(11)
    cis = M.confidence_intervals(y, s, groups, n_boot=300, seed=5)
    assert set(cis) == set(M.DEFAULT_CI_METRICS)
    for name, ci in cis.items():
        single = M.bootstrap_ci(y, s, groups, metric=name, n_boot=300, seed=5)
        assert (ci["value"], ci["low"], ci["high"]) == tuple(single)
        assert ci["low"] <= ci["value"] <= ci["high"]


@pytest.mark.parametrize("kwargs", [{"metric": "tp"}, {"metric": "accuracy", "n_boot": 0},
                                    {"metric": "accuracy", "alpha": 1.5}])
def test_bootstrap_rejects_bad_arguments(kwargs):
    y, s, groups = _random_scores(12, n=20, n_patients=5)
    with pytest.raises(ValueError):
        M.bootstrap_ci(y, s, groups, **kwargs)


def test_bootstrap_rejects_missing_groups():
    with pytest.raises(ValueError, match="no group"):
        M.bootstrap_ci([0, 1], [0.1, 0.9], np.array(["a", None], dtype=object), metric="accuracy")


def test_bootstrap_speed():
    y, s, groups = _random_scores(13, n=2000, n_patients=700)
    s = s + np.random.default_rng(0).random(2000) * 1e-3  # mostly distinct scores: worst case for the ranking
    start = time.process_time()  # CPU time of this process: robust to other jobs sharing the machine
    M.confidence_intervals(y, s, groups, names=M.BOOTSTRAP_METRICS, n_boot=1000)
    assert time.process_time() - start < 2.0


# ---------------------------------------------------------------- thresholds


def test_youden_threshold_is_optimal():
    y, s, _ = _random_scores(14)
    thr = M.youden_threshold(y, s)
    assert thr in set(s)

    def j(t: float) -> float:
        sens, spec, _ = _confusion_rates(y, s, t)
        return sens + spec - 1

    assert all(j(thr) >= j(t) - 1e-12 for t in np.unique(s))


def test_f1_threshold_is_optimal():
    y, s, _ = _random_scores(15)
    thr = M.f1_threshold(y, s)
    best = max(_confusion_rates(y, s, t)[2] for t in np.unique(s))
    assert _confusion_rates(y, s, thr)[2] == pytest.approx(best)


@pytest.mark.parametrize("target", [0.8, 0.95, 1.0])
def test_threshold_for_sensitivity(target):
    y, s, _ = _random_scores(16)
    thr = M.threshold_for_sensitivity(y, s, min_sensitivity=target)
    sens, spec, _ = _confusion_rates(y, s, thr)
    assert sens >= target
    # every threshold that also reaches the target has no better specificity
    for t in np.unique(s):
        other_sens, other_spec, _ = _confusion_rates(y, s, t)
        if other_sens >= target:
            assert other_spec <= spec


def test_thresholds_perfect_separation():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.3, 0.6, 0.9])
    assert M.youden_threshold(y, s) == 0.6
    assert M.f1_threshold(y, s) == 0.6
    assert M.threshold_for_sensitivity(y, s, 1.0) == 0.6


def test_thresholds_need_both_classes():
    with pytest.raises(ValueError, match="only class"):
        M.youden_threshold([1, 1], [0.2, 0.4])


# ---------------------------------------------------------------- paper table


def _row(variant: str, backbone: str = "vgg19", split: str = "test", **kw) -> dict:
    y, s, _ = _random_scores(ord(variant), n=100)
    return {"variant": variant, "backbone": backbone, "split": split, **M.classification_metrics(y, s), **kw}


def test_paper_table_layout():
    rows = [_row("e"), _row("c"), _row("d")]
    table = M.paper_table(rows)
    assert list(table.index) == ["c", "d", "e"] and table.index.name == "Part"
    assert list(table.columns) == ["Accuracy", "Sensitivity", "Specificity", "F1 Score"]
    assert table.loc["e", "F1 Score"] == rows[0]["f1"]
    assert table.loc["c", "Specificity"] == rows[1]["specificity"]


def test_paper_table_several_backbones():
    table = M.paper_table([_row("c", "vgg16"), _row("c", "vgg19"), _row("d", "vgg19")])
    assert table.index.names == ["split", "backbone", "Part"]
    assert list(table.index) == [("test", "vgg16", "c"), ("test", "vgg19", "c"), ("test", "vgg19", "d")]


@pytest.mark.parametrize(
    "rows",
    [[], [{"variant": "c"}], [{**_row("c"), "variant": "x"}], [_row("c"), _row("c")]],
)
def test_paper_table_rejects_bad_rows(rows):
    with pytest.raises(ValueError):
        M.paper_table(rows)


def test_paper_table_is_a_dataframe_of_floats():
    table = M.paper_table([_row("d")])
    assert isinstance(table, pd.DataFrame) and all(dtype == np.float64 for dtype in table.dtypes)


# --- operating thresholds, computed exactly ---------------------------------------------------------------------------


def _scores(seed: int, n: int = 80, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    s = rng.normal(y * 1.0, 1.0)
    return y, (np.round(s, 1) if ties else s)


def _brute_force(y: np.ndarray, s: np.ndarray, objective: str, min_sensitivity: float) -> float:
    """Every distinct score as ``>=`` threshold, the best objective value, ties to the highest threshold."""
    best, best_t = -np.inf, None
    for t in sorted(set(s.tolist()), reverse=True):
        called = s >= t
        tp, fp = int((called & (y == 1)).sum()), int((called & (y == 0)).sum())
        sens, spec = tp / (y == 1).sum(), 1 - fp / (y == 0).sum()
        if objective == "youden":
            value = sens + spec - 1
        elif objective == "f1":
            value = 2 * tp / (2 * tp + fp + (y == 1).sum() - tp)
        else:
            value = spec if sens >= min_sensitivity else -np.inf
        if value > best + 1e-12:
            best, best_t = value, t
    return best_t


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("objective", M.THRESHOLD_OBJECTIVES)
def test_operating_threshold_is_the_exact_optimum(objective, ties, seed):
    y, s = _scores(seed, ties=ties)
    choice = M.operating_threshold(y, s, objective, min_sensitivity=0.9)
    assert choice.threshold == _brute_force(y, s, objective, 0.9)
    m = M.classification_metrics(y, s, threshold=choice.threshold)
    assert choice.sensitivity == pytest.approx(m["sensitivity"])
    assert choice.specificity == pytest.approx(m["specificity"])
    assert (choice.n_positive, choice.n_negative) == (int(y.sum()), int(len(y) - y.sum()))
    if objective == "sensitivity":
        assert choice.sensitivity >= 0.9 and choice.min_sensitivity == 0.9
    assert choice.to_dict()["threshold"] == choice.threshold


@pytest.mark.parametrize("y, s, kwargs, match", [
    ([0, 0, 0], [0.1, 0.2, 0.3], {}, "only class"),
    ([0, 1], [0.1, float("nan")], {}, "finite"),
    ([0, 2], [0.1, 0.2], {}, "binary"),
    ([0, 1], [0.1, 0.2], {"objective": "accuracy"}, "must be one of"),
    ([0, 1], [0.1, 0.2], {"objective": "sensitivity", "min_sensitivity": 1.5}, r"\[0, 1\]"),
])
def test_operating_threshold_rejects_bad_input(y, s, kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.operating_threshold(np.array(y), np.array(s), **kwargs)


def test_served_outcomes_count_refusals_apart_from_answers():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.5, 0.2, 0.8, 0.7, 0.1, 0.5, 0.3, 0.95])
    refused = np.array([0, 0, 0, 1, 0, 0, 0, 1, 1], dtype=bool)
    out = M.served_outcomes(y, s, refused, threshold=0.5)
    assert (out["n"], out["n_positive"], out["n_negative"], out["refused"]) == (9, 4, 5, 3)
    assert out["positives_called_covid"] == pytest.approx(2 / 4)  # 0.9 and 0.5 (inclusive); 0.8 was refused
    assert out["positives_refused"] == pytest.approx(1 / 4)
    assert out["negatives_called_covid"] == pytest.approx(2 / 5)  # 0.7 and 0.5; 0.95 was refused, not answered
    assert out["negatives_refused"] == pytest.approx(2 / 5) and out["refused_share"] == pytest.approx(3 / 9)
    assert out["answered_sensitivity"] == pytest.approx(2 / 3)
    assert out["answered_specificity"] == pytest.approx(1 / 3)
    # nothing refused: the served figures are the classification metrics at the same threshold
    plain = M.served_outcomes(y, s, np.zeros(len(y), dtype=bool), threshold=0.5)
    m = M.classification_metrics(y, s, threshold=0.5)
    assert plain["negatives_called_covid"] == pytest.approx(1 - m["specificity"])
    assert plain["answered_sensitivity"] == pytest.approx(m["sensitivity"]) and plain["refused"] == 0


def test_served_outcomes_of_one_class_and_bad_input():
    negatives = M.served_outcomes([0, 0, 0, 0], [0.9, 0.2, 0.6, 0.1], [True, False, False, False], threshold=0.5)
    assert math.isnan(negatives["positives_called_covid"]) and math.isnan(negatives["answered_sensitivity"])
    assert negatives["negatives_called_covid"] == pytest.approx(0.25) and negatives["negatives_refused"] == 0.25
    everything_refused = M.served_outcomes([0, 1], [0.9, 0.9], [True, True], threshold=0.5)
    assert math.isnan(everything_refused["answered_specificity"]) and everything_refused["negatives_called_covid"] == 0
    with pytest.raises(ValueError, match="refused has 1 entries for 2 labels"):
        M.served_outcomes([0, 1], [0.1, 0.9], [True], threshold=0.5)


def test_served_outcomes_count_films_refused_before_scoring_with_their_reason():
    """A film serving refuses before the classifier (a lateral view, a failed lung mask) has no score: NaN there is
    not read, and the film counts as refused, by its reason; an answered film's score must still be a number."""
    y = np.array([1, 1, 0, 0, 0, 0])
    s = np.array([0.9, np.nan, 0.7, 0.2, np.nan, 0.99])
    reasons = np.array(["", "empty_lung_mask", "", "", "lateral_view", "out_of_distribution"])
    out = M.served_outcomes(y, s, reasons != "", threshold=0.5, reasons=reasons)
    assert (out["n"], out["n_positive"], out["n_negative"], out["refused"]) == (6, 2, 4, 3)
    assert out["refused_by_reason"] == {"empty_lung_mask": 1, "lateral_view": 1, "out_of_distribution": 1}
    assert out["negatives_called_covid"] == pytest.approx(1 / 4) and out["negatives_refused"] == pytest.approx(2 / 4)
    assert out["positives_called_covid"] == pytest.approx(1 / 2) and out["answered_sensitivity"] == 1.0
    assert "refused_by_reason" not in M.served_outcomes(y[:1], s[:1], [False], threshold=0.5)
    with pytest.raises(ValueError, match="y_score has 1 non-finite values"):  # the lateral film, answered
        M.served_outcomes(y, s, reasons == "empty_lung_mask", threshold=0.5)
    with pytest.raises(ValueError, match="reasons has 2 entries for 6 labels"):
        M.served_outcomes(y, s, reasons != "", threshold=0.5, reasons=reasons[:2])


def test_the_threshold_rules_refuse_what_is_not_a_threshold_and_name_it():
    """One rule for a model's operating threshold, a site's file and a request's param (each wraps the ValueError in
    its own error); a bool is no number (``True`` would have served as 1.0)."""
    assert M.check_threshold(0) == 0.0 and M.check_threshold(np.float32(0.25)) == 0.25
    assert M.check_ood_threshold(0) == 0.0 and M.check_ood_threshold(np.float64(31.5)) == 31.5
    for value, message in [(1.5, r"x must be in \[0, 1\], got 1.5"), (float("nan"), "got nan"),
                           (True, r"x must be a number in \[0, 1\], got True"), ("0.3", "got '0.3'"), (None, "None")]:
        with pytest.raises(ValueError, match=message):
            M.check_threshold(value, "x")
    for value, message in [(-1, "got -1.0"), (float("inf"), "got inf"), (np.bool_(True), r"got (np\.)?True"),
                           ("far", "got 'far'"), (10**400, "got an integer of 401 digits")]:
        with pytest.raises(ValueError, match=rf"ood_threshold must be a finite non-negative number, {message}"):
            M.check_ood_threshold(value)
