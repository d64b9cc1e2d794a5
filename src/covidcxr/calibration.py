"""Probability calibration: Platt scaling of a classifier's logit, fitted on the validation split.

A network trained with class weights on confounded sources gives scores, not probabilities (the demo's test ECE was
0.20 to 0.27 at its operating threshold). ``PlattCalibrator`` learns ``p = sigmoid(a * logit(s) + b)`` on validation
labels and scores (scikit-learn style: ``fit`` sets ``a_``, ``b_``; ``transform`` applies them), is saved in the model
folder (``calibration.json``) and applied wherever a probability is computed, serving included. It never reverses the
ranking (``a_ >= 0``), and with ``a_ > 0`` it is strictly increasing, but ranking metrics (AUC) are not always
unchanged: probabilities are rounded to 6 decimals (``models.probability``), so a slope above 1 can push distinct
scores near 0 or 1 onto the same 0.0 or 1.0 and one below 1 can draw close scores onto one value, ties that ROC AUC
counts half; and a validation split the scores rank worse than chance gets ``a_ = 0`` (every probability its base
rate, AUC 0.5, with a warning). A threshold chosen on the calibrated, rounded scores keeps its meaning: serving applies
it to the same scores.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_EPS = 1e-7


class CalibrationError(RuntimeError):
    """The Platt fit did not converge: the message says the optimiser's reason and the number of scores."""


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def _loss(params: np.ndarray, y: np.ndarray, z: np.ndarray, l2: float) -> tuple[float, np.ndarray]:
    """Mean negative log-likelihood of ``sigmoid(a * z + b)`` with an L2 prior on ``(a, b)``, and its gradient."""
    a, b = params
    t = a * z + b
    nll = np.logaddexp(0.0, t) - y * t
    grad_t = 1.0 / (1.0 + np.exp(-t)) - y
    value = nll.mean() + l2 * (a * a + b * b) / 2
    return float(value), np.array([(grad_t * z).mean() + l2 * a, grad_t.mean() + l2 * b])


def _minimize(y: np.ndarray, z: np.ndarray, l2: float, *, flat: bool):
    """L-BFGS-B from ``a = 1, b = 0``; ``flat``: with ``a`` held at 0 (only ``b`` fitted)."""
    from scipy.optimize import minimize

    if flat:
        return minimize(_loss, x0=np.zeros(2), args=(y, z, l2), jac=True, method="L-BFGS-B",
                        bounds=[(0.0, 0.0), (None, None)])
    return minimize(_loss, x0=np.array([1.0, 0.0]), args=(y, z, l2), jac=True, method="L-BFGS-B")


class PlattCalibrator:
    """``sigmoid(a_ * logit(score) + b_)`` fitted by maximum likelihood (a weak L2 prior keeps separable data
    finite)."""

    def __init__(self, l2: float = 1e-3) -> None:
        self.l2 = l2

    def fit(self, y_true: np.ndarray, scores: np.ndarray) -> PlattCalibrator:
        """Learn ``a_ >= 0`` and ``b_`` on labels (0/1) and finite scores in [0, 1]; both classes are needed.
        Raises ValueError on bad input, :class:`CalibrationError` when the optimiser fails."""
        y = np.asarray(y_true, dtype=np.float64).ravel()
        raw = np.asarray(scores, dtype=np.float64).ravel()
        if len(y) != len(raw) or len(y) == 0:
            raise ValueError(f"y_true ({len(y)}) and scores ({len(raw)}) must be non-empty and of equal length")
        if not np.isin(y, (0.0, 1.0)).all() or y.min() == y.max():
            raise ValueError("calibration needs binary labels of both classes")
        bad = int((~np.isfinite(raw)).sum())
        if bad:
            raise ValueError(f"calibration needs finite scores: {bad} of {len(raw)} are NaN or infinite")
        z = logit(raw)
        # The loss is convex, so the optimum under a >= 0 is the unbounded one when its a is positive, else on a = 0.
        # Fitting it so, rather than with bounds (0, inf), keeps every calibrator fitted before bit-identical (bounds
        # change L-BFGS-B's steps: the same optimum to ~1e-5) and finds a = 0 (bounded, L-BFGS-B can stop short of it).
        result = _minimize(y, z, self.l2, flat=False)
        if result.x[0] < 0:  # scores that rank validation worse than chance: a would reverse the ranking
            result = _minimize(y, z, self.l2, flat=True)
        if not result.success or not np.isfinite(result.x).all():
            raise CalibrationError(f"Platt calibration did not converge on {len(y)} scores: {result.message}")
        self.a_, self.b_ = float(result.x[0]), float(result.x[1])
        if self.a_ == 0.0:
            log.warning("Platt calibration: the scores rank the %d validation images worse than chance; every "
                        "calibrated probability is about their base rate (a = 0)", len(y))
        self.n_fit_ = int(len(y))
        return self

    def transform(self, scores: np.ndarray) -> np.ndarray:
        if not hasattr(self, "a_"):
            raise RuntimeError("PlattCalibrator is not fitted: call fit on validation labels and scores first")
        t = self.a_ * logit(scores) + self.b_
        return 1.0 / (1.0 + np.exp(-t))

    def to_dict(self) -> dict:
        return {"method": "platt", "a": self.a_, "b": self.b_, "n_fit": self.n_fit_, "l2": self.l2}

    @classmethod
    def from_dict(cls, state: dict) -> PlattCalibrator:
        """A fitted calibrator from :meth:`to_dict`'s state; ValueError for a state ``fit`` cannot give (a slope that
        is negative, reversing the model's ranking, or a slope or intercept that is not finite)."""
        if state.get("method") != "platt":
            raise ValueError(f"not a Platt calibration: {state.get('method')!r}")
        obj = cls(l2=float(state.get("l2", 1e-3)))
        obj.a_, obj.b_, obj.n_fit_ = float(state["a"]), float(state["b"]), int(state["n_fit"])
        if not (np.isfinite(obj.a_) and np.isfinite(obj.b_)):
            raise ValueError(f"Platt calibration with a non-finite slope or intercept: a = {obj.a_}, b = {obj.b_}")
        if obj.a_ < 0:
            raise ValueError(f"Platt calibration with a negative slope a = {obj.a_}: it would reverse the model's "
                             "ranking (a fitted calibrator has a >= 0)")
        return obj

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> PlattCalibrator:
        """The calibrator saved at ``path``; a state :meth:`from_dict` refuses is a ValueError naming the file."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
