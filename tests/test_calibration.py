"""Platt calibration: fitted on validation, monotonic, saved with the model, applied by serving's probability."""

from __future__ import annotations

import numpy as np
import pytest

from covidcxr import metrics
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


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="both classes"):
        PlattCalibrator().fit([1, 1], [0.2, 0.3])
    with pytest.raises(RuntimeError, match="not fitted"):
        PlattCalibrator().transform([0.5])
