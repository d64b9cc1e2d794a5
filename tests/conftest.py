"""Shared fixtures: the real-data corpus (from ../shared, located by COVIDCXR_REAL_DATA) and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REAL_DATA_ENV = "COVIDCXR_REAL_DATA"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Root of the real chest X-ray corpus.

    Unset variable: skip with a visible reason (a user's fresh clone). Set but missing: fail, since CI
    sets it and must never pass by skipping.
    """
    value = os.environ.get(REAL_DATA_ENV)
    if not value:
        pytest.skip(f"{REAL_DATA_ENV} is not set: real chest X-ray tests need ../shared/real-data")
    root = Path(value)
    if not (root / "cohen" / "metadata.csv").is_file():
        pytest.fail(f"{REAL_DATA_ENV}={value} does not hold the real-data corpus (no cohen/metadata.csv)")
    return root


@pytest.fixture(autouse=True)
def _tracking_uri_restored():
    """``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into ``os.environ``: without this, a test
    that calls it in-process (the CLI, a stage's ``main``) would send every later test's subprocesses, such as the
    end-to-end ``dvc repro`` in a copy of the project, to its own store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
