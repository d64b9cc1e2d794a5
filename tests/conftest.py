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
