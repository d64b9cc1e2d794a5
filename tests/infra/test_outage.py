"""Tracking server or artifact store down: a typed error naming the endpoint, bounded retries with backoff, and no
model version registered when the artifacts could not be stored. Real servers and sockets on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import numpy as np
import pytest

from covidcxr import tracking
from tests.infra.conftest import BIN, base_env, free_port, missing, stop_group, wait_http

pytestmark = pytest.mark.infra  # real servers on 127.0.0.1 (some also slow)
HANG_GUARD_S = 300  # S3 going away mid-run ends the run in about 6 s here (AWS_MAX_ATTEMPTS=2)


class FlakyServer:
    """An HTTP server that answers 503 to its first ``failures`` requests, then 200, and counts them."""

    def __init__(self, failures: int) -> None:
        self.failures, self.requests = failures, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                owner.requests.append((time.monotonic(), self.path))
                status = 503 if len(owner.requests) <= owner.failures else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FlakyServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_closed_port_fails_fast_with_a_typed_error_naming_the_endpoint():
    port = free_port()  # bound then released: nothing listens there
    waits: list[float] = []
    with pytest.raises(tracking.TrackingUnavailable) as caught:
        tracking.ensure_reachable(f"http://alice:s3cret@127.0.0.1:{port}/", retries=2, backoff=0.05,
                                  sleep=waits.append)
    message = str(caught.value)
    assert f"http://127.0.0.1:{port}" in message and "3 attempts" in message, message
    assert "s3cret" not in message and "alice" not in message
    assert waits == [0.05, 0.1]  # between the three attempts, and no more


def test_a_run_against_a_dead_server_fails_before_logging_anything(monkeypatch):
    port = free_port()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # MLflow's own knobs drive the check's defaults
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
    try:
        # bounded by the attempts the message counts (MLflow's retry setting), each refused at once
        with pytest.raises(tracking.TrackingUnavailable, match=f"127.0.0.1:{port}.*2 attempts"):
            with tracking.run("covidcxr-outage", "never", params={"a": 1}):
                pytest.fail("the run's body must not start")
        assert mlflow.active_run() is None
    finally:
        mlflow.set_tracking_uri(None)


def test_retries_with_exponential_backoff_until_the_server_answers():
    waits: list[float] = []
    with FlakyServer(failures=2) as server:
        attempts = tracking.ensure_reachable(server.url, retries=4, backoff=0.01, sleep=waits.append)
    assert attempts == 3 and len(server.requests) == 3  # two 503s, then success: no further request
    assert waits == [0.01, 0.02]
    assert {path for _, path in server.requests} == {"/health"}


def test_retries_are_bounded():
    waits: list[float] = []
    with FlakyServer(failures=100) as server:
        with pytest.raises(tracking.TrackingUnavailable, match="HTTP 503"):
            tracking.ensure_reachable(server.url, retries=3, backoff=0.02, sleep=waits.append)
    assert len(server.requests) == 4  # 1 + retries, then it gives up
    assert waits == [0.02, 0.04, 0.08]  # a backoff between each two requests, none after the last


def test_other_stores_are_not_probed(tmp_path):
    assert tracking.ensure_reachable(f"sqlite:///{tmp_path / 'mlflow.db'}") == 0
    assert tracking.ensure_reachable(str(tmp_path / "mlruns")) == 0


@pytest.fixture
def own_s3(tmp_path, monkeypatch):
    """A private moto S3 server (not the session's shared one: this test stops it), with made-up credentials."""
    server = BIN / "moto_server"
    if not server.exists():
        missing("moto[server] is not installed (pip install -e '.[test]')")
    port, log = free_port(), tmp_path / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, env=base_env(), start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{endpoint}/moto-api/", proc, log)
        for name in [k for k in os.environ if k.startswith("AWS_")]:
            monkeypatch.delenv(name)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "covidcxr-test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "covidcxr-test-secret")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # boto3's own retries with backoff, bounded for the test
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="covidcxr-outage")
        yield endpoint, proc
    finally:
        stop_group(proc)


@pytest.mark.slow
def test_artifact_store_down_mid_run_registers_no_model_version(own_s3, tmp_path: Path):
    import keras

    endpoint, s3_server = own_s3
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        client.create_experiment("covidcxr-outage", artifact_location="s3://covidcxr-outage/mlartifacts")
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        x = np.zeros((2, 4), dtype=np.float32)
        outcome: dict = {}

        def s3_goes_away_mid_run() -> None:
            try:
                with tracking.run("covidcxr-outage", "s3-down") as active:
                    outcome["run_id"] = active.info.run_id
                    mlflow.log_text("written while S3 was up", "notes.txt")  # the store works at first
                    stop_group(s3_server)  # then S3 goes away mid-run
                    # the register stage's order: upload everything, register only after a successful upload
                    model_uri = tracking.log_keras_model(model, x)
                    mlflow.register_model(model_uri, "covidcxr-outage")
            except BaseException as err:  # noqa: BLE001 - judged below, in the test's own thread
                outcome["error"] = err

        # a hang guard, not a speed target: retries that never end (AWS_MAX_ATTEMPTS ignored) fail here, by name
        worker = threading.Thread(target=s3_goes_away_mid_run, daemon=True)
        worker.start()
        worker.join(HANG_GUARD_S)
        assert not worker.is_alive(), f"the run had not ended {HANG_GUARD_S} s after S3 went away: unbounded retries?"
        assert isinstance(outcome.get("error"), tracking.ArtifactStoreUnavailable), outcome
        message = str(outcome["error"])
        assert endpoint in message and "s3://covidcxr-outage/mlartifacts" in message, message
        assert "covidcxr-test-secret" not in message
        assert client.get_run(outcome["run_id"]).info.status == "FAILED"
        assert client.search_registered_models() == []
        assert client.search_model_versions("name='covidcxr-outage'") == []
    finally:
        mlflow.set_tracking_uri(None)
