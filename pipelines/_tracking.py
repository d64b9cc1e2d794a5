"""MLflow for the stages: the tracking store and the tags that make a run reproducible."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import mlflow

from covidcxr import io, tracking, training
from pipelines import _common

#: The split tables each stage trains, selects or is measured on: with the manifest, what its figures were computed
#: on (its runs' ``data_version``). ingest makes the manifest, so its runs carry none (only ``data_dvc``).
STAGE_SPLITS: dict[str, tuple[str, ...]] = {
    "ingest": (),
    "pretrain": ("covid", "projection"),  # their test and external splits are left out of pretraining
    "train_projection": ("projection",),
    "tune_unet": ("segmentation",),
    "train_unet": ("segmentation",),
    "train_classifier": ("covid",),
    "audit": ("covid",),
    "register": ("covid",),
}


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


def data_version(files: Mapping[str, str | os.PathLike]) -> str:
    """One SHA-256 of what figures were computed on: over each file's role (``files``' key) and SHA-256, by role.

    The manifest holds every image's SHA-256 (and path), so another download, corpus or ``COVIDCXR_REAL_DATA`` gives
    another version; a split table holds the selection, so another ``split.experiment`` or ``split.seed`` does too.
    data.dvc cannot tell: the real corpus is read from outside the folder it tracks.
    """
    lines = []
    for role in sorted(files):
        path = Path(files[role])
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; the data version ({role}) is a hash of it")
        lines.append(f"{role}\t{io.sha256_file(path)}\n")
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def stage_data(stage: str) -> dict[str, str]:
    """The files of a stage's data version (role -> path): the manifest and its split tables (:data:`STAGE_SPLITS`),
    or none for a stage that makes the manifest."""
    if stage not in STAGE_SPLITS:
        raise ValueError(f"stage {stage!r} has no entry in pipelines._tracking.STAGE_SPLITS: say which split tables "
                         "its figures are computed on")
    tasks = STAGE_SPLITS[stage]
    return {"manifest": _common.MANIFEST, **{f"split:{t}": _common.split_table(t) for t in tasks}} if tasks else {}


def repro_tags(stage: str, experiment: str) -> dict[str, str]:
    """What makes a run reproducible: the code version, the data version, and the stage that made it.

    ``data_version`` (:func:`data_version`) is of the manifest and split tables the stage's figures were computed on,
    so that figures of other data are never taken for comparable; ``data_dvc`` is the hash data.dvc records (the
    demo data folder only).
    """
    files = stage_data(stage)
    return {
        "git_commit": tracking.git_commit(),
        **({"data_version": data_version(files)} if files else {}),
        "data_dvc": tracking.dvc_file_hash("data.dvc"),
        "dvc_stage": stage,
        "experiment": experiment,
    }
