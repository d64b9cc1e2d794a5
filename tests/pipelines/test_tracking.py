"""pipelines._tracking: where a stage logs its runs."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from pipelines import _tracking

CLUSTER = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}


@pytest.mark.parametrize(("index", "chief"), [(0, True), (1, False)])
def test_only_the_chief_worker_logs_to_the_team_store(monkeypatch, tmp_path: Path, index: int, chief: bool):
    team = f"sqlite:///{tmp_path / 'team.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": CLUSTER, "task": {"type": "worker", "index": index}}))
    previous = mlflow.get_tracking_uri()
    try:
        _tracking.setup_tracking()
        uri = mlflow.get_tracking_uri()
    finally:
        mlflow.set_tracking_uri(previous)
    assert (uri == team) is chief
    if not chief:
        assert uri.startswith("sqlite:///") and "covidcxr-worker-mlruns-" in uri
