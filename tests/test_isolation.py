"""The suite's own isolation: what one test sets in-process must not reach the next test's subprocesses."""

from __future__ import annotations

import os

import mlflow

BEFORE = os.environ.get("MLFLOW_TRACKING_URI")


def test_a_test_that_points_mlflow_elsewhere(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    assert os.environ["MLFLOW_TRACKING_URI"].endswith("elsewhere.db")  # mlflow writes it into the environment


def test_the_next_test_sees_the_environment_it_started_with():
    # tests run in file order: the test above ran just before this one (tests/conftest.py restores the variable)
    assert os.environ.get("MLFLOW_TRACKING_URI") == BEFORE
