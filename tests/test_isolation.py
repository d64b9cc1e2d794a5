"""The suite's own isolation: what one test sets in-process must not reach the next test's subprocesses, and the
fixtures hand them paths that hold wherever they run."""

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
