"""Platt calibration: fitted on validation, monotonic, saved with the model, applied by serving's probability."""

from __future__ import annotations

import numpy as np
import pytest

from covidcxr import calibration, metrics
from covidcxr.calibration import PlattCalibrator


def overconfident(seed: int, n: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """Scores whose true probability is far milder than they claim (a logit three times too large)."""
    rng = np.random.default_rng(seed)
    t = rng.normal(0, 1.2, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-t))).astype(int)
    return y, 1 / (1 + np.exp(-3 * t))


def test_calibration_lowers_the_expected_calibration_error_and_keeps_the_ranking():
    y_val, s_val = overconfident(0)
    y_test, s_test = overconfident(1)
    cal = PlattCalibrator().fit(y_val, s_val)
    assert cal.a_ == pytest.approx(1 / 3, abs=0.08)
    before = metrics.expected_calibration_error(y_test, s_test)
    after = metrics.expected_calibration_error(y_test, cal.transform(s_test))
    assert after < before / 2
    assert metrics.classification_metrics(y_test, cal.transform(s_test))["roc_auc"] == pytest.approx(
        metrics.classification_metrics(y_test, s_test)["roc_auc"])
    assert np.all(np.diff(cal.transform(np.linspace(0.01, 0.99, 50))) > 0)


def test_separable_data_stays_finite_and_round_trips(tmp_path):
    cal = PlattCalibrator().fit([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert np.isfinite([cal.a_, cal.b_]).all()
    cal.save(tmp_path / "c.json")
    again = PlattCalibrator.load(tmp_path / "c.json")
    np.testing.assert_array_equal(again.transform([0.0, 0.3, 1.0]), cal.transform([0.0, 0.3, 1.0]))


def test_scores_ranking_validation_worse_than_chance_are_flattened_never_reversed(caplog):
    """Scores that rank validation below chance: an unbounded fit took a < 0 and turned the ranking around (AUC 0.35
    before, 0.65 after calibration); a >= 0 leaves every probability at about the base rate, with a warning."""
    y, s = overconfident(2, n=300)
    s = 1 - s  # the ranking of a model worse than chance on this split
    rng = np.random.default_rng(3)
    s = 1 / (1 + np.exp(-(calibration.logit(s) / 6 + rng.normal(0, 1, len(s)))))
    auc = metrics.classification_metrics(y, s)["roc_auc"]
    assert 0.3 < auc < 0.5
    cal = PlattCalibrator().fit(y, s)
    assert cal.a_ == 0.0 and cal.transform(s) == pytest.approx(np.full(len(s), y.mean()), abs=0.01)
    assert np.all(np.diff(cal.transform(np.linspace(0.01, 0.99, 50))) >= 0)
    assert "worse than chance" in caplog.text


@pytest.mark.parametrize("seed", range(4))
def test_a_positive_slope_is_the_unbounded_fit_to_the_bit(seed):
    """Calibrators fitted before a >= 0 was enforced are unchanged: where the unbounded optimum has a > 0 it is kept as
    L-BFGS-B finds it without bounds (with bounds its steps differ, the same optimum only to about 1e-5)."""
    from scipy.optimize import minimize

    y, s = overconfident(10 + seed, n=200 + 150 * seed)
    unbounded = minimize(calibration._loss, x0=np.array([1.0, 0.0]), args=(y.astype(float), calibration.logit(s),
                         1e-3), jac=True, method="L-BFGS-B")
    cal = PlattCalibrator().fit(y, s)
    assert unbounded.x[0] > 0 and (cal.a_, cal.b_) == (float(unbounded.x[0]), float(unbounded.x[1]))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="both classes"):
        PlattCalibrator().fit([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="finite scores: 2 of 4 are NaN or infinite"):
        PlattCalibrator().fit([0, 1, 0, 1], [0.2, np.nan, 0.4, np.inf])
    with pytest.raises(RuntimeError, match="not fitted"):
        PlattCalibrator().transform([0.5])


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [("-0.5", "0.1", "negative slope a = -0.5"), ("NaN", "0.1", "non-finite"), ("0.5", "Infinity", "non-finite"),
     ("-Infinity", "0.0", "non-finite")],
)
def test_a_saved_state_fit_cannot_give_is_refused_naming_the_file(tmp_path, a, b, message):
    """A calibration.json with a < 0 loaded silently and reversed every probability's ranking; a NaN slope made every
    probability NaN."""
    path = tmp_path / "calibration.json"
    path.write_text(f'{{"a": {a}, "b": {b}, "l2": 0.001, "method": "platt", "n_fit": 40}}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=message) as caught:
        PlattCalibrator.load(path)
    assert str(path) in str(caught.value)


def test_a_valid_saved_state_loads_to_the_bit(tmp_path):
    """Every state fit gives (a = 0, the flattened fit, included) loads as saved."""
    for y, s in ([[0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]], overconfident(4)):
        cal = PlattCalibrator().fit(y, s)
        cal.save(tmp_path / "c.json")
        again = PlattCalibrator.load(tmp_path / "c.json")
        assert again.to_dict() == cal.to_dict()
    (tmp_path / "flat.json").write_text('{"a": 0.0, "b": -0.3, "l2": 0.001, "method": "platt", "n_fit": 9}\n')
    assert PlattCalibrator.load(tmp_path / "flat.json").to_dict() == {"a": 0.0, "b": -0.3, "l2": 0.001,
                                                                     "method": "platt", "n_fit": 9}
