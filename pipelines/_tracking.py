"""MLflow for the stages: the tracking store and the tags that make a run reproducible."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import mlflow

from covidcxr import tracking, training


def setup_tracking() -> None:
    """Default store: sqlite in the project directory; MLFLOW_TRACKING_URI overrides it.

    A non-chief worker of a multi-worker cluster (``TF_CONFIG``) trains like the chief but must not add runs to the
    team's store: it logs to a throwaway store in a temporary folder, and only the chief's runs count.
    """
    if not training.is_chief():
        scratch = Path(tempfile.mkdtemp(prefix="covidcxr-worker-mlruns-"))
        logging.getLogger("covidcxr").info("not the chief worker: MLflow runs go to a throwaway store in %s", scratch)
        mlflow.set_tracking_uri(f"sqlite:///{scratch / 'mlflow.db'}")
        return
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")


def repro_tags(stage: str, experiment: str) -> dict[str, str]:
    """What makes a run reproducible: the code version, the data version, and the stage that made it."""
    return {
        "git_commit": tracking.git_commit(),
        "data_version": tracking.dvc_file_hash("data.dvc"),
        "dvc_stage": stage,
        "experiment": experiment,
    }
