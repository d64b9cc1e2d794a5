"""Drift monitoring: a window of the prediction log against the reference saved when the model was registered.

The reference is what the served model logs for its own validation split (``register`` scores it through the serving
pipeline into a :class:`covidcxr.predlog.MemoryLog`), so both sides have the same columns and meanings. The tests:

- each scalar (COVID-19 probability, OOD score, lung area, projection probability, intensity statistics): the
  two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``);
- the compact feature vectors: a kernel two-sample test, the maximum mean discrepancy (MMD) with a Gaussian kernel
  (``sklearn.metrics.pairwise.rbf_kernel``, bandwidth by the median heuristic) and a permutation p-value
  (``scipy.stats.permutation_test``);
- the positive rate (accepted images whose COVID-19 probability reaches the reference's threshold, the model's), the
  refusal rate (any reason but out of distribution) and the share above the model's OOD threshold (a film served as
  out of distribution without a finite score counts as above, serving's rule): Fisher's exact test
  (``scipy.stats.fisher_exact``). Each is held to the model's thresholds on both sides, so a window served at a site's
  own thresholds (a request's, or a server's ``$COVIDCXR_SITE``) is compared on what its images are, not on how the
  site chose to call them. Films a site admitted past the model's OOD threshold count in the OOD share, and in neither
  the positive rate nor the probability test: the model would have refused them, and the reference has none (unless
  the model only flags them, ``register.ood_action: flag``, as the reference's meta says; a reference saved before it
  said so is taken as flagging when it answers such films). Films refused at a stricter OOD threshold than the
  model's (a request's or a site's) count as in distribution in the OOD share, and, having no probability, in neither
  the positive rate nor the probability test, whose notes count them.

Records of images the server failed on (a retry reason, :data:`covidcxr.serving.RETRY_REASONS`: ``internal_error``,
``out_of_memory``) say nothing of the images, and a client (the PACS worker) sends those images again, so each is
usually logged a second time as a real record: they are left out of both sides, and of the window's size, before
anything is compared, and the report counts them (``server_failures``).

The p-values are Bonferroni-corrected over the tests that ran (as alibi-detect does for feature-wise tests); drift is
significant when any corrected p-value is below ``alpha``. Each test records the smallest p-value its sample sizes
allow (``p_min``); a test whose ``p_min`` cannot fall below ``alpha`` over the number of tests is ``inconclusive`` (too
few records to show drift: with no drift elsewhere, the verdict is ``insufficient_data``, never ``no_drift``). The
MMD test's permutations are raised where needed, so that a Monte Carlo p-value (at least ``1 / (permutations + 1)``)
can pass. :func:`render` writes a self-contained HTML report (inline
SVG, no script, no network), :func:`log_to_mlflow` logs it with its figures under the model version.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr import dburl, ood, predlog

REFERENCE_ARTIFACT = "monitoring/reference.json"  # in the register run
EXPERIMENT = "covidcxr-monitoring"
SCALARS: tuple[str, ...] = ("covid_probability", "ood_score", "lung_area_fraction", "projection_probability",
                            *predlog.INTENSITY_COLUMNS)
STATUSES = ("drift", "no_drift", "insufficient_data")


class MonitorError(RuntimeError):
    """The monitor cannot run: no reference, an unreadable log, an unknown model version (the message says which)."""


# --- the reference ----------------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """The records the served model gives its validation split, and what they were made with (``meta``: model name
    and version, OOD threshold and quantile, the split)."""

    frame: pd.DataFrame
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        rows = self.frame.astype(object).where(self.frame.notna(), None).to_dict(orient="records")
        for row in rows:
            if isinstance(row.get("time"), (dt.datetime, pd.Timestamp)):
                row["time"] = row["time"].isoformat()
        return {"meta": self.meta, "records": rows}

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")

    def check_model(self, model_name: str, model_version: str, source: str) -> None:
        """MonitorError (naming ``source``, the reference's file or run) when the reference's ``meta`` says it was made
        by another model or version than the one monitored: its OOD threshold and feature basis are that version's,
        so drift measured against them means nothing. A reference whose meta names neither is taken as it is."""
        name, version = self.meta.get("model_name"), self.meta.get("model_version")
        if (name is None or str(name) == model_name) and (version is None or str(version) == str(model_version)):
            return
        raise MonitorError(f"{source}: the drift reference is of {name or model_name} v{version or model_version}, not "
                           f"of the monitored {model_name} v{model_version} (--model, --version): its OOD threshold "
                           "and feature basis are that version's; monitor with that version's reference")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Reference:
        try:
            state = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(pd.DataFrame(state["records"], columns=list(predlog.COLUMNS)), dict(state["meta"]))
        except (OSError, KeyError, TypeError, ValueError) as err:
            raise MonitorError(f"{path}: not a drift reference ({type(err).__name__}: {err})") from None


def fetch_reference(name: str, version: str | None = None, alias: str | None = None, *, client=None,
                    dst: str | os.PathLike | None = None) -> tuple[Reference, str]:
    """The reference logged by ``register`` for model ``name`` at ``version`` (or ``alias``), and the version."""
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    client = client or mlflow.MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias) if version is None else client.get_model_version(
            name, str(version))
    except MlflowException:
        what = f"version {version}" if version is not None else f"alias @{alias}"
        raise MonitorError(f"model {name!r} has no {what} in {mlflow.get_tracking_uri()}") from None
    folder = dst or tempfile.mkdtemp(prefix="covidcxr-reference-")
    try:
        path = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=REFERENCE_ARTIFACT, dst_path=folder)
    except (MlflowException, OSError):
        raise MonitorError(f"{name} v{mv.version} has no drift reference ({REFERENCE_ARTIFACT} in its register run "
                           f"{mv.run_id}): registered before monitoring existed; register it again") from None
    return Reference.load(path), str(mv.version)


# --- the tests --------------------------------------------------------------------------------------------------------


@dataclass
class Test:
    """One test: its statistic and p-value (None when skipped, with the reason in ``note``), the figure it compares on
    each side, the sample sizes, the Bonferroni-corrected p-value, the smallest p-value these sample sizes allow, and
    whether that smallest p-value could not pass the corrected alpha (``inconclusive``: it could not show drift)."""

    name: str
    kind: str
    statistic: float | None
    p_value: float | None
    reference: float | None
    window: float | None
    n_reference: int
    n_window: int
    note: str = ""
    p_adjusted: float | None = None
    drift: bool = False
    p_min: float | None = None
    inconclusive: bool = False


@dataclass
class Drift:
    status: str
    alpha: float
    n_reference: int
    n_window: int
    tests: list[Test]
    reasons: dict[str, dict[str, float]]
    #: Records of each side left out as the server's failures, not the images' (:func:`server_failures`)
    server_failures: dict[str, int] = field(default_factory=lambda: {"reference": 0, "window": 0})

    @property
    def drifted(self) -> bool:
        return self.status == "drift"

    def to_dict(self) -> dict:
        return {"status": self.status, "alpha": self.alpha, "n_reference": self.n_reference,
                "n_window": self.n_window, "tests": [asdict(t) for t in self.tests], "reasons": self.reasons,
                "server_failures": self.server_failures}

    def metrics(self) -> dict[str, float]:
        """Flat finite figures for MLflow: ``drift``, counts, and each test's statistic, p-values and window figure."""
        out = {"drift": float(self.drifted), "n_window": float(self.n_window), "n_reference": float(self.n_reference),
               "server_failures": float(self.server_failures["window"])}
        for t in self.tests:
            for key in ("statistic", "p_value", "p_adjusted", "p_min", "window"):
                value = getattr(t, key)
                if value is not None and math.isfinite(value):
                    out[f"{t.name}.{key}"] = float(value)
        return out


def _values(frame: pd.DataFrame, column: str) -> np.ndarray:
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
    return values[np.isfinite(values)]


def _accepted(frame: pd.DataFrame) -> pd.Series:
    return frame["accepted"].astype(object).map(lambda v: bool(v) if v is not None and v == v else False)


def ks_test(name: str, reference: np.ndarray, window: np.ndarray, min_n: int) -> Test:
    from scipy.stats import ks_2samp

    ref_mean = float(reference.mean()) if len(reference) else None
    win_mean = float(window.mean()) if len(window) else None
    if min(len(reference), len(window)) < min_n:
        return Test(name, "ks", None, None, ref_mean, win_mean, len(reference), len(window),
                    note=f"skipped: fewer than {min_n} values on a side")
    result = ks_2samp(reference, window)
    n, m = len(reference), len(window)
    p_min = float(ks_2samp(np.arange(n), np.arange(n, n + m)).pvalue)  # samples apart: the largest statistic, 1
    return Test(name, "ks", float(result.statistic), float(result.pvalue), ref_mean, win_mean, n, m,
                note="Kolmogorov-Smirnov; figures: means", p_min=p_min)


def rate_test(name: str, reference: np.ndarray, window: np.ndarray, min_n: int) -> Test:
    """Fisher's exact test of two shares (boolean arrays); the statistic is the window's share minus the reference's."""
    from scipy.stats import fisher_exact

    ref = float(reference.mean()) if len(reference) else None
    win = float(window.mean()) if len(window) else None
    if min(len(reference), len(window)) < min_n:
        return Test(name, "fisher", None, None, ref, win, len(reference), len(window),
                    note=f"skipped: fewer than {min_n} images on a side")
    a, c = int(reference.sum()), int(window.sum())
    result = fisher_exact([[a, len(reference) - a], [c, len(window) - c]])
    p_min = float(fisher_exact([[len(reference), 0], [0, len(window)]]).pvalue)  # all on one side, none on the other
    return Test(name, "fisher", win - ref, float(result.pvalue), ref, win, len(reference), len(window),
                note="Fisher's exact test; figures: shares", p_min=p_min)


def mmd_test(reference: np.ndarray, window: np.ndarray, *, min_n: int, permutations: int = 1000, seed: int = 0,
             max_samples: int = 500) -> Test:
    """Maximum mean discrepancy (biased estimate of MMD squared) of two samples of vectors under a Gaussian kernel whose
    bandwidth is the median pairwise distance, with a permutation p-value (``scipy.stats.permutation_test``).

    Each side is subsampled (seeded) to ``max_samples`` rows. The statistic of a split of the pooled sample is
    ``z' K z`` with ``z`` = 1/n on one side and -1/m on the other, over the pooled kernel matrix ``K``, computed once.
    ``p_min``: ``1 / (permutations + 1)``, or over every split when ``permutations`` reach their number (scipy then
    runs the exact test).
    """
    from scipy.stats import permutation_test
    from sklearn.metrics.pairwise import euclidean_distances, rbf_kernel

    n, m = len(reference), len(window)
    if min(n, m) < min_n:
        return Test("features_mmd", "mmd", None, None, None, None, n, m,
                    note=f"skipped: fewer than {min_n} feature vectors on a side")
    rng = np.random.default_rng(seed)
    if n > max_samples:
        reference, n = reference[rng.choice(n, max_samples, replace=False)], max_samples
    if m > max_samples:
        window, m = window[rng.choice(m, max_samples, replace=False)], max_samples
    pooled = np.vstack([reference, window]).astype(np.float64)
    squared = euclidean_distances(pooled, squared=True)[np.triu_indices(len(pooled), 1)]
    positive = squared[squared > 0]
    kernel = rbf_kernel(pooled, gamma=1.0 / float(np.median(positive)) if len(positive) else 1.0)

    def statistic(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        x, y = np.atleast_2d(x).astype(np.intp), np.atleast_2d(y).astype(np.intp)
        z = np.zeros((x.shape[0], n + m))
        np.put_along_axis(z, x, 1.0 / n, axis=1)
        np.put_along_axis(z, y, -1.0 / m, axis=1)
        return ((z @ kernel) * z).sum(axis=1)

    result = permutation_test((np.arange(n), np.arange(n, n + m)), statistic, permutation_type="independent",
                              vectorized=True, n_resamples=permutations, alternative="greater", rng=seed, batch=100)
    splits = math.comb(n + m, n)
    if permutations >= splits:  # scipy runs every split (exact): the observed one and, for n = m, its mirror count
        p_min, how = (2 if n == m else 1) / splits, f"exact over all {splits} splits"
    else:
        p_min, how = 1 / (permutations + 1), f"{permutations} permutations"
    return Test("features_mmd", "mmd", float(np.ravel(result.statistic)[0]), float(np.ravel(result.pvalue)[0]),
                None, None, n, m, note=f"MMD^2 (Gaussian kernel, median heuristic), {how}", p_min=p_min)


def permutations_for(alpha: float, n_tests: int, requested: int) -> int:
    """The permutations the MMD test needs for its smallest Monte Carlo p-value, ``1 / (permutations + 1)``, to pass
    Bonferroni's ``alpha / n_tests``: ``requested``, or more where that is too few."""
    needed = max(requested, math.floor(n_tests / alpha))
    while min(1.0, 1.0 / (needed + 1) * n_tests) >= alpha:
        needed += 1
    return needed


def _features(frame: pd.DataFrame) -> tuple[np.ndarray, int]:
    """The compact feature vectors of the frame's records that have one, and how many were left out for a non-finite
    entry (a feature that overflowed, logged as null): the kernel test cannot measure them."""
    vectors = [v for v in frame["features"] if isinstance(v, (list, tuple, np.ndarray)) and len(v)]
    if not vectors:
        return np.zeros((0, 0)), 0
    width = min(len(v) for v in vectors)
    array = np.asarray([[np.nan if x is None else x for x in list(v)[:width]] for v in vectors], dtype=np.float64)
    finite = np.isfinite(array).all(axis=1)
    return array[finite], int((~finite).sum())


def _per_side(reference: int, window: int) -> str:
    """``reference: 2, window: 5`` for a note, naming only the sides with a count ("" when neither)."""
    return ", ".join(f"{side}: {n}" for side, n in (("reference", reference), ("window", window)) if n)


def _ood_scores(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The OOD scores (NaN where none) and which records the detector scored: those with a finite score, and those
    served as out of distribution without one (a score that could not be compared, NaN, is logged as null)."""
    scores = pd.to_numeric(frame["ood_score"], errors="coerce").to_numpy(dtype=np.float64)
    return scores, np.isfinite(scores) | (frame["reason"] == "out_of_distribution").to_numpy(dtype=bool)


def _unscored_out(frame: pd.DataFrame) -> int:
    """How many records were served as out of distribution without a finite OOD score."""
    scores, scored = _ood_scores(frame)
    return int((scored & ~np.isfinite(scores)).sum())


def _ood_out(frame: pd.DataFrame, ood_threshold: float) -> pd.Series:
    """Whether each record is out of distribution at ``ood_threshold``, by serving's rule (:func:`covidcxr.ood.is_out`:
    a score that cannot be compared is out), aligned with the frame; NA where the detector scored none (the log cannot
    tell). The one rule of the OOD share and of the films beyond the model, so the two cannot disagree."""
    scores, scored = _ood_scores(frame)
    return pd.Series(ood.is_out(scores, ood_threshold), index=frame.index, dtype="boolean").where(scored)


def server_failures(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The frame's records but those of images the server failed on (a retry reason), and how many those were: the
    server's state, not the image's, and the image is usually sent again and logged as a real record."""
    from covidcxr.serving import RETRY_REASONS  # here: serving imports MLflow, which the tests need not

    failed = frame["reason"].isin(RETRY_REASONS).to_numpy(dtype=bool)
    return frame.loc[~failed], int(failed.sum())


def reason_shares(frame: pd.DataFrame) -> dict[str, float]:
    """Share of each refusal reason (and ``accepted``) among the frame's records."""
    if not len(frame):
        return {}
    labels = frame["reason"].where(~_accepted(frame) | frame["reason"].notna(), "accepted").fillna("unknown")
    return {str(k): float(v) for k, v in labels.value_counts(normalize=True).sort_index().items()}


def compare(reference: pd.DataFrame, window: pd.DataFrame, *, ood_threshold: float | None,
            ood_action: str | None = None, alpha: float = 0.05, permutations: int = 1000, min_records: int = 20,
            min_per_test: int = 5, seed: int = 0) -> Drift:
    """Every test of the module docstring between the reference records and the window's, with the verdict.
    ``ood_threshold`` and ``ood_action`` are the model's (the reference's meta; ``ood_action`` None: not recorded)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if ood_action not in (None, "refuse", "flag"):
        raise ValueError(f"the reference's ood_action must be 'refuse' or 'flag', got {ood_action!r}")
    if permutations < 1:
        raise ValueError(f"permutations must be at least 1, got {permutations}")
    (reference, ref_failed), (window, win_failed) = server_failures(reference), server_failures(window)
    reference, window = reference.reset_index(drop=True), window.reset_index(drop=True)
    accepted = {"reference": _accepted(reference), "window": _accepted(window)}
    beyond, notes = _beyond_the_model(reference, window, accepted, ood_threshold, ood_action)
    tests = [ks_test(name, _values(reference, name),
                     _values(window.loc[~beyond] if name == "covid_probability" else window, name), min_per_test)
             for name in SCALARS]
    thresholds = _values(reference, "threshold")
    model_threshold = float(np.median(thresholds)) if len(thresholds) else None

    def positive(frame: pd.DataFrame, answered: pd.Series) -> np.ndarray:
        frame = frame.loc[answered]
        if model_threshold is None:  # a reference without thresholds: the labels as served
            return (frame.loc[frame["label"].notna(), "label"] == "covid").to_numpy()
        return _values(frame, "covid_probability") >= model_threshold

    def refused(frame: pd.DataFrame, side: str) -> np.ndarray:
        out = ~accepted[side].to_numpy(dtype=bool)
        if ood_threshold is not None:  # the OOD share below tests those at the model's OOD threshold
            out &= (frame["reason"] != "out_of_distribution").to_numpy(dtype=bool)
        return out

    tests.append(rate_test("positive_rate", positive(reference, accepted["reference"]),
                           positive(window, accepted["window"] & ~beyond), min_per_test))
    tests.append(rate_test("refusal_rate", refused(reference, "reference"), refused(window, "window"), min_per_test))
    if ood_threshold is not None:
        ref_out, win_out = (_ood_out(f, ood_threshold).dropna().to_numpy(dtype=bool) for f in (reference, window))
        tests.append(rate_test("ood_rate", ref_out, win_out, min_per_test))
    for t in tests:
        if t.name in ("covid_probability", "positive_rate") and notes:
            t.note += "; " + notes
    unscored = _per_side(_unscored_out(reference), _unscored_out(window))
    if unscored:
        tests[SCALARS.index("ood_score")].note += (f"; served out of distribution without a finite score, counted in "
                                                   f"ood_rate only ({unscored})")
    # The MMD test last, as it needs the number of tests for its permutations; listed after the scalars
    (ref_vectors, ref_left_out), (win_vectors, win_left_out) = _features(reference), _features(window)
    vectors = {"reference": ref_vectors, "window": win_vectors}
    n_tests = sum(t.p_value is not None for t in tests) + (min(map(len, vectors.values())) >= min_per_test)
    used = permutations_for(alpha, n_tests, permutations)
    mmd = mmd_test(vectors["reference"], vectors["window"], min_n=min_per_test, permutations=used, seed=seed)
    if used > permutations:
        mmd.note += f" (raised from {permutations}: fewer could not pass alpha / {n_tests} tests)"
    left_out = _per_side(ref_left_out, win_left_out)
    if left_out:
        mmd.note += f"; feature vectors with a non-finite entry left out ({left_out})"
    tests.insert(len(SCALARS), mmd)
    ran = [t for t in tests if t.p_value is not None]
    for t in ran:
        t.p_adjusted = min(1.0, t.p_value * len(ran))
        t.drift = t.p_adjusted < alpha
        t.inconclusive = t.p_min is not None and min(1.0, t.p_min * len(ran)) >= alpha
        if t.inconclusive:
            t.note += (f"; inconclusive: too few records, its smallest possible p-value ({t.p_min:.3g}) cannot pass "
                       f"alpha / {len(ran)} tests ({alpha / len(ran):.3g})")
    if len(window) < min_records or not ran:  # too few records, or every test skipped: nothing was measured
        status = "insufficient_data"
    elif any(t.drift for t in ran):
        status = "drift"
    else:
        status = "insufficient_data" if any(t.inconclusive for t in ran) else "no_drift"
    return Drift(status=status, alpha=alpha, n_reference=len(reference), n_window=len(window), tests=tests,
                 reasons={"reference": reason_shares(reference), "window": reason_shares(window)},
                 server_failures={"reference": ref_failed, "window": win_failed})


def _beyond_the_model(reference: pd.DataFrame, window: pd.DataFrame, accepted: Mapping[str, pd.Series],
                      ood_threshold: float | None, ood_action: str | None) -> tuple[pd.Series, str]:
    """The window's records the model's own thresholds would not have answered (left out of its side of the positive
    rate and the probability test), and a note saying what was left out or cannot be told ("" when nothing).

    Those answered past the model's OOD threshold (a site's own admitted them; a model that refuses such films,
    ``ood_action: refuse``, would not have answered them; one that flags them answers them, in its reference too). An
    answered record without an OOD score is kept and counted in the note: the log cannot tell whether the model would
    have answered it. Films refused at a stricter OOD threshold than the model's (a request's or a site's) are
    counted in the note: the model would have answered them, but the log holds no probability of theirs.
    ``ood_action`` None (a reference saved before register recorded it): guessed from whether the reference answers
    any film past the threshold, and the note says so where it matters.
    """
    none = pd.Series(False, index=window.index)
    if ood_threshold is None:
        return none, ""
    out = _ood_out(window, ood_threshold)
    beyond = accepted["window"] & out.fillna(False)
    notes = []
    if ood_action is None:
        flags = bool((accepted["reference"] & _ood_out(reference, ood_threshold).fillna(False)).any())
        ood_action = "flag" if flags else "refuse"
        if beyond.any():
            notes.append(f"the reference does not say whether the model refuses or flags films past its OOD threshold "
                         f"(saved before register recorded ood_action): taken as {ood_action}, as its records "
                         f"{'answer' if flags else 'answer no'} such films")
    if ood_action == "flag":
        beyond = none
    elif beyond.any():
        notes.append(f"window: {int(beyond.sum())} film(s) admitted past the model's OOD threshold (a site's own) "
                     "left out")
    unknown = int((accepted["window"] & out.isna()).sum())
    if unknown:
        notes.append(f"window: {unknown} answered film(s) without an OOD score kept (the log cannot tell whether the "
                     "model's threshold would have answered them)")
    stricter = int((~accepted["window"] & (window["reason"] == "out_of_distribution") & ~out.fillna(False)).sum())
    if stricter:
        notes.append(f"window: {stricter} film(s) refused at a stricter OOD threshold than the model's (a request's "
                     "or a site's) left out: the model would have answered them, but the log holds no probability")
    return beyond, "; ".join(notes)


# --- time windows -----------------------------------------------------------------------------------------------------


def parse_time(text: str | None, now: dt.datetime | None = None) -> dt.datetime | None:
    """``Nd``, ``Nh`` or ``Nm`` (days, hours, minutes before now) or an ISO date or date-time (UTC unless it says
    otherwise) as a UTC time without time zone, as the log stores it; None stays None."""
    if text is None or not str(text).strip():
        return None
    text = str(text).strip()
    now = now or predlog.now()
    match = re.fullmatch(r"(\d+)([dhm])", text)
    if match:
        unit = {"d": "days", "h": "hours", "m": "minutes"}[match.group(2)]
        return now - dt.timedelta(**{unit: int(match.group(1))})
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"expected Nd, Nh, Nm or an ISO date/time (2026-01-31, 2026-01-31T08:00:00Z), "
                         f"got {text!r}") from None
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return value


# --- the HTML report --------------------------------------------------------------------------------------------------


def svg_histogram(title: str, reference: np.ndarray, window: np.ndarray, *, bins: int = 20, width: int = 320,
                  height: int = 210) -> str:
    """Step histograms (share of images per bin) of two samples on common bins, as an inline SVG string."""
    from covidcxr.modelcard import PALETTE, _e

    left, right, top, bottom = 44, 10, 24, 34
    pw, ph = width - left - right, height - top - bottom
    both = np.concatenate([reference, window])
    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{_e(title)}"><text x="{width / 2:.0f}" y="15" text-anchor="middle" class="pt">{_e(title)}'
             f'</text><rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>']
    if not len(both):
        parts.append(f'<text x="{width / 2:.0f}" y="{top + ph / 2:.0f}" text-anchor="middle" class="tk">no values'
                     "</text></svg>")
        return "".join(parts)
    lo, hi = float(both.min()), float(both.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    shares = [np.histogram(s, edges)[0] / max(len(s), 1) for s in (reference, window)]
    top_share = max(float(max(s.max() for s in shares)), 1e-9)
    for k, (name, share, n) in enumerate(zip(("reference", "window"), shares, (len(reference), len(window)))):
        points = []
        for b, value in enumerate(share):
            y = top + ph * (1 - value / top_share)
            points += [(left + pw * b / bins, y), (left + pw * (b + 1) / bins, y)]
        colour = PALETTE[k]
        if n:
            coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{left + 6}" y="{top + 13 + 13 * k}" class="lg" fill="{colour}">{name} (n={n})</text>')
    parts.append(f'<text x="{left}" y="{top + ph + 14}" class="tk">{lo:.3g}</text>'
                 f'<text x="{left + pw}" y="{top + ph + 14}" text-anchor="end" class="tk">{hi:.3g}</text>'
                 f'<text x="{left - 4}" y="{top + 8}" text-anchor="end" class="tk">{top_share:.2f}</text>'
                 f'<text x="{left + pw / 2:.0f}" y="{height - 4}" text-anchor="middle" class="ax">share of images per '
                 "bin</text></svg>")
    return "".join(parts)


def svg_scatter(title: str, reference: np.ndarray, window: np.ndarray, *, width: int = 320, height: int = 260,
                max_points: int = 400) -> str:
    """The first two compact feature dimensions of both samples as points (inline SVG)."""
    from covidcxr.modelcard import PALETTE, _e

    left, right, top, bottom = 14, 10, 24, 20
    pw, ph = width - left - right, height - top - bottom
    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{_e(title)}"><text x="{width / 2:.0f}" y="15" text-anchor="middle" class="pt">{_e(title)}'
             f'</text><rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>']
    samples = [s[:max_points, :2] for s in (reference, window) if s.ndim == 2 and s.shape[1] >= 2]
    if len(samples) == 2 and all(len(s) for s in samples):
        both = np.vstack(samples)
        lo, hi = both.min(axis=0), both.max(axis=0)
        span = np.where(hi > lo, hi - lo, 1.0)
        for k, sample in enumerate(samples):
            xy = (sample - lo) / span
            parts.extend(f'<circle cx="{left + 4 + (pw - 8) * x:.1f}" cy="{top + 4 + (ph - 8) * (1 - y):.1f}" r="2.2" '
                         f'fill="{PALETTE[k]}" fill-opacity="0.55"/>' for x, y in xy)
            parts.append(f'<text x="{left + 6}" y="{top + 13 + 13 * k}" class="lg" fill="{PALETTE[k]}">'
                         f'{("reference", "window")[k]}</text>')
    parts.append(f'<text x="{left + pw / 2:.0f}" y="{height - 5}" text-anchor="middle" class="ax">compact features: '
                 "dimension 1 (x) and 2 (y)</text></svg>")
    return "".join(parts)


HOW_TO_READ = (
    "Each test asks whether the window's images could come from the same distribution as the validation images the "
    "model was registered with. A corrected p-value below alpha marks drift. The OOD score is the Mahalanobis "
    "distance of the classifier's features to its training images: an OOD rate well above the reference's (about 1 - "
    "quantile) means images unlike any it learned from, whose answers should not be trusted. A shift in the intensity "
    "statistics or the lung area points at acquisition (a new scanner, exposure, cropping); a shift in the positive "
    "rate alone may be a real change in prevalence. Drift is a reason to look, not a verdict on the model: read the "
    "histograms, then check a sample of the window's images with a radiologist before retraining or withdrawing it.")


def served_thresholds(frame: pd.DataFrame) -> str:
    """The operating and OOD thresholds the records were served at and whose they were, with their counts (a site's
    own show here; the tests hold both sides to the model's): ``0.5 / OOD 7 (model): 60``; ``-`` where none was in
    force or logged (a log of an earlier version has no ``thresholds_from``)."""
    def shown(value: object) -> str:
        number = pd.to_numeric(value, errors="coerce")
        return "-" if pd.isna(number) else f"{float(number):.6g}"

    counts = pd.Series([f"{shown(t)} / OOD {shown(o)}" + ("" if pd.isna(w) else f" ({w})")
                        for t, o, w in zip(frame["threshold"], frame["ood_threshold"], frame["thresholds_from"])],
                       dtype=object).value_counts()
    return "; ".join(f"{pair}: {n}" for pair, n in counts.items()) or "-"


def render(drift: Drift, *, model_name: str, model_version: str, since: object, until: object, log_url: str,
           reference_meta: Mapping, reference: pd.DataFrame, window: pd.DataFrame) -> str:
    """The report as one self-contained HTML document."""
    from covidcxr.modelcard import CSS, _badge, _e, _table

    verdict = {"drift": "fail", "no_drift": "pass", "insufficient_data": "warn"}[drift.status]
    (reference, _), (window, _) = server_failures(reference), server_failures(window)  # as compared
    title = f"Drift report: {model_name} v{model_version}"
    rows = [(t.name, t.kind, t.reference, t.window, t.statistic, t.p_value, t.p_adjusted, t.p_min,
             "drift" if t.drift else "-" if t.p_value is None else "inconclusive" if t.inconclusive else "no drift",
             t.note) for t in drift.tests]
    reasons = sorted(set(drift.reasons["reference"]) | set(drift.reasons["window"]))
    unmeasured = [t.name for t in drift.tests if t.inconclusive]
    plots = [svg_histogram(name, _values(reference, name), _values(window, name)) for name in SCALARS]
    plots.append(svg_scatter("compact features", _features(reference)[0], _features(window)[0]))
    body = [
        f"<h1>{_e(title)}</h1>",
        f"<p>{_badge(verdict)} <b>{_e(drift.status.replace('_', ' '))}</b> at alpha {drift.alpha:g} "
        f"(Bonferroni over {sum(t.p_value is not None for t in drift.tests)} tests)"
        + (f"; too few records for {_e(', '.join(unmeasured))} to show drift at all (inconclusive)"
           if unmeasured else "") + "</p>",
        _table(("", ""), [("window", f"{since or 'the beginning'} to {until or 'now'} (UTC)"),
                          ("records in the window", drift.n_window),
                          ("left out: records of the server's failures, not the images' (sent again)",
                           _per_side(**drift.server_failures) or "none"),
                          ("reference", f"{drift.n_reference} records: the {reference_meta.get('split', 'val')} split "
                                        f"scored by v{reference_meta.get('model_version', '?')} at registration"),
                          ("OOD threshold", reference_meta.get("ood_threshold")),
                          ("thresholds served in the window", served_thresholds(window)),
                          ("prediction log", dburl.shown_url(log_url))], numeric=(False, False)),
        "<h2>How to read it</h2>", f"<p>{_e(HOW_TO_READ)}</p>",
        "<h2>Tests</h2>",
        _table(("test", "kind", "reference", "window", "statistic", "p-value", "corrected p", "smallest possible p",
                "verdict", "note"), rows, numeric=(False, False, True, True, True, True, True, True, False, False)),
        "<h2>Refusals</h2>",
        _table(("reason", "reference share", "window share"),
               [(r, drift.reasons["reference"].get(r, 0.0), drift.reasons["window"].get(r, 0.0)) for r in reasons],
               numeric=(False, True, True)),
        "<h2>Distributions</h2>", f'<div class="plots">{"".join(plots)}</div>',
        "<footer>Generated by covidcxr monitor from aggregate figures of the prediction log (no image, header field or "
        "file name is logged); self-contained (no network resources).</footer>",
    ]
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# --- MLflow -----------------------------------------------------------------------------------------------------------


def log_to_mlflow(drift: Drift, files: Sequence[str | os.PathLike], *, model_name: str, model_version: str,
                  params: Mapping[str, object], experiment: str = EXPERIMENT) -> str:
    """A run in ``experiment`` with the figures (also linked to the model version's logged model), the report files,
    and the version's tags ``monitor.status``, ``monitor.run_id``, ``monitor.time``; returns the run id."""
    import mlflow

    from covidcxr import tracking

    client = mlflow.MlflowClient()
    mv = client.get_model_version(model_name, str(model_version))
    tags = {"model_name": model_name, "model_version": str(model_version), "monitor.status": drift.status}
    with tracking.run(experiment, f"monitor-{model_name}-v{model_version}", params=params, tags=tags) as run:
        metrics = drift.metrics()
        mlflow.log_metrics(metrics)
        if getattr(mv, "model_id", None):  # MLflow 3: the figures also show on the registered model's page
            mlflow.log_metrics(metrics, model_id=mv.model_id)
        for path in files:
            mlflow.log_artifact(str(path), "monitoring")
    for key, value in (("monitor.status", drift.status), ("monitor.run_id", run.info.run_id),
                       ("monitor.time", predlog.now().isoformat(timespec="seconds") + "Z")):
        client.set_model_version_tag(model_name, str(model_version), key, value)
    return run.info.run_id
