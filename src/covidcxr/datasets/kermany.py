"""Pediatric chest X-rays of Kermany et al. 2018 (Cell 172(5); Mendeley Data rscbjbr9sj, v2/v3).

Layout (the Kaggle "chest-xray-pneumonia" release of the Mendeley data)::

    root/chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}/*.jpeg

``root`` may also be the ``chest_xray`` folder itself. There is no metadata file: the folder gives
the class and the file name gives the patient:

- ``personN_bacteria_M.jpeg`` / ``personN_virus_M.jpeg`` -> patient ``personN``, finding
  "bacterial pneumonia" / "viral pneumonia";
- ``IM-xxxx-0001.jpeg`` (also ``IM-xxxx-0001-0002.jpeg``) / ``NORMAL2-IM-xxxx-0001.jpeg`` ->
  patient ``IM-xxxx`` / ``NORMAL2-IM-xxxx``, finding "normal".

A file name of neither form keeps its stem as patient id (with a warning). All images are frontal
(anterior-posterior radiographs of the Guangzhou Women and Children's Medical Center; site
"guangzhou"); label is always ``negative``. The patients are children aged one to five years,
but no per-image age or sex is published: ``age`` stays <NA> and ``sex`` unknown. A classifier
can tell these images from adult ones by anatomy alone; keep that confounder in mind.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pandas as pd

from covidcxr.datasets import DatasetLayoutError, check_on_missing, finish, join, make_image_id

log = logging.getLogger(__name__)

SOURCE = "kermany"
SITE = "guangzhou"
SPLITS = ("train", "test", "val")
CLASSES = ("NORMAL", "PNEUMONIA")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")

_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)_\d+$", re.IGNORECASE)
_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)(?:-\d+)+$", re.IGNORECASE)
_FINDING = {"bacteria": "bacterial pneumonia", "virus": "viral pneumonia"}


def load(root: str | os.PathLike, *, on_missing: str = "raise") -> pd.DataFrame:
    """Manifest of every image under ``root/chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}``."""
    check_on_missing(on_missing)
    base, prefix = _base(Path(root))
    rows, unparsed = [], []
    for split in SPLITS:
        for klass in CLASSES:
            folder = base / split / klass
            if not folder.is_dir():
                continue
            for file in sorted(folder.iterdir()):
                if file.suffix.lower() not in IMAGE_SUFFIXES or not file.is_file():
                    log.debug("kermany: ignored %s", file)
                    continue
                patient, finding = parse_name(file.stem, klass)
                if patient is None:
                    unparsed.append(file.name)
                    patient = file.stem
                relative = f"{prefix}{split}/{klass}/{file.name}"
                rows.append(
                    {
                        "image_id": make_image_id(SOURCE, relative),
                        "path": join(root, relative),
                        "patient_id": f"{SOURCE}:{patient}",
                        "projection": "frontal",
                        "label": "negative",
                        "finding": finding,
                        "site": SITE,
                        "sex": "unknown",
                    }
                )
    if unparsed:
        log.warning(
            "kermany: %d file name(s) of unknown form, patient id taken from the whole name "
            "(first: %s)",
            len(unparsed),
            unparsed[0],
        )
    return finish(rows, SOURCE, on_missing, base)


def parse_name(stem: str, klass: str) -> tuple[str | None, str]:
    """(patient id, finding) of a Kermany file stem in class folder ``klass``."""
    if klass.upper() == "NORMAL":
        match = _NORMAL.match(stem)
        return (match.group(1) if match else None), "normal"
    match = _PERSON.match(stem)
    if not match:
        return None, "pneumonia"
    return match.group(1), _FINDING[match.group(2).lower()]


def _base(root: Path) -> tuple[Path, str]:
    """The folder holding train/test/val, and its path prefix relative to ``root``."""
    for base, prefix in ((root / "chest_xray", "chest_xray/"), (root, "")):
        if any((base / split).is_dir() for split in SPLITS):
            return base, prefix
    raise DatasetLayoutError(
        f"{root}: missing Kermany folders chest_xray/{{{','.join(SPLITS)}}}/{{{','.join(CLASSES)}}}"
    )
