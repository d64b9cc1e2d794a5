"""A new site's own operating threshold: the model's threshold rule applied to a few labelled films of that site.

A threshold chosen on the validation split of the training sources does not carry to a hospital the model never saw:
on the real corpus, at the held-out hospitals, the validation threshold gives a sensitivity above its target and a
specificity of a third. The field's remedy is local validation before use: the site scores a small labelled set of
its own films and the threshold is chosen there by the model's own rule (:func:`covidcxr.metrics.operating_threshold`
with the objective and minimum sensitivity saved with the model, ``threshold.json``). :func:`local_threshold` does it
(``covidcxr calibrate-site``); serving applies the result as a request's ``threshold``. :func:`local_calibration`
measures what it buys (stage ``evaluate``, on a test split with both classes): it draws many small calibration sets
from the split, chooses the threshold on each and scores the split's other films with it, beside the model's own
threshold on the same films.

A site can also admit its own films past the model's out-of-distribution check (:func:`local_ood_threshold`, served as
a request's ``ood_threshold``), where that check refuses what the site sees every day.

A sensitivity target is kept on the site's next films, not only on the few it was chosen on (:func:`site_rule`): on 20
COVID-19 films, "at least 0.95 of these" lets one fall below the threshold, and the next films then average 19/21 =
0.905 (0.91 measured at the held-out hospitals); the site rule lets none fall below, which promises 20/21. The promise
needs the films exchangeable with the next one, which a patient's follow-up films are not (two films of one patient
score alike: 10 patients of 2 films keep about 10/11, not 20/21): with the labels' ``patient`` column it counts
patients, each at the lowest score of their COVID-19 films; without it, it assumes one film per patient.

What ``calibrate-site --output`` writes is read back by :meth:`SiteThresholds.load` (``covidcxr predict --site``,
``covidcxr pacs --site``, or a server's ``$COVIDCXR_SITE``, which applies it to every request and refuses per-request
thresholds). The thresholds were chosen on one model's scores and mean nothing for another: every use checks the model
that answers, by registered name and version (``covidcxr`` and ``covidcxr-real`` both have a version 2), against the one
they were chosen for. A file written before it recorded the name cannot be checked by name and is refused with the
advice to calibrate again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from covidcxr import metrics
from covidcxr.ood import is_out

#: Fewest films of each class a site threshold is chosen on: below it one film moves the sensitivity by over 10%.
MIN_PER_CLASS = 10
#: A server's site thresholds file: applied to every request, per-request thresholds refused.
ENV = "COVIDCXR_SITE"


class SiteFileError(ValueError):
    """A site's thresholds file that cannot be used (unreadable, not what ``calibrate-site --output`` writes, or chosen
    for another model); the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class SiteThresholds:
    """A site's own thresholds (``calibrate-site --output``): its operating threshold, its OOD threshold when it
    admitted its films (None: the model's), and the registered model name and version whose scores they were chosen
    on (``model_name`` None: a file written before it recorded the name, which :meth:`check_model` refuses)."""

    threshold: float
    ood_threshold: float | None
    model_version: str
    model_name: str | None = None
    path: str = ""

    @classmethod
    def load(cls, path: str | os.PathLike) -> SiteThresholds:
        """The thresholds file at ``path``; :class:`SiteFileError` naming it and what is wrong."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as err:
            raise SiteFileError(f"site thresholds {path}: cannot read ({err.strerror})") from None
        except ValueError:
            raise SiteFileError(f"site thresholds {path}: not JSON") from None
        if not isinstance(data, Mapping) or "threshold" not in data:
            raise SiteFileError(f"site thresholds {path}: not a thresholds file of `covidcxr calibrate-site --output` "
                                "(a JSON object with a threshold)")
        version = data.get("model_version")
        try:
            threshold = metrics.check_threshold(data["threshold"])
            limit = None if data.get("ood_threshold") is None else metrics.check_ood_threshold(data["ood_threshold"])
        except ValueError as err:
            null = " (or null: the model's own)" if str(err).startswith("ood_threshold") else ""
            raise SiteFileError(f"site thresholds {path}: {err}{null}") from None
        if version is None or isinstance(version, bool) or not str(version).strip():
            raise SiteFileError(f"site thresholds {path}: no model_version; thresholds mean nothing without the model "
                                "version they were chosen for: calibrate the site again (`covidcxr calibrate-site`)")
        name = data.get("model_name")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise SiteFileError(f"site thresholds {path}: model_name must be the registered model's name, got {name!r}")
        return cls(threshold, limit, str(version), model_name=name, path=str(path))

    def params(self) -> dict:
        """The request params that apply them: ``threshold``, and ``ood_threshold`` when the site admitted its films."""
        return {"threshold": self.threshold, **({} if self.ood_threshold is None else
                                                {"ood_threshold": self.ood_threshold})}

    def check_model(self, model_name: object, model_version: object) -> None:
        """:class:`SiteFileError` unless the model answering (``model_name``, ``model_version``) is the one they were
        chosen for: the same version of the same registered model. Refused as well when either name is unknown (a file
        written before it recorded the name, a model that does not report its own): versions alone repeat across
        registered models, so the thresholds could be another model's."""
        again = "calibrate the site again for it (`covidcxr calibrate-site`)"
        if str(model_version) != self.model_version:
            raise SiteFileError(f"site thresholds {self.path} were chosen on model version {self.model_version}'s "
                                f"scores; the model answering is version {model_version}: {again}")
        if self.model_name is None:
            raise SiteFileError(f"site thresholds {self.path} record no model_name (written before calibrate-site "
                                f"recorded it): they cannot be checked by name, and version {self.model_version} of "
                                f"another registered model would pass; {again}")
        if model_name is None:
            raise SiteFileError(f"site thresholds {self.path}: the model answering does not report its name (served "
                                "before answers carried model_name): they cannot be checked by name; serve the model "
                                f"{self.model_name} v{self.model_version} they were chosen on")
        if str(model_name) != self.model_name:
            raise SiteFileError(f"site thresholds {self.path} were chosen on {self.model_name} v{self.model_version}'s "
                                f"scores; the model answering is {model_name} v{model_version}: {again}")


class LabelsFileError(ValueError):
    """A site's table of labelled films (``calibrate-site LABELS.csv``) that cannot be used; the message names the
    file and the problem."""


class LabelledFilm(NamedTuple):
    """A film of a site's labels table: its path, whether it is labelled COVID-19, and its patient (the site's own
    pseudonymous key; None when the table has no ``patient`` column)."""

    file: str
    covid: bool
    patient: str | None = None


def read_labels(path: str | os.PathLike) -> list[LabelledFilm]:
    """The films of a site's labels table, in its order. Its columns are ``file`` (relative to the table's folder),
    ``label`` (``covid`` or ``negative``) and, optionally, ``patient`` (a key of the site's own that is the same for
    every film of one patient: the sensitivity promise then counts patients, :func:`covid_patients`).
    :class:`LabelsFileError` when it cannot be read, a row lacks a column (``patient`` too, where the table has it), or
    a film is listed twice: a curation error that would also count the film twice in the threshold's choice."""
    import csv

    labels = Path(path)
    try:  # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which would be part of the first column's name
        with labels.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [name.strip() for name in reader.fieldnames or ()]  # "file, label" names label
            reader.fieldnames = columns
            table = list(reader)
    except OSError as err:
        raise LabelsFileError(f"cannot read {labels} ({err.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise LabelsFileError(f"{labels} is not a UTF-8 CSV table ({type(err).__name__})") from None
    missing = [name for name in ("file", "label") if name not in columns]
    if missing:
        found = columns or "none (an empty file)"
        raise LabelsFileError(f"{labels} has no column {' or '.join(missing)} in its first line: it needs the columns "
                              f"file and label (covid or negative), patient optional; found {found}")
    by_patient = "patient" in columns
    for row in table:
        row["label"] = (row["label"] or "").strip()
    bad = [i for i, row in enumerate(table, start=2) if row.get("label") not in ("covid", "negative")
           or not row.get("file") or (by_patient and not (row.get("patient") or "").strip())]
    if not table or bad:
        columns = "file, label (covid or negative) and patient" if by_patient else "file and label (covid or negative)"
        raise LabelsFileError(f"{labels} needs the columns {columns} on every row; "
                              f"{'no rows' if not table else f'lines {bad[:5]} do not have them'}")
    films = [str(labels.parent / row["file"]) for row in table]  # relative paths: from the table's folder
    lines: dict[Path, list[int]] = {}
    for line, film in enumerate(films, start=2):
        lines.setdefault(Path(film).resolve(), []).append(line)
    twice = [(table[at[0] - 2]["file"], at) for at in lines.values() if len(at) > 1]
    if twice:
        listed = "; ".join(f"{name!r} on lines {', '.join(map(str, at))}" for name, at in twice[:5])
        raise LabelsFileError(f"{labels} lists a film more than once ({listed}{'; ...' if len(twice) > 5 else ''}): "
                              "list each film once (twice, it would count twice in the threshold's choice)")
    return [LabelledFilm(film, row["label"] == "covid", row["patient"].strip() if by_patient else None)
            for film, row in zip(films, table)]


def covid_patients(y: np.ndarray, patients: np.ndarray | None) -> int | None:
    """How many patients the COVID-19 films (``y`` 1) are of, by ``patients`` (one key per film); None without keys."""
    if patients is None:
        return None
    y, patients = np.asarray(y, dtype=int).ravel(), np.asarray(patients).astype(str).ravel()
    if len(patients) != len(y):
        raise ValueError(f"{len(patients)} patient ids for {len(y)} films")
    return len(np.unique(patients[y == 1]))


#: The MLflow experiment of the sites' calibrations (``calibrate-site --log NAME``).
EXPERIMENT = "covidcxr-sites"
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: What a calibration's figures are logged as (those of ``calibrate-site``'s output that are numbers), by output key:
#: the sensitivity and specificity at the site's threshold were measured on the films it was chosen on (optimistic),
#: and their names say so, beside the promised sensitivity and the model's own threshold on the same films.
LOGGED_METRICS: dict[str, str] = {
    **{key: key for key in ("threshold", "promised_sensitivity", "ood_threshold", "admitted", "n_covid",
                            "n_covid_patients", "n_negative", "model_threshold", "model_ood_threshold",
                            "model_answered", "model_sensitivity", "model_specificity")},
    "sensitivity": "sensitivity_on_calibration_films", "specificity": "specificity_on_calibration_films"}
#: The tag on a calibration's run that says where its figures were measured.
MEASURED_ON = ("the site's calibration films: sensitivity_on_calibration_films and specificity_on_calibration_films at "
               "the threshold chosen on them (optimistic), model_sensitivity and model_specificity at the model's own "
               "threshold on the films it answered; promised_sensitivity is the bound on the site's next COVID-19 "
               "films")


def check_site_name(site: str) -> str:
    """``site`` when it can name MLflow tags (``site.<site>.threshold``), else a ValueError that says what can."""
    if not SITE_NAME.fullmatch(site):
        raise ValueError(f"site name {site!r}: 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or "
                         "digit (it names MLflow tags)")
    return site


def log_to_mlflow(result: Mapping, path: str | os.PathLike, *, site: str, model_name: str,
                  experiment: str = EXPERIMENT) -> tuple[str, bool]:
    """A run in ``experiment`` with one site's calibration (``result``: what ``calibrate-site`` wrote, at ``path``):
    its rule as params, its figures as metrics (:data:`LOGGED_METRICS`: those measured on the films the threshold was
    chosen on named so, and a ``measured_on`` tag), the file as an artifact; and, when the model version it was
    chosen on is registered under ``model_name``, that version's tags ``site.<site>.threshold``,
    ``site.<site>.ood_threshold`` and ``site.<site>.run_id``, so the registry says which thresholds each site uses
    with which version. Returns the run id and whether the version was tagged."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from covidcxr import tracking

    check_site_name(site)
    version = str(result["model_version"])
    tags = {"site": site, "model_name": model_name, "model_version": version, "measured_on": MEASURED_ON}
    params = {"site": site, "objective": result.get("objective"), "min_sensitivity": result.get("min_sensitivity")}
    with tracking.run(experiment, f"site-{site}-{model_name}-v{version}", params=params, tags=tags) as run:
        mlflow.log_metrics({name: float(result[k]) for k, name in LOGGED_METRICS.items() if result.get(k) is not None})
        mlflow.log_artifact(str(path), "site")
    client = mlflow.MlflowClient()
    try:
        client.get_model_version(model_name, version)
    except MlflowException:
        return run.info.run_id, False
    for key, value in (("threshold", result["threshold"]), ("ood_threshold", result.get("ood_threshold")),
                       ("run_id", run.info.run_id)):
        client.set_model_version_tag(model_name, version, f"site.{site}.{key}", "none" if value is None else str(value))
    return run.info.run_id, True


def from_env(env: Mapping[str, str] | None = None) -> SiteThresholds | None:
    """The thresholds file ``$COVIDCXR_SITE`` names, or None when it is unset or empty."""
    path = (os.environ if env is None else env).get(ENV, "").strip()
    return SiteThresholds.load(path) if path else None


def site_rule(n_covid: int, min_sensitivity: float, unit: str = "films") -> tuple[int, float]:
    """How many of a site's ``n_covid`` COVID-19 films (or patients: ``unit``) its threshold may leave below it, and
    the sensitivity that promises on the site's next COVID-19 films: the largest ``k`` with ``(n - k) / (n + 1) >=
    min_sensitivity``, and that fraction.

    With the threshold at the ``(k + 1)``-th lowest COVID-19 score, a next COVID-19 film of the same site (exchangeable
    with these) scores at or above it with probability at least ``(n - k) / (n + 1)``: its rank among the ``n + 1`` is
    uniform (the split-conformal bound; no model of the scores). Films of one patient are not exchangeable with a next
    patient's film: counted by patient (each at the lowest score of their films), a next patient's lowest score, and
    so each of their films, is at or above the threshold with that probability. Too few to promise the target is an
    error that says how many it takes.
    """
    if not 0.0 <= min_sensitivity < 1.0:
        raise ValueError(f"a site threshold can promise a sensitivity in [0, 1), not {min_sensitivity:g}")
    k = math.floor(n_covid - min_sensitivity * (n_covid + 1) + 1e-9)
    if k < 0:
        need = math.ceil(min_sensitivity / (1.0 - min_sensitivity) - 1e-9)
        raise ValueError(f"{n_covid} COVID-19 {unit} cannot promise sensitivity {min_sensitivity:g} on the site's next "
                         f"films (the lowest of n scores promises n / (n + 1)): it takes at least {need}")
    return k, (n_covid - k) / (n_covid + 1)


def local_threshold(y: np.ndarray, score: np.ndarray, rule: Mapping, *, min_per_class: int = MIN_PER_CLASS,
                    patients: np.ndarray | None = None) -> metrics.ThresholdChoice:
    """The model's threshold rule (``rule``: the choice saved with it, as :func:`covidcxr.folders.folder_threshold`
    reads it: ``objective`` and ``min_sensitivity``) applied to a site's labelled films (``y`` 1 for COVID-19, the
    served ``score``). Fewer than ``min_per_class`` films of either class is an error that says how many there are; so
    are a sensitivity rule without its ``min_sensitivity`` and scores that do not separate the films (ROC AUC at or
    below 0.5: no threshold of them does better than chance, and Youden's J, never above 0, would put one above every
    score, beyond 1 when the top score is 1).

    The ``sensitivity`` objective keeps its target on the site's next films (:func:`site_rule`): the highest threshold
    that leaves at most ``k`` of these COVID-19 films below it, or, with ``patients`` (one key per film), at most ``k``
    of the COVID-19 patients' lowest scores (``n`` the patients). The choice's ``sensitivity`` is that on these films;
    its ``min_sensitivity`` the target.
    """
    _check_rule(rule)
    choice = _rule_choice(y, score, rule, min_per_class=min_per_class, patients=patients)
    auc = metrics.classification_metrics(y, score)["roc_auc"]
    if not auc > 0.5:
        raise ValueError(f"the model does not separate this site's films: ROC AUC {auc:.3f}, at or below chance "
                         "(0.5); no threshold of its scores does better than calling at random")
    metrics.check_threshold(choice.threshold, "site threshold")  # a sensitivity target of 0 is above every score
    return choice


def _check_rule(rule: Mapping) -> None:
    """A ValueError for a sensitivity rule without its target: there is nothing a site's threshold could keep."""
    if rule["objective"] == "sensitivity" and rule.get("min_sensitivity") is None:
        raise ValueError("the sensitivity objective needs a min_sensitivity (the target kept on the site's next "
                         "COVID-19 films)")


def _rule_choice(y: np.ndarray, score: np.ndarray, rule: Mapping, *, min_per_class: int,
                 patients: np.ndarray | None = None) -> metrics.ThresholdChoice:
    """``rule`` applied to the films as :func:`local_threshold` does, without refusing scores that do not separate
    them: :func:`local_calibration` measures what a site's few films give in every draw, a useless choice included."""
    y, score = np.asarray(y, dtype=int).ravel(), np.asarray(score, dtype=float).ravel()
    if len(y) != len(score):
        raise ValueError(f"{len(y)} labels for {len(score)} scores")
    if not np.isfinite(score).all():
        raise ValueError("every score must be a finite probability (a refused film has none: leave it out)")
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if min(n_pos, n_neg) < min_per_class:
        raise ValueError(f"a site threshold needs at least {min_per_class} COVID-19 and {min_per_class} negative "
                         f"films; got {n_pos} and {n_neg}")
    if rule["objective"] != "sensitivity":
        return metrics.operating_threshold(y, score, str(rule["objective"]))
    target = float(rule["min_sensitivity"])
    n_patients = covid_patients(y, patients)
    if n_patients is None:
        k, _ = site_rule(n_pos, target)
        choice = metrics.operating_threshold(y, score, "sensitivity", min_sensitivity=(n_pos - k) / n_pos)
        return dataclasses.replace(choice, min_sensitivity=target)
    k, _ = site_rule(n_patients, target, "patients")
    keys = np.asarray(patients).astype(str).ravel()[y == 1]
    lowest = np.array([score[y == 1][keys == key].min() for key in np.unique(keys)])  # each patient's lowest
    at = metrics.operating_threshold(np.r_[np.ones(n_patients, int), np.zeros(n_neg, int)],
                                     np.r_[lowest, score[y == 0]], "sensitivity",
                                     min_sensitivity=(n_patients - k) / n_patients).threshold
    called = score >= at
    return metrics.ThresholdChoice(threshold=at, objective="sensitivity", min_sensitivity=target,
                                   sensitivity=float(called[y == 1].mean()),
                                   specificity=float((~called[y == 0]).mean()), n_positive=n_pos, n_negative=n_neg)


def local_ood_threshold(ood_scores: np.ndarray, model_threshold: float) -> float:
    """The out-of-distribution threshold at which a site admits its own films: the highest OOD score of the films it
    labelled (each a chest X-ray of its patients that it vouched for), never below the model's own threshold.

    A next film of the site scores at or below it with probability at least ``n / (n + 1)`` (its rank among the
    ``n + 1`` is uniform): on average at most 1 in ``n + 1`` of the site's films is refused (1 in 41 for 40 films; the
    model's own threshold refuses 1 in 20 of its validation films), and anything further from training than every film
    the site labelled still is. Serving applies it as a request's ``ood_threshold``.
    """
    scores = np.asarray(ood_scores, dtype=float).ravel()
    if not len(scores) or not np.isfinite(scores).all():
        raise ValueError("a site's OOD threshold needs the finite OOD scores of its labelled films")
    return max(float(model_threshold), float(scores.max()))


def local_calibration(y: np.ndarray, score: np.ndarray, rule: Mapping, *, n_per_class: int = 20, draws: int = 200,
                      seed: int = 0, ood: tuple[np.ndarray, float] | None = None,
                      patients: np.ndarray | None = None) -> dict:
    """What a site gains from its own threshold, measured on a labelled split of films it never trained on.

    Each of ``draws`` times: ``n_per_class`` COVID-19 and ``n_per_class`` negative films drawn at random (without
    replacement) choose a threshold by the model's rule as :func:`local_threshold` does (a draw its scores do not
    separate included), and the split's other films are called with it and,
    for comparison, with the model's own threshold (``rule["threshold"]``). Returns the mean over draws of each
    sensitivity and specificity, their 10th and 90th percentiles (how much a site's few films move them), the median
    threshold and, for the sensitivity objective, the sensitivity the site rule promises (:func:`site_rule`); ``status``
    is ``skipped``, with the reason, when a class has too few films (patients, with ``patients``) to both choose and
    test (``n_per_class`` + 5) or ``n_per_class`` of them cannot promise the target. A sensitivity rule without its
    ``min_sensitivity`` is a ValueError, whatever the films (as for :func:`local_threshold`).

    ``ood``: the films' OOD scores and the model's OOD threshold, the films serving refuses as out of distribution
    included: the site also admits its own films (:func:`local_ood_threshold` of the drawn films), so the threshold is
    chosen on every drawn film and the other films are answered up to the site's OOD threshold (``refused``: the share
    of them above it); the model's figures are what serving gives without either (its threshold, on the films its
    own OOD threshold answers; ``model_refused``). A figure no film defines in a draw (no COVID-19 film answered)
    leaves that draw out of its mean.

    ``patients`` (one id per film): what ``calibrate-site`` does with a labels table's ``patient`` column. Each draw
    takes ``n_per_class`` COVID-19 patients and ``n_per_class`` negative patients (all their films of that label),
    the threshold is chosen counting patients (``local_threshold`` with ``patients``), the promise is that of
    ``n_per_class`` patients, and only the films of patients drawn in neither class are tested (a patient's other
    films would test a threshold chosen on that very patient). A patient with films of both labels is in both draws
    (as in a site's table, where each film carries its label); drawn in one, none of their films is tested.
    ``unit`` says which was counted (``films`` or ``patients``; ``n_covid`` and ``n_negative`` are films either way,
    ``n_covid_patients`` and ``n_negative_patients`` the patients).
    """
    y, score = np.asarray(y, dtype=int).ravel(), np.asarray(score, dtype=float).ravel()
    if patients is not None and len(patients) != len(y):
        raise ValueError(f"{len(patients)} patient ids for {len(y)} films")
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    unit = "films" if patients is None else "patients"
    base = {"n_per_class": int(n_per_class), "draws": int(draws), "n_covid": n_pos, "n_negative": n_neg,
            "unit": unit, "objective": rule.get("objective"), "min_sensitivity": rule.get("min_sensitivity")}
    patient = None
    counts = (n_pos, n_neg)
    if patients is not None:  # each patient a code; the patients with a film of each label
        patient = np.unique(np.asarray(patients).astype(str).ravel(), return_inverse=True)[1].ravel()
        pools = (np.unique(patient[y == 1]), np.unique(patient[y == 0]))
        counts = (len(pools[0]), len(pools[1]))
        base.update(n_covid_patients=counts[0], n_negative_patients=counts[1])
    if rule.get("objective") is None:
        return {**base, "status": "skipped", "reason": "the model's threshold does not say by which rule it was chosen"}
    _check_rule(rule)
    if min(counts) < n_per_class + 5:
        return {**base, "status": "skipped",
                "reason": f"{counts[0]} COVID-19 and {counts[1]} negative {unit}: a site threshold on {n_per_class} of "
                          f"each needs at least {n_per_class + 5} of each (the rest test it)"}
    promised = {}
    if rule["objective"] == "sensitivity":
        try:
            promised = {"promised_sensitivity": site_rule(int(n_per_class), float(rule["min_sensitivity"]), unit)[1]}
        except ValueError as err:
            return {**base, "status": "skipped", "reason": str(err)}
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    names = ("sensitivity", "specificity", "model_sensitivity", "model_specificity")
    figures: dict[str, list[float]] = {k: [] for k in names + (("refused", "model_refused") if ood is not None
                                                                 else ())}
    if ood is not None:
        ood_scores, model_ood = np.asarray(ood[0], dtype=float).ravel(), float(ood[1])
    thresholds = []
    for _ in range(int(draws)):
        if patient is None:
            p, n = rng.permutation(pos), rng.permutation(neg)
            chosen, rest = np.r_[p[:n_per_class], n[:n_per_class]], np.r_[p[n_per_class:], n[n_per_class:]]
        else:
            drawn = (rng.permutation(pools[0])[:n_per_class], rng.permutation(pools[1])[:n_per_class])
            chosen = np.flatnonzero(np.where(y == 1, np.isin(patient, drawn[0]), np.isin(patient, drawn[1])))
            rest = np.flatnonzero(~np.isin(patient, np.r_[drawn[0], drawn[1]]))
        answered = {"": rest, "model_": rest}
        if ood is not None:
            limits = {"": local_ood_threshold(ood_scores[chosen], model_ood), "model_": model_ood}
            for prefix, limit in limits.items():
                answered[prefix] = rest[~is_out(ood_scores[rest], limit)]
                figures[prefix + "refused"].append(1.0 - len(answered[prefix]) / len(rest) if len(rest) else np.nan)
        least = min(n_per_class, MIN_PER_CLASS)
        t = _rule_choice(y[chosen], score[chosen], rule, min_per_class=least,
                         patients=None if patient is None else patient[chosen]).threshold
        for prefix, threshold in (("", t), ("model_", float(rule["threshold"]))):
            films_y, called = y[answered[prefix]], score[answered[prefix]] >= threshold
            figures[prefix + "sensitivity"].append(float(called[films_y == 1].mean()) if (films_y == 1).any()
                                                   else np.nan)
            figures[prefix + "specificity"].append(float((~called[films_y == 0]).mean()) if (films_y == 0).any()
                                                   else np.nan)
        thresholds.append(t)
    out = {**base, **promised, "status": "measured", "threshold_median": float(np.median(thresholds))}
    for key, values in figures.items():
        values = np.asarray(values, dtype=float)
        values = values[np.isfinite(values)]
        out[key] = float(np.mean(values)) if len(values) else None
        out[f"{key}_p10"], out[f"{key}_p90"] = ((float(v) for v in np.percentile(values, [10, 90])) if len(values)
                                                else (None, None))
        if ood is not None:
            out[f"{key}_draws"] = int(len(values))
    return out
