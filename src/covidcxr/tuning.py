"""Optuna tuning: the U-Net's hyperparameters and mask threshold, and the classifiers' operating thresholds.

U-Net: a study maximises the standard per-image validation Dice of the cleaned masks (those `segment` and serving make)
over F0, learning rate, dropout scale, batch size and the mask threshold, pruning on the per-epoch validation Dice. A
study lives in any Optuna storage (sqlite on one machine, PostgreSQL for many): the first worker creates it and stores
the search configuration and a fingerprint of the data in it, so that every worker that joins later (``covidcxr tune``
on another runner) searches the same space on the same data. Every trial is an MLflow run nested under the study's run;
the best trial is tagged ``best_trial``.

Operating thresholds are not searched here: over a finite set of validation scores they are computed exactly
(``metrics.operating_threshold``).

Nothing here reads ``params.yaml`` or decides where files go: callers pass URLs, paths and configurations.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from covidcxr import dburl

log = logging.getLogger(__name__)

STORAGE_ENV = "COVIDCXR_OPTUNA_STORAGE"
CONFIG_ATTR = "covidcxr_config"
DATA_ATTR = "covidcxr_data_sha256"
RUN_ATTR = "mlflow_run_id"  # the study's MLflow run (on a trial: the trial's); "" when its creator did not track
BEST_TAG = "best_trial"

UNET_PARAMS: tuple[str, ...] = ("f0", "lr", "dropout_scale", "batch_size", "mask_threshold")
UNET_DEFAULTS: dict = {
    "epochs": 3,
    "seed": 42,
    "augment": False,
    "lr_schedule": "constant",
    "strategy": "default",
    "sampler": {"n_startup_trials": 2},
    "pruner": {"n_startup_trials": 2, "n_warmup_steps": 1},
}

#: ``objective(trial, report)``: ``report(step, metrics)`` streams per-epoch metrics into the trial's MLflow run.
Report = Callable[[int, Mapping[str, float]], None]
Objective = Callable[[optuna.Trial, Report], float]


# --------------------------------------------------------------------------------------------------------------------
# Search space and the U-Net objective


def suggest(trial: optuna.Trial, space: Mapping[str, object]) -> dict:
    """One point of ``space``: ``{choices: [...]}`` is categorical, ``{low, high, log?}`` a float range, a scalar fixed.

    Fixed values are returned too (not suggested), so that the result always holds every name of ``space``.
    """
    point: dict = {}
    for name, spec in space.items():
        if isinstance(spec, Mapping) and "choices" in spec:
            point[name] = trial.suggest_categorical(name, list(spec["choices"]))
        elif isinstance(spec, Mapping) and {"low", "high"} <= set(spec):
            point[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]),
                                              log=bool(spec.get("log", False)))
        elif isinstance(spec, (int, float, str)) and not isinstance(spec, bool):
            point[name] = spec
        else:
            raise ValueError(f"search space entry {name!r} must be a value, {{choices: [...]}} or {{low, high, log}}, "
                             f"got {spec!r}")
    return point


def unet_config(values: Mapping) -> dict:
    """A complete, validated U-Net study configuration: ``space`` (every name of ``UNET_PARAMS``) plus defaults."""
    config = {**UNET_DEFAULTS, **{k: values[k] for k in (*UNET_DEFAULTS, "space") if k in values}}
    space = config.get("space")
    if not isinstance(space, Mapping):
        raise ValueError("a U-Net tuning configuration needs a 'space' mapping")
    missing = [name for name in UNET_PARAMS if name not in space]
    unknown = [name for name in space if name not in UNET_PARAMS]
    if missing or unknown:
        raise ValueError(f"U-Net search space: missing {missing}, unknown {unknown} (expected {list(UNET_PARAMS)})")
    for name, spec in space.items():
        if isinstance(spec, Mapping) and "choices" in spec and not list(spec["choices"]):
            raise ValueError(f"U-Net search space: {name!r} has no choices")
        if isinstance(spec, Mapping) and {"low", "high"} <= set(spec) and float(spec["low"]) > float(spec["high"]):
            raise ValueError(f"U-Net search space: {name!r} has low > high ({spec['low']} > {spec['high']})")
    if int(config["epochs"]) < 1:
        raise ValueError(f"U-Net tuning needs at least one epoch, got {config['epochs']}")
    from covidcxr.training import LR_SCHEDULES, STRATEGIES

    if config["strategy"] not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {config['strategy']!r}")
    if config["lr_schedule"] not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {config['lr_schedule']!r}")
    for name, make in (("sampler", lambda: _sampler(config, 0)), ("pruner", lambda: _pruner(config))):
        try:  # built here, so that a study is never created with options every worker then fails on
            make()
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} options {config[name]!r}: {err}") from None
    return {**config, "space": {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in space.items()}}


@dataclass(frozen=True)
class UNetData:
    """Standardised training and validation images ``(N, H, W)`` and binary masks, and the data's fingerprint."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    sha256: str


def unet_data(images: np.ndarray, masks: np.ndarray, split: Sequence[str]) -> UNetData:
    """Train/val arrays from images in [0, 1], masks and each image's split; standardised with train statistics."""
    from covidcxr.preprocess import Standardizer

    split = np.asarray(split)
    train, val = split == "train", split == "val"
    if not train.any() or not val.any():
        raise ValueError(f"U-Net tuning needs train and val images, got {dict(Counter(split.tolist()))}")
    digest = hashlib.sha256()
    for part in (images[train], masks[train], images[val], masks[val]):
        part = np.ascontiguousarray(part)
        digest.update(f"{part.dtype}{part.shape}".encode())
        digest.update(part.tobytes())
    std = Standardizer().fit(images[train])
    return UNetData(std.transform(images[train]), masks[train].astype(np.float32),
                    std.transform(images[val]), masks[val].astype(np.float32), digest.hexdigest())


def load_unet_data(cache_dir: str | os.PathLike, split_csv: str | os.PathLike) -> UNetData:
    """``unet_data`` from a working-size cache folder (``preprocess.load_cache``) and a segmentation split table."""
    from covidcxr.preprocess import load_cache, rows_for

    index, images, masks = load_cache(cache_dir, mmap=True)
    table = pd.read_csv(split_csv, keep_default_na=False, na_values=[""])
    for column in ("image_id", "split"):
        if column not in table.columns:
            raise ValueError(f"{split_csv}: no '{column}' column")
    table = table[table["split"].isin(["train", "val"])]
    try:
        rows = rows_for(index, table["image_id"])
    except KeyError as err:
        raise KeyError(f"{split_csv}: {err.args[0]} ({cache_dir})") from None
    return unet_data(np.asarray(images[rows], dtype=np.float32), np.asarray(masks[rows]), table["split"].to_numpy())


def unet_objective(data: UNetData, config: Mapping) -> Objective:
    """The U-Net objective: train ``config['epochs']`` epochs at one point of ``config['space']``, return the mean
    standard per-image validation Dice of the cleaned masks at the point's ``mask_threshold`` (:func:`lungs.cleaned`:
    the masks `segment` and serving make). The point's ``lr`` is the rate of
    ``config['lr_schedule']`` (``training.learning_rate``, over the trial's epochs), so that a rate tuned for a cosine
    run was found under a cosine.

    Every epoch's validation Dice is reported to the trial; a trial the pruner stops raises ``optuna.TrialPruned``.
    Models are built under ``config['strategy']`` (see ``training.distribution_strategy``).
    """
    import keras

    from covidcxr import lungs, metrics, models, training

    config = unet_config(config)
    strategy = training.distribution_strategy(config["strategy"])
    seed, epochs = int(config["seed"]), int(config["epochs"])

    def objective(trial: optuna.Trial, report: Report) -> float:
        point = suggest(trial, config["space"])
        keras.backend.clear_session()
        training.seed_everything(seed)  # the same start for every trial: trials differ by their point only
        with strategy.scope():
            model = models.build_unet(int(point["f0"]), data.x_train.shape[1:] + (1,),
                                      dropout_scale=float(point["dropout_scale"]))
            rate = training.learning_rate(float(point["lr"]), config["lr_schedule"], epochs=epochs,
                                          n_train=len(data.x_train), batch_size=int(point["batch_size"]))
            model.compile(optimizer=keras.optimizers.Adam(rate), loss=models.bce_dice_loss)
        history: list[float] = []
        pruned_at: list[int] = []

        def on_epoch_end(epoch: int, logs: dict[str, float]) -> None:
            prob = training.predict(model, data.x_val)[..., 0]
            masks = lungs.cleaned(prob, float(point["mask_threshold"]))  # the masks segment and serving make
            value = float(np.mean(metrics.dice(data.y_val, masks, threshold=0.5)))
            history.append(value)
            report(epoch, {**logs, "val_dice": value})
            trial.report(value, epoch)
            if epoch < epochs - 1 and trial.should_prune():  # after the last epoch there is nothing left to save
                pruned_at.append(epoch)
                model.stop_training = True

        training.fit(model, (data.x_train, data.y_train), (data.x_val, data.y_val), epochs=epochs,
                     batch_size=int(point["batch_size"]), seed=seed, augment=bool(config["augment"]),
                     on_epoch_end=on_epoch_end)
        if pruned_at:
            raise optuna.TrialPruned(f"validation Dice {history[-1]:.4f} after epoch {pruned_at[0]}")
        return history[-1]

    return objective


# --------------------------------------------------------------------------------------------------------------------
# Storage and the shared study


def resolve_storage(*candidates: str | None) -> str:
    """The first non-empty storage URL of ``candidates`` (callers pass e.g. flag, env, params, default in order)."""
    for url in candidates:
        if url:
            return str(url)
    raise ValueError("no Optuna storage URL given")


def make_storage(url: str, *, heartbeat_s: int | None = 60) -> optuna.storages.BaseStorage:
    """An Optuna RDB storage for any SQLAlchemy URL, sqlite or PostgreSQL (``postgresql+psycopg2://user@host/db``).

    The password comes from the URL's environment (``PGPASSWORD``, ``~/.pgpass``), never from params. With
    ``heartbeat_s`` a worker that dies mid-trial has its trial marked failed after ``3 * heartbeat_s`` seconds instead
    of left running forever. Workers that start together race to create the schema: that is retried. A URL that is no
    SQLAlchemy URL, or names a dialect or driver not installed, is a :class:`StudyRefused`; a storage that still cannot
    be reached after the retries is a :class:`StorageUnavailable`. Neither message shows a password.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        make_url(url).get_dialect().import_dbapi()
    except ArgumentError:  # NoSuchModuleError (no such dialect) is one: no retry mends either
        raise StudyRefused(f"Optuna storage {dburl.shown_url(url)}: not a SQLAlchemy URL of an installed dialect and "
                         "driver (e.g. sqlite:///optuna.db, postgresql+psycopg2://optuna@db-host/optuna)") from None
    except ImportError as exc:  # the dialect is known, its driver module is not installed
        raise StudyRefused(f"Optuna storage {dburl.shown_url(url)}: its driver is not installed ({exc.name})") from None
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    heartbeat = {"heartbeat_interval": heartbeat_s, "grace_period": 3 * heartbeat_s} if heartbeat_s else {}
    for attempt in range(4):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5, and used on purpose
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
        except SQLAlchemyError as exc:
            if attempt == 3:
                raise StorageUnavailable(f"Optuna storage {dburl.shown_url(url)} cannot be reached after 4 tries: "
                                         f"{type(exc).__name__}: {dburl.shown_error(exc, url)}") from None
            log.info("Optuna storage %s not ready (%s); retrying", dburl.shown_url(url), type(exc).__name__)
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _sampler(config: Mapping, seed: int) -> optuna.samplers.BaseSampler:
    # constant_liar keeps concurrent workers from proposing the same point while the first is still running
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True, **dict(config.get("sampler") or {}))


def _pruner(config: Mapping) -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner(**dict(config.get("pruner") or {}))


class StudyRefused(ValueError):
    """This worker cannot use the study or its storage as given: a storage URL that is no SQLAlchemy URL of an
    installed driver, a study created on other data, or a configuration (given or stored) it cannot run. The
    caller's input is wrong; a ValueError raised while a trial trains is not one of these."""


class StudyMissing(KeyError):
    """No study of that name in the storage, where this worker only joins one (no configuration given, or an export
    of 0 trials)."""


class NoCompletedTrial(RuntimeError):
    """The study holds no completed trial yet: there is no best to export."""


class StorageUnavailable(RuntimeError):
    """The study's storage (a database server) cannot be reached: down, refusing the user, or no such database."""


class StudyNotReady(RuntimeError):
    """A joined study still lacks what its creator stores while setting it up (its configuration, or the MLflow run
    it said it would log to) after the wait: the creator died mid-setup, or is stuck."""


def _wait_for_attrs(study: optuna.Study, names: Sequence[str], wait_s: float) -> dict:
    deadline = time.monotonic() + wait_s
    while True:
        attrs = study.user_attrs
        if all(n in attrs for n in names):
            return attrs
        if time.monotonic() > deadline:
            absent = [n for n in names if n not in attrs]
            held = len(study.get_trials(deepcopy=False))
            fix = (f"the study and its {held} trial(s) are kept: do not delete it. If its creator is gone, record that "
                   f"the study has no MLflow run (optuna.load_study(study_name={study.study_name!r}, storage=...)"
                   f".set_user_attr({RUN_ATTR!r}, '')) or join with --no-tracking"
                   if absent == [RUN_ATTR] else
                   f"the study holds {held} trial(s); with none, delete it (optuna delete-study) and start again")
            raise StudyNotReady(f"study {study.study_name!r} has no {absent} after {wait_s:.0f} s: its creator died "
                                f"while setting it up, or is stuck; {fix}")
        time.sleep(0.2)


def open_study(
    name: str,
    storage: str | optuna.storages.BaseStorage,
    config: Mapping | None = None,
    *,
    data_sha256: str | None = None,
    seed: int | None = None,
    wait_s: float = 60.0,
    tracked: bool = True,
) -> tuple[optuna.Study, bool]:
    """Create study ``name`` with ``config`` or join it if it exists; returns ``(study, created)``.

    Creation is atomic in the storage (unique study names), so of several workers starting together exactly one
    creates the study and stores ``config`` and ``data_sha256``; the others wait for them and then use the stored
    configuration (their own ``config`` only says what a new study would get). Joining with other data raises
    ``ValueError``. ``seed`` seeds this worker's sampler (default: the configuration's seed); give each worker its own.
    ``tracked``: whether this worker, if it creates the study, will log it to MLflow (``attach_tracker``); if not, the
    study records that it has no MLflow run, so that joiners that track start one instead of waiting for it.
    A joiner still without the stored configuration after ``wait_s`` seconds raises :class:`StudyNotReady`.
    """
    storage = make_storage(storage) if isinstance(storage, str) else storage
    created = False
    if config is not None:
        config = unet_config(config)
        try:
            optuna.create_study(study_name=name, storage=storage, direction="maximize")
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            pass
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError as exc:
        raise StudyMissing(f"study {name!r} does not exist in this storage; create it with a configuration first") \
            from exc
    if created:
        if data_sha256:
            study.set_user_attr(DATA_ATTR, data_sha256)
        if not tracked:  # before the configuration, for which joiners wait: they see both at once
            study.set_user_attr(RUN_ATTR, "")
        study.set_user_attr(CONFIG_ATTR, dict(config))
        stored = dict(config)
    else:
        attrs = _wait_for_attrs(study, [CONFIG_ATTR], wait_s)
        stored = attrs[CONFIG_ATTR]
        if data_sha256 and attrs.get(DATA_ATTR) not in (None, data_sha256):
            raise StudyRefused(f"study {name!r} was created on other data (sha256 {attrs[DATA_ATTR][:12]}..., this "
                             f"worker has {data_sha256[:12]}...): run every worker on the same dvc-pulled cache and "
                             "split")
        if config is not None and dict(config) != stored:
            log.info("study %r exists: using its stored configuration, not this worker's", name)
    sampler_seed = int(stored.get("seed", 0) if seed is None else seed)
    study = optuna.load_study(study_name=name, storage=storage, sampler=_sampler(stored, sampler_seed),
                              pruner=_pruner(stored))
    return study, created


def study_config(study: optuna.Study) -> dict:
    """The configuration stored in a study by its creator."""
    try:
        return dict(study.user_attrs[CONFIG_ATTR])
    except KeyError as exc:
        raise KeyError(f"study {study.study_name!r} has no stored configuration ({CONFIG_ATTR})") from exc


# --------------------------------------------------------------------------------------------------------------------
# MLflow: the study's run and one nested run per trial


def _mlflow_client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


@dataclass
class StudyTracker:
    """Logs each trial as an MLflow run nested under the study's run (thread- and process-safe: client API only)."""

    client: object
    experiment_id: str
    parent_run_id: str
    study_name: str
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    sampler_seed: int | None = None  # this worker's: with the study's trials, what replays its proposals

    def start(self, trial: optuna.Trial) -> str:
        seed = {} if self.sampler_seed is None else {"sampler_seed": str(self.sampler_seed)}
        run = self.client.create_run(
            self.experiment_id, run_name=f"trial-{trial.number:03d}",
            tags={"mlflow.parentRunId": self.parent_run_id, "optuna_study": self.study_name,
                  "optuna_trial": str(trial.number), "worker": self.worker, **seed},
        )
        trial.set_user_attr(RUN_ATTR, run.info.run_id)
        return run.info.run_id

    def log(self, run_id: str, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(step)) for k, v in values.items() if np.isfinite(v)]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)

    def end(self, run_id: str, trial: optuna.Trial | optuna.trial.FrozenTrial, state: str,
            value: float | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        params = [Param(k, str(v)) for k, v in sorted(trial.params.items())]
        metrics = [Metric("value", float(value), int(time.time() * 1000), 0)] if value is not None else []
        self.client.log_batch(run_id, params=params, metrics=metrics, tags=[RunTag("optuna_state", state)])
        self.client.set_terminated(run_id, "FAILED" if state == "FAIL" else "FINISHED")

    def end_failed(self, study: optuna.Study) -> int:
        """End, FAILED and tagged ``optuna_state`` FAIL, the run of every failed trial still RUNNING; return how many.

        A worker killed outright (SIGKILL, out of memory, a lost node) never ends its trial's run: Optuna fails the
        trial when its heartbeat stops, and this ends the run. Runs in another tracking store are left alone.
        """
        from mlflow.exceptions import MlflowException

        ended = 0
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
            run_id = trial.user_attrs.get(RUN_ATTR)
            if not run_id:
                continue
            try:
                status = self.client.get_run(run_id).info.status
            except MlflowException:
                continue
            if status == "RUNNING":
                _racing(self.end, run_id, trial, "FAIL")  # another worker's summary may end it at the same time
                ended += 1
        if ended:
            log.warning("study %r: ended the MLflow run of %d failed trial(s) whose worker died", study.study_name,
                        ended)
        return ended

    def tag_best(self, study: optuna.Study, *, passes: int = 5) -> int | None:
        """Tag the study's best trial run ``best_trial=true`` (and no other); record it on the study's run.

        Another worker may complete a better trial and tag it while this one tags the best it read, and this one would
        then untag the new best: each pass ends by reading the best again, and tags again when it changed (at most
        ``passes`` times; the last worker to finish tags again anyway).
        """
        from mlflow.entities import Metric, RunTag

        try:
            best = study.best_trial
        except ValueError:
            return None
        for _ in range(passes):
            best_run = best.user_attrs.get(RUN_ATTR)
            stale = self.client.search_runs(
                [self.experiment_id], max_results=1000,
                filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}' and tags.{BEST_TAG} = 'true'",
            )
            for run in stale:
                if run.info.run_id != best_run:
                    _racing(self.client.set_tag, run.info.run_id, BEST_TAG, "false")
            if best_run:
                _racing(self.client.set_tag, best_run, BEST_TAG, "true")
            _racing(
                self.client.log_batch,
                self.parent_run_id,
                metrics=[Metric("best_value", float(best.value), int(time.time() * 1000), 0)],
                tags=[RunTag("best_trial_number", str(best.number)), RunTag("best_run_id", str(best_run)),
                      *[RunTag(f"best.{k}", str(v)) for k, v in sorted(best.params.items())]],
            )
            now = study.best_trial
            if now.number == best.number:
                return best.number
            best = now
        log.warning("study %r: its best trial kept changing while this worker tagged it (now %d); the last worker to "
                    "finish tags it again", study.study_name, best.number)
        return best.number


def _racing(call: Callable, *args, attempts: int = 3, **kwargs):
    """``call``, again when another worker wrote the same tag between MLflow's read and its insert.

    MLflow's SQL store sets a tag by reading it, then inserting or updating: two workers of a shared study that finish
    together tag the same best run at once, and the later insert fails on PostgreSQL's unique key. Again, the read
    finds the row and updates it. Any other error, or a race lost ``attempts`` times, is raised.
    """
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return call(*args, **kwargs)
        except MlflowException as err:
            if attempt == attempts - 1 or "duplicate key" not in str(err):
                raise
            time.sleep(0.05 * (attempt + 1))


def attach_tracker(
    study: optuna.Study,
    created: bool,
    *,
    experiment: str,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
    wait_s: float = 60.0,
    sampler_seed: int | None = None,
) -> StudyTracker:
    """The study's MLflow run: created (with the stored configuration as params) by the worker that created the study,
    found through the study by every other worker. Joiners log into the parent's experiment, whatever ``experiment``.
    A study whose creator did not track it (an empty run id) gets its run from the first joiner that tracks. A joiner
    waits up to ``wait_s`` seconds for a tracking creator's run id, then raises :class:`StudyNotReady`.
    """
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    from covidcxr.tracking import flatten

    client = _mlflow_client(tracking_uri)
    if not created:
        parent = _wait_for_attrs(study, [RUN_ATTR], wait_s)[RUN_ATTR]
        if not parent:
            log.info("study %r has no MLflow run (its creator did not track it): this worker starts one",
                     study.study_name)
        else:
            try:
                experiment_id = client.get_run(parent).info.experiment_id
                return StudyTracker(client, experiment_id, parent, study.study_name, sampler_seed=sampler_seed)
            except MlflowException:
                log.warning("study %r's MLflow run %s is not in this tracking store (%s): logging under a new run",
                            study.study_name, parent, client.tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=run_name or f"tune-{study.study_name}",
                            tags={**(tags or {}), "optuna_study": study.study_name})
    params = flatten(study.user_attrs.get(CONFIG_ATTR, {}))
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in sorted(params.items())])
    study.set_user_attr(RUN_ATTR, run.info.run_id)
    return StudyTracker(client, experiment_id, run.info.run_id, study.study_name, sampler_seed=sampler_seed)


def tracked(objective: Objective, tracker: StudyTracker | None) -> Callable[[optuna.Trial], float]:
    """``objective`` as an Optuna objective, each trial logged as a nested MLflow run when ``tracker`` is given."""

    def run_trial(trial: optuna.Trial) -> float:
        if tracker is None:
            return objective(trial, lambda step, values: None)
        run_id = tracker.start(trial)
        try:
            value = objective(trial, lambda step, values: tracker.log(run_id, step, values))
        except optuna.TrialPruned:
            tracker.end(run_id, trial, "PRUNED")
            raise
        except BaseException:
            tracker.end(run_id, trial, "FAIL")
            raise
        tracker.end(run_id, trial, "COMPLETE", value)
        return value

    return run_trial


def optimize(study: optuna.Study, objective: Objective, n_trials: int, *, tracker: StudyTracker | None = None) -> None:
    """Run ``n_trials`` trials of ``objective`` in this worker (other workers may add theirs to the same study)."""
    if n_trials > 0:
        study.optimize(tracked(objective, tracker), n_trials=int(n_trials), gc_after_trial=True)
    if tracker is not None:
        tracker.tag_best(study)
        tracker.client.set_terminated(tracker.parent_run_id, "FINISHED")


#: The trial states a summary counts (Optuna's, lower case).
TRIAL_STATES: tuple[str, ...] = ("complete", "pruned", "fail", "running", "waiting")


def summary(study: optuna.Study, tracker: StudyTracker | None = None) -> dict:
    """The best trial (number, value, parameters) and the trial counts by state; raises if no trial completed.

    ``best_params`` also holds the values the search space fixed, so that a model trained with them is the one tuned.
    Trials of dead workers (no heartbeat for the storage's grace period) are marked failed first: Optuna does it only
    when a worker starts its next trial, so the study's last one, or an export that runs none, left them running. With
    ``tracker`` the MLflow runs of failed trials that no worker ended are ended too (:meth:`StudyTracker.end_failed`).
    """
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5, and used on purpose
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    if tracker is not None:
        tracker.end_failed(study)
    counts = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    try:
        best = study.best_trial
    except ValueError as exc:
        raise NoCompletedTrial(f"study {study.study_name!r} has no completed trial ({dict(counts)})") from exc
    space = study.user_attrs.get(CONFIG_ATTR, {}).get("space", {})
    fixed = {k: v for k, v in space.items() if not isinstance(v, Mapping)}
    return {
        "study": study.study_name,
        "objective": "val_dice",
        "best_trial": best.number,
        "best_value": float(best.value),
        "best_params": {**fixed, **best.params},
        "trials": {state: int(counts.get(state, 0)) for state in TRIAL_STATES},
    }


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, value, parameters, epochs reported (no times, no run ids)."""
    rows = [
        {"number": t.number, "state": t.state.name, "value": t.value,
         "epochs_reported": len(t.intermediate_values),
         **{f"param_{k}": v for k, v in sorted(t.params.items())}}
        for t in study.get_trials(deepcopy=False)
    ]
    return pd.DataFrame(rows).sort_values("number").reset_index(drop=True) if rows else pd.DataFrame()


# --------------------------------------------------------------------------------------------------------------------
# One worker: what the `tune_unet` stage and `covidcxr tune` both run


@dataclass(frozen=True)
class Tracking:
    """Where a worker logs its trials: the MLflow experiment of a new study's run, its name, tags, tracking URI."""

    experiment: str
    run_name: str
    tags: Mapping[str, str] = field(default_factory=dict)
    tracking_uri: str | None = None


def tune_unet(study_name: str, storage: str, data: UNetData, *, config: Mapping | None, n_trials: int, seed: int,
              tracking: Tracking | None = None) -> tuple[dict, pd.DataFrame]:
    """Create or join U-Net study ``study_name`` in ``storage``, run ``n_trials`` trials here, and return the study's
    summary (best trial and parameters) and its trials table.

    ``config`` configures a new study (an existing one keeps its own); with ``n_trials`` 0 (an export of the best) the
    study must exist and is never created: a mistyped name would leave an empty study in a shared storage. ``seed``
    seeds this worker's sampler (give every worker of a shared study its own). With ``tracking`` each trial is an
    MLflow run nested under the study's run.
    """
    log.info("Optuna study %r in %s: %d trial(s) here, sampler seed %d", study_name, dburl.shown_url(storage),
             n_trials, seed)
    try:
        study, created = open_study(study_name, storage, config if n_trials > 0 else None, data_sha256=data.sha256,
                                    seed=seed, tracked=tracking is not None)
    except StudyMissing:
        if n_trials > 0:
            raise
        raise StudyMissing(f"study {study_name!r} does not exist in {dburl.shown_url(storage)}: with 0 trials only a "
                           "study that exists is exported (its best trial); check the name and the storage") from None
    except StudyRefused:
        raise
    except ValueError as err:  # a configuration, given or stored, that the sampler or pruner refuses
        raise StudyRefused(str(err)) from err
    tracker = None
    if tracking is not None:
        tracker = attach_tracker(study, created, experiment=tracking.experiment, run_name=tracking.run_name,
                                 tags={**tracking.tags, "optuna_storage": dburl.shown_url(storage)},
                                 tracking_uri=tracking.tracking_uri, sampler_seed=seed)
    objective = unet_objective(data, study_config(study)) if n_trials > 0 else None
    optimize(study, objective, n_trials, tracker=tracker)
    return summary(study, tracker), trials_table(study)
