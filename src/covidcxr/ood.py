"""Out-of-distribution score: how far an image's features lie from what the classifier was trained on.

The score is the Mahalanobis distance of the classifier's penultimate features (the input of its ``logits`` layer) to
the training features (Lee et al. 2018, "A simple unified framework for detecting out-of-distribution samples"), with
the covariance shrunk by Ledoit-Wolf (scikit-learn's estimator) so that a few hundred training images in 64 or more
dimensions give a well-conditioned precision matrix. Its threshold is a quantile of the validation split's scores: at
quantile 0.95 about 5% of in-distribution images score above it. The detector also keeps a fixed PCA projection of the
same features (fitted on train) that the prediction log stores as a compact feature vector for drift tests.

Fitted state the scikit-learn way: :meth:`MahalanobisDetector.fit` (train features) sets ``location_``,
``precision_``, ``pca_mean_``, ``components_``; :meth:`calibrate` (validation scores) sets ``threshold_``. It is saved
in the classifier's model folder as ``ood.json`` and applied wherever a classifier scores, serving included
(:func:`covidcxr.models.out_of_distribution`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

#: OOD scores are reported, stored and compared with the threshold at this many decimals, everywhere.
SCORE_DECIMALS = 4
#: Decimals of the compact feature vector in the prediction log and the drift reference.
COMPACT_DECIMALS = 4


class Scored(NamedTuple):
    """The OOD score of each image (rounded) and its compact feature vector ``[N, n_components]``."""

    score: np.ndarray
    compact: np.ndarray


class MahalanobisDetector:
    """Mahalanobis distance to the training features under a Ledoit-Wolf shrunk covariance, with a quantile threshold.

    ``n_components``: dimensions of the compact PCA vector (at most the features' and the training images' count);
    ``quantile``: the share of validation scores at or below the threshold.
    """

    def __init__(self, n_components: int = 16, quantile: float = 0.95) -> None:
        if n_components < 1:
            raise ValueError(f"n_components must be positive, got {n_components}")
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        self.n_components = int(n_components)
        self.quantile = float(quantile)

    def fit(self, features: np.ndarray) -> MahalanobisDetector:
        """Learn the training features' mean and shrunk precision, and the PCA projection; needs 2+ images."""
        from sklearn.covariance import LedoitWolf
        from sklearn.decomposition import PCA

        x = _matrix(features)
        if len(x) < 2:
            raise ValueError(f"the OOD detector needs at least 2 training images, got {len(x)}")
        estimator = LedoitWolf().fit(x)
        self.location_ = estimator.location_.astype(np.float64)
        self.precision_ = estimator.precision_.astype(np.float64)
        self.shrinkage_ = float(estimator.shrinkage_)
        pca = PCA(n_components=min(self.n_components, x.shape[1], len(x)), svd_solver="full").fit(x)
        self.pca_mean_ = pca.mean_.astype(np.float64)
        self.components_ = pca.components_.astype(np.float64)
        self.explained_variance_ratio_ = pca.explained_variance_ratio_.astype(np.float64)
        self.n_fit_, self.n_features_ = int(x.shape[0]), int(x.shape[1])
        return self

    def score(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row to the training features, rounded to :data:`SCORE_DECIMALS`."""
        self._check("location_")
        d = _matrix(features, self.n_features_) - self.location_
        squared = np.einsum("ij,jk,ik->i", d, self.precision_, d)
        return np.round(np.sqrt(np.clip(squared, 0.0, None)), SCORE_DECIMALS)

    def project(self, features: np.ndarray) -> np.ndarray:
        """The compact feature vector: the fixed PCA projection of each row, rounded to :data:`COMPACT_DECIMALS`."""
        self._check("components_")
        x = _matrix(features, self.n_features_)
        return np.round((x - self.pca_mean_) @ self.components_.T, COMPACT_DECIMALS)

    def calibrate(self, scores: np.ndarray) -> MahalanobisDetector:
        """Set ``threshold_`` to the ``quantile`` of validation scores (an observed score: ``method='higher'``)."""
        s = np.asarray(scores, dtype=np.float64).ravel()
        s = s[np.isfinite(s)]
        if not len(s):
            raise ValueError("the OOD threshold needs at least one finite validation score")
        self.threshold_ = float(np.quantile(s, self.quantile, method="higher"))
        self.n_calibration_ = int(len(s))
        return self

    @property
    def threshold(self) -> float:
        self._check("threshold_")
        return self.threshold_

    def is_out(self, scores: np.ndarray) -> np.ndarray:
        """Whether each score lies above the threshold (out of distribution)."""
        return np.asarray(scores, dtype=np.float64) > self.threshold

    def _check(self, attribute: str) -> None:
        if not hasattr(self, attribute):
            step = "calibrate on validation scores" if attribute == "threshold_" else "fit on training features"
            raise RuntimeError(f"MahalanobisDetector is not ready: {step} first")

    def to_dict(self) -> dict:
        self._check("threshold_")
        return {"method": "mahalanobis-ledoit-wolf", "quantile": self.quantile, "n_components": self.n_components,
                "threshold": self.threshold_, "n_fit": self.n_fit_, "n_calibration": self.n_calibration_,
                "n_features": self.n_features_, "shrinkage": self.shrinkage_,
                "location": self.location_.tolist(), "precision": self.precision_.tolist(),
                "pca_mean": self.pca_mean_.tolist(), "components": self.components_.tolist(),
                "explained_variance_ratio": self.explained_variance_ratio_.tolist()}

    @classmethod
    def from_dict(cls, state: dict) -> MahalanobisDetector:
        if state.get("method") != "mahalanobis-ledoit-wolf":
            raise ValueError(f"not a Mahalanobis OOD detector: {state.get('method')!r}")
        obj = cls(n_components=int(state["n_components"]), quantile=float(state["quantile"]))
        obj.threshold_, obj.shrinkage_ = float(state["threshold"]), float(state["shrinkage"])
        obj.n_fit_, obj.n_calibration_ = int(state["n_fit"]), int(state["n_calibration"])
        obj.n_features_ = int(state["n_features"])
        for key in ("location", "precision", "pca_mean", "components", "explained_variance_ratio"):
            setattr(obj, f"{key}_", np.asarray(state[key], dtype=np.float64))
        if obj.precision_.shape != (obj.n_features_, obj.n_features_) or obj.location_.shape != (obj.n_features_,):
            raise ValueError(f"OOD detector state does not match its {obj.n_features_} features")
        return obj

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> MahalanobisDetector:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a valid OOD detector file ({err})") from None


def _matrix(features: np.ndarray, n_features: int | None = None) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or (n_features is not None and x.shape[1] != n_features):
        want = f"[N, {n_features}]" if n_features is not None else "[N, D]"
        raise ValueError(f"features must be a {want} matrix, got shape {x.shape}")
    return x
