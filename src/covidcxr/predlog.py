"""The prediction log: one database row per image the served model scores, for drift monitoring (`covidcxr monitor`).

A record holds the time (UTC), the model's name and version, whether the image was accepted and the reason if not,
the projection probability, the lung area fraction, the COVID-19 probability and label, the threshold, the
out-of-distribution score, intensity statistics of the working image (mean, standard deviation, 5th/50th/95th
percentiles of the min-max normalised image) and the compact feature vector (:meth:`covidcxr.ood.MahalanobisDetector
.project`). Never pixels, header fields, file names or messages: nothing that identifies a patient.

Any SQLAlchemy URL works: ``sqlite:///predictions.db`` (relative to where the server runs), or PostgreSQL for a team
(``postgresql+psycopg2://covidcxr@db-host:5432/covidcxr``) with the password only in the environment (``PGPASSWORD``)
or ``~/.pgpass``, never in the URL, params or logs. ``$COVIDCXR_PREDICTION_LOG`` overrides the model's own URL
(``none`` turns the log off).

Writing never fails or slows a request: :class:`PredictionLog` queues records and a background thread inserts them
in batches; when the database is unreachable the records are counted as lost and the error is logged (its type and the
URL without a password; the message too of this module's own :class:`PredictionLogError`, which holds no credentials,
where a driver's may echo its connection string), at most once a minute, and the server goes on answering.
"""

from __future__ import annotations

import atexit
import datetime as dt
import logging
import math
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from covidcxr import dburl

log = logging.getLogger(__name__)

ENV = "COVIDCXR_PREDICTION_LOG"
OFF = ("none", "off", "null")
TABLE = "predictions"
#: Figures copied from a served entry into its record.
ENTRY_COLUMNS: tuple[str, ...] = ("accepted", "reason", "projection", "projection_probability", "lung_area_fraction",
                                  "covid_probability", "label", "threshold", "ood_score", "ood_threshold",
                                  "thresholds_from")
INTENSITY_COLUMNS: tuple[str, ...] = ("intensity_mean", "intensity_std", "intensity_p05", "intensity_p50",
                                      "intensity_p95")
#: Columns a log written by an earlier version lacks: added on first write (:func:`add_missing_columns`).
ADDED_COLUMNS: dict[str, str] = {"ood_threshold": "float", "thresholds_from": "text"}
#: Every column of the log, in order (``id`` is the database's own).
COLUMNS: tuple[str, ...] = ("time", "model_name", "model_version", *ENTRY_COLUMNS, *INTENSITY_COLUMNS, "features")
STAT_DECIMALS = 6


class PredictionLogError(RuntimeError):
    """The prediction log cannot be read, or written as it is (a table of its name that is not the log's): the message
    says why, never a password."""


def describe(exc: BaseException) -> str:
    """A write failure as the log shows it: the message of a :class:`PredictionLogError` (it holds no credentials),
    only the type of any other (a driver's message may echo its connection string)."""
    return f"{type(exc).__name__}: {exc}" if isinstance(exc, PredictionLogError) else type(exc).__name__


class Sink(Protocol):
    """Where :class:`covidcxr.serving.Pipeline` sends the records of each request."""

    def append(self, records: Sequence[Mapping]) -> None: ...


# --- records ----------------------------------------------------------------------------------------------------------


def now() -> dt.datetime:
    """The current time in UTC, without time zone (how the log stores it, in sqlite and PostgreSQL alike)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def intensity_stats(image: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation and 5th/50th/95th percentiles of a working image (min-max normalised to [0, 1])."""
    x = np.asarray(image, dtype=np.float32).ravel()
    p05, p50, p95 = np.percentile(x, (5, 50, 95))
    values = (x.mean(), x.std(), p05, p50, p95)
    return {k: round(float(v), STAT_DECIMALS) for k, v in zip(INTENSITY_COLUMNS, values)}


def finite(value: object) -> object:
    """``value``, or None for a non-finite number (NaN, infinity): PostgreSQL's JSON refuses them (a whole batch
    lost) where sqlite stores them, so both backends store None."""
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return None
    return value


def records(entries: Sequence[Mapping], stats: Mapping[int, Mapping], compact: Mapping[int, Sequence[float]], *,
            when: dt.datetime, model_name: str, model_version: str) -> list[dict]:
    """One record per served entry (same order): its figures, the intensity statistics of the images that were read
    and the compact feature vectors of those that reached the classifier (by position in the request). A non-finite
    number (an OOD score or feature from a feature that overflowed) is stored as None (:func:`finite`)."""
    out = []
    for i, entry in enumerate(entries):
        record = {"time": when, "model_name": model_name, "model_version": str(model_version)}
        record.update({k: finite(entry.get(k)) for k in ENTRY_COLUMNS})
        record.update({k: finite(v) for k, v in (stats.get(i) or dict.fromkeys(INTENSITY_COLUMNS)).items()})
        record["features"] = [finite(float(v)) for v in compact[i]] if i in compact else None
        out.append(record)
    return out


class MemoryLog:
    """A sink that keeps the records in memory (the drift reference is scored through it; tests use it)."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def append(self, records: Sequence[Mapping]) -> None:
        self.records.extend(dict(r) for r in records)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.records, columns=list(COLUMNS))


# --- URLs -------------------------------------------------------------------------------------------------------------


def resolve_url(configured: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """``$COVIDCXR_PREDICTION_LOG`` when set (``none``/``off``: no log), else the model's configured URL."""
    env = os.environ if env is None else env
    value = env.get(ENV, "").strip()
    if value:
        return None if value.lower() in OFF else value
    return configured or None


def open_log(configured: str | None) -> PredictionLog | None:
    """The prediction log the environment or the model's configuration names, or None; a URL with a password is
    refused (logged, without it) and no log is kept."""
    url = resolve_url(configured)
    if url is None:
        return None
    if dburl.has_password(url):
        log.error("prediction log %s: the URL holds a password; give it in PGPASSWORD instead. Not logging.",
                  dburl.shown_url(url))
        return None
    log.info("prediction log: %s", dburl.shown_url(url))
    return PredictionLog(url)


# --- the database -----------------------------------------------------------------------------------------------------


def _table():
    from sqlalchemy import JSON, BigInteger, Boolean, Column, DateTime, Float, Index, Integer, MetaData, String, Table

    metadata = MetaData()
    numbers = [Column(name, Float) for name in ("projection_probability", "lung_area_fraction", "covid_probability",
                                                 "threshold", "ood_score", *INTENSITY_COLUMNS)]
    # Added after the first deployments: appended to an existing table by add_missing_columns, so they come last
    added = [Column(name, {"float": Float, "text": String(16)}[kind]) for name, kind in ADDED_COLUMNS.items()]
    table = Table(
        TABLE, metadata,
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("time", DateTime, nullable=False), Column("model_name", String(128), nullable=False),
        Column("model_version", String(32), nullable=False), Column("accepted", Boolean, nullable=False),
        Column("reason", String(64)), Column("projection", String(16)), Column("label", String(16)),
        *numbers, Column("features", JSON), *added,
        Index(f"ix_{TABLE}_model_time", "model_name", "model_version", "time"),
    )
    return metadata, table


def create_table(engine, metadata) -> None:
    """Create the log's table (and its index) where it is missing. Another writer creating it at the same moment is no
    error: the CREATE of whichever comes second fails, and the table is there."""
    from sqlalchemy import inspect

    try:
        metadata.create_all(engine, checkfirst=True)
    except Exception:
        if not inspect(engine).has_table(TABLE):
            raise


def add_missing_columns(engine, table) -> list[str]:
    """Bring a log table created by an earlier version up to :func:`_table`'s: add each nullable column it lacks
    (:data:`ADDED_COLUMNS`; rows written before have nulls there). Returns the columns added. Another writer adding
    the same column at the same moment is no error."""
    from sqlalchemy import inspect, text

    existing = {c["name"] for c in inspect(engine).get_columns(table.name)}
    added = []
    for column in table.columns:
        if column.name in existing:
            continue
        if column.name not in ADDED_COLUMNS:
            raise PredictionLogError(f"the prediction log's table {table.name!r} lacks column {column.name!r}, which "
                                     "no migration adds (is it another application's table?)")
        kind = column.type.compile(dialect=engine.dialect)
        try:
            with engine.begin() as connection:
                connection.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"))
        except Exception:
            if column.name not in {c["name"] for c in inspect(engine).get_columns(table.name)}:
                raise
        added.append(column.name)
        log.info("prediction log: column %s added to %s", column.name, table.name)
    return added


def engine_for(url: str, *, create: bool = True):
    """An SQLAlchemy engine for the log. ``create`` (writing): a sqlite file's folder is created, and the file on first
    connection; else (reading) a missing sqlite file raises :class:`PredictionLogError` and the file is opened so that
    it cannot be created."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database
        if not path or path == ":memory:" or path.startswith("file:"):
            return create_engine(url, connect_args={"timeout": 30})
        if create:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return create_engine(url, connect_args={"timeout": 30})
        if not Path(path).is_file():
            raise PredictionLogError(f"prediction log {dburl.shown_url(url)} cannot be read: its file {path} does not "
                                     "exist (a server creates it on its first write; check the URL)")
        uri = Path(path).resolve().as_uri() + "?mode=rw"  # rw: never creates the file (it may be gone by now)
        return create_engine(url, creator=lambda: sqlite3.connect(uri, uri=True, timeout=30))
    connect_args = {"connect_timeout": 5} if parsed.get_backend_name() == "postgresql" else {}
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


class PredictionLog:
    """Records queued by :meth:`append` (never raises, never blocks) and inserted by a background thread.

    ``written`` and ``lost`` count records; :meth:`flush` waits until the queue is empty (also run at exit).
    After a failed write the database is not tried again for ``retry_s`` seconds from that failure (records meanwhile
    are lost, and do not extend the pause); the first write that succeeds after a reported failure is logged.
    """

    def __init__(self, url: str, *, max_pending: int = 10_000, batch_size: int = 500, retry_s: float = 10.0) -> None:
        self.url, self.shown = url, dburl.shown_url(url)
        self.max_pending, self.batch_size, self.retry_s = max_pending, batch_size, retry_s
        self.written = self.lost = 0
        self._lock, self._counting = threading.Lock(), threading.Lock()
        self._pid: int | None = None
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._engine = None
        self._down_until = 0.0
        self._failure: str | None = None  # the last failed write's error (describe), until one succeeds
        self._last_report = -1e9
        self._reported_down = False

    def append(self, records: Sequence[Mapping]) -> None:
        try:
            self._ensure_writer()
            for i, record in enumerate(records):
                try:
                    self._queue.put_nowait(dict(record))
                except queue.Full:
                    self._lose(len(records) - i, "queue full (the database is slower than the traffic)")
                    break
        except Exception as exc:  # noqa: BLE001 - the log must never fail a request
            self._lose(len(records), describe(exc))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued record is written or lost; False if ``timeout`` seconds were not enough."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def _ensure_writer(self) -> None:
        pid = os.getpid()
        if self._pid == pid:
            return
        with self._lock:
            if self._pid == pid:
                return
            if self._pid is not None:  # a forked worker: the parent's queue, thread and connections are not ours
                self._queue, self._engine = queue.Queue(self.max_pending), None
            threading.Thread(target=self._run, name="covidcxr-prediction-log", daemon=True).start()
            atexit.register(self.flush, 5.0)
            self._pid = pid

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                if time.monotonic() < self._down_until:  # not tried: the pause runs from the failure, never extended
                    self._lose(len(batch), f"not tried for {self.retry_s:g} s after {self._failure}")
                    continue
                try:
                    self._write(batch)
                except Exception as exc:  # noqa: BLE001 - counted and reported; the server goes on
                    self._failure = describe(exc)
                    self._down_until = time.monotonic() + self.retry_s
                    self._dispose()
                    self._lose(len(batch), self._failure)
                    continue
                self.written += len(batch)
                if self._failure is not None:
                    self._recovered()
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _write(self, batch: list[dict]) -> None:
        if self._engine is None:
            metadata, self._sql = _table()
            self._engine = engine_for(self.url)
            create_table(self._engine, metadata)
            add_missing_columns(self._engine, self._sql)
        with self._engine.begin() as connection:
            connection.execute(self._sql.insert(), batch)

    def _recovered(self) -> None:
        """A write succeeded after a failed one: said once where the failure was reported (an operator who read
        "unavailable" learns it is over)."""
        with self._counting:
            reported, self._reported_down = self._reported_down, False
            self._failure = None
        if reported:
            log.warning("prediction log %s writing again; %d record(s) not written in all", self.shown, self.lost)

    def _dispose(self) -> None:
        if self._engine is not None:
            try:
                self._engine.dispose()
            except Exception:  # noqa: BLE001
                pass
            self._engine = None

    def _lose(self, n: int, why: str) -> None:
        with self._counting:  # request threads and the writer both lose records
            self.lost += n
            report = time.monotonic() - self._last_report >= 60.0
            if report:
                self._last_report, self._reported_down = time.monotonic(), True
        if report:
            log.error("prediction log %s unavailable (%s): %d record(s) not written so far; answers are unaffected",
                      self.shown, why, self.lost)


def read(url: str, *, model_name: str | None = None, model_version: str | None = None,
         since: dt.datetime | None = None, until: dt.datetime | None = None) -> pd.DataFrame:
    """The records of a window (times in UTC; ``since`` inclusive, ``until`` exclusive), oldest first, as a frame of
    :data:`COLUMNS` (``features`` a list per row, or None). Reading creates nothing: a missing sqlite file, or a
    database without the log's table, raises :class:`PredictionLogError` naming the log, as does any other failure."""
    from sqlalchemy import inspect, select

    shown = dburl.shown_url(url)
    try:
        engine = engine_for(url, create=False)
        try:
            if not inspect(engine).has_table(TABLE):
                raise PredictionLogError(f"prediction log {shown} cannot be read: it holds no {TABLE!r} table (no "
                                         "server has written to it; check the URL)")
            _, table = _table()
            present = {c["name"] for c in inspect(engine).get_columns(TABLE)}  # a log no server has migrated yet
            query = select(*(table.c[c] for c in COLUMNS if c in present)).order_by(table.c.id)
            for column, value in (("model_name", model_name), ("model_version", model_version)):
                if value is not None:
                    query = query.where(table.c[column] == str(value))
            if since is not None:
                query = query.where(table.c.time >= since)
            if until is not None:
                query = query.where(table.c.time < until)
            with engine.connect() as connection:
                rows = [dict(r) for r in connection.execute(query).mappings()]
        finally:
            engine.dispose()
    except PredictionLogError:
        raise
    except Exception as exc:  # noqa: BLE001 - one typed error naming the log, without credentials
        raise PredictionLogError(f"prediction log {shown} cannot be read ({type(exc).__name__})") from None
    return pd.DataFrame(rows, columns=list(COLUMNS))
