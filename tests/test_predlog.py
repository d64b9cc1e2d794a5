"""The prediction log: one record per scored image in a real sqlite database, no PHI, and a dead database that never
fails a request."""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from covidcxr import dburl, predlog, serving
from tests.helpers import build_bundle, phantom, png_b64
from tests.test_serving import PHI, b64, dicom_b64, make_dicom


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> serving.Pipeline:
    return serving.Pipeline.load(build_bundle(tmp_path_factory.mktemp("bundle"), model_version="7"))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once closed


def test_every_scored_image_appends_one_record_without_phi(pipeline, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    url = f"sqlite:///{tmp_path / 'logs' / 'predictions.db'}"
    monkeypatch.setenv(predlog.ENV, url)
    sink = predlog.open_log(None)
    pipeline.prediction_log = sink
    try:
        request = [dicom_b64(phantom(), ViewPosition="PA", **PHI), dicom_b64(phantom(), ViewPosition="LL", **PHI),
                   b64(make_dicom(None, shape=(40, 40), **PHI)), png_b64(phantom(seed=3)), "@@@"]
        before = predlog.now()
        entries = pipeline.score(request)
        assert sink.flush(10) and sink.written == len(request) and sink.lost == 0
    finally:
        pipeline.prediction_log = None
    frame = predlog.read(url)
    assert list(frame.columns) == list(predlog.COLUMNS) and len(frame) == len(request)
    assert [r if isinstance(r, str) else None for r in frame["reason"]] == [e["reason"] for e in entries]
    assert (frame["model_version"] == "7").all() and (frame["model_name"] == "covidcxr").all()
    assert (frame["thresholds_from"] == "model").all()
    first = frame.iloc[0]
    assert bool(first["accepted"]) and first["covid_probability"] == entries[0]["covid_probability"]
    assert before <= first["time"].to_pydatetime() <= predlog.now()
    assert 0 <= first["intensity_p05"] <= first["intensity_p50"] <= first["intensity_p95"] <= 1
    assert np.isnan(frame.iloc[4]["intensity_mean"])  # never decoded: no statistics
    # The database holds only these columns, and none of the headers' identifying values anywhere in its bytes.
    with sqlite3.connect(tmp_path / "logs" / "predictions.db") as db:
        columns = [row[1] for row in db.execute(f"PRAGMA table_info({predlog.TABLE})")]
    assert columns == ["id", "time", "model_name", "model_version", "accepted", "reason", "projection", "label",
                       "projection_probability", "lung_area_fraction", "covid_probability", "threshold", "ood_score",
                       *predlog.INTENSITY_COLUMNS, "features", "ood_threshold", "thresholds_from"]
    data = (tmp_path / "logs" / "predictions.db").read_bytes() + caplog.text.encode()
    for value in PHI.values():
        assert value.encode() not in data and value.split("^")[0].encode() not in data


def test_records_carry_the_compact_features_of_the_images_the_classifier_saw():
    entries = [dict.fromkeys(serving.FIELDS) | {"accepted": True, "ood_score": 3.5},
               dict.fromkeys(serving.FIELDS) | {"accepted": False, "reason": "lateral_view"}]
    records = predlog.records(entries, {0: predlog.intensity_stats(np.linspace(0, 1, 100))}, {0: [0.5, -1.25]},
                              when=dt.datetime(2026, 1, 2), model_name="m", model_version=3)
    assert [tuple(r) for r in records] == [predlog.COLUMNS] * 2
    assert records[0]["features"] == [0.5, -1.25] and records[1]["features"] is None
    assert records[0]["intensity_p50"] == pytest.approx(0.5) and records[1]["intensity_mean"] is None
    assert records[0]["model_version"] == "3"
    json.dumps(records, default=str, allow_nan=False)


def check_non_finite(url: str) -> None:
    """A record with a NaN OOD score (a feature that overflowed: serving refuses it as out of distribution) and
    non-finite feature entries, in one batch with an ordinary one: PostgreSQL's JSON refused the whole batch (every
    record lost) where sqlite stored it. Both store None for each non-finite number, and the batch."""
    nan, inf = float("nan"), float("inf")
    refused = dict.fromkeys(serving.FIELDS) | {"accepted": False, "reason": "out_of_distribution", "ood_score": nan,
                                               "ood_threshold": 7.0, "lung_area_fraction": 0.25}
    answered = dict.fromkeys(serving.FIELDS) | {"accepted": True, "ood_score": 3.5, "covid_probability": 0.25}
    stats = {0: predlog.intensity_stats(np.linspace(0, 1, 100)) | {"intensity_std": inf}}
    batch = predlog.records([refused, answered], stats, {0: [nan, 1.5, -inf], 1: [0.5, -1.0, 2.0]},
                            when=dt.datetime(2026, 3, 1), model_name="covidcxr", model_version="1")
    assert batch[0]["ood_score"] is None and batch[0]["intensity_std"] is None
    assert batch[0]["features"] == [None, 1.5, None] and batch[0]["ood_threshold"] == 7.0
    json.dumps(batch, default=str, allow_nan=False)
    sink = predlog.PredictionLog(url)
    sink.append(batch)
    assert sink.flush(20) and (sink.written, sink.lost) == (2, 0)
    frame = predlog.read(url)
    assert frame["features"].tolist() == [[None, 1.5, None], [0.5, -1.0, 2.0]]
    assert pd.isna(frame["ood_score"].iloc[0]) and frame["ood_score"].iloc[1] == 3.5
    assert pd.isna(frame["intensity_std"].iloc[0]) and frame["intensity_p50"].iloc[0] == pytest.approx(0.5)


def test_non_finite_numbers_are_stored_as_none(tmp_path):
    check_non_finite(f"sqlite:///{tmp_path / 'p.db'}")


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_a_dead_database_never_fails_a_request(pipeline, tmp_path, caplog, kind):
    url = {"postgresql": f"postgresql+psycopg2://covidcxr@127.0.0.1:{closed_port()}/covidcxr",
           "sqlite": f"sqlite:///{tmp_path / 'not-a-folder'}/predictions.db"}[kind]
    if kind == "sqlite":
        (tmp_path / "not-a-folder").write_text("a file where the folder should be")
    sink = predlog.PredictionLog(url, retry_s=0.0)
    pipeline.prediction_log = sink
    try:
        entries = pipeline.score([dicom_b64(phantom(), ViewPosition="PA", **PHI), png_b64(phantom(seed=1))])
        assert [e["accepted"] for e in entries] == [True, True]
        assert sink.flush(20) and sink.written == 0 and sink.lost == 2
        entries = pipeline.score([png_b64(phantom(seed=2))])  # still answering, still counting
        assert entries[0]["accepted"] and sink.flush(20) and sink.lost == 3
    finally:
        pipeline.prediction_log = None
    errors = [r.getMessage() for r in caplog.records if r.name == "covidcxr.predlog" and r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "unavailable" in errors[0] and "answers are unaffected" in errors[0]
    for value in PHI.values():
        assert value not in caplog.text


def test_steady_traffic_does_not_keep_the_log_paused_after_one_failure(tmp_path, caplog):
    """A failed write pauses writing for retry_s; every batch lost during the pause set it again, so a server with a
    request at least once per retry_s never tried the database again (one blip: every later record lost). The sqlite
    log's folder is a file at first (the write fails), then a folder, with a record every 0.1 s throughout."""
    caplog.set_level(logging.INFO, logger="covidcxr.predlog")
    folder = tmp_path / "logs"
    folder.write_text("a file where the folder should be")
    url = f"sqlite:///{folder}/predictions.db"
    entry = dict.fromkeys(predlog.ENTRY_COLUMNS) | {"accepted": True}
    sink = predlog.PredictionLog(url, retry_s=0.5)
    sink.append(predlog.records([entry], {}, {}, when=dt.datetime(2026, 3, 1), model_name="covidcxr",
                                model_version="1"))
    assert sink.flush(10) and (sink.written, sink.lost) == (0, 1)
    paused_until = sink._down_until  # set by that failure: the records lost meanwhile must not move it
    folder.unlink()
    folder.mkdir()
    sent, start = 1, time.monotonic()
    while not sink.written and time.monotonic() - start < 10:  # a hang guard: the pause is 0.5 s
        sink.append(predlog.records([entry], {}, {}, when=dt.datetime(2026, 3, 1), model_name="covidcxr",
                                    model_version="1"))
        sent += 1
        time.sleep(0.1)
    assert sink.flush(10) and sink.written, "no record written in 10 s of traffic after the database came back"
    assert sink._down_until == paused_until  # the records lost in the pause never extended it
    assert sink.written + sink.lost == sent and len(predlog.read(url)) == sink.written
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "covidcxr.predlog"]
    errors = [m for level, m in messages if level >= logging.ERROR]
    assert len(errors) == 1 and "unavailable (FileExistsError)" in errors[0]  # the real failure, by its type
    assert any("writing again" in m for level, m in messages if level == logging.WARNING)


def test_urls_come_from_the_environment_first_and_never_carry_a_password(monkeypatch, caplog):
    assert predlog.resolve_url("sqlite:///a.db", env={}) == "sqlite:///a.db"
    assert predlog.resolve_url(None, env={}) is None
    assert predlog.resolve_url("sqlite:///a.db", env={predlog.ENV: "sqlite:///b.db"}) == "sqlite:///b.db"
    assert predlog.resolve_url("sqlite:///a.db", env={predlog.ENV: "none"}) is None
    secret = "postgresql+psycopg2://covidcxr:hunter22@db-host/covidcxr"
    assert dburl.has_password(secret) and not dburl.has_password("postgresql+psycopg2://covidcxr@db-host/x")
    assert "hunter22" not in dburl.shown_url(secret) and "db-host" in dburl.shown_url(secret)
    monkeypatch.setenv(predlog.ENV, secret)
    assert predlog.open_log("sqlite:///a.db") is None and "hunter22" not in caplog.text and "PGPASSWORD" in caplog.text
    with pytest.raises(predlog.PredictionLogError, match=r"covidcxr:\*\*\*@127.0.0.1") as err:
        predlog.read(secret.replace("db-host", f"127.0.0.1:{closed_port()}"))
    assert "hunter22" not in str(err.value)


def test_reading_creates_nothing_and_says_what_is_missing(tmp_path):
    """`covidcxr monitor --log sqlite:///typo.db` read an empty window (a quiet day) and left the file behind."""
    typo = tmp_path / "typo" / "predictions.db"
    with pytest.raises(predlog.PredictionLogError, match=r"typo/predictions.db cannot be read: its file .* does not "
                                                         r"exist"):
        predlog.read(f"sqlite:///{typo}")
    assert not typo.parent.exists()
    other = tmp_path / "mlflow.db"  # a database, but not a prediction log
    sqlite3.connect(other).execute("CREATE TABLE runs (id INTEGER)").connection.close()
    before = other.read_bytes()
    with pytest.raises(predlog.PredictionLogError, match="mlflow.db cannot be read: it holds no 'predictions' table"):
        predlog.read(f"sqlite:///{other}")
    assert other.read_bytes() == before


def test_read_selects_a_window_by_model_version_and_time(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    sink = predlog.PredictionLog(url)
    start = dt.datetime(2026, 3, 1)
    for hour in range(6):
        entry = dict.fromkeys(serving.FIELDS) | {"accepted": True}
        sink.append(predlog.records([entry], {}, {}, when=start + dt.timedelta(hours=hour), model_name="covidcxr",
                                    model_version=str(1 + hour % 2)))
    assert sink.flush(10) and sink.written == 6
    assert len(predlog.read(url)) == 6 and len(predlog.read(url, model_version="2")) == 3
    window = predlog.read(url, model_name="covidcxr", model_version="1", since=start + dt.timedelta(hours=1),
                          until=start + dt.timedelta(hours=4))
    assert [t.hour for t in window["time"]] == [2] and predlog.read(url, model_name="other").empty


WRITER = """
import datetime as dt, json, sys
from covidcxr import predlog
entry = dict.fromkeys(predlog.ENTRY_COLUMNS) | {"accepted": True}
records = predlog.records([entry] * 5, {}, {}, when=dt.datetime(2026, 3, 1), model_name="covidcxr", model_version="1")
metadata, _ = predlog._table()  # SQLAlchemy's lazy imports done before the start, so the writers meet at the CREATE
metadata.create_all(predlog.engine_for("sqlite://"))
print("ready", flush=True)
for url in sys.stdin:  # one fresh log a round, given to every writer at once
    sink = predlog.PredictionLog(url.strip())
    sink.append(records)
    sink.flush(30)
    print(json.dumps({"written": sink.written, "lost": sink.lost}), flush=True)
"""


def test_writers_starting_together_on_a_fresh_log_lose_nothing(tmp_path):
    """Servers (or workers) started at once on a new log all create its table: the CREATE of all but the first failed
    (table already exists), and they lost their first batch and every record of the next 10 seconds. Six writers on
    each of eight fresh logs (the race is one of timing: on two loaded cores, some rounds do not meet)."""
    n, rounds = 6, 8
    writers = [subprocess.Popen([sys.executable, "-c", WRITER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True) for _ in range(n)]
    try:
        assert [w.stdout.readline() for w in writers] == ["ready\n"] * n
        for k in range(rounds):
            url = f"sqlite:///{tmp_path / str(k) / 'predictions.db'}"
            for w in writers:
                w.stdin.write(url + "\n")
                w.stdin.flush()
            results = [json.loads(w.stdout.readline()) for w in writers]
            assert results == [{"written": 5, "lost": 0}] * n, f"round {k}"
            assert len(predlog.read(url)) == 5 * n
    finally:
        for w in writers:
            w.kill()


def old_log(url: str, when: dt.datetime, lacking: tuple[str, ...]) -> None:
    """A log as servers before the ``lacking`` columns wrote it, with one record of theirs."""
    from sqlalchemy import text

    metadata, table = predlog._table()
    engine = predlog.engine_for(url)
    try:
        metadata.create_all(engine)
        with engine.begin() as connection:
            for column in lacking:
                connection.execute(text(f"ALTER TABLE {predlog.TABLE} DROP COLUMN {column}"))
            connection.execute(text(f"INSERT INTO {predlog.TABLE} (time, model_name, model_version, accepted, "
                                    "threshold, ood_score) VALUES (:t, 'covidcxr', '3', :a, 0.5, 4.0)"),
                               {"t": when, "a": True})
    finally:
        engine.dispose()


def check_migration(url: str, lacking: tuple[str, ...] = tuple(predlog.ADDED_COLUMNS)) -> None:
    """An earlier version's log, without the ``lacking`` columns: read as it is (nulls there), then the first write
    adds them, keeps the old record (null there) and writes the new one's."""
    start = dt.datetime(2026, 3, 1)
    old_log(url, start, lacking)
    before = predlog.read(url)
    assert list(before.columns) == list(predlog.COLUMNS) and len(before) == 1
    assert before[list(lacking)].isna().all().all() and before["ood_score"].tolist() == [4.0]
    sink = predlog.PredictionLog(url)
    entry = dict.fromkeys(serving.FIELDS) | {"accepted": True, "threshold": 0.25, "ood_score": 9.0,
                                             "ood_threshold": 12.5, "thresholds_from": "site"}
    sink.append(predlog.records([entry], {}, {}, when=start + dt.timedelta(hours=1), model_name="covidcxr",
                                model_version="3"))
    assert sink.flush(20) and (sink.written, sink.lost) == (1, 0)
    after = predlog.read(url)
    assert after["ood_score"].tolist() == [4.0, 9.0] and after["threshold"].tolist() == [0.5, 0.25]
    assert after["ood_threshold"].iloc[1] == 12.5 and after["thresholds_from"].iloc[1] == "site"
    assert all(pd.isna(after[column].iloc[0]) for column in lacking)
    again = predlog.PredictionLog(url)  # a second server on the migrated log: nothing left to add
    again.append(predlog.records([entry], {}, {}, when=start + dt.timedelta(hours=2), model_name="covidcxr",
                                 model_version="3"))
    assert again.flush(20) and (again.written, again.lost) == (1, 0) and len(predlog.read(url)) == 3


@pytest.mark.parametrize("lacking", [("ood_threshold", "thresholds_from"), ("thresholds_from",)])
def test_a_log_of_an_earlier_version_gains_the_missing_columns_on_first_write(tmp_path, lacking):
    check_migration(f"sqlite:///{tmp_path / 'old.db'}", lacking)


def test_a_probe_asks_without_leaving_a_record(pipeline):
    """The PACS worker probes the server on every pass and predict/pacs --site and calibrate-site before they start: a
    blank probe, refused as zero_variance. Logged, 288 of them a day at a 5-minute interval read as refusals in the
    monitor's refusal rate; a request of probes only is no served prediction. A real film beside a probe still is."""
    sink = predlog.MemoryLog()
    pipeline.prediction_log = sink
    try:
        [probe] = pipeline.score([serving.probe_image()])
        assert probe["reason"] == "zero_variance" and sink.records == []
        about = serving.probe(lambda images, params: pipeline.score(images))
        assert about["model_version"] == "7" and sink.records == []
        pipeline.score([serving.probe_image(), png_b64(phantom())])
        assert [r["reason"] for r in sink.records] == ["zero_variance", None]
    finally:
        pipeline.prediction_log = None


def test_a_table_of_the_log_s_name_that_is_not_the_log_is_reported_with_its_message(tmp_path, caplog):
    """A write failure was logged by its type only, to keep a driver's message (which may echo the connection string)
    out of the log: an unrelated 'predictions' table read 'unavailable (RuntimeError)', which says nothing an operator
    can act on. The project's own error says which column is missing; a driver's stays type-only."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    with sqlite3.connect(tmp_path / "shared.db") as connection:
        connection.execute("CREATE TABLE predictions (id INTEGER PRIMARY KEY, sku TEXT, forecast REAL)")
    entry = dict.fromkeys(predlog.ENTRY_COLUMNS) | {"accepted": True}
    sink = predlog.PredictionLog(url)
    sink.append(predlog.records([entry], {}, {}, when=dt.datetime(2026, 3, 1), model_name="covidcxr",
                                model_version="1"))
    assert sink.flush(10) and (sink.written, sink.lost) == (0, 1)
    [error] = [r.getMessage() for r in caplog.records if r.name == "covidcxr.predlog" and r.levelno >= logging.ERROR]
    assert ("unavailable (PredictionLogError: the prediction log's table 'predictions' lacks column 'time', which no "
            "migration adds") in error
    assert predlog.describe(sqlite3.OperationalError("unable to open postgresql://covidcxr:secret@db/x")) == (
        "OperationalError")
