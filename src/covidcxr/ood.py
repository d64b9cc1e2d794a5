"""Out-of-distribution score: how far an image's features lie from what the classifier was trained on.

The score is the Mahalanobis distance of the classifier's features (:meth:`covidcxr.models.Component.features`: the
global-average-pooled output of each convolutional block and the penultimate features, the input of its ``logits``
layer) to the training features, after Lee et al. 2018 ("A simple unified framework for detecting out-of-distribution
samples"), who also pool several layers: the penultimate features alone see what separates the classes, the early
blocks see acquisition (exposure, texture, resolution), which is what differs between hospitals. The features are
standardized on train and the covariance is shrunk by Ledoit-Wolf (scikit-learn's estimator), so that a few hundred
training images in hundreds of dimensions give a well-conditioned precision matrix. The threshold is a quantile of
the validation split's scores: at quantile 0.95 about 5% of in-distribution images score above it. The detector also
keeps a fixed PCA projection of the same standardized features (fitted on train) that the prediction log stores as
a compact feature vector for drift tests.

Fitted state the scikit-learn way: :meth:`MahalanobisDetector.fit` (train features) sets ``center_``, ``scale_``,
``location_``, ``precision_``, ``components_``; :meth:`calibrate` (validation scores) sets ``threshold_``. It is saved
in the classifier's model folder as ``ood.npz`` (numpy arrays: exact, and compact for a large precision matrix) and
applied wherever a classifier scores, serving included (:func:`covidcxr.models.ood_scored`, on the features of the
pass that scores the image: :func:`covidcxr.models.classifier_evidence`).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

#: OOD scores are reported, stored and compared with the threshold at this many decimals, everywhere.
SCORE_DECIMALS = 4
#: Decimals of the compact feature vector in the prediction log and the drift reference.
COMPACT_DECIMALS = 4
METHOD = "mahalanobis-ledoit-wolf"
#: The fitted arrays saved in ``ood.npz`` (attributes with a trailing underscore).
ARRAYS = ("center", "scale", "location", "precision", "pca_mean", "components", "explained_variance_ratio")


class Scored(NamedTuple):
    """The OOD score of each image (rounded) and its compact feature vector ``[N, n_components]``."""

    score: np.ndarray
    compact: np.ndarray


def is_out(scores, threshold: float) -> np.ndarray:
    """Out of distribution: a score above ``threshold``, or one that cannot be compared (NaN, from a feature that
    overflowed). The one rule of serving, the stages, the lateral check and a site's admission, so that what evaluate
    counts as refused is what serving refuses."""
    return ~(np.asarray(scores, dtype=np.float64) <= float(threshold))


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
        self.center_ = x.mean(axis=0)
        std = x.std(axis=0)
        self.scale_ = np.where(std > 1e-6 * max(float(std.max()), 1e-12), std, 1.0)  # constant (dead) units: as is
        x = (x - self.center_) / self.scale_
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
        d = self._standardize(features) - self.location_
        squared = np.einsum("ij,jk,ik->i", d, self.precision_, d)
        return np.round(np.sqrt(np.clip(squared, 0.0, None)), SCORE_DECIMALS)

    def project(self, features: np.ndarray) -> np.ndarray:
        """The compact feature vector: the fixed PCA projection of each row, rounded to :data:`COMPACT_DECIMALS`."""
        self._check("components_")
        return np.round((self._standardize(features) - self.pca_mean_) @ self.components_.T, COMPACT_DECIMALS)

    def _standardize(self, features: np.ndarray) -> np.ndarray:
        return (_matrix(features, self.n_features_) - self.center_) / self.scale_

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
        """Whether each score is out of distribution at this detector's threshold (:func:`is_out`)."""
        return is_out(scores, self.threshold)

    def _check(self, attribute: str) -> None:
        if not hasattr(self, attribute):
            step = "calibrate on validation scores" if attribute == "threshold_" else "fit on training features"
            raise RuntimeError(f"MahalanobisDetector is not ready: {step} first")

    def summary(self) -> dict:
        """The scalar state (what reports and MLflow show)."""
        self._check("threshold_")
        return {"method": METHOD, "quantile": self.quantile, "n_components": self.n_components,
                "threshold": self.threshold_, "n_fit": self.n_fit_, "n_calibration": self.n_calibration_,
                "n_features": self.n_features_, "shrinkage": self.shrinkage_}

    def save(self, path: str | os.PathLike) -> None:
        """Arrays and the scalar state (as JSON) in one ``.npz`` file, written in one go."""
        buffer = io.BytesIO()
        np.savez(buffer, state=np.array(json.dumps(self.summary(), sort_keys=True)),
                 **{key: getattr(self, f"{key}_") for key in ARRAYS})
        Path(path).write_bytes(buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> MahalanobisDetector:
        try:
            with np.load(path, allow_pickle=False) as data:
                state = json.loads(str(data["state"]))
                arrays = {key: np.asarray(data[key], dtype=np.float64) for key in ARRAYS}
            if state.get("method") != METHOD:
                raise ValueError(f"not a Mahalanobis OOD detector: {state.get('method')!r}")
            obj = cls(n_components=int(state["n_components"]), quantile=float(state["quantile"]))
            obj.threshold_, obj.shrinkage_ = float(state["threshold"]), float(state["shrinkage"])
            obj.n_fit_, obj.n_calibration_ = int(state["n_fit"]), int(state["n_calibration"])
            obj.n_features_ = n = int(state["n_features"])
            for key, value in arrays.items():
                setattr(obj, f"{key}_", value)
            if obj.precision_.shape != (n, n) or obj.location_.shape != (n,) or obj.center_.shape != (n,):
                raise ValueError(f"arrays do not match its {n} features")
        except (OSError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a valid OOD detector file ({err})") from None
        return obj


def _matrix(features: np.ndarray, n_features: int | None = None) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or (n_features is not None and x.shape[1] != n_features):
        want = f"[N, {n_features}]" if n_features is not None else "[N, D]"
        raise ValueError(f"features must be a {want} matrix, got shape {x.shape}")
    return x
