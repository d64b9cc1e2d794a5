"""The shortcut audit: does a classifier read the lungs, or where the image came from?

Three checks, each graded pass / warn / fail against thresholds the caller passes, ``inconclusive`` when it could not
measure (counted as a warning, never as a pass), or ``skipped`` with the reason (a check that does not apply: a variant
not trained, heat maps of variant e):

- ``lungs_removed_auc`` (per backbone): how much of the full-image model's (variant c) ROC AUC above chance the
  lungs-removed model (variant e) keeps. A variant e that scores near c means the label is readable outside the lungs.
- ``heatmap_lung_mass`` (per variant and class): the Grad-CAM mass inside the lungs divided by the lungs' share of the
  image area. 1.0 is what a uniform heat map scores; below it, the heat sits outside the lungs. Too few maps with any
  heat, or no image of the class to explain, is ``inconclusive``.
- ``source_classifier`` (all models): the same backbone trained to tell the image's source (site or dataset); the
  value is the ROC AUC of the label predicted from the source *read from the image* (the COVID share in training of the
  source it predicts). It is high only when the source is both readable and predictive of the label. Sites with too
  few training images are grouped into their dataset source (``group_sources``); when the classifier does not read the
  sources clearly above chance (the lower bound of a bootstrap interval of its balanced accuracy at least a tenth of
  the way from chance to 1, :data:`READABLE_MARGIN`), the check is ``inconclusive``: a low label AUC then says nothing
  about the model.

The lungs-removed and source checks grade a figure of a few dozen validation patients, whose uncertainty can span both
thresholds. Each carries a 95% patient-level bootstrap interval (``low``, ``high``; the lungs-removed one resamples the
patients once for c and e, which score the same images): a point at or above ``warn`` grades ``warn`` or ``fail`` as
usual, but a point below ``warn`` passes only when the interval's upper bound is below ``warn`` too; otherwise the check
is ``inconclusive``: it could not show the figure is low.

The checks are graded on the validation split (the audit gates which classifier is registered and whether it becomes
champion, and nothing may be chosen on a test split); the heat maps each explain the call the model made. The source
classifier picks its epoch on the same validation images it is then read on, an optimistic reading of the source:
the gate errs strict. The test split's figures are reported beside them, never graded.

Pure functions on numbers and arrays: nothing here reads files or params (``pipelines/audit.py`` does).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

PASS, WARN, FAIL, SKIPPED, INCONCLUSIVE = "pass", "warn", "fail", "skipped", "inconclusive"
STATUSES: tuple[str, ...] = (PASS, WARN, FAIL, SKIPPED, INCONCLUSIVE)
_RANK = {PASS: 0, INCONCLUSIVE: 1, WARN: 2, FAIL: 3}  # inconclusive counts as a warning: it never passes

LUNGS_REMOVED, HEATMAP, SOURCE = "lungs_removed_auc", "heatmap_lung_mass", "source_classifier"
CHECKS: tuple[str, ...] = (LUNGS_REMOVED, HEATMAP, SOURCE)
ALL = "all"


@dataclass(frozen=True)
class Check:
    """One graded check: the measured value, its thresholds, the status and a one-line reason; ``low`` and ``high``:
    the value's 95% bootstrap interval where the check grades on one (None otherwise, or where a bound is undefined or
    unbounded)."""

    name: str
    subject: str
    value: float | None
    warn: float | None
    fail: float | None
    status: str
    reason: str
    low: float | None = None
    high: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def grade(value: float, warn: float, fail: float, *, higher_is_worse: bool = True) -> str:
    """``fail`` / ``warn`` / ``pass`` for a value against its thresholds (reached counts: ``value >= fail`` fails).

    With ``higher_is_worse=False`` the scale is reversed (a value at or below ``fail`` fails). A NaN value is a
    ValueError: it fails no comparison, so it would pass; a check that could not measure is ``inconclusive``.
    """
    if math.isnan(value):
        raise ValueError(f"cannot grade an undefined value (NaN) against warn={warn}, fail={fail}: a check that could "
                         "not measure is inconclusive, never graded")
    if higher_is_worse and warn > fail or not higher_is_worse and warn < fail:
        raise ValueError(f"thresholds out of order: warn={warn}, fail={fail} "
                         f"({'higher' if higher_is_worse else 'lower'} is worse)")
    sign = 1.0 if higher_is_worse else -1.0
    if sign * value >= sign * fail:
        return FAIL
    if sign * value >= sign * warn:
        return WARN
    return PASS


def grade_upper(value: float, high: float | None, warn: float, fail: float) -> str:
    """:func:`grade` of a value (higher is worse) that passes only when its interval's upper bound ``high`` is below
    ``warn`` too: a point below ``warn`` whose interval reaches it (or has no finite upper bound) is ``inconclusive``,
    as the figure could not be shown to be low. ``warn`` and ``fail`` are graded on the point."""
    status = grade(value, warn, fail)
    if status == PASS and not (_finite(high) and high < warn):
        return INCONCLUSIVE
    return status


def _bounds(low: float | None, high: float | None) -> tuple[float | None, float | None]:
    """The interval's bounds for a :class:`Check`: None where undefined or unbounded."""
    return (low if _finite(low) else None), (high if _finite(high) else None)


def _pct(x: float | None) -> str:
    """An interval bound as a percentage for a reason: ``?`` where undefined, ``unbounded`` where infinite."""
    return f"{x:.0%}" if _finite(x) else "?" if x is None or math.isnan(x) else "unbounded"


def worst(statuses: Iterable[str]) -> str:
    """The worst of graded statuses (skipped ones ignored); ``warn`` when nothing could be graded at all."""
    graded = [s for s in statuses if s != SKIPPED]
    for s in graded:
        if s not in _RANK:
            raise ValueError(f"unknown status {s!r}: expected one of {STATUSES}")
    return max(graded, key=_RANK.__getitem__) if graded else WARN


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _skip(name: str, subject: str, reason: str, warn: float | None, fail: float | None,
          value: float | None = None) -> Check:
    return Check(name, subject, value if _finite(value) else None, warn, fail, SKIPPED, reason)


# --- check 1: variant e (lungs removed) against variant c (full image) ------------------------------------------------

def kept_share(auc_c: float | np.ndarray, auc_e: float | np.ndarray) -> float | np.ndarray:
    """Share of c's ROC AUC above chance that e keeps, ``(AUC_e - 0.5) / (AUC_c - 0.5)``, floored at 0 (c above
    chance): of two AUCs, or elementwise of two arrays of them (a bootstrap's resamples)."""
    return np.maximum(0.0, (np.asarray(auc_e) - 0.5) / (np.asarray(auc_c) - 0.5))


@dataclass(frozen=True)
class KeptShare:
    """Variants c and e scored on the same images: both ROC AUCs and the 95% paired patient-bootstrap interval of
    :func:`kept_share`. ``n_unbounded``: resamples on which c's AUC fell to or below chance (no share to take: counted
    as unbounded, above every other); ``n_skipped``: resamples holding one class (no AUC), left out."""

    auc_c: float
    auc_e: float
    low: float
    high: float
    n_boot: int
    n_unbounded: int = 0
    n_skipped: int = 0


def paired_kept_share(y: np.ndarray, score_c: np.ndarray, score_e: np.ndarray, patients: Sequence, *,
                      n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> KeptShare:
    """Both AUCs and the interval of the share e keeps, resampling the patients once for both models (their images
    are the same: the resample that draws a hard patient twice draws it for c and e alike, so the share's interval
    is not widened by two independent draws). Percentiles are taken outward (the order statistics at or beyond
    ``alpha / 2`` and ``1 - alpha / 2``), never interpolated towards an unbounded resample."""
    from covidcxr import metrics

    y = np.asarray(y).astype(int)
    score_c, score_e = np.asarray(score_c, dtype=np.float64), np.asarray(score_e, dtype=np.float64)
    if not (len(y) == len(score_c) == len(score_e) == len(patients)):
        raise ValueError(f"{len(y)} labels, {len(score_c)} c scores, {len(score_e)} e scores and {len(patients)} "
                         "patient ids: c and e must score the same images")
    auc_c, auc_e = _auc(y, score_c), _auc(y, score_e)
    if not len(y):
        return KeptShare(auc_c, auc_e, float("nan"), float("nan"), n_boot)
    weights = metrics.patient_resample_weights(np.asarray(patients, dtype=object), n_boot=n_boot, seed=seed)
    boot_c = metrics.resampled_ranking_metrics(y, score_c, weights)["roc_auc"]
    boot_e = metrics.resampled_ranking_metrics(y, score_e, weights)["roc_auc"]
    defined = np.isfinite(boot_c) & np.isfinite(boot_e)
    above = defined & (boot_c > 0.5)
    kept = np.full(n_boot, np.inf)
    kept[above] = kept_share(boot_c[above], boot_e[above])
    low, high = metrics.percentile_interval(kept[defined], alpha=alpha, outward=True)
    return KeptShare(auc_c, auc_e, low, high, n_boot, n_unbounded=int((defined & ~above).sum()),
                     n_skipped=int((~defined).sum()))


def lungs_removed_check(backbone: str, auc_c: float | None, auc_e: float | None, *, warn: float, fail: float,
                        min_c_auc: float = 0.6, split: str = "validation",
                        interval: tuple[float, float] | None = None, unbounded: int = 0,
                        undefined: int = 0) -> Check:
    """Share of c's ROC AUC above chance that e keeps, ``(AUC_e - 0.5) / (AUC_c - 0.5)``, floored at 0
    (:func:`kept_share`), graded with :func:`grade_upper` on its ``interval`` (``(low, high)``, e.g. from
    :func:`paired_kept_share`): it passes only when the upper bound is below ``warn``. Without an interval a share
    below ``warn`` is ``inconclusive`` (nothing shows it is low), never a pass. ``unbounded`` and ``undefined``: the
    resamples :class:`KeptShare` counted unbounded or left out, named in the reason when there are any.

    ``None`` for a variant means it was not trained (skipped). An AUC that is undefined (one class in ``split``), or a c
    that scores below ``min_c_auc`` or at or below chance (0.5, whatever ``min_c_auc`` says: no AUC above chance to
    take a share of, and the ratio's sign would turn), could not be measured: ``inconclusive``, with both AUCs in the
    reason (an e far above a near-chance c is itself a shortcut's sign, never a pass).
    """
    subject = f"c_{backbone}"
    if auc_c is None or auc_e is None:
        missing = " and ".join(f"{v}_{backbone}" for v, a in (("c", auc_c), ("e", auc_e)) if a is None)
        return _skip(LUNGS_REMOVED, subject, f"{missing} not trained: nothing to compare", warn, fail)
    if not (_finite(auc_c) and _finite(auc_e)):
        return Check(LUNGS_REMOVED, subject, None, warn, fail, INCONCLUSIVE,
                     f"{split} ROC AUC undefined (c {auc_c}, e {auc_e}): one class in {split}")
    if auc_c <= 0.5:
        return Check(LUNGS_REMOVED, subject, None, warn, fail, INCONCLUSIVE,
                     f"c_{backbone} {split} AUC {auc_c:.3f} is at or below chance (0.5): no AUC above chance to "
                     f"compare e_{backbone} ({auc_e:.3f}) against")
    if auc_c < min_c_auc:
        return Check(LUNGS_REMOVED, subject, None, warn, fail, INCONCLUSIVE,
                     f"c_{backbone} {split} AUC {auc_c:.3f} is below {min_c_auc}: too close to chance to compare "
                     f"e_{backbone} ({auc_e:.3f}) against")
    kept = float(kept_share(auc_c, auc_e))
    low, high = interval if interval is not None else (None, None)
    status = grade_upper(kept, high, warn, fail)
    meaning = {PASS: "the label is hardly readable without the lungs",
               WARN: "much of the signal lies outside the lungs",
               FAIL: "the label is readable outside the lungs: a shortcut",
               INCONCLUSIVE: (f"below {warn:.0%}, but the interval reaches it: could not show that the label is hardly "
                              "readable without the lungs" if interval is not None else
                              f"below {warn:.0%}, but with no interval nothing shows it is low")}[status]
    uncounted = "".join(f"; {n} resample{'s' * (n != 1)} {why}" for n, why in (
        (unbounded, "where c fell to chance, counted unbounded"), (undefined, "of one class, left out")) if n)
    spread = (f" [{_pct(low)}, {_pct(high)}] (95% interval, {split} patients resampled alike for c and e{uncounted})"
              if interval is not None else "")
    return Check(LUNGS_REMOVED, subject, kept, warn, fail, status,
                 f"e_{backbone} {split} AUC {auc_e:.3f} vs c_{backbone} {auc_c:.3f}: keeps {kept:.0%}{spread} of "
                 f"c's AUC above chance; {meaning}", *_bounds(low, high))


# --- check 2: Grad-CAM mass inside the lungs, relative to the lungs' area ---------------------------------------------

def heatmap_check(subject: str, mass_share: float | None, area_share: float | None, *, warn: float,
                  fail: float) -> Check:
    """Heat-map mass share inside the lungs divided by the lungs' area share (1.0 = a uniform map); lower is worse."""
    if not (_finite(mass_share) and _finite(area_share)) or area_share <= 0:
        return Check(HEATMAP, subject, None, warn, fail, INCONCLUSIVE,
                     f"no heat-map mass ({mass_share}) or lung area ({area_share}) to compare")
    ratio = mass_share / area_share
    status = grade(ratio, warn, fail, higher_is_worse=False)
    meaning = {PASS: "the heat map concentrates on the lungs",
               WARN: "the heat map is barely more on the lungs than a uniform one",
               FAIL: "the heat map sits outside the lungs"}[status]
    return Check(HEATMAP, subject, ratio, warn, fail, status,
                 f"{mass_share:.0%} of the heat in lungs covering {area_share:.0%} of the image "
                 f"({ratio:.2f}x uniform); {meaning}")


def heatmap_checks(name: str, explain: Mapping[str, float], *, warn: float, fail: float, min_maps: int = 1,
                   classes: Sequence[str] = ("covid", "negative"), split: str = "validation") -> list[Check]:
    """One heat-map check per class of a classifier ``<variant>_<backbone>`` from its explain figures over one split
    (``lung_mass_share_<class>``, ``lung_area_share_<class>``, ``n_maps_<class>``, ``n_empty_<class>``). Fewer than
    ``min_maps`` maps with any heat (an empty map argues for nothing and has no share) is ``inconclusive``: the mean
    of a handful says nothing of the class; so is a class with no image to explain in ``split`` (the check applies,
    but could not measure). Variant e is skipped: its lungs are blanked out, so its heat is outside them by
    design."""
    checks = []
    for label in classes:
        subject = f"{name}/{label}"
        if name.startswith("e_"):
            checks.append(_skip(HEATMAP, subject, "variant e has its lungs removed: heat outside them is by design",
                                warn, fail))
            continue
        n_maps = int(explain.get(f"n_maps_{label}") or 0)
        n_heat = n_maps - int(explain.get(f"n_empty_{label}") or 0)
        if not n_maps:
            checks.append(Check(HEATMAP, subject, None, warn, fail, INCONCLUSIVE,
                                f"no {label} {split} images to explain: could not measure where the model reads "
                                f"{label}"))
            continue
        if n_heat < min_maps:
            checks.append(Check(HEATMAP, subject, None, warn, fail, INCONCLUSIVE,
                                f"{n_heat} of {n_maps} {label} {split} heat maps hold any heat, fewer than {min_maps}: "
                                f"too few to say where the model reads"))
            continue
        check = heatmap_check(subject, explain.get(f"lung_mass_share_{label}"),
                              explain.get(f"lung_area_share_{label}"), warn=warn, fail=fail)
        checks.append(dataclasses.replace(check, reason=f"{check.reason} ({n_heat} of {n_maps} {label} {split} maps "
                                                        f"hold heat)"))
    return checks


# --- check 3: the source classifier --------------------------------------------------------------------------------

#: "Clearly above chance": the lower bound of the balanced accuracy must lie this share of the way from chance to a
#: perfect reading. A source classifier whose training collapsed onto one source (it names that source for nearly every
#: image) reads that source's own images right and lands just above chance: on the real corpus one read 8 sources with
#: 0.15 [0.13, 0.18] against a chance of 0.125, calling 148 of Kermany's 154 test films Hannover's, where its runs
#: before read Kermany's 145 of 154 right. Such a classifier reads no source, and a low label AUC from it shows nothing.
READABLE_MARGIN = 0.1


@dataclass(frozen=True)
class SourceReading:
    """How well the source is read from the images of one split (``split``), and how much that tells about the
    label."""

    classes: tuple[str, ...]
    n_read: int  # images of a source seen in training (others cannot be read and are left out)
    accuracy: float
    balanced_accuracy: float
    chance: float  # balanced accuracy of guessing: 1 / number of sources
    label_auc_true_source: float  # label ROC AUC from the true source's training COVID share
    label_auc_read_source: float  # ... from the source read from the image (the classifier's most probable source)
    balanced_accuracy_low: float = float("nan")  # 95% bootstrap interval of the balanced accuracy (patients resampled)
    balanced_accuracy_high: float = float("nan")
    split: str = "validation"
    label_auc_read_source_low: float = float("nan")  # ... of label_auc_read_source, on the same resamples
    label_auc_read_source_high: float = float("nan")

    @property
    def readable_above(self) -> float:
        """The balanced accuracy the interval's lower bound must exceed: :data:`READABLE_MARGIN` of the way from chance
        to 1."""
        return self.chance + READABLE_MARGIN * (1.0 - self.chance)

    @property
    def readable(self) -> bool:
        """Whether the sources are read clearly above chance (the interval's lower bound above
        :attr:`readable_above`)."""
        return _finite(self.balanced_accuracy_low) and self.balanced_accuracy_low > self.readable_above


def source_class_weight(codes: np.ndarray, n_classes: int) -> dict[int, float]:
    """Inverse-frequency weights, so that every source weighs the same in the loss."""
    counts = np.bincount(np.asarray(codes, dtype=int), minlength=n_classes).astype(float)
    return {k: float(len(codes) / (n_classes * counts[k])) for k in range(n_classes) if counts[k] > 0}


def train_source_classifier(
    x_train: np.ndarray, source_train: Sequence[str], x_val: np.ndarray, source_val: Sequence[str], *,
    depth: int, width: float, head: Sequence[int], epochs: int, batch_size: int, lr: float, seed: int,
    weights: str | None = None, fold: str = "luminance",
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
):
    """The classifier's backbone (``build_vgg``) trained with ``training.fit`` to predict the source of each image.

    Images are the model's inputs ``(N, H, W)`` (already standardized). Returns ``(model, classes, epoch)``: a softmax
    over the sources of the training split, in sorted order, with the weights of the epoch (1-based) of the highest
    balanced accuracy on the validation images, restored after training; validation images of unseen sources are left
    out. The probe's reading then rests on its best epoch, not on wherever a fixed count of epochs left it (on the real
    corpus one probe collapsed onto one site in its last epochs). Balanced accuracy, the measure its reading is graded
    by, and not the validation loss: the loss is unweighted while training weighs the sources equally, so a probe that
    calls everything the largest source can have the lowest loss. ``epoch`` is None without validation images, and the
    last weights stand.
    """
    import keras

    from covidcxr import models, training

    classes = tuple(sorted(set(map(str, source_train))))
    if len(classes) < 2:
        raise ValueError(f"a source classifier needs at least two sources in training, got {list(classes)}")
    code = {c: i for i, c in enumerate(classes)}
    y_train = np.array([code[str(s)] for s in source_train], dtype=np.float32)
    known = np.array([str(s) in code for s in source_val], dtype=bool)
    y_val = np.array([code[str(s)] for s in np.asarray(source_val, dtype=object)[known]], dtype=np.float32)
    training.seed_everything(seed)
    x_train = np.asarray(x_train, dtype=np.float32)
    model = models.build_vgg(depth, x_train.shape[1:3] + (1,), weights=weights, fold=fold, width=width,
                             head=tuple(head), outputs=len(classes), name=f"source_vgg{depth}")
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x_val = np.asarray(x_val, dtype=np.float32)[known]
    best: dict = {"score": -math.inf, "epoch": None, "weights": None}

    def keep_best(epoch: int, logs: dict[str, float]) -> None:
        if len(y_val):
            score = _balanced_accuracy(y_val, training.predict(model, x_val).argmax(axis=1), len(classes))
            logs = {**logs, "val_balanced_accuracy": score}
            if score > best["score"]:
                best.update(score=score, epoch=epoch + 1, weights=model.get_weights())
        if on_epoch_end is not None:
            on_epoch_end(epoch, logs)

    training.fit(model, (x_train, y_train), (x_val, y_val), epochs=epochs,
                 batch_size=batch_size, seed=seed, class_weight=source_class_weight(y_train, len(classes)),
                 on_epoch_end=keep_best)
    if best["weights"] is not None:
        model.set_weights(best["weights"])
    return model, classes, best["epoch"]


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")


def read_sources(classes: Sequence[str], probabilities: np.ndarray, source_read: Sequence[str], y_read: np.ndarray,
                 source_train: Sequence[str], y_train: np.ndarray, *, patients: Sequence[str] | None = None,
                 split: str = "validation", n_boot: int = 500, seed: int = 0) -> SourceReading:
    """Score a source classifier's probabilities ``(N, len(classes))`` on one split's images: readability of the
    source, and the label ROC AUC of the source's COVID share in training, with the true source and with the source
    read from the image (its most probable source). Images of sources unseen in training are left out. The 95%
    intervals of the balanced accuracy and of the label AUC from the read source share ``n_boot`` resamples of
    ``patients`` (one id per image; else each image is its own): a patient's films share a site and are read alike, so
    resampling films would narrow them."""
    classes = tuple(classes)
    p = np.asarray(probabilities, dtype=np.float64)
    source_read = np.asarray(source_read, dtype=object).astype(str)
    source_train = np.asarray(source_train, dtype=object).astype(str)
    y_read, y_train = np.asarray(y_read).astype(int), np.asarray(y_train).astype(int)
    if p.shape != (len(source_read), len(classes)):
        raise ValueError(f"probabilities {p.shape} do not match {len(source_read)} {split} images x "
                         f"{len(classes)} sources")
    patients = np.arange(len(source_read)) if patients is None else np.asarray(patients, dtype=object)
    if len(patients) != len(source_read):
        raise ValueError(f"{len(patients)} patient ids for {len(source_read)} {split} images")
    rate = np.array([y_train[source_train == c].mean() if (source_train == c).any() else np.nan for c in classes])
    known = np.isin(source_read, classes)
    truth = np.array([classes.index(s) for s in source_read[known]], dtype=int)
    called = p[known].argmax(axis=1)
    low, high = auc_low, auc_high = float("nan"), float("nan")
    if len(truth) >= 2:
        from covidcxr import metrics

        weights = metrics.patient_resample_weights(patients[known], n_boot=n_boot, seed=seed).astype(np.float64)
        low, high = metrics.percentile_interval(_balanced_accuracies(truth, called, len(classes), weights))
        auc_low, auc_high = metrics.percentile_interval(
            metrics.resampled_ranking_metrics(y_read[known], rate[called], weights)["roc_auc"])
    return SourceReading(
        classes=classes, n_read=int(known.sum()),
        accuracy=float((called == truth).mean()) if len(truth) else float("nan"),
        balanced_accuracy=_balanced_accuracy(truth, called, len(classes)),
        chance=1.0 / len(classes),
        label_auc_true_source=_auc(y_read[known], rate[truth]),
        label_auc_read_source=_auc(y_read[known], rate[called]),
        balanced_accuracy_low=low, balanced_accuracy_high=high, split=split,
        label_auc_read_source_low=auc_low, label_auc_read_source_high=auc_high,
    )


def _balanced_accuracy(truth: np.ndarray, called: np.ndarray, n_classes: int) -> float:
    recalls = [float((called[truth == k] == k).mean()) for k in range(n_classes) if (truth == k).any()]
    return float(np.mean(recalls)) if recalls else float("nan")


def _balanced_accuracies(truth: np.ndarray, called: np.ndarray, n_classes: int, weights: np.ndarray) -> np.ndarray:
    """The balanced accuracy on each resample (a row of ``weights``, :func:`covidcxr.metrics.patient_resample_weights`):
    a resample's recall of a source weighs each film by how often its patient was drawn; NaN where no film is."""
    recalls = []
    for k in range(n_classes):
        total = weights[:, truth == k].sum(axis=1)
        right = weights[:, (truth == k) & (called == k)].sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            recalls.append(np.where(total > 0, right / np.where(total > 0, total, 1.0), np.nan))
    recalls = np.array(recalls)
    present = ~np.isnan(recalls)
    return np.where(present.any(axis=0), np.nansum(recalls, axis=0) / np.maximum(present.sum(axis=0), 1), np.nan)


def group_sources(site: Sequence[str], source: Sequence[str], train: np.ndarray, min_images: int) -> np.ndarray:
    """Each image's site, or its dataset source where the site has fewer than ``min_images`` training images.

    A source classifier cannot learn a class of one to five images (Cohen's sites are 29 countries, most of them
    tiny): such sites are read as their dataset instead, which is what they share with the other small ones.
    """
    site = np.asarray(site, dtype=object).astype(str)
    source = np.asarray(source, dtype=object).astype(str)
    train = np.asarray(train, dtype=bool)
    names, counts = np.unique(site[train], return_counts=True)
    big = set(names[counts >= min_images].tolist())
    return np.where(np.isin(site, list(big)), site, source).astype(object)


def source_check(reading: SourceReading | None, *, warn: float, fail: float, skip_reason: str = "") -> Check:
    """Grade the label AUC through the source read from the image (0.5: no label information; higher is worse) with
    :func:`grade_upper` on its patient-bootstrap interval: it passes only when the upper bound is below ``warn``."""
    if reading is None:
        return _skip(SOURCE, ALL, skip_reason or "no source classifier", warn, fail)
    r = reading
    read = (f"{len(r.classes)} sources read on {r.split} with balanced accuracy {r.balanced_accuracy:.2f} "
            f"[{r.balanced_accuracy_low:.2f}, {r.balanced_accuracy_high:.2f}] (chance {r.chance:.2f})")
    if not r.readable:
        return Check(SOURCE, ALL, None, warn, fail, INCONCLUSIVE,
                     f"{read}: not clearly above chance (the lower bound must exceed {r.readable_above:.2f}), so the "
                     f"check could not measure whether the source predicts the label (a classifier at chance reads no "
                     f"source; it does not show there is none)")
    if not _finite(r.label_auc_read_source):
        return Check(SOURCE, ALL, None, warn, fail, INCONCLUSIVE,
                     f"label AUC undefined: the {r.n_read} {r.split} images of known sources hold one class")
    low, high = r.label_auc_read_source_low, r.label_auc_read_source_high
    status = grade_upper(r.label_auc_read_source, high, warn, fail)
    meaning = {PASS: "the source read from the image says little about the label",
               WARN: "the source read from the image partly predicts the label",
               FAIL: "the source is readable and predicts the label: a shortcut",
               INCONCLUSIVE: f"below {warn}, but the interval reaches it: could not show that the source read from "
                             "the image says little about the label"}[status]
    return Check(SOURCE, ALL, r.label_auc_read_source, warn, fail, status,
                 f"{read}; the read source predicts the label with AUC {r.label_auc_read_source:.2f} "
                 f"[{low:.2f}, {high:.2f}] (95% interval, patients resampled; true source: "
                 f"{r.label_auc_true_source:.2f}); {meaning}", *_bounds(low, high))


# --- the report, and what it says about one model -------------------------------------------------------------------

def report(checks: Sequence[Check]) -> dict:
    """``{"status": worst of the checks, "checks": [...]}``: the shape of reports/audit/audit.json."""
    return {"status": worst(c.status for c in checks), "checks": [c.to_dict() for c in checks]}


def applies_to(check: Mapping, classifier: str) -> bool:
    """Whether a check in a report concerns classifier ``<variant>_<backbone>``: checks of ``all``, of the classifier
    itself or of one of its classes, and the lungs-removed check of its backbone for variants c and e (both see
    outside the lungs; d does not)."""
    subject = str(check["subject"])
    if subject in (ALL, classifier) or subject.startswith(f"{classifier}/"):
        return True
    variant, _, backbone = classifier.partition("_")
    return check["name"] == LUNGS_REMOVED and subject == f"c_{backbone}" and variant == "e"


def model_verdict(audit_report: Mapping, classifier: str) -> tuple[str, list[dict]]:
    """(worst status of the checks that concern ``classifier``, those of them that failed)."""
    mine = [c for c in audit_report["checks"] if applies_to(c, classifier)]
    return worst(c["status"] for c in mine), [c for c in mine if c["status"] == FAIL]
