"""What every stage shares: validated params, where files go, stable JSON and atomic writes, tracking setup.

Stages read params only through :func:`params` (validated by ``pipelines._params`` before any work) and find each
other's outputs only through the paths below; they never import one another.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import yaml

from covidcxr import runtime
from pipelines import _params

PROJECT = Path(__file__).resolve().parent.parent
PARAMS_FILE = "params.yaml"
_UMASK = os.umask(0)
os.umask(_UMASK)


def finish() -> NoReturn:
    """End a stage's process once its work is done and written: Python's exit handlers run (logging, MLflow, worker
    pools), then the process exits without the interpreter's teardown of TensorFlow and the rest, which took 1 to 2 s
    in every stage (0.9 s for a bare ``import tensorflow``; a real-data experiment starts about 45 stage processes).
    Every output is closed by then; a stage that fails raises before it and exits the usual way."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --- where the stages' outputs live (the one place that decides it) ---------------------------------------------------

MANIFEST = "artifacts/manifest.csv"
SPLITS_DIR = "artifacts/splits"
CACHE_DIR = "artifacts/cache"
PROJECTION_CACHE_DIR = "artifacts/cache_projection"  # the projection filter's, at train_projection.size
FRONTAL = "artifacts/frontal.csv"
MASKS_DIR = "artifacts/masks"
MASKS, MASKS_INDEX = f"{MASKS_DIR}/masks.npy", f"{MASKS_DIR}/index.csv"
MODELS_DIR = "artifacts/models"
PROJECTION_MODEL, UNET_MODEL = f"{MODELS_DIR}/projection", f"{MODELS_DIR}/unet"
TUNED_UNET = "artifacts/tune/unet.json"
PRETRAIN_DIR = "artifacts/pretrain"  # the pretrain stage's encoders, one per backbone
PREDICTIONS = "predictions.csv"  # beside each classifier's model files
#: Beside each classifier's ``predictions.csv``: the films of its split that serving refuses before the classifier
#: (its columns but the scores, and ``reason``), which `evaluate` counts in what serving answers.
REFUSED = "refused.csv"
EVALUATE_DIR = Path("reports/evaluate")
EXPLAIN_METRICS = Path("reports/explain/metrics.json")
AUDIT_REPORT = Path("reports/audit/audit.json")
FRONTAL_REPORT = Path("reports/filter_frontal/metrics.json")  # with the projection filter run it applied
SEGMENT_REPORT = Path("reports/segment/metrics.json")  # with the U-Net run and the mask rules it applied
REGISTERED = Path("reports/register/registered.json")


def model_dir(variant: str, backbone: str) -> str:
    """The model folder of the classifier of ``variant`` and ``backbone``."""
    return f"{MODELS_DIR}/classifier_{variant}_{backbone}"


def pretrained_encoder(backbone: str) -> str:
    """The encoder weights file the pretrain stage writes for ``backbone`` (vgg16, vgg19)."""
    return f"{PRETRAIN_DIR}/encoder_{backbone}.weights.h5"


def split_table(task: str) -> str:
    """The split table of a task (covid, projection, segmentation)."""
    return f"{SPLITS_DIR}/{task}.csv"


ParamsError = _params.ParamsError  # what a stage raises, before any work, for params it cannot use


def params(key: str, path: str | os.PathLike = PARAMS_FILE):
    """A validated section of ``params.yaml`` (``"segment"``), defaults filled in, or one key of it
    (``"split.experiment"``). Declare what a stage reads here in its ``params`` in dvc.yaml (a test checks)."""
    section, _, name = key.partition(".")
    with open(path, encoding="utf-8") as fh:
        everything = yaml.safe_load(fh) or {}
    if section not in everything:
        raise ParamsError(f"{path} has no '{section}' section")
    values = _params.validate(section, everything[section], source=str(path))
    if not name:
        return values
    if name not in values:
        raise ParamsError(f"{path}: {section} has no key {name!r}")
    return values[name]


def setup_logging() -> logging.Logger:
    """INFO logging to stderr for a stage; third-party noise only with ``-v`` or ``COVIDCXR_VERBOSE=1``."""
    runtime.configure(verbose=runtime.verbose_requested())
    return logging.getLogger("covidcxr.pipelines")


def show_progress() -> bool:
    """Progress bars only on a terminal."""
    import sys

    return sys.stderr.isatty()


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it into place only if the block finishes.

    A stage killed half way thus never leaves a partial output that DVC could take as valid.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the user's usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder beside ``path`` to build a directory output in; it replaces ``path`` only if the block
    finishes.

    A stage killed half way leaves at most a hidden ``.<name>.*.tmp`` sibling, never a partial ``path`` that DVC could
    take as valid; the next run of the stage removes such leftovers before it starts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700 folders; outputs get the user's usual mode
        old = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        if path.is_dir() and not path.is_symlink():
            os.rename(path, old)  # a folder cannot be renamed over a non-empty one: move the old one aside first
        elif path.exists() or path.is_symlink():
            path.unlink()
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_leftovers(path: Path) -> None:
    """Remove the temporary siblings of ``path`` (``.<name>.<8 chars>.tmp``) that a killed run left behind.

    Safe because one stage at a time writes a given output (DVC locks the repository).
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    for stale in path.parent.iterdir():
        if not pattern.fullmatch(stale.name):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def write_with(path: str | os.PathLike, writer: Callable[[Path], object]) -> Path:
    """Write ``path`` atomically with ``writer(tmp_path)``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_json(path: str | os.PathLike, data: object) -> Path:
    """Stable, diffable JSON (sorted keys, fixed indent, trailing newline), written atomically."""
    text = json.dumps(_finite(data), indent=2, sort_keys=True, ensure_ascii=False, default=_jsonable) + "\n"
    return write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_csv(path: str | os.PathLike, frame) -> Path:
    """A DataFrame as CSV without the index, written atomically."""
    return write_with(path, lambda tmp: frame.to_csv(tmp, index=False, lineterminator="\n"))


def save_npy(path: str | os.PathLike, array) -> Path:
    """A numpy array as .npy, written atomically."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    return write_with(path, write)


def _finite(value: object) -> object:
    """NaN and infinities become null: strict JSON readers (DVC, browsers) reject them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return _finite(value.item())
    return value


def _jsonable(value: object) -> object:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return value.as_posix()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_report(path: str | os.PathLike, made_by: str, error: type[ValueError] = ValueError) -> object:
    """A stage's JSON report; a missing one names the stage that writes it, a malformed one raises ``error``."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; run the {made_by} stage first (dvc repro {made_by})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err})") from None


def made_with(path: str | os.PathLike, made_by: str, run_id: object, *, key: str, model: str, verb: str,
              product: str, holder: str, recorded_in: str, rerun: str,
              rules: Mapping[str, tuple[object, str]] | None = None, error: type[ValueError] = ValueError) -> dict:
    """``made_by``'s JSON report at ``path``, when what it records having used is what is used now: its ``key`` is
    the ``model`` run ``run_id`` (the weights a later stage bundles or describes), and each of its ``rules`` (name:
    (the value used now, where that value is stated)) has that value. The one rule by which `register` and
    `model_card` refuse to ship or card anything made with other weights or rules than theirs (a model retrained, or
    params changed, since the report's stage ran: ``dvc repro -s register`` after one of them).

    ``verb`` says what the report's stage did with the weights ("measured", "applied"), ``product`` what it made of
    them ("figures", "masks"); ``holder`` says, as a clause, who holds the weights ("artifacts/models/unet holds",
    "covidcxr v1 bundles"); ``recorded_in`` where its run id is recorded; ``rerun`` what to run again. ``error`` (a
    ValueError) naming the report and both values when they differ, or naming what does not record its value (written
    before it was recorded: what the report is of cannot be checked, so it is refused)."""
    path = Path(path)
    report = read_report(path, made_by, error)
    if not isinstance(report, dict):
        raise error(f"{path}: not {'an' if made_by[:1] in 'aeiou' else 'a'} {made_by} report (not a JSON object); "
                    f"rerun {rerun}")
    used = report.get(key)
    if used is None or run_id is None:
        unknown = [f"{path} ({key}) does not say which {model} run it is of (written before {made_by} recorded "
                   "it)"] if used is None else []
        if run_id is None:
            unknown.append(f"{recorded_in} does not say which {model} run {holder} (written before that was "
                           "recorded)")
        check = (f"a report that does not say which weights it {verb} cannot be checked against those {holder} "
                 f"(run {run_id if run_id is not None else 'not recorded'})" if used is None else
                 f"{product} of run {used} cannot be checked against weights of no recorded run")
        raise error(f"{'; '.join(unknown)}: {check}; rerun {rerun}")
    if used != run_id:
        raise error(f"{path} {verb} the weights of run {used}, but {holder} those of run {run_id} (a {model} "
                    f"retrained since): its {product} are not of these weights; rerun {rerun}")
    for name, (value, stated_in) in (rules or {}).items():
        if name not in report:
            raise error(f"{path} ({name}) does not say which {name} {made_by} applied (written before it recorded "
                        f"it): its {product} cannot be checked against {stated_in} ({value!r}); rerun {rerun}")
        if report[name] != value:
            raise error(f"{path}: {made_by} applied {name} {report[name]!r}, but {stated_in} is {value!r} (changed "
                        f"since {made_by} ran): its {product} are not of the {name} served; rerun {rerun}")
    return report


def evaluation_of_weights(classifier: str, run_id: object, *, holder: str, recorded_in: str, rerun: str,
                          rules: Mapping[str, tuple[object, str]] | None = None,
                          error: type[ValueError] = ValueError) -> dict:
    """Evaluate's report of ``classifier`` (``reports/evaluate/<classifier>/metrics.json``), when it measured the
    weights of run ``run_id`` (its ``run_id``) under ``rules`` (its ``ood_action``, say): :func:`made_with`, by which
    `register` (the weights in the model folder) and `model_card` (the weights register bundled) check their figures,
    so that no figures of other weights (a classifier retrained since) are registered or carded."""
    return made_with(EVALUATE_DIR / classifier / "metrics.json", "evaluate", run_id, key="run_id", model="classifier",
                     verb="measured", product="figures", holder=holder, recorded_in=recorded_in, rerun=rerun,
                     rules=rules, error=error)


def mlflow_experiment(experiment: str) -> str:
    """One MLflow experiment per paper experiment (``split.experiment``)."""
    return f"covidcxr-{experiment}"


def filed_under(path: str | os.PathLike = PARAMS_FILE) -> str:
    """``split.experiment`` for a stage whose outputs do not depend on the selection (ingest, the projection filter,
    the U-Net and its tuning), which files its MLflow run under that experiment but does not declare it in dvc.yaml:
    a new selection must not rerun it. Only the run's name in MLflow comes from it; a run DVC restores from its run
    cache stays filed where it was made."""
    return params("split.experiment", path)
