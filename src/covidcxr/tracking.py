"""MLflow helpers: one experiment per paper experiment, one run per trained model, reproducibility tags.

Pure plumbing around the MLflow fluent API; callers (the pipeline stages) decide the store and what to log.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

# MLflow's own HTTP retries (its defaults: 7 retries, backoff factor 2, about 4 minutes before a dead server is
# reported) bounded to about half a minute; the environment overrides them. ensure_reachable uses the same two.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402

#: Distributions a logged Keras model needs; their versions are the installed ones (``pins``).
KERAS_MODEL_PACKAGES: tuple[str, ...] = ("tensorflow-cpu", "keras", "mlflow", "numpy", "pandas", "pillow", "pydicom",
                                         "scikit-learn")


def pins(names: Sequence[str]) -> list[str]:
    """``name==version`` of the installed distributions ``names``: the environment built from requirements.lock (the
    one source of pins), logged with every model so that ``mlflow models serve`` can rebuild it exactly."""
    from importlib import metadata

    out, missing = [], []
    for name in names:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise RuntimeError(f"not installed: {missing} (make setup installs requirements.lock)")
    return out


# `mlflow run` exports its run for the command; taken out of the environment so that fluent calls do not resume it.
_PARENT_RUN: str | None = os.environ.pop("MLFLOW_RUN_ID", None)


def flatten(params: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested params -> flat ``a.b.c`` keys with string values (MLflow params are flat, 6000 chars max)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """The current git commit, with ``-dirty`` when tracked files differ; ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def dvc_file_hash(path: str | os.PathLike) -> str:
    """The md5 a ``.dvc`` file records for its output (the data version), or ``unknown``."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            outs = (yaml.safe_load(fh) or {}).get("outs") or []
    except OSError:
        return "unknown"
    return str(outs[0].get("md5", "unknown")) if outs else "unknown"


class TrackingUnavailable(ConnectionError):
    """The MLflow tracking server cannot be reached; the message names the endpoint (never its credentials)."""


class ArtifactStoreUnavailable(TrackingUnavailable):
    """The artifact store (S3, or the tracking server proxying it) failed while artifacts were being logged."""


def public_uri(uri: str) -> str:
    """``uri`` without user, password, query or fragment: safe to print and log."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.netloc:
        return uri.split("?", 1)[0]
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return urllib.parse.urlunsplit((parts.scheme, f"{host}:{parts.port}" if parts.port else host, parts.path, "", ""))


def ensure_reachable(
    uri: str | None = None,
    *,
    retries: int | None = None,
    backoff: float | None = None,
    timeout: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Check that an http(s) tracking server answers before a run logs anything to it; returns the attempts made.

    Tries ``1 + retries`` times, waiting ``backoff * 2**i`` seconds after the i-th failure (defaults: MLflow's
    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` and ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``). Any HTTP answer below 500 means
    the server is up (401/403/404 included: MLflow reports those itself); refused or timed-out connections and 5xx
    answers are retried. Other stores (sqlite, files, databricks) are not checked. Raises TrackingUnavailable.
    """
    uri = uri or mlflow.get_tracking_uri()
    if urllib.parse.urlsplit(uri).scheme not in ("http", "https"):
        return 0
    retries = int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) if retries is None else int(retries)
    backoff = float(os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]) if backoff is None else float(backoff)
    endpoint = public_uri(uri).rstrip("/")
    start, problem = time.monotonic(), ""
    for attempt in range(retries + 1):
        if attempt:
            sleep(backoff * 2 ** (attempt - 1))
        try:
            with urllib.request.urlopen(f"{endpoint}/health", timeout=timeout):
                return attempt + 1
        except urllib.error.HTTPError as err:
            if err.code < 500:
                return attempt + 1
            problem = f"HTTP {err.code}"
        except (OSError, http.client.HTTPException) as err:  # URLError, refused, reset, timed out
            problem = str(getattr(err, "reason", None) or err) or type(err).__name__
    raise TrackingUnavailable(
        f"MLflow tracking server {endpoint} is unreachable: {problem} ({retries + 1} attempts over "
        f"{time.monotonic() - start:.1f} s). Start it, or point MLFLOW_TRACKING_URI at a running one."
    )


def _connection_failure(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) is a network failure rather than a bug or a refusal."""
    import requests
    import urllib3

    try:
        import botocore.exceptions as boto
        boto_errors: tuple = (boto.ConnectionError, boto.HTTPClientError)
    except ImportError:
        boto_errors = ()
    network = (ConnectionError, TimeoutError, requests.exceptions.ConnectionError, requests.exceptions.Timeout,
               urllib3.exceptions.HTTPError, *boto_errors)
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, network) or "Max retries exceeded" in str(err):  # MLflow's REST errors keep only the text
            return True
        err = err.__cause__ or err.__context__
    return False


def artifact_store() -> str:
    """Where the active run's artifacts go, without credentials (and the S3 endpoint, for s3:// stores)."""
    uri = public_uri(mlflow.get_artifact_uri()) if mlflow.active_run() else "(no active run)"
    if uri.startswith("s3://"):
        uri += f" at {os.environ.get('MLFLOW_S3_ENDPOINT_URL') or os.environ.get('AWS_ENDPOINT_URL') or 'AWS S3'}"
    elif uri.startswith("mlflow-artifacts:"):
        uri += f" through {public_uri(mlflow.get_tracking_uri())}"
    return uri


@contextmanager
def artifact_upload(what: str) -> Iterator[None]:
    """Turn a network failure while ``what`` is uploaded into ArtifactStoreUnavailable naming the store.

    Register a model only after this block finished: then no registered version points at partial artifacts.
    """
    try:
        yield
    except Exception as err:
        if isinstance(err, TrackingUnavailable) or not _connection_failure(err):
            raise
        raise ArtifactStoreUnavailable(
            f"logging {what} failed: the artifact store {artifact_store()} could not be reached "
            f"({type(err).__name__}); it is not logged, so register nothing from it"
        ) from err


@contextmanager
def run(
    experiment: str,
    run_name: str,
    *,
    params: Mapping | None = None,
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start (or resume, with ``run_id``) a run in ``experiment`` with flat params and tags.

    Under ``mlflow run`` (which exports ``MLFLOW_RUN_ID`` for its own run) a new run is nested under that one
    instead of writing every model's params into it.
    """
    ensure_reachable()  # a dead server fails here, naming it, before any work is logged
    parent = _PARENT_RUN if run_id is None else None
    tags = {**(tags or {}), **({"mlflow.parentRunId": parent} if parent else {})}
    exp = mlflow.set_experiment(experiment)
    if run_id is not None and not _exists(run_id):
        run_id = _stand_in(exp.experiment_id, run_id, run_name)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name) as active:
        if params:
            mlflow.log_params(flatten(params))
        if tags:
            mlflow.set_tags(dict(tags))
        yield active


def log_keras_model(model, example: np.ndarray, *, name: str = "model") -> str:
    """Log a Keras model with a signature and the project's exact pins; returns the model URI.

    No ``input_example``: ``mlflow.keras.log_model`` with one is broken in MLflow 3.17.
    """
    from mlflow.models import infer_signature

    example = np.asarray(example[:2], dtype=np.float32)
    signature = infer_signature(example, np.asarray(model.predict(example, verbose=0), dtype=np.float32))
    with artifact_upload(f"the Keras model '{name}'"):
        info = mlflow.keras.log_model(model, name=name, signature=signature,
                                      pip_requirements=pins(KERAS_MODEL_PACKAGES))
    return info.model_uri


def log_epoch(epoch: int, logs: Mapping[str, float]) -> None:
    """Per-epoch training metrics (a Keras callback target)."""
    mlflow.log_metrics({k: float(v) for k, v in logs.items() if np.isfinite(v)}, step=int(epoch))


def member_epoch_log(i: int) -> Callable[[int, Mapping[str, float]], None]:
    """:func:`log_epoch` for network ``i`` of a seed ensemble: the first's metrics as a single network's, a further
    one's under ``member<i>.`` beside them in the same run."""
    if i == 0:
        return log_epoch
    return lambda epoch, logs: log_epoch(epoch, {f"member{i}.{k}": v for k, v in logs.items()})


def log_finite_metrics(metrics: Mapping[str, object], prefix: str = "") -> None:
    """Log the numeric, finite entries of a (nested) metrics dict under flat ``prefix.key`` names."""
    flat: dict[str, float] = {}
    for key, value in flatten(metrics).items():
        try:
            number = float(value)
        except ValueError:
            continue
        if np.isfinite(number):
            flat[f"{prefix}{key}"] = number
    if flat:
        mlflow.log_metrics(flat)


ORIGINAL_RUN_TAG = "covidcxr.original_run_id"


def _exists(run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        mlflow.get_run(run_id)
    except MlflowException:
        return False
    return True


def _stand_in(experiment_id: str, run_id: str, run_name: str) -> str:
    """A run that stands in for a model's run missing from this store (a model DVC restored from its cache, or a new
    tracking server): found by tag, else created, so evaluation and explanation share one run per model."""
    client = mlflow.MlflowClient()
    found = client.search_runs([experiment_id], filter_string=f"tags.`{ORIGINAL_RUN_TAG}` = '{run_id}'", max_results=1)
    if found:
        return found[0].info.run_id
    created = client.create_run(experiment_id, run_name=run_name, tags={ORIGINAL_RUN_TAG: run_id})
    client.set_terminated(created.info.run_id)
    return created.info.run_id
