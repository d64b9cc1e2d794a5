"""Evaluation metrics: segmentation overlap, binary classification, calibration, operating thresholds and
patient-level bootstrap confidence intervals.

Pure functions on numpy arrays (MONAI style): nothing here knows about MLflow, DVC or file paths.

Conventions shared by every function:

- Labels are binary (``0``/``1`` or ``bool``), the positive class is COVID-19.
- A score is positive when ``score >= threshold`` (so a score exactly at the threshold is positive), the same
  semantics as the thresholds returned by :func:`sklearn.metrics.roc_curve`.
- A ratio whose denominator is zero (sensitivity without positives, precision without predicted positives, ROC AUC
  with one class, ...) is ``float("nan")``, never an exception and never a made-up 0 or 1. F1 of the positive class
  is NaN without positives too (like sensitivity, however many false positives there are).

scikit-learn is imported inside the few functions that call it, not here: serving, its clients (``pacs --url``,
``covidcxr monitor``) and :mod:`covidcxr.folders` use this module's threshold rules and start without it.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

#: Metrics that :func:`bootstrap_ci` and :func:`confidence_intervals` compute in vectorised form.
BOOTSTRAP_METRICS: tuple[str, ...] = (
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "roc_auc",
    "average_precision",
)
DEFAULT_CI_METRICS: tuple[str, ...] = ("accuracy", "sensitivity", "specificity", "f1", "roc_auc", "average_precision")

PAPER_COLUMNS: dict[str, str] = {
    "accuracy": "Accuracy",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "f1": "F1 Score",
}
PAPER_PARTS: tuple[str, ...] = ("c", "d", "e")

# Weight matrices of the bootstrap are processed in chunks of about this many elements (bounded memory).
_CHUNK_ELEMENTS = 4_000_000


# --------------------------------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------------------------------


def _binary_masks(y_true: np.ndarray, y_pred: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Both mask batches as boolean ``(N, H*W)`` arrays (``value >= threshold`` is foreground)."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"mask shapes differ: y_true {t.shape} vs y_pred {p.shape}")
    if t.ndim == 4 and t.shape[-1] == 1:
        t, p = t[..., 0], p[..., 0]
    if t.ndim != 3:
        raise ValueError(f"masks must be (N, H, W) or (N, H, W, 1), got shape {np.asarray(y_true).shape}")
    if np.isnan(t.astype(float, copy=False)).any() or np.isnan(p.astype(float, copy=False)).any():
        raise ValueError("masks contain NaN")
    return (t >= threshold).reshape(len(t), -1), (p >= threshold).reshape(len(p), -1)


def dice(y_true: np.ndarray, y_pred: np.ndarray, *, threshold: float = 0.5) -> np.ndarray:
    """Standard Dice coefficient ``2|A∩B| / (|A|+|B|)`` per image, on binary masks.

    Both arrays are binarised with ``value >= threshold`` (so 0/1, 0/255 and probability masks all work). An image
    where both masks are empty scores 1.0 (perfect agreement on "no lung"). Returns a float array of shape ``(N,)``;
    report its mean (and spread), not a pixel-pooled number.
    """
    t, p = _binary_masks(y_true, y_pred, threshold)
    inter = np.count_nonzero(t & p, axis=1)
    total = np.count_nonzero(t, axis=1) + np.count_nonzero(p, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total == 0, 1.0, 2.0 * inter / total)


def iou(y_true: np.ndarray, y_pred: np.ndarray, *, threshold: float = 0.5) -> np.ndarray:
    """Intersection over union (Jaccard) ``|A∩B| / |A∪B|`` per image, on binary masks; both empty -> 1.0."""
    t, p = _binary_masks(y_true, y_pred, threshold)
    inter = np.count_nonzero(t & p, axis=1)
    union = np.count_nonzero(t | p, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union == 0, 1.0, inter / union)


def paper_pixel_dice(y_true: np.ndarray, y_pred: np.ndarray, smooth: float = 1.0, *, per_pixel: bool = False) -> float:
    """The authors' Keras ``dice_coef``, kept ONLY to compare with the paper's Table 2; do not use it to judge masks.

    Default (``per_pixel=False``): the common Keras formula on the whole batch flattened together (``K.flatten``)::

        (2 * sum(t * p) + smooth) / (sum(t) + sum(p) + smooth)

    on soft (unthresholded) predictions. It pools every pixel of the batch, so large lungs dominate: an image whose
    small lungs are missed entirely (empty prediction, standard Dice 0) barely moves the number when it shares the
    batch with well-segmented large lungs, and ``smooth`` makes an all-empty batch score 1.

    ``per_pixel=True``: the same formula with the sums taken over the channel axis only (``axis=-1``), i.e. one Dice
    per pixel, then averaged over pixels, which is how the released code ended up averaging it. Every background pixel
    then scores 1, so an empty prediction scores ``1 - f/2`` for a lung fraction ``f`` (about 0.79 for typical
    chest X-rays) where the standard per-image Dice is 0.

    Neither is comparable with :func:`dice`.
    """
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if t.shape != p.shape:
        raise ValueError(f"mask shapes differ: y_true {t.shape} vs y_pred {p.shape}")
    if t.size == 0:
        raise ValueError("paper_pixel_dice of empty arrays")
    if per_pixel:
        inter = t * p  # channel axis of a one-channel mask has length 1: the axis=-1 sums are the values themselves
        return float(np.mean((2.0 * inter + smooth) / (t + p + smooth)))
    return float((2.0 * np.sum(t * p) + smooth) / (np.sum(t) + np.sum(p) + smooth))


# --------------------------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------------------------


def _labels_scores(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(N,)`` int labels in {0, 1} and ``(N,)`` finite float scores (``(N, 1)`` is accepted)."""
    t = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if s.ndim == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if t.ndim != 1 or s.ndim != 1:
        raise ValueError(f"y_true and y_score must be 1-D (or (N, 1)), got {np.asarray(y_true).shape} and "
                         f"{np.asarray(y_score).shape}")
    if len(t) != len(s):
        raise ValueError(f"y_true has {len(t)} values but y_score has {len(s)}")
    if len(t) == 0:
        raise ValueError("no samples: y_true and y_score are empty")
    if t.dtype == bool:
        t = t.astype(np.int64)
    else:
        bad = ~np.isin(t, (0, 1))
        if bad.any():
            raise ValueError(f"y_true must be binary 0/1, found {sorted(set(np.unique(t[bad]).tolist()))[:5]}")
        t = t.astype(np.int64)
    if not np.isfinite(s).all():
        raise ValueError(f"y_score has {int((~np.isfinite(s)).sum())} non-finite values")
    return t, s


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """``num / den`` with NaN where ``den == 0``."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den == 0, np.nan, num / np.where(den == 0, 1.0, den))


def _from_counts(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    """Threshold metrics from confusion counts (scalars or arrays of resamples). F1 is NaN without positives
    (``tp + fn == 0``): false positives alone would make it 0, a figure about a class that is not there."""
    return {
        "accuracy": _ratio(tp + tn, tp + fp + tn + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "f1": np.where(np.asarray(tp + fn) == 0, np.nan, _ratio(2 * tp, 2 * tp + fp + fn)),
    }


def classification_metrics(y_true: np.ndarray, y_score: np.ndarray, *, threshold: float = 0.5) -> dict:
    """Binary metrics of scores against labels, positive when ``score >= threshold``.

    Returns ``accuracy, sensitivity`` (recall of positives), ``specificity, precision, f1, roc_auc,
    average_precision`` (floats; NaN when undefined, e.g. sensitivity or F1 without positives, ROC AUC with one
    class)
    and the counts ``tp, fp, tn, fn, n, n_positive`` (ints). ROC AUC and average precision are scikit-learn's.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    t, s = _labels_scores(y_true, y_score)
    pred = s >= threshold
    tp = int(np.count_nonzero(pred & (t == 1)))
    fp = int(np.count_nonzero(pred & (t == 0)))
    tn = int(np.count_nonzero(~pred & (t == 0)))
    fn = int(np.count_nonzero(~pred & (t == 1)))
    n_pos = tp + fn
    out: dict = {k: float(v) for k, v in _from_counts(tp, fp, tn, fn).items()}
    out["roc_auc"] = float(roc_auc_score(t, s)) if 0 < n_pos < len(t) else float("nan")
    out["average_precision"] = float(average_precision_score(t, s)) if n_pos > 0 else float("nan")
    out.update(tp=tp, fp=fp, tn=tn, fn=fn, n=len(t), n_positive=n_pos)
    return out


def served_outcomes(y_true: np.ndarray, y_score: np.ndarray, refused: np.ndarray, *, threshold: float,
                    reasons: np.ndarray | None = None) -> dict:
    """What serving answers for each image, by class: refused (``refused``: e.g. out of distribution, or before the
    classifier, a lateral view), called COVID-19 (``score >= threshold``) or called negative; the shares are of the
    class's images, refusals included. A refused image's score is not read: NaN for one refused before it was scored.

    The figure a site sees: ``negatives_called_covid`` is the share of its healthy films that come back COVID-19 (one
    minus specificity counts refused films as false alarms too), ``negatives_refused`` those it is told to read
    itself. ``answered_sensitivity``/``answered_specificity`` are of the answered images alone. NaN where a class is
    absent; the counts are ints. ``reasons`` (one per image, read where refused): ``refused_by_reason`` counts the
    refused images by it.
    """
    out = np.asarray(refused, dtype=bool).ravel()
    s = np.asarray(y_score, dtype=np.float64)
    if out.shape == (s.size,):  # only an answered image's score must be a number
        s = np.where(out, 0.0, s.ravel())
    t, s = _labels_scores(y_true, s)
    if out.shape != t.shape:
        raise ValueError(f"refused has {out.size} entries for {t.size} labels")
    called = (s >= threshold) & ~out
    counts = {}
    for name, cls in (("positives", 1), ("negatives", 0)):
        member = t == cls
        counts[name] = (int(np.count_nonzero(member)), int(np.count_nonzero(member & out)),
                        int(np.count_nonzero(member & called)))
    (n_pos, pos_refused, tp), (n_neg, neg_refused, fp) = counts["positives"], counts["negatives"]
    result = {
        "n": len(t), "n_positive": n_pos, "n_negative": n_neg, "refused": pos_refused + neg_refused,
        "refused_share": float(_ratio(pos_refused + neg_refused, len(t))),
        "positives_called_covid": float(_ratio(tp, n_pos)), "positives_refused": float(_ratio(pos_refused, n_pos)),
        "negatives_called_covid": float(_ratio(fp, n_neg)), "negatives_refused": float(_ratio(neg_refused, n_neg)),
        "answered_sensitivity": float(_ratio(tp, n_pos - pos_refused)),
        "answered_specificity": float(_ratio(n_neg - neg_refused - fp, n_neg - neg_refused)),
    }
    if reasons is not None:
        why = np.asarray(reasons, dtype=str).ravel()
        if why.shape != t.shape:
            raise ValueError(f"reasons has {why.size} entries for {t.size} labels")
        names, n = np.unique(why[out], return_counts=True)
        result["refused_by_reason"] = {str(k): int(v) for k, v in zip(names, n)}
    return result


def _finite_thresholds(thresholds: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """Replace scikit-learn's ``inf`` threshold ("nothing positive") by the next float above the highest score."""
    top = np.nextafter(float(np.max(y_score)), np.inf)
    return np.where(np.isfinite(thresholds), thresholds, top)


def roc_curve_points(y_true: np.ndarray, y_score: np.ndarray) -> dict[str, list[float]]:
    """ROC curve for plots: ``fpr, tpr, thresholds`` (same length, all finite, thresholds decreasing).

    The first point (0, 0) gets a threshold just above the highest score instead of scikit-learn's ``inf``, so the
    lists serialise to strict JSON. With one class only, the curve is undefined: empty lists and a warning.
    """
    t, s = _labels_scores(y_true, y_score)
    if t.min() == t.max():
        log.warning("ROC curve undefined: y_true has only class %d", int(t[0]))
        return {"fpr": [], "tpr": [], "thresholds": []}
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(t, s)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": _finite_thresholds(thr, s).tolist()}


def pr_curve_points(y_true: np.ndarray, y_score: np.ndarray) -> dict[str, list[float]]:
    """Precision-recall curve for plots: ``precision, recall, thresholds`` of equal length, all finite.

    scikit-learn's final point (precision 1, recall 0, no threshold) gets a threshold just above the highest score.
    Without positives the curve is undefined: empty lists and a warning.
    """
    t, s = _labels_scores(y_true, y_score)
    if t.max() == 0:
        log.warning("precision-recall curve undefined: y_true has no positives")
        return {"precision": [], "recall": [], "thresholds": []}
    from sklearn.metrics import precision_recall_curve

    precision, recall, thr = precision_recall_curve(t, s)
    thr = np.append(thr, np.nextafter(float(s.max()), np.inf))
    return {"precision": precision.tolist(), "recall": recall.tolist(), "thresholds": thr.tolist()}


# --------------------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------------------


def _calibration_bins(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int) -> tuple[np.ndarray, ...]:
    """Per equal-width bin: edges, counts, sum of probabilities and sum of labels.

    Bin ``i = floor(p * n_bins)`` holds ``i/n_bins <= p < (i+1)/n_bins``; the last bin also holds ``p == 1``.
    (Computed as ``floor(p * n_bins)`` rather than by searching ``linspace`` edges, so that decimal probabilities on a
    bin edge, e.g. 0.6 with 5 bins, land in the bin they start.)
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    t, p = _labels_scores(y_true, y_prob)
    if p.min() < 0 or p.max() > 1:
        raise ValueError(f"y_prob must be probabilities in [0, 1], got range [{p.min():.4g}, {p.max():.4g}]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.minimum(np.floor(p * n_bins).astype(np.intp), n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=t, minlength=n_bins)
    return edges, counts, sum_p, sum_y


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, *, n_bins: int = 10) -> float:
    """Expected calibration error: ``sum_b (n_b / N) * |observed frequency_b - mean probability_b|``.

    Equal-width bins on [0, 1] (see :func:`reliability_diagram`); ``y_prob`` is the probability of the positive class.
    """
    _, counts, sum_p, sum_y = _calibration_bins(y_true, y_prob, n_bins)
    return float(np.sum(np.abs(sum_y - sum_p)) / counts.sum())


def reliability_diagram(y_true: np.ndarray, y_prob: np.ndarray, *, n_bins: int = 10) -> dict[str, list[float]]:
    """Data of a reliability diagram: ``bin_edges`` (n_bins + 1), and per bin ``bin_centers, mean_predicted,
    observed_frequency, counts``. Empty bins have count 0 and NaN means."""
    edges, counts, sum_p, sum_y = _calibration_bins(y_true, y_prob, n_bins)
    return {
        "bin_edges": edges.tolist(),
        "bin_centers": ((edges[:-1] + edges[1:]) / 2).tolist(),
        "mean_predicted": _ratio(sum_p, counts).tolist(),
        "observed_frequency": _ratio(sum_y, counts).tolist(),
        "counts": counts.astype(int).tolist(),
    }


# --------------------------------------------------------------------------------------------------------------------
# Patient-level bootstrap
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootstrapCI:
    """A bootstrap estimate. Unpacks like the tuple ``(value, low, high)``.

    ``n_skipped`` counts resamples on which the metric was undefined (e.g. no positive patient drawn for
    sensitivity) and that were left out of the percentiles; ``n_boot`` is the number drawn.
    """

    value: float
    low: float
    high: float
    n_boot: int
    n_skipped: int

    def __iter__(self) -> Iterator[float]:
        return iter((self.value, self.low, self.high))


def _group_codes(groups: Sequence | np.ndarray, n: int) -> tuple[np.ndarray, int]:
    """Integer codes 0..G-1 of the group (patient) of each sample, and G."""
    g = np.asarray(groups)
    if g.ndim != 1 or len(g) != n:
        raise ValueError(f"groups must be 1-D with one value per sample ({n}), got shape {g.shape}")
    codes, uniques = pd.factorize(pd.Series(g, dtype=object), sort=True)
    if (codes < 0).any():
        raise ValueError(f"{int((codes < 0).sum())} samples have no group (patient) id")
    return codes.astype(np.intp), len(uniques)


def _draw_group_counts(n_groups: int, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n_groups)`` multiplicities of each group in each resample of groups with replacement."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    flat = (draws + np.arange(n_boot)[:, None] * n_groups).ravel()
    return np.bincount(flat, minlength=n_boot * n_groups).reshape(n_boot, n_groups)


def patient_resample_weights(groups: Sequence | np.ndarray, *, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, N)`` weights of each sample in each bootstrap resample of its groups (patients) with replacement:
    a patient drawn twice counts its films twice, one not drawn counts none (the resampling of :func:`bootstrap_ci`,
    for figures computed elsewhere)."""
    codes, n_groups = _group_codes(groups, len(np.asarray(groups)))
    return _draw_group_counts(n_groups, n_boot, seed)[:, codes]


def _ranking_metrics(weights: np.ndarray, t_sorted: np.ndarray, level_end: np.ndarray) -> dict[str, np.ndarray]:
    """Weighted ROC AUC and average precision for each row of ``weights``.

    ``weights`` are sample weights ``(B, N)`` in order of decreasing score, ``level_end`` the last index of each run of
    equal scores. Same definitions as scikit-learn: trapezoidal ROC AUC over the distinct thresholds, and
    ``AP = sum_k (R_k - R_{k-1}) P_k``.
    """
    tp = np.cumsum(weights * t_sorted, axis=1)[:, level_end]
    fp = np.cumsum(weights * (1 - t_sorted), axis=1)[:, level_end]
    n_pos, n_neg = tp[:, -1:], fp[:, -1:]
    tpr = _ratio(tp, n_pos)
    fpr = _ratio(fp, n_neg)
    zero = np.zeros((len(weights), 1))
    tpr0, fpr0 = np.hstack([zero, tpr]), np.hstack([zero, fpr])
    auc = np.sum(np.diff(fpr0, axis=1) * (tpr0[:, 1:] + tpr0[:, :-1]) / 2, axis=1)
    auc = np.where((n_pos[:, 0] > 0) & (n_neg[:, 0] > 0), auc, np.nan)
    precision = np.nan_to_num(_ratio(tp, tp + fp))  # 0/0 only where no sample is drawn yet: recall step is 0 there
    ap = np.sum(np.diff(tpr0, axis=1) * precision, axis=1)
    ap = np.where(n_pos[:, 0] > 0, ap, np.nan)
    return {"roc_auc": auc, "average_precision": ap}


def _score_levels(t: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The order of decreasing score (stable), the labels in that order and the last index of each run of equal
    scores: what :func:`_ranking_metrics` takes."""
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    return order, t[order].astype(np.float64), np.flatnonzero(np.append(s_sorted[1:] != s_sorted[:-1], True))


def resampled_ranking_metrics(y_true: np.ndarray, y_score: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Weighted ROC AUC and average precision (``{"roc_auc", "average_precision"}``, each ``(B,)``) of the scores for
    each row of ``weights`` ``(B, N)``, one weight per resample and sample (e.g. :func:`patient_resample_weights`).

    The figures :func:`bootstrap_ci` computes on its resamples, for intervals of figures built from them: two models'
    AUCs on the same resamples of the same images (a paired bootstrap), or an AUC on the resamples of another figure.
    NaN on a resample that holds one class (no AUC) or no positive (no AP).
    """
    t, s = _labels_scores(y_true, y_score)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != len(t):
        raise ValueError(f"weights must be (resamples, {len(t)} samples), got shape {w.shape}")
    order, t_sorted, level_end = _score_levels(t, s)
    return _ranking_in_chunks(len(w), lambda rows: w[rows][:, order], t_sorted, level_end)


def _ranking_in_chunks(n_rows: int, weights_of: Callable[[slice], np.ndarray], t_sorted: np.ndarray,
                       level_end: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`_ranking_metrics` of ``n_rows`` resamples, a chunk of rows at a time (``weights_of(rows)``: their
    weights in score order), so that no ``(B, N)`` array larger than ``_CHUNK_ELEMENTS`` is ever held."""
    chunk = max(1, _CHUNK_ELEMENTS // len(t_sorted))
    parts = [_ranking_metrics(weights_of(slice(start, start + chunk)), t_sorted, level_end)
             for start in range(0, n_rows, chunk)]
    return {n: np.concatenate([p[n] for p in parts]) if parts else np.empty(0)
            for n in ("roc_auc", "average_precision")}


def _bootstrap_named(
    t: np.ndarray,
    s: np.ndarray,
    codes: np.ndarray,
    counts: np.ndarray,
    names: Sequence[str],
    threshold: float,
) -> dict[str, np.ndarray]:
    """Values of the named metrics on each resample, given the group multiplicities ``counts`` (B, G)."""
    n_groups = counts.shape[1]
    pred = s >= threshold
    per_group = {
        key: np.bincount(codes, weights=mask.astype(np.float64), minlength=n_groups)
        for key, mask in (("tp", pred & (t == 1)), ("fp", pred & (t == 0)), ("tn", ~pred & (t == 0)),
                          ("fn", ~pred & (t == 1)))
    }
    cf = counts.astype(np.float64)
    out = {k: v for k, v in _from_counts(*(cf @ per_group[k] for k in ("tp", "fp", "tn", "fn"))).items() if k in names}

    ranking = [n for n in names if n in ("roc_auc", "average_precision")]
    if ranking:
        order, t_sorted, level_end = _score_levels(t, s)
        codes_sorted = codes[order]
        values = _ranking_in_chunks(len(counts), lambda rows: cf[rows][:, codes_sorted], t_sorted, level_end)
        out.update({n: values[n] for n in ranking})
    return {n: out[n] for n in names}


def percentile_interval(samples: np.ndarray, *, alpha: float = 0.05, outward: bool = False) -> tuple[float, float]:
    """The ``1 - alpha`` percentile interval of the resamples' defined (non-NaN) values; NaN bounds when none is.

    Linear interpolation between order statistics, as :func:`bootstrap_ci`; ``outward`` takes the order statistics at
    or beyond each bound instead, for resamples that may be infinite (a bound is never interpolated towards one)."""
    valid = np.asarray(samples, dtype=np.float64)
    valid = valid[~np.isnan(valid)]
    if not len(valid):
        return float("nan"), float("nan")
    if outward:
        return (float(np.quantile(valid, alpha / 2, method="lower")),
                float(np.quantile(valid, 1 - alpha / 2, method="higher")))
    low, high = np.percentile(valid, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def _percentile_ci(value: float, samples: np.ndarray, alpha: float, n_boot: int) -> BootstrapCI:
    """Percentile interval of the defined (non-NaN) resample values."""
    low, high = percentile_interval(samples, alpha=alpha)
    return BootstrapCI(value=float(value), low=low, high=high, n_boot=n_boot,
                       n_skipped=int(np.isnan(samples).sum()))


def _check_boot_args(n_boot: int, alpha: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _warn_skipped(name: str, ci: BootstrapCI) -> None:
    if ci.n_skipped > ci.n_boot // 10:
        log.warning("bootstrap of %s: %d of %d resamples undefined (too few patients of a class?) and skipped",
                    name, ci.n_skipped, ci.n_boot)


def bootstrap_ci(
    y_true: np.ndarray,
    y_score: np.ndarray,
    groups: Sequence | np.ndarray,
    *,
    metric: Callable[[np.ndarray, np.ndarray], float] | str,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    threshold: float = 0.5,
) -> BootstrapCI:
    """Point estimate and percentile confidence interval with patient-level resampling.

    Each resample draws the unique ``groups`` (patients) with replacement and takes all images of every drawn patient,
    so images of one patient never count as independent evidence. ``metric`` is a name from
    :data:`BOOTSTRAP_METRICS` (computed vectorised, at ``threshold`` where one applies) or a callable
    ``metric(y_true, y_score) -> float``; for a callable, resamples lacking either class are skipped (most ranking
    metrics need both) as well as NaN results. Resamples where the metric is undefined are skipped, counted in
    ``n_skipped`` and left out of the percentiles. Returns a :class:`BootstrapCI`, which unpacks as
    ``value, low, high``.
    """
    _check_boot_args(n_boot, alpha)
    t, s = _labels_scores(y_true, y_score)
    codes, n_groups = _group_codes(groups, len(t))
    counts = _draw_group_counts(n_groups, n_boot, seed)
    if isinstance(metric, str):
        if metric not in BOOTSTRAP_METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {BOOTSTRAP_METRICS} or pass a callable")
        value = classification_metrics(t, s, threshold=threshold)[metric]
        samples = _bootstrap_named(t, s, codes, counts, [metric], threshold)[metric]
        name = metric
    else:
        value = float(metric(t, s))
        samples = np.full(n_boot, np.nan)
        for b in range(n_boot):
            idx = np.repeat(np.arange(len(t)), counts[b, codes])
            if len(idx) and t[idx].min() != t[idx].max():
                samples[b] = float(metric(t[idx], s[idx]))
        name = getattr(metric, "__name__", "metric")
    ci = _percentile_ci(value, samples, alpha, n_boot)
    _warn_skipped(name, ci)
    return ci


def confidence_intervals(
    y_true: np.ndarray,
    y_score: np.ndarray,
    groups: Sequence | np.ndarray,
    *,
    names: Sequence[str] = DEFAULT_CI_METRICS,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    threshold: float = 0.5,
) -> dict[str, dict]:
    """Patient-level bootstrap intervals of several named metrics from one shared set of resamples.

    Returns ``{name: {"value", "low", "high", "n_skipped"}}``; with the same ``seed`` each entry equals
    :func:`bootstrap_ci` of that metric.
    """
    _check_boot_args(n_boot, alpha)
    unknown = [n for n in names if n not in BOOTSTRAP_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {BOOTSTRAP_METRICS}")
    t, s = _labels_scores(y_true, y_score)
    codes, n_groups = _group_codes(groups, len(t))
    counts = _draw_group_counts(n_groups, n_boot, seed)
    point = classification_metrics(t, s, threshold=threshold)
    samples = _bootstrap_named(t, s, codes, counts, list(names), threshold)
    out: dict[str, dict] = {}
    for name in names:
        ci = _percentile_ci(point[name], samples[name], alpha, n_boot)
        _warn_skipped(name, ci)
        out[name] = {"value": ci.value, "low": ci.low, "high": ci.high, "n_skipped": ci.n_skipped}
    return out


# --------------------------------------------------------------------------------------------------------------------
# Operating thresholds
# --------------------------------------------------------------------------------------------------------------------


def _both_classes(y_true: np.ndarray, y_score: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    t, s = _labels_scores(y_true, y_score)
    if t.min() == t.max():
        raise ValueError(f"cannot choose a {what} threshold: y_true has only class {int(t[0])}")
    return t, s


def youden_threshold(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Threshold maximising Youden's J = sensitivity + specificity - 1 (ties: the highest threshold).

    The returned value is a score from the data, to be used as ``score >= threshold``.
    """
    from sklearn.metrics import roc_curve

    t, s = _both_classes(y_true, y_score, "Youden")
    fpr, tpr, thr = roc_curve(t, s, drop_intermediate=False)
    thr = _finite_thresholds(thr, s)
    return float(thr[int(np.argmax(tpr - fpr))])


def f1_threshold(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Threshold maximising F1 of the positive class (ties: the highest threshold)."""
    from sklearn.metrics import precision_recall_curve

    t, s = _both_classes(y_true, y_score, "F1")
    precision, recall, thr = precision_recall_curve(t, s)
    f1 = np.nan_to_num(_ratio(2 * precision[:-1] * recall[:-1], precision[:-1] + recall[:-1]))
    best = np.flatnonzero(f1 == f1.max())
    return float(thr[best].max())


def threshold_for_sensitivity(y_true: np.ndarray, y_score: np.ndarray, min_sensitivity: float = 0.95) -> float:
    """The highest-specificity threshold whose sensitivity is at least ``min_sensitivity``.

    Specificity only falls as the threshold falls, so this is the highest threshold that reaches the sensitivity.
    """
    if not 0 <= min_sensitivity <= 1:
        raise ValueError(f"min_sensitivity must be in [0, 1], got {min_sensitivity}")
    from sklearn.metrics import roc_curve

    t, s = _both_classes(y_true, y_score, "sensitivity")
    _, tpr, thr = roc_curve(t, s, drop_intermediate=False)
    thr = _finite_thresholds(thr, s)
    ok = np.flatnonzero(tpr >= min_sensitivity - 1e-12)
    return float(thr[ok[0]])


THRESHOLD_OBJECTIVES: tuple[str, ...] = ("youden", "f1", "sensitivity")


def check_threshold(value: object, name: str = "threshold") -> float:
    """``value`` as an operating threshold, a number in [0, 1] (positive when ``score >= threshold``); a ValueError
    naming ``name`` otherwise. The one rule for a model's threshold, a site's thresholds file and a request's param."""
    number = _number(value, name, "a number in [0, 1]")
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {number}")
    return number


def check_ood_threshold(value: object, name: str = "ood_threshold") -> float:
    """``value`` as an out-of-distribution threshold (scores above it are refused), a finite non-negative number; a
    ValueError naming ``name`` otherwise. The one rule for a site's thresholds file and a request's param."""
    number = _number(value, name, "a finite non-negative number")
    if not (np.isfinite(number) and number >= 0.0):
        raise ValueError(f"{name} must be a finite non-negative number, got {number}")
    return number


def _number(value: object, name: str, what: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an integer beyond any float (a JSON number of hundreds of digits)
        raise ValueError(f"{name} must be {what}, got an integer of {len(str(value))} digits") from None


@dataclass(frozen=True)
class ThresholdChoice:
    """An operating threshold (positive when ``score >= threshold``), how it was chosen, and what it gives there."""

    threshold: float
    objective: str
    min_sensitivity: float | None
    sensitivity: float
    specificity: float
    n_positive: int
    n_negative: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def operating_threshold(y_true: np.ndarray, y_score: np.ndarray, objective: str = "youden", *,
                        min_sensitivity: float = 0.95) -> ThresholdChoice:
    """The operating threshold for ``objective`` on (validation) labels and scores, computed exactly.

    The objectives only change at the distinct scores, so every one of them is tried: ``youden`` (sensitivity +
    specificity - 1), ``f1`` (of the positive class), ``sensitivity`` (the highest specificity among thresholds whose
    sensitivity is at least ``min_sensitivity``). Ties go to the highest threshold (fewest positives).
    """
    if objective not in THRESHOLD_OBJECTIVES:
        raise ValueError(f"threshold objective must be one of {list(THRESHOLD_OBJECTIVES)}, got {objective!r}")
    if objective == "youden":
        threshold = youden_threshold(y_true, y_score)
    elif objective == "f1":
        threshold = f1_threshold(y_true, y_score)
    else:
        threshold = threshold_for_sensitivity(y_true, y_score, min_sensitivity)
    t, s = _labels_scores(y_true, y_score)
    called = s >= threshold
    n_pos, n_neg = int(t.sum()), int(len(t) - t.sum())
    return ThresholdChoice(
        threshold=float(threshold), objective=objective,
        min_sensitivity=float(min_sensitivity) if objective == "sensitivity" else None,
        sensitivity=float(called[t == 1].mean()), specificity=float((~called[t == 0]).mean()),
        n_positive=n_pos, n_negative=n_neg,
    )


# --------------------------------------------------------------------------------------------------------------------
# The paper's table layout
# --------------------------------------------------------------------------------------------------------------------


def paper_table(rows: Sequence[Mapping]) -> pd.DataFrame:
    """Metrics in the layout of the paper's Tables 6/10/14/15: one row per part c/d/e, columns
    ``Accuracy, Sensitivity, Specificity, F1 Score`` (COVID-19 label). The paper thresholds the network's own output
    at 0.5: rows of a calibrated score at 0.5 are another operating point.

    Each input row is ``{"variant": "c"|"d"|"e", "backbone": ..., "split": ..., "accuracy", "sensitivity",
    "specificity", "f1", ...}`` (e.g. :func:`classification_metrics` output plus the three keys; extra keys are
    ignored). With one (split, backbone) the index is ``Part``; with several, it is ``(split, backbone, Part)``.
    Values are not rounded.
    """
    if not rows:
        raise ValueError("paper_table needs at least one row")
    required = ("variant", "backbone", "split", *PAPER_COLUMNS)
    for i, row in enumerate(rows):
        missing = [k for k in required if k not in row]
        if missing:
            raise ValueError(f"paper_table row {i} lacks {missing}")
        if row["variant"] not in PAPER_PARTS:
            raise ValueError(f"paper_table row {i}: variant {row['variant']!r} is not one of {PAPER_PARTS}")
    df = pd.DataFrame([{k: row[k] for k in required} for row in rows])
    dup = df.duplicated(["split", "backbone", "variant"], keep=False)
    if dup.any():
        raise ValueError(f"paper_table has duplicate (split, backbone, variant) rows: "
                         f"{df.loc[dup, ['split', 'backbone', 'variant']].drop_duplicates().values.tolist()}")
    df = df.rename(columns={"variant": "Part", **PAPER_COLUMNS})
    df["Part"] = pd.Categorical(df["Part"], categories=PAPER_PARTS, ordered=True)
    df = df.sort_values(["split", "backbone", "Part"]).astype({c: float for c in PAPER_COLUMNS.values()})
    df["Part"] = df["Part"].astype(str)
    index = ["Part"] if len(df[["split", "backbone"]].drop_duplicates()) == 1 else ["split", "backbone", "Part"]
    return df.set_index(index)[list(PAPER_COLUMNS.values())]
