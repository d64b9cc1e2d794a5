"""The suite's own isolation: what one test sets in-process must not reach the next test's subprocesses, and the
fixtures hand them paths that hold wherever they run."""

from __future__ import annotations

import functools
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parents[1]
BEFORE = os.environ.get("MLFLOW_TRACKING_URI")
#: The README's team set-up as a developer's shell exports it, with the credentials such a shell also holds.
TEAM_SHELL = {
    "MLFLOW_TRACKING_URI": "http://mlflow-host:5000",
    "MLFLOW_TRACKING_TOKEN": "team-token",
    "COVIDCXR_PREDICTION_LOG": "postgresql+psycopg2://covidcxr@db-host/predictions",
    "COVIDCXR_OPTUNA_STORAGE": "postgresql+psycopg2://optuna@db-host/optuna",
    "COVIDCXR_SITE": "/srv/covidcxr/site-thresholds.json",
    "COVIDCXR_PSEUDONYM_SALT": "team-salt",
    "COVIDCXR_PORTABLE_CPU": "1",
    "AWS_ACCESS_KEY_ID": "AKIATEAM",
    "AWS_SECRET_ACCESS_KEY": "team-secret",
    "PGPASSWORD": "team-password",
}
#: What a test probe records: the tests' environment and a stage subprocess's (runtime.environment copies os.environ).
PROBE = """
import json, os
from pathlib import Path


def test_probe():
    from covidcxr import runtime

    seen = {"tests": dict(os.environ), "subprocesses": runtime.environment()}
    (Path(__file__).parent / "seen.json").write_text(json.dumps(seen))
"""


def test_the_developers_team_settings_reach_neither_tests_nor_their_subprocesses(tmp_path):
    """`make test` in a shell with the team set-up exported: the end-to-end `dvc repro` registered a demo model as
    the team's covidcxr@champion, the tune stage added a trial to the team's study, the serving tests wrote phantom
    predictions to the hospital's log. tests/conftest.py now removes those settings from every test process."""
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # not this run's xdist worker
    env |= TEAM_SHELL | {"COVIDCXR_REAL_DATA": str(tmp_path / "real-data"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           str(tmp_path / "test_probe.py")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = json.loads((tmp_path / "seen.json").read_text())
    for where, environment in seen.items():
        assert sorted(set(TEAM_SHELL) & set(environment)) == [], where
        assert environment["COVIDCXR_REAL_DATA"] == str(tmp_path / "real-data"), where  # what the tests read: kept
        assert environment["MLFLOW_DISABLE_TELEMETRY"] == "true", where


def test_a_test_that_points_mlflow_elsewhere(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    assert os.environ["MLFLOW_TRACKING_URI"].endswith("elsewhere.db")  # mlflow writes it into the environment


def test_the_next_test_sees_the_environment_it_started_with():
    # tests run in file order: the test above ran just before this one (tests/conftest.py restores the variable)
    assert os.environ.get("MLFLOW_TRACKING_URI") == BEFORE


def test_a_relative_real_data_path_reaches_other_folders_absolute(tmp_path, monkeypatch):
    """`COVIDCXR_REAL_DATA=../shared/real-data make test`: the fixture's root is absolute, so that a project copy
    elsewhere (tests/pipelines/test_real_data.py writes it into the copy's params.yaml) finds the corpus too."""
    from tests.conftest import REAL_DATA_ENV, real_data_root

    (tmp_path / "shared/real-data/cohen").mkdir(parents=True)
    (tmp_path / "shared/real-data/cohen/metadata.csv").write_text("filename\n")
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    monkeypatch.setenv(REAL_DATA_ENV, "../shared/real-data")
    root = real_data_root()
    assert root.is_absolute() and root == (tmp_path / "shared/real-data").resolve()
    monkeypatch.chdir(tmp_path)  # where the copy's dvc runs: the relative path would name tmp_path/../shared here
    assert (root / "cohen/metadata.csv").is_file()


def test_loopback_requests_never_go_through_the_shells_proxy(tmp_path, monkeypatch):
    """With http_proxy set and no no_proxy, urlopen sent the requests to the tests' own servers (a model server's
    /ping, /invocations with planted identifiers) to the proxy; LOOPBACK, which they use now, never reads it."""
    from tests.conftest import LOOPBACK

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))  # bound, never listening: a request sent to the proxy is refused
            for name in ("no_proxy", "NO_PROXY"):
                monkeypatch.delenv(name, raising=False)
            for name in ("http_proxy", "HTTP_PROXY"):
                monkeypatch.setenv(name, f"http://127.0.0.1:{closed.getsockname()[1]}")
            with LOOPBACK.open(f"http://127.0.0.1:{server.server_address[1]}/", timeout=10) as response:
                assert response.status == 200
    finally:
        server.shutdown()
        server.server_close()
