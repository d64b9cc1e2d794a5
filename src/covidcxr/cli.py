"""Command line: `covidcxr demo-data OUT_DIR`, `inspect FILE...`, `predict FILE...`, `calibrate-site LABELS.csv`,
`pacs --dicomweb-url URL`, `tune --study --storage`, `monitor --model NAME --since 7d`."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import datetime as dt
    from pathlib import Path

    from covidcxr.sites import LabelledFilm
    from covidcxr.sites import SiteThresholds as Site


def _demo_data(args: argparse.Namespace) -> int:
    """Write the demo dataset; a folder it may not write into (not empty and no demo output) is one line, exit 2."""
    from covidcxr.datasets import demo

    try:
        counts = demo.generate(args.out_dir, seed=args.seed)
    except (OSError, ValueError) as err:  # FileExistsError, NotADirectoryError, a folder it cannot write
        print(f"demo-data: {err}", file=sys.stderr)
        return 2
    print(json.dumps(counts, indent=2, sort_keys=True))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    """Print what read_image sees in each file (whitelisted header only), or why it refuses it."""
    from covidcxr import io

    status = 0
    for path in args.files:
        try:
            pixels, header = io.read_image(path)
        except io.ImageReadError as err:
            print(f"{path}\tREFUSED\t{err.reason}\t{err}")
            status = 1
            continue
        stats = {"min": float(pixels.min()), "max": float(pixels.max()), "mean": round(float(pixels.mean()), 3)}
        print(f"{path}\tOK\t{json.dumps({**header, **stats}, default=str, sort_keys=True)}")
    return status


def _whole_number(text: str, minimum: int, unit: str, too_few: str) -> int:
    """A count on the command line: a whole number of ``unit`` (plural), at least ``minimum`` (``too_few``: how the
    refusal words that bound)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number of {unit} (at least {minimum}), got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{too_few}, got {value}")
    return value


def _batch_size(text: str) -> int:
    """``--batch-size``: a whole number of images, at least 1."""
    return _whole_number(text, 1, "images", "at least 1 image per request")


def _objective(text: str) -> str:
    """``calibrate-site --objective``: one of the threshold rules (:data:`covidcxr.metrics.THRESHOLD_OBJECTIVES`),
    checked as the command line is read, before any film is scored (the module is imported only here, as every
    command's are, so that the parser stays quick to build)."""
    from covidcxr import metrics

    if text not in metrics.THRESHOLD_OBJECTIVES:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from "
                                         f"{', '.join(metrics.THRESHOLD_OBJECTIVES)})")
    return text


PREDICT_COLUMNS = ("accepted", "projection", "projection_probability", "lung_area_fraction", "covid_probability",
                   "label", "ood_score", "ood_threshold", "threshold", "thresholds_from", "model_version", "reason")


def _predict(args: argparse.Namespace) -> int:
    """Score files with the registered model in this process, or with a running server (``--url``); print a table."""
    import base64
    from pathlib import Path

    from covidcxr import serving, sites

    try:
        site = sites.SiteThresholds.load(args.site) if args.site else None
    except sites.SiteFileError as err:
        print(f"predict: {err}", file=sys.stderr)
        return 2
    params = {"explain": bool(args.explain), **(site.params() if site else {}),
              **{k: v for k, v in (("threshold", args.threshold), ("ood_threshold", args.ood_threshold))
                 if v is not None}}
    try:
        score = None
        if site is not None:  # the site's thresholds only on the model (name and version) they were chosen for
            served = _scorer(args.model_uri, args.url, args.timeout)
            about = serving.probe(served)
            site.check_model(about["model_name"], about["model_version"])  # before any film is scored (and logged)

            def score(images: list[str], params: dict) -> list[dict]:
                entries = served(images, params)
                for entry in entries:  # the server may have changed model since the probe
                    site.check_model(entry.get("model_name"), entry["model_version"])
                return entries

        rows = _score_files(args.files, args, params, score)
    except Exception as err:  # noqa: BLE001 - the CLI reports a failed request in one line, not a traceback
        print(f"predict failed: {getattr(err, 'message', None) or err}", file=sys.stderr)
        return 1
    print("\t".join(("file", *PREDICT_COLUMNS)))
    written: set[str] = set()
    for path, entry in rows:
        cells = [_cell(entry.get(c)) for c in PREDICT_COLUMNS]
        print("\t".join((path, *cells)))
        if entry.get("gradcam_png"):
            # files of the same name in different folders: stem.png, stem-2.png, ... in the order given
            name, n = f"{Path(path).stem}.png", 1
            while name in written:
                n += 1
                name = f"{Path(path).stem}-{n}.png"
            written.add(name)
            out = Path(args.gradcam_dir) / name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(base64.b64decode(entry["gradcam_png"]))
    if args.explain:
        print(f"Grad-CAM overlays of accepted images: {args.gradcam_dir}/<file stem>.png (-2, -3... for files of the "
              "same name)", file=sys.stderr)
    unread = _unreadable(rows)
    for line in unread:
        print(f"predict: {line}", file=sys.stderr)
    return 1 if unread else 0


def _score_files(files: Sequence[str], args: argparse.Namespace, params: dict,
                 score: Callable[[list[str], dict], list[dict]] | None = None) -> list[tuple[str, dict]]:
    """Each file's served entry, in the order given (a file given twice: twice), scored in batches of
    ``args.batch_size`` (at most the model's ``max_images``) by the model here (``args.model_uri``) or on a server
    (``args.url``), or by ``score``; a file that cannot be read gets an ``unreadable`` entry whose ``message`` says why
    (:func:`_unreadable`)."""
    from covidcxr import serving

    entries: list[dict | None] = [None] * len(files)
    readable: list[tuple[int, str]] = []
    for i, path in enumerate(files):
        try:
            readable.append((i, serving.encode_file(path)))
        except OSError as err:
            entries[i] = {"accepted": False, "reason": "unreadable",
                          "message": f"cannot read ({err.strerror or type(err).__name__})"}
    score = score or _scorer(args.model_uri, args.url, args.timeout)
    batch_size = serving.request_size(serving.probe(score), args.batch_size) if readable else args.batch_size
    for start in range(0, len(readable), batch_size):
        chunk = readable[start:start + batch_size]
        for (i, _), entry in zip(chunk, score([b for _, b in chunk], params), strict=True):
            entries[i] = entry
    return list(zip(files, entries, strict=True))


def _unreadable(rows: Sequence[tuple[str, dict]]) -> list[str]:
    """``PATH: cannot read (why)`` for each file of ``rows`` (:func:`_score_files`) that could not be read here (an
    ``unreadable`` entry of the model's own, a file it could not decode, names the model version)."""
    return [f"{path}: {entry.get('message')}" for path, entry in rows if entry.get("reason") == "unreadable"
            and entry.get("model_version") is None]


def _calibrate_site(args: argparse.Namespace) -> int:
    """A site's own threshold: score its labelled films with the model (here or on a server) and apply the model's
    threshold rule to the films it answers (covidcxr.sites); print the threshold, what it gives on those films and what
    the model's own threshold gives on them, as JSON. ``--admit``: the films the model refuses as out of distribution
    are admitted too (the site's own OOD threshold, :func:`covidcxr.sites.local_ood_threshold`) and join the choice."""
    import os
    from collections import Counter
    from pathlib import Path
    from unittest import mock

    import numpy as np

    from covidcxr import predlog, sites

    try:
        if args.log:
            sites.check_site_name(args.log)
    except ValueError as err:
        print(f"calibrate-site: --log: {err}", file=sys.stderr)
        return 2
    try:
        films = sites.read_labels(args.labels)
    except sites.LabelsFileError as err:
        print(f"calibrate-site: {err}", file=sys.stderr)
        return 1
    files = [film.file for film in films]
    refusal = _too_few_for_the_rule(args, films)  # before minutes of loading and scoring
    if refusal:
        print(f"calibrate-site: {refusal}", file=sys.stderr)
        return 1
    try:
        # The labelled films are no production traffic: a model loaded here keeps no prediction log (a server's own
        # log records them, README)
        with mock.patch.dict(os.environ, {predlog.ENV: "none"}):
            score = _scorer(args.model_uri, args.url, args.timeout)
        if _applies_a_site(score):
            print(f"calibrate-site: the model answers at a site's thresholds (${sites.ENV}) and refuses its own, which "
                  f"the site's are chosen against: calibrate in process or on a server without {sites.ENV}",
                  file=sys.stderr)
            return 1
        served = _score_files(files, args, {}, score)  # what the model answers today
        rows = list(served)
        # --admit: the films refused as out of distribution again, without an OOD limit (the rest would not change)
        far = [i for i, (_, e) in enumerate(served) if e.get("reason") == "out_of_distribution"] if args.admit else []
        again = _score_files([files[i] for i in far], args, {"ood_threshold": sys.float_info.max}, score)
        for i, row in zip(far, again, strict=True):
            rows[i] = row
    except Exception as err:  # noqa: BLE001 - the CLI reports a failed request in one line, not a traceback
        print(f"calibrate-site failed: {getattr(err, 'message', None) or err}", file=sys.stderr)
        return 1
    for line in _unreadable(served):  # left out of the choice (counted as refused): said, by name, here only
        print(f"calibrate-site: {line}: left out", file=sys.stderr)

    def answered_in(scored: list[tuple[str, dict]]) -> list[tuple[LabelledFilm, dict]]:  # (film, its answer)
        return [(film, entry) for film, (_, entry) in zip(films, scored, strict=True) if entry.get("accepted")]

    model, answered = answered_in(served), answered_in(rows)
    refused = dict(Counter(entry.get("reason") or "unknown" for _, entry in rows if not entry.get("accepted")))
    y = np.array([int(film.covid) for film, _ in answered], dtype=int)
    by_patient = films[0].patient is not None
    patients = np.array([film.patient for film, _ in answered], dtype=str) if by_patient else None
    probability = np.array([e["covid_probability"] for _, e in answered], dtype=float)
    # The model that answered (a film read here and sent to it): its version and threshold, for its rule
    first = next((e for _, e in served if e.get("model_version") is not None), None)
    if first is None:
        print(f"calibrate-site: none of the {len(rows)} films could be read ({refused})", file=sys.stderr)
        return 1
    mixed = _not_one_model(served, again)
    if mixed:
        print(f"calibrate-site: {mixed}", file=sys.stderr)
        return 1
    try:
        rule, rule_from = _site_rule(args, first["model_version"], first.get("threshold"), first.get("model_name"))
    except RuntimeError as err:
        print(f"calibrate-site: {err}", file=sys.stderr)
        return 1
    try:
        choice = sites.local_threshold(y, probability, rule, patients=patients)
    except ValueError as err:
        print(f"calibrate-site: of {len(rows)} films the model answered {len(y)} ({refused} refused): {err}",
              file=sys.stderr)
        return 1
    model_ood = next((e["ood_threshold"] for _, e in served if e.get("ood_threshold") is not None), None)
    admitted = sum(rows[i][1].get("accepted", False) for i in far)
    ood_scores = np.array([e["ood_score"] for _, e in answered], dtype=float)  # null (None): NaN
    if admitted and model_ood is not None and not np.isfinite(ood_scores).all():
        at = [line for line, (_, e) in enumerate(rows, start=2)  # the table's lines: no file name is printed
              if e.get("accepted") and not np.isfinite(np.array(e.get("ood_score"), dtype=float))]
        lines = f"{at[:5]}{' ...' if len(at) > 5 else ''}"
        print(f"calibrate-site: {len(at)} of the films answered have no finite OOD score (the model answers them "
              f"flagged out of distribution, ood_action: flag; {args.labels} lines {lines}): a site's OOD threshold "
              "cannot be chosen above a score that cannot be compared; leave those films out of the table, or "
              "calibrate without --admit", file=sys.stderr)
        return 1
    ood_threshold = sites.local_ood_threshold(ood_scores, model_ood) if admitted and model_ood is not None else None
    model_y = np.array([int(film.covid) for film, _ in model], dtype=int)
    at_model = np.array([e["label"] == "covid" for _, e in model])  # serving's own call at the model's thresholds
    n_patients = sites.covid_patients(y, patients)
    promised = promise = None
    if choice.min_sensitivity is not None:
        promised = sites.site_rule(n_patients if by_patient else choice.n_positive, choice.min_sensitivity)[1]
        promise = (f"each film of a next COVID-19 patient of the site is called COVID-19 with probability at least "
                   f"{promised:.4f} (all of that patient's films, too): counted over the {n_patients} COVID-19 "
                   "patients, each at the lowest score of their films" if by_patient else
                   f"counted over the {choice.n_positive} COVID-19 films: it assumes one film per patient (follow-up "
                   "films of one patient score alike and promise less); give the labels a patient column")
    out = {"threshold": choice.threshold, "objective": choice.objective, "min_sensitivity": choice.min_sensitivity,
           "rule_from": rule_from, "promised_sensitivity": promised, "promise": promise,
           "n_covid_patients": n_patients, "ood_threshold": ood_threshold,
           "admitted": admitted,
           "n_covid": choice.n_positive, "n_negative": choice.n_negative, "sensitivity": choice.sensitivity,
           "specificity": choice.specificity, "model_threshold": float(first["threshold"]),
           "model_ood_threshold": model_ood, "model_answered": len(model),
           "model_sensitivity": float(at_model[model_y == 1].mean()) if (model_y == 1).any() else None,
           "model_specificity": float((~at_model[model_y == 0]).mean()) if (model_y == 0).any() else None,
           "refused": refused, "model_name": first.get("model_name"), "model_version": first["model_version"],
           "note": "figures on the films the threshold was chosen on (optimistic; promised_sensitivity is what the "
                   "site's next COVID-19 films get on average); serve with this threshold (and ood_threshold, when "
                   "not null) as the request's params, or this file as `covidcxr predict --site` / `covidcxr pacs "
                   "--site` or a server's COVIDCXR_SITE, with this model (model_name, model_version) only"}
    print(json.dumps(out, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    if args.log:
        return _log_site(out, args)
    return 0


def _not_one_model(served: Sequence[tuple[str, dict]], again: Sequence[tuple[str, dict]]) -> str | None:
    """Why ``calibrate-site``'s answers (``served``, the first pass; ``again``, ``--admit``'s) cannot choose a site's
    thresholds, or None: they must all come from one model (registered name and version), answering the first pass at
    its own thresholds (``thresholds_from: model``). A server behind a load balancer mid-rollout, or a replica that
    applies a site's file, would otherwise mix scores or calls of two models, or of a site, into one file."""
    from collections import Counter

    from covidcxr import sites

    def models(rows: Sequence[tuple[str, dict]]) -> Counter:
        return Counter((e.get("model_name"), str(e["model_version"])) for _, e in rows
                       if e.get("model_version") is not None)

    seen = models(served) + models(again)
    if len(seen) > 1:
        named = ", ".join(f"{name or 'a model without a name'} v{version} ({n} films)"
                          for (name, version), n in sorted(seen.items(), key=str))
        return (f"the films were answered by {len(seen)} models ({named}): a site's thresholds are chosen on one "
                "model's scores; calibrate when every request reaches the same model (a server mid-rollout, or "
                "replicas of several versions, answer with several)")
    whose = Counter(str(e.get("thresholds_from")) for _, e in served
                    if e.get("model_version") is not None and e.get("thresholds_from") != "model")
    if whose:
        named = ", ".join(f"{n} at thresholds_from {source}" for source, n in sorted(whose.items()))
        return (f"{sum(whose.values())} films were answered at other thresholds than the model's own ({named}): a site "
                "is calibrated against the model's own thresholds; calibrate where no replica applies a site's "
                f"(${sites.ENV}) and the model reports whose thresholds it answered at")
    return None


def _log_site(out: dict, args: argparse.Namespace) -> int:
    """``calibrate-site --log NAME``: the calibration as an MLflow run, and the registered version's site tags."""
    import tempfile
    from pathlib import Path

    import mlflow

    from covidcxr import sites

    name = out.get("model_name")  # the model that answered, whichever --model-uri named (a server's own)
    if name is None:
        print("calibrate-site: the model answering does not report its name (served before answers carried "
              "model_name): not logged, no registered version tagged (the calibration is above)", file=sys.stderr)
        return 1
    mlflow.set_tracking_uri(_tracking_uri())
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(args.output or Path(tmp) / f"site-{args.log}.json")
            if not args.output:
                path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
            run_id, tagged = sites.log_to_mlflow(out, path, site=args.log, model_name=name)
    except Exception as err:  # noqa: BLE001 - the store failed: one line (the calibration is printed above)
        print(f"calibrate-site: logging to MLflow failed ({type(err).__name__}; the calibration is above)",
              file=sys.stderr)
        return 1
    where = (f"tagged {name} v{out['model_version']} site.{args.log}.*" if tagged else
             f"{name} v{out['model_version']} is not in the registry: no version tags")
    print(f"calibrate-site: logged to MLflow run {run_id} (experiment {sites.EXPERIMENT}); {where}", file=sys.stderr)
    return 0


def _applies_a_site(score: Callable[[list[str], dict], list[dict]]) -> bool:
    """Whether ``score`` answers every request at a site's thresholds (``$COVIDCXR_SITE``): it refuses a request's
    own ``threshold`` with a message naming the variable."""
    from covidcxr import serving, sites

    try:
        score([serving.probe_image()], {"threshold": 0.5})
    except Exception as err:  # noqa: BLE001 - refused remotely (ScoringError) or in process (MlflowException)
        if sites.ENV in str(getattr(err, "message", None) or err):
            return True
        raise
    return False


def _cell(value: object) -> str:
    """A table cell; numbers at the precision probabilities are compared with thresholds at
    (:data:`covidcxr.models.PROBABILITY_DECIMALS`), so the label a row shows follows from the figures it shows."""
    from covidcxr import models

    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{models.PROBABILITY_DECIMALS}f}"
    return str(value)


def _scorer(model_uri: str, url: str | None, timeout: float):
    """The pyfunc's scoring function: on the server at ``url``, else the model loaded here (sqlite:///mlflow.db by
    default, or $MLFLOW_TRACKING_URI)."""

    from covidcxr import serving

    if url:
        return serving.remote_scorer(url, timeout)
    import mlflow

    mlflow.set_tracking_uri(_tracking_uri())
    missing = _missing_alias(model_uri)
    if missing:
        raise RuntimeError(missing)
    return serving.local_scorer(model_uri)


def _missing_alias(model_uri: str) -> str | None:
    """For ``models:/NAME@ALIAS`` whose alias is not set: why (the last registration's decision) and what to run
    instead; None when the URI is of another form or the alias exists."""
    import mlflow
    from mlflow.exceptions import MlflowException

    parsed = _models_uri(model_uri)
    if parsed is None or parsed.alias is None:
        return None
    name, alias = parsed.name, parsed.alias
    client = mlflow.MlflowClient()
    try:
        client.get_model_version_by_alias(name, alias)
        return None
    except MlflowException:
        pass
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        versions = []
    if not versions:
        return (f"no model {name!r} is registered in {mlflow.get_tracking_uri()}: run the pipeline first (`make run` "
                "or `dvc repro`), or set MLFLOW_TRACKING_URI to the store that holds it")
    latest = max(versions, key=lambda v: int(v.version))
    aliases = dict(client.get_registered_model(name).aliases or {})
    why = latest.tags.get("decision_reason") or "no reason recorded"
    lines = [f"model {name!r} has no version with alias {alias!r}.",
             f"The last registration, v{latest.version}, got {latest.tags.get('decision', 'no alias')!r}: {why}."]
    if aliases:
        others = ", ".join(f"@{a} (v{v})" for a, v in sorted(aliases.items()))
        lines.append(f"Aliases that exist: {others}; e.g. `covidcxr predict --model-uri models:/{name}@"
                     f"{sorted(aliases)[0]} FILE` (knowing why it is not the champion).")
    if latest.tags.get("audit_status") == "fail":
        lines.append("To accept a model whose shortcut audit failed as champion, knowingly: "
                     "`dvc exp run -S register.allow_failed_audit=true`.")
    return " ".join(lines)


def _retries(text: str) -> int:
    """``pacs --retries``: a whole number, at least 0 (-1 made no request at all and called the PACS unreachable)."""
    return _whole_number(text, 0, "retries", "at least 0 retries")


def _seconds(text: str) -> float:
    """``--timeout`` (predict, calibrate-site, pacs), ``pacs --pacs-timeout``, ``--interval``: a number of seconds
    above 0 (a negative timeout reached socket.settimeout, a failed request; 0 made the socket non-blocking)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of seconds, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"more than 0 seconds, got {text}")
    return value


def _dicomweb_url(text: str) -> str:
    """``pacs --dicomweb-url``: an http(s) URL with a host. The error never repeats the value: it may hold a user and
    password (a URL without its scheme was a traceback quoting them)."""
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(text)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError("an http:// or https:// URL with a host (and a numeric port, if any), e.g. "
                                          "https://pacs.example.org/dicom-web (the value given is not repeated: it "
                                          "may hold credentials)")
    return text


#: `covidcxr pacs`'s exit status when another worker of the same PACS and scorer holds the lock (EX_TEMPFAIL).
PACS_BUSY = 75


def _lock_key(url: str) -> str:
    """``url`` as the PACS or scorer it reaches, for the lock's key: without credentials (the scheme and host
    lowercased, by :func:`~covidcxr.tracking.public_uri`), a default port, a trailing ``/`` or ``/invocations`` (the
    scorer's endpoint, which ``serving.remote_scorer`` adds when missing); a model URI as it is, less a final ``/``."""
    import urllib.parse

    from covidcxr.tracking import public_uri

    parts = urllib.parse.urlsplit(public_uri(url))
    if parts.scheme not in ("http", "https"):
        return public_uri(url).rstrip("/")
    netloc = parts.netloc.removesuffix({"http": ":80", "https": ":443"}[parts.scheme])
    path = parts.path.rstrip("/").removesuffix("/invocations").rstrip("/")
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, "", ""))


def _pacs_lock_path(dicomweb_url: str, scorer: str) -> Path:
    """``pacs --lock-file``'s default: one file per PACS and scorer (a model URI or a server URL), keyed as the
    requests reach them (:func:`_lock_key`), in the temporary folder (``tempfile.gettempdir()``: $TMPDIR, else /tmp),
    which cron, a login shell and a systemd unit share (a session's $XDG_RUNTIME_DIR they do not); named by a hash,
    so no URL and no credentials are in the name."""
    import tempfile
    from pathlib import Path

    from covidcxr import pacs

    key = pacs.hashed(f"{_lock_key(dicomweb_url)} {_lock_key(scorer)}")
    return Path(tempfile.gettempdir()) / f"covidcxr-pacs-{key}.lock"


def _pacs(args: argparse.Namespace) -> int:
    """Score new CR/DX studies of a DICOMweb PACS and store SR + overlay results back, once or every --interval s."""
    import contextlib
    import warnings

    from covidcxr import pacs, sites

    _timestamped_logs()  # a long-running worker's lines need their time
    warnings.showwarning = _warning_without_text
    try:
        since = pacs.parse_since(args.since)
        site = sites.SiteThresholds.load(args.site) if args.site else None
    except ValueError as err:
        print(f"pacs: {err}", file=sys.stderr)
        return 2
    lock = args.lock_file or _pacs_lock_path(args.dicomweb_url, args.url or args.model_uri)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(pacs.worker_lock(lock))
        except pacs.WorkerBusy as err:
            print(f"pacs: {err}", file=sys.stderr)
            return PACS_BUSY
        except OSError as err:
            print(f"pacs: cannot open the lock file {lock} ({type(err).__name__}): give another with --lock-file",
                  file=sys.stderr)
            return 2
        return _pacs_passes(args, since, site)


def _pacs_passes(args: argparse.Namespace, since: dt.date | None, site: Site | None) -> int:
    """The worker's passes, once or every --interval s, under the lock :func:`_pacs` holds."""
    import logging
    import os
    import time

    from mlflow.exceptions import MlflowException

    from covidcxr import pacs, serving, sites

    log = logging.getLogger("covidcxr.pacs")
    model_name = args.model_name or _registered_name(args.model_uri)
    try:
        client = pacs.DicomWeb(args.dicomweb_url, user=os.environ.get(pacs.USER_ENV),
                               password=os.environ.get(pacs.PASSWORD_ENV), timeout=args.pacs_timeout,
                               retries=args.retries, ca_bundle=args.pacs_ca_bundle)
    except pacs.PacsError as err:
        print(f"pacs: {err}", file=sys.stderr)
        return 2
    try:
        served = _scorer(args.model_uri, args.url, args.timeout)
    except Exception as err:  # noqa: BLE001 - one line naming the model, not a traceback
        print(f"pacs: cannot load {args.model_uri}: {type(err).__name__}", file=sys.stderr)
        return 1
    try:
        locked = site is not None and _applies_a_site(served)  # it would refuse every request carrying --site's
    except Exception:  # noqa: BLE001 - an unreachable scorer: the pass below reports it
        locked = False
    if locked:
        print(f"pacs: the model already answers at a site's thresholds (${sites.ENV} on the server): leave out --site",
              file=sys.stderr)
        return 2

    def score(images: list[str], params: dict) -> list[dict]:  # the site's thresholds on every request
        return served(images, {**params, **(site.params() if site else {})})

    status = 0
    failures: dict[str, int] = {}  # consecutive failed passes of each study (hashed id), kept while this process runs
    while True:
        try:
            summary = pacs.run(client, score, model_name, since=since, batch_size=args.batch_size, site=site,
                               failures=failures)
            print(json.dumps(summary.to_dict(), sort_keys=True), flush=True)
            status = 1 if summary.failed_studies else 0
        except (pacs.PacsError, pacs.ModelChanged, sites.SiteFileError) as err:
            log.error("%s", err)
            status = 1
        except serving.ScoringError as err:  # the server's text is left out: it could quote a request
            log.error("scoring failed: %s answered HTTP %d", err.endpoint, err.status)
            status = 1
        except MlflowException as err:  # the model here refused or failed the probe
            log.error("scoring failed: %s (%s)", type(err).__name__, err.error_code)
            status = 1
        except OSError as err:  # the scoring server unreachable
            log.error("scoring failed: %s", type(err).__name__)
            status = 1
        except Exception as err:  # noqa: BLE001 - anything else: this pass fails, an --interval worker goes on
            log.error("the pass failed: %s (the next pass tries again)", type(err).__name__)
            status = 1
        if args.interval is None:
            return status
        time.sleep(args.interval)


def _timestamped_logs() -> None:
    """Each log line to stderr opens with its time: the format of the handler :func:`covidcxr.runtime.configure` set
    up (logging.basicConfig's: a plain StreamHandler; its level and filters are kept), which a second basicConfig
    would not change. Other handlers (a test's capture) keep their own."""
    import logging

    stamped = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:
            handler.setFormatter(stamped)


def _warning_without_text(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings reach the log as their category and origin only: pydicom's quote header values."""
    import logging
    from pathlib import Path

    logging.getLogger("covidcxr.pacs").warning("%s from %s (text withheld: it may quote the image header)",
                                               category.__name__, Path(filename).name)


def _tracking_uri(uri: str | None = None) -> str:
    """``uri``, else $MLFLOW_TRACKING_URI, else the project's ``sqlite:///mlflow.db``: where commands find MLflow."""
    import os

    return uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def _model_rule(model_uri: str, version: object, model_name: str | None = None) -> dict:
    """The threshold rule saved with the classifier of ``model_uri``'s model at ``version`` (its ``threshold.json``:
    objective, min_sensitivity), read from the registry (of the registered model ``model_name``, the one that answered,
    else the one a ``models:/`` URI names); RuntimeError saying why when it cannot be read."""
    import tempfile
    from pathlib import Path

    import mlflow

    mlflow.set_tracking_uri(_tracking_uri())
    base = (f"models:/{model_name or _registered_name(model_uri)}/{version}" if model_uri.startswith("models:/")
            else model_uri.rstrip("/"))
    uri = f"{base}/artifacts/classifier/threshold.json"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return json.loads(Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)).read_text())
    except Exception as err:  # noqa: BLE001 - any failure to read it is reported, with the way round it
        raise RuntimeError(f"the model's threshold rule cannot be read from {uri} ({type(err).__name__}): give "
                           "--objective and --min-sensitivity") from None


def _too_few_for_the_rule(args: argparse.Namespace, films: Sequence[LabelledFilm]) -> str | None:
    """Why the labelled ``films`` cannot meet the threshold rule even if the model answers every one, when the rule is
    known before scoring (:func:`_rule_before_scoring`); None when they may, or only the answering model can say.
    The films it answers are at most those labelled, and fewer COVID-19 films never promise more (``sites.site_rule``):
    refusing here spares loading the model and scoring every film only to refuse."""
    import numpy as np

    from covidcxr import sites

    rule = _rule_before_scoring(args)
    if rule is None or rule["objective"] != "sensitivity" or rule["min_sensitivity"] is None:
        return None
    y = np.array([int(film.covid) for film in films], dtype=int)
    by_patient = films[0].patient is not None
    patients = np.array([film.patient for film in films], dtype=str) if by_patient else None
    # a film is listed once (sites.read_labels refuses a second row): without patients, its COVID-19 films count
    n_covid, unit = (sites.covid_patients(y, patients), "patients") if by_patient else (int(y.sum()), "films")
    try:
        sites.site_rule(n_covid, rule["min_sensitivity"], unit)
    except ValueError as err:
        return f"{err} (the threshold rule on the {n_covid} COVID-19 {unit} of {args.labels}; nothing was scored)"
    return None


def _rule_before_scoring(args: argparse.Namespace) -> dict | None:
    """The rule :func:`_site_rule` will apply, read before any film is scored: the flags' alone, or the registered
    version's that a local ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` names (the version loaded to score);
    None when only the answering model can say (a server, another URI) or the registry cannot be read here (the rule
    is then read after scoring, with its own errors)."""
    flags = _flag_rule(args)
    if flags is not None:
        return flags
    parsed = _models_uri(args.model_uri)
    if args.url or parsed is None or (parsed.alias is None and parsed.version is None):
        return None
    try:
        import mlflow

        mlflow.set_tracking_uri(_tracking_uri())
        version = parsed.version
        if parsed.alias is not None:
            version = mlflow.MlflowClient().get_model_version_by_alias(parsed.name, parsed.alias).version
        return _model_rule_with_flags(args, _model_rule(args.model_uri, version))[0]
    except Exception:  # noqa: BLE001 - no early answer; scoring and the usual reading say what is wrong
        return None


def _given_flags(args: argparse.Namespace) -> dict:
    """The rule's flags the user gave (``objective``, ``min_sensitivity``), without those left out."""
    return {k: v for k, v in (("objective", args.objective), ("min_sensitivity", args.min_sensitivity))
            if v is not None}


def _flag_rule(args: argparse.Namespace) -> dict | None:
    """The rule the flags give whole (``--objective`` other than sensitivity, or ``--min-sensitivity``, which implies
    the sensitivity objective); None when the model's own rule is needed."""
    given = _given_flags(args)
    if given.get("min_sensitivity") is not None:
        given.setdefault("objective", "sensitivity")
    if given.get("objective", "sensitivity") != "sensitivity" or len(given) == 2:
        return {"objective": given["objective"], "min_sensitivity": given.get("min_sensitivity")}
    return None


def _site_rule(args: argparse.Namespace, version: object, threshold: object,
               model_name: str | None = None) -> tuple[dict, str]:
    """The rule a site's threshold is chosen by, and whose it is: the answering model's own (``model``), unless the
    flags give it (``flags``), or replace part of it (``model and flags``). ``--min-sensitivity`` alone means the
    sensitivity objective; ``--objective sensitivity`` over a model trained by another rule needs it. The rule is read
    for the model that answered: registered as ``model_name`` (a server's own, whatever ``--model-uri`` names; the
    URI's name when the model reports none) at ``version``, and must be of the model that answered at ``threshold``."""
    flags = _flag_rule(args)
    if flags is not None:
        return flags, "flags"
    saved = _model_rule(args.model_uri, version, model_name)
    if saved.get("threshold") != threshold:
        raise RuntimeError(f"the threshold rule read for version {version} of {model_name or args.model_uri} is "
                           f"another model's (its threshold {saved.get('threshold')}, the model answering "
                           f"{threshold}): name the served model with --model-uri (or point MLFLOW_TRACKING_URI at "
                           "the registry it was registered in), or give --objective and --min-sensitivity")
    return _model_rule_with_flags(args, saved)


def _model_rule_with_flags(args: argparse.Namespace, saved: dict) -> tuple[dict, str]:
    """The model's ``saved`` rule with the flags given over it, and whose it is (``model`` or ``model and flags``)."""
    given = _given_flags(args)
    rule = {"objective": saved.get("objective"), "min_sensitivity": saved.get("min_sensitivity"), **given}
    if rule["objective"] is None:
        raise RuntimeError("the model's threshold does not say by which rule it was chosen: give --objective and "
                           "--min-sensitivity")
    if rule["objective"] == "sensitivity" and rule["min_sensitivity"] is None:
        raise RuntimeError(f"the sensitivity objective needs a target: give --min-sensitivity (the model's own rule, "
                           f"{saved.get('objective')}, has none)")
    return rule, "model and flags" if given else "model"


class _ModelsUri(NamedTuple):
    """A ``models:/`` URI's parts: the registered model's NAME, and the ALIAS or VERSION it names (None when it names
    neither: ``models:/NAME``, ``models:/NAME/latest``, a stage)."""

    name: str
    alias: str | None
    version: str | None


def _models_uri(model_uri: str) -> _ModelsUri | None:
    """The parts of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (VERSION all digits), or of another
    ``models:/NAME...`` (NAME only: up to its first ``@`` or ``/``); None for any other URI (another scheme, a path,
    no NAME). The one reading of a models:/ URI here."""
    match = re.fullmatch(r"models:/([^@/]+)(.*)", model_uri, flags=re.DOTALL)
    if match is None:
        return None
    name, rest = match.groups()
    alias = re.fullmatch(r"@([^/]+)", rest)
    version = re.fullmatch(r"/(\d+)", rest)
    return _ModelsUri(name, alias[1] if alias else None, version[1] if version else None)


def _registered_name(model_uri: str) -> str:
    """NAME of ``models:/NAME@alias`` or ``models:/NAME/version`` (:func:`_models_uri`); ``covidcxr`` for any other
    URI."""
    parsed = _models_uri(model_uri)
    return parsed.name if parsed is not None else "covidcxr"


def _tune(args: argparse.Namespace) -> int:
    """One Optuna worker of a U-Net study (shared when the storage is): ``tuning.tune_unet``, as the tune_unet stage."""
    import os
    import random
    from pathlib import Path

    from covidcxr import tuning

    url = args.storage or os.environ.get(tuning.STORAGE_ENV)
    if not url:
        print(f"tune: no --storage and no ${tuning.STORAGE_ENV}", file=sys.stderr)
        return 2
    try:
        config = _read_tune_config(args.config) if args.config else None
        data = tuning.load_unet_data(args.cache_dir, args.split)
    except (OSError, ValueError, KeyError) as err:  # no such file, not a cache, a table without its columns or ids
        print(f"tune: {err.args[0] if isinstance(err, KeyError) and err.args else err}", file=sys.stderr)
        return 2
    # A shared study needs a different sampler seed in every worker (pids repeat across containers).
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"tune: sampler seed {seed} (each trial's MLflow run is tagged sampler_seed)", file=sys.stderr)
    tracking = None if args.no_tracking else tuning.Tracking(
        experiment=args.experiment, run_name=f"tune-unet-{args.study}",
        tracking_uri=_tracking_uri(args.tracking_uri))
    try:
        result, _ = tuning.tune_unet(args.study, url, data, config=config, n_trials=args.n_trials, seed=seed,
                                     tracking=tracking)
    except (tuning.StudyMissing, tuning.NoCompletedTrial, tuning.StudyNotReady, tuning.StorageUnavailable) as err:
        print(f"tune: {err.args[0] if err.args else err}", file=sys.stderr)
        return 1
    except tuning.StudyRefused as err:  # a storage or study this worker cannot use: other data, a configuration refused
        named = str(err) if f"study {args.study!r}" in str(err) else f"study {args.study!r}: {err}"
        print(f"tune: {named}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


def _trial_count(text: str) -> int:
    """``tune --n-trials``: a whole number of trials, at least 0 (0: only export the best of a study that exists)."""
    return _whole_number(text, 0, "trials", "at least 0 trials")


def _read_tune_config(path: str) -> dict:
    """A U-Net study configuration from a YAML file: its ``tune_unet`` section when it has one (a params.yaml),
    validated (``tuning.unet_config``) before any storage is opened."""
    from pathlib import Path

    import yaml

    from covidcxr import tuning

    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"--config {path}: not YAML ({type(err).__name__})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} holds no mapping")
    config = values.get("tune_unet", values)
    if not isinstance(config, dict):
        raise ValueError(f"--config {path}: its tune_unet section holds no mapping")
    try:
        tuning.unet_config(config)
    except (ValueError, TypeError) as err:  # TypeError: a value of the wrong kind (epochs: null)
        raise ValueError(f"--config {path}: {err}") from None
    return config


#: Exit statuses of `covidcxr monitor` (0: no significant drift): drift, could not run, could not measure (too few
#: records in the window)
MONITOR_DRIFT, MONITOR_ERROR, MONITOR_UNMEASURED = 1, 2, 3


def _monitor(args: argparse.Namespace) -> int:
    """Compare a window of the prediction log with the model version's drift reference; write the HTML report, log it
    to MLflow, exit 1 on significant drift, 3 when the window holds too few records to measure (2 when it cannot
    run)."""
    import os
    from pathlib import Path

    from covidcxr import dburl, monitoring, predlog

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one JSON line out, no progress bars
    try:
        since, until = monitoring.parse_time(args.since), monitoring.parse_time(args.until)
        if not (args.reference and args.no_mlflow):
            import mlflow

            mlflow.set_tracking_uri(_tracking_uri(args.tracking_uri))
        if args.reference:
            reference = monitoring.Reference.load(args.reference)
            version = str(args.version or reference.meta.get("model_version", "unregistered"))
        else:
            reference, version = monitoring.fetch_reference(args.model, args.version,
                                                            None if args.version else args.alias)
        reference.check_model(args.model, version, args.reference or f"the reference of {args.model} v{version} "
                                                                     f"({monitoring.REFERENCE_ARTIFACT})")
        url = _monitored_log(args, version)
        window = predlog.read(url, model_name=args.model, model_version=version, since=since, until=until)
        drift = monitoring.compare(reference.frame, window, ood_threshold=reference.meta.get("ood_threshold"),
                                   ood_action=reference.meta.get("ood_action"), alpha=args.alpha,
                                   permutations=args.permutations, min_records=args.min_records)
        out = Path(args.out or f"reports/monitor/{args.model}-v{version}.html")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(monitoring.render(drift, model_name=args.model, model_version=version, since=since, until=until,
                                         log_url=url, reference_meta=reference.meta, reference=reference.frame,
                                         window=window), encoding="utf-8")
        summary = {"model_name": args.model, "model_version": version, "since": since and since.isoformat(),
                   "until": until and until.isoformat(), "report": str(out), **drift.to_dict()}
        out.with_suffix(".json").write_text(json.dumps(summary, indent=2, sort_keys=True, allow_nan=False) + "\n",
                                            encoding="utf-8")
        if not args.no_mlflow:
            params = {"since": summary["since"], "until": summary["until"], "alpha": args.alpha,
                      "permutations": args.permutations, "prediction_log": dburl.shown_url(url)}
            summary["mlflow_run_id"] = monitoring.log_to_mlflow(
                drift, [out, out.with_suffix(".json")], model_name=args.model, model_version=version, params=params)
    except (ValueError, monitoring.MonitorError, predlog.PredictionLogError) as err:
        print(f"monitor: {err}", file=sys.stderr)
        return MONITOR_ERROR
    except Exception as err:  # noqa: BLE001 - the tracking server or registry failed: one line, no credentials
        import logging

        logging.getLogger("covidcxr.monitor").debug("monitor failed", exc_info=True)
        print(f"monitor: failed ({type(err).__name__}; -v shows the traceback)", file=sys.stderr)
        return MONITOR_ERROR
    failed = [t.name for t in drift.tests if t.drift]
    print(json.dumps({k: summary[k] for k in ("model_name", "model_version", "status", "n_window", "report")}
                     | {"drifted_tests": failed}, sort_keys=True))
    if drift.status == "insufficient_data":
        return MONITOR_UNMEASURED
    return MONITOR_DRIFT if drift.drifted else 0


def _monitored_log(args: argparse.Namespace, version: str) -> str:
    """The prediction log `monitor` reads: ``--log``, else ``$COVIDCXR_PREDICTION_LOG``, else the one the registered
    model version writes to (its configuration's ``prediction_log``, ``register.prediction_log``, as serving reads
    it). ValueError when none is named, logging is off, or the URL holds a password."""
    import os

    from covidcxr import dburl, predlog

    if args.log:
        url, whose = args.log, "--log"
    elif os.environ.get(predlog.ENV, "").strip():
        url, whose = predlog.resolve_url(None), f"${predlog.ENV}"
        if url is None:
            raise ValueError(f"${predlog.ENV}={os.environ[predlog.ENV].strip()} turns the prediction log off: there "
                             "is no traffic to monitor; name the log with --log URL")
    elif args.reference:
        raise ValueError(f"with --reference, name the prediction log with --log URL or ${predlog.ENV} (the model's "
                         "own is read from the registry)")
    else:
        url, whose = _configured_log(args.model, version), f"{args.model} v{version}'s configuration"
        if url is None:
            raise ValueError(f"{args.model} v{version} keeps no prediction log (register.prediction_log is empty) and "
                             f"${predlog.ENV} names none: there is no traffic to monitor; name a log with --log URL")
    if dburl.has_password(url):
        raise ValueError(f"{whose}: the prediction log URL {dburl.shown_url(url)} holds a password; give it in "
                         "PGPASSWORD or ~/.pgpass instead")
    return url


def _configured_log(name: str, version: str) -> str | None:
    """The prediction log URL saved in the configuration of registered model ``name`` at ``version`` (the pyfunc's
    ``config`` artifact); None when it keeps none. MonitorError when the configuration cannot be read."""
    import tempfile

    import mlflow

    from covidcxr import monitoring, serving  # serving imports no TensorFlow: monitor starts in seconds

    uri = f"models:/{name}/{version}"
    try:
        artifact = mlflow.models.get_model_info(uri).flavors["python_function"]["artifacts"][serving.CONFIG_ARTIFACT]
        with tempfile.TemporaryDirectory() as tmp:
            config = serving.Config.load(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/{artifact['path']}",
                                                                             dst_path=tmp))
    except Exception as err:  # noqa: BLE001 - any failure: said with the way round it
        raise monitoring.MonitorError(f"{name} v{version}: its configured prediction log cannot be read from {uri} "
                                      f"({type(err).__name__}): name the log with --log URL") from None
    return config.prediction_log


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covidcxr", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="also the logs of TensorFlow and other libraries")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo-data", help="write the deterministic synthetic demo dataset (DICOM phantoms + masks)")
    demo.add_argument("out_dir", help="folder to write, e.g. data/demo (must be empty or a previous demo output)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (the committed data.dvc matches seed 0)")
    demo.set_defaults(func=_demo_data)

    inspect = sub.add_parser("inspect", help="read image files as the pipeline does and print their header and range")
    inspect.add_argument("files", nargs="+", help="DICOM, PNG, JPEG or JSRT .IMG files")
    inspect.set_defaults(func=_inspect)

    predict = sub.add_parser("predict", help="score image files with the registered model (here, or on a server)")
    predict.add_argument("files", nargs="+", help="DICOM, PNG or JPEG files")
    predict.add_argument("--model-uri", default="models:/covidcxr@champion", help="MLflow model URI (local scoring)")
    predict.add_argument("--url", help="a running `mlflow models serve` (e.g. http://127.0.0.1:5000) instead")
    predict.add_argument("--explain", action="store_true", help="also write Grad-CAM overlays to --gradcam-dir")
    predict.add_argument("--gradcam-dir", default="gradcam", help="folder for the overlays (default: gradcam)")
    predict.add_argument("--threshold", type=float, help="decision threshold instead of the model's operating one")
    predict.add_argument("--site", help="a site's thresholds (`calibrate-site --output`): its threshold and, when it "
                                        "admitted its films, its OOD threshold; --threshold/--ood-threshold override; "
                                        "an error when the model answering is not the one (registered name and "
                                        "version) they were chosen on")
    predict.add_argument("--ood-threshold", type=float,
                         help="out-of-distribution threshold instead of the model's (a site's, from calibrate-site "
                              "--admit)")
    predict.add_argument("--batch-size", type=_batch_size, default=8, help="images per request (default: 8)")
    predict.add_argument("--timeout", type=_seconds, default=120.0, help="seconds to wait for the server (--url)")
    predict.set_defaults(func=_predict)
    site = sub.add_parser("calibrate-site", help="a new site's own threshold: the model's rule on its labelled films")
    site.add_argument("labels", help="CSV with columns file (relative to the CSV's folder), label (covid or "
                                     "negative) and, optionally, patient (the site's own key, the same on every film "
                                     "of one patient): at least 10 answered films of each label; a sensitivity target "
                                     "of 0.95 takes 19 COVID-19 patients (n promise at most n / (n + 1)); without the "
                                     "patient column the promise counts films and assumes one film per patient")
    site.add_argument("--model-uri", default="models:/covidcxr@champion", help="MLflow model URI (local scoring)")
    site.add_argument("--url", help="a running `mlflow models serve` (e.g. http://127.0.0.1:5000) instead")
    site.add_argument("--objective", type=_objective,
                      help="the threshold rule: sensitivity, youden or f1 (default: the model's own, saved with "
                           "its classifier: train_classifier.threshold_objective)")
    site.add_argument("--min-sensitivity", type=float,
                      help="the sensitivity objective's minimum (default: the model's own, "
                           "train_classifier.min_sensitivity)")
    site.add_argument("--admit", action="store_true",
                      help="admit the films the model refuses as out of distribution: the site's own OOD threshold "
                           "(the highest OOD score of its films), and those films join the threshold's choice")
    site.add_argument("--output", help="also write the JSON here")
    site.add_argument("--log", metavar="SITE", help="log the calibration to MLflow under this site's name (experiment "
                      "covidcxr-sites) and tag the registered model version with site.SITE.threshold, "
                      "site.SITE.ood_threshold and site.SITE.run_id")
    site.add_argument("--batch-size", type=_batch_size, default=8, help="images per request (default: 8)")
    site.add_argument("--timeout", type=_seconds, default=120.0, help="seconds to wait for the server (--url)")
    site.set_defaults(func=_calibrate_site)
    worker = sub.add_parser("pacs", help="score new CR/DX studies of a DICOMweb PACS; store SR + overlay back")
    worker.add_argument("--dicomweb-url", required=True, type=_dicomweb_url, help="DICOMweb root (QIDO/WADO/STOW), "
                        "e.g. https://pacs.example.org/dicom-web; basic auth from $COVIDCXR_PACS_USER/_PASSWORD")
    worker.add_argument("--model-uri", default="models:/covidcxr@champion", help="MLflow model URI (local scoring)")
    worker.add_argument("--url", help="a running `mlflow models serve` (e.g. http://127.0.0.1:5000) instead")
    worker.add_argument("--model-name", help="model name written into the results for a model that does not report "
                        "its own (one served before entries carried model_name; default: NAME of --model-uri "
                        "models:/NAME@alias, else covidcxr)")
    worker.add_argument("--since", help="only studies from this study date on: YYYY-MM-DD, YYYYMMDD or Nd (N days "
                        "back, for schedules)")
    when = worker.add_mutually_exclusive_group()
    when.add_argument("--once", action="store_true", help="one pass, then exit (the default; for cron or timers)")
    when.add_argument("--interval", type=_seconds, help="run a pass every INTERVAL seconds until stopped")
    worker.add_argument("--site", help="the site's thresholds (`calibrate-site --output`) on every image, instead of "
                                       "the model's: the results record the threshold that decided; nothing is scored "
                                       "when the model answering is not the one (registered name and version) they "
                                       "were chosen on")
    worker.add_argument("--batch-size", type=_batch_size, default=8,
                        help="images per scoring request (default: 8; at most the model's own limit, max_images)")
    worker.add_argument("--timeout", type=_seconds, default=120.0, help="seconds to wait for the server (--url)")
    worker.add_argument("--pacs-timeout", type=_seconds, default=30.0,
                        help="seconds the PACS may keep silent: to connect, and between two reads of an answer (not "
                             "for the whole answer; default: 30)")
    worker.add_argument("--pacs-ca-bundle", metavar="PEM",
                        help="certificate authorities to trust for an https PACS (a hospital's own CA); the "
                             "environment's REQUESTS_CA_BUNDLE and proxies are never read")
    worker.add_argument("--retries", type=_retries, default=3,
                        help="retries of a failed PACS request, waiting 1, 2, 4... s (default: 3)")
    worker.add_argument("--lock-file", help="held while the worker runs: another worker of the same lock exits 75 at "
                        "once (default: one per PACS and scorer in the temporary folder, $TMPDIR else /tmp: the "
                        "workers of one PACS must share TMPDIR, or all pass the same --lock-file)")
    worker.set_defaults(func=_pacs)
    tune = sub.add_parser("tune", help="run one Optuna worker of the U-Net study (start several on one shared storage)")
    tune.add_argument("--study", required=True, help="study name (the tune_unet stage's is tune_unet.study)")
    tune.add_argument("--storage", help="SQLAlchemy URL, e.g. postgresql+psycopg2://optuna@db-host/optuna (password in "
                      "PGPASSWORD or ~/.pgpass); default: $COVIDCXR_OPTUNA_STORAGE")
    tune.add_argument("--cache-dir", required=True, help="working-size image cache, e.g. artifacts/cache (dvc pull)")
    tune.add_argument("--split", required=True, help="segmentation split table, e.g. artifacts/splits/segmentation.csv")
    tune.add_argument("--config", help="YAML with the configuration of a NEW study (its tune_unet section, e.g. "
                      "params.yaml); without it the study must exist, and an existing study keeps its own")
    tune.add_argument("--n-trials", type=_trial_count, default=1,
                      help="trials this worker runs (0: only tag and print the best)")
    tune.add_argument("--seed", type=int, help="this worker's sampler seed (default: a fresh one per worker)")
    tune.add_argument("--experiment", default="covidcxr-tuning",
                      help="MLflow experiment of a new study's run (joiners log under the study's own run)")
    tune.add_argument("--tracking-uri",
                      help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    tune.add_argument("--no-tracking", action="store_true", help="do not log trials to MLflow")
    tune.add_argument("--out", help="also write the summary JSON (best parameters) to this file")
    tune.set_defaults(func=_tune)
    monitor = sub.add_parser("monitor", help="drift report of a window of the prediction log against the model's "
                             "reference; exit 1 on significant drift, 2 when it cannot run, 3 when it could not "
                             "measure (too few records in the window) (for schedulers)")
    monitor.add_argument("--model", default="covidcxr", help="registered model name (default: covidcxr)")
    which = monitor.add_mutually_exclusive_group()
    which.add_argument("--version", help="model version whose traffic and reference to compare")
    which.add_argument("--alias", default="champion", help="or the version an alias points at (default: champion)")
    monitor.add_argument("--since", default="7d", help="window start: Nd, Nh, Nm back, or an ISO date/time in UTC "
                         "(default: 7d)")
    monitor.add_argument("--until", help="window end (exclusive), same forms (default: now)")
    monitor.add_argument("--log", help="prediction log URL (default: $COVIDCXR_PREDICTION_LOG, else the one the "
                         "registered model version writes to, register.prediction_log; a sqlite path is relative to "
                         "where this runs; PostgreSQL password from PGPASSWORD, never the URL)")
    monitor.add_argument("--reference", help="a reference.json instead of the one logged at register (offline)")
    monitor.add_argument("--alpha", type=float, default=0.05, help="family-wise significance level (default: 0.05)")
    monitor.add_argument("--permutations", type=int, default=1000, help="MMD permutations (default: 1000)")
    monitor.add_argument("--min-records", type=int, default=20,
                         help="fewer records in the window: insufficient data, exit 3 (default: 20)")
    monitor.add_argument("--out", help="HTML report path (default: reports/monitor/NAME-vVERSION.html; a .json "
                         "summary beside it)")
    monitor.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                         "sqlite:///mlflow.db)")
    monitor.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    monitor.set_defaults(func=_monitor)
    for command in sub.choices.values():  # `-v` after the command works too
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="also the logs of TensorFlow and other libraries")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from covidcxr import runtime

    runtime.configure(verbose=args.verbose)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
