"""Model folders: the files a trained network is saved as (by the training stages, read by every stage that scores,
bundled by register, loaded by serving), and what can be read of them without loading a network.

Kept apart from :mod:`covidcxr.models` so that a stage that only reads a folder's run info or threshold (``evaluate``)
does not import Keras and TensorFlow (seconds per stage process).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from covidcxr import metrics

MODEL_FILE, STANDARDIZER_FILE = "model.keras", "standardizer.json"
RUN_FILE, THRESHOLD_FILE, CALIBRATION_FILE = "run.json", "threshold.json", "calibration.json"
OOD_FILE = "ood.npz"  # covidcxr.ood: a classifier's out-of-distribution detector, a projection filter's lateral check
INPUT_FILE = "input.json"  # a classifier's input transform (lung crop, intensity normalisation); absent: the identity
MEMBER_FILE = "member{}.keras"  # an ensemble's further networks (1, 2, ...), beside MODEL_FILE, the first
#: The key of ``run.json`` listing the files ``models.Component.save`` wrote beside it, so that a fitted file that went
#: missing is an error, not a model served without it (a folder saved before the record has no such key).
SAVED_FILES_KEY = "files"
#: The files of a model folder that scoring needs (``predictions.csv`` and the like stay beside it, not in a bundle).
FOLDER_FILES: tuple[str, ...] = (MODEL_FILE, STANDARDIZER_FILE, RUN_FILE, THRESHOLD_FILE, CALIBRATION_FILE, OOD_FILE,
                                 INPUT_FILE)


def member_files(folder: str | os.PathLike) -> list[str]:
    """The file names of a model folder's further ensemble networks, in order (``member1.keras``, ...; none for a
    single network). Numbered from 1 without gaps: a gap ends the list."""
    names, i = [], 1
    while (Path(folder) / MEMBER_FILE.format(i)).is_file():
        names.append(MEMBER_FILE.format(i))
        i += 1
    return names


def folder_files(folder: str | os.PathLike) -> list[str]:
    """The files of a model folder that scoring needs and that it holds: :data:`FOLDER_FILES` and its members'."""
    return [f for f in FOLDER_FILES if (Path(folder) / f).is_file()] + member_files(folder)


def folder_info(folder: str | os.PathLike) -> dict:
    """The run info of a model folder (``run_id`` of its MLflow run and what made it), without loading the network.

    A file the folder was saved with (``run.json``'s :data:`SAVED_FILES_KEY`) that is gone is a FileNotFoundError
    naming it: a classifier without its ``input.json`` would score whole, unequalised images, without its
    ``calibration.json`` raw scores against a threshold chosen on calibrated ones, without ``ood.npz`` refuse nothing.
    """
    folder = Path(folder)
    for name in (MODEL_FILE, STANDARDIZER_FILE, RUN_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: not a model folder (no {name}); run the stage that trains it")
    info = _read_json(folder / RUN_FILE)
    missing = [name for name in info.get(SAVED_FILES_KEY, ()) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: model folder lacks {', '.join(missing)}, saved with it ({RUN_FILE} lists "
                                "it); rerun the stage that trains it")
    return info


def _read_json(path: Path) -> dict:
    """A folder file's JSON object; a ValueError naming the file when it is not one (truncated, say)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({type(err).__name__}); rerun the stage that trains it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object; rerun the stage that trains it")
    return data


def folder_threshold(folder: str | os.PathLike) -> dict | None:
    """The operating threshold of a model folder and how it was chosen (``threshold.json``), or None. A file without
    its ``threshold``, or one that :func:`covidcxr.metrics.check_threshold` refuses (the rule serving loads it by), is
    a ValueError naming it."""
    path = Path(folder) / THRESHOLD_FILE
    if not path.is_file():
        return None
    saved = _read_json(path)
    if "threshold" not in saved:
        raise ValueError(f"{path}: no threshold; rerun the stage that trains it")
    try:
        metrics.check_threshold(saved["threshold"], f"{path}: threshold")
    except ValueError as err:
        raise ValueError(f"{err}; rerun the stage that trains it") from None
    return saved


def ood_detector(folder: str | os.PathLike):
    """The folder's out-of-distribution detector (:class:`covidcxr.ood.MahalanobisDetector`, numpy only), or None for
    a folder saved without one (serving then refuses nothing as out of distribution)."""
    path = Path(folder) / OOD_FILE
    if not path.is_file():
        return None
    from covidcxr.ood import MahalanobisDetector

    return MahalanobisDetector.load(path)


def operating_threshold(folder: str | os.PathLike) -> float:
    """The threshold saved with a model folder, as its loaded ``models.Component`` applies it; a folder without one is
    an error naming the file."""
    saved = folder_threshold(folder)
    if not saved:
        raise FileNotFoundError(f"{folder}: no operating threshold ({THRESHOLD_FILE}); rerun the stage that trains it")
    return float(saved["threshold"])
