"""COVID-19 Image Data Collection (Cohen et al. 2020), github.com/ieee8023/covid-chestxray-dataset.

Layout (README.md and SCHEMA.md of that repository)::

    root/metadata.csv          patientid, offset, sex, age, finding, ..., view, modality, date,
                               location, folder, filename, doi, url, license, clinical_notes, ...
    root/<folder>/<filename>   the image ("folder" is "images" for X-rays, "volumes" for CT;
                               when the column is absent the image is looked up in images/)
    root/masks_v7labs/<image stem>.png   optional V7 Labs lung masks (both lungs in one file,
                               as distributed in torchxrayvision)

Only ``modality == "X-ray"`` rows are chest radiographs; CT rows (and any other modality) are left
out and counted in a log message. ``metadata.csv`` has been published both as UTF-8 and as
cp1252/latin-1: both are read.

Mapping: ``view`` PA/AP/AP Supine/APS/AP semi erect -> frontal, L -> lateral, blank or "?" ->
unknown. ``finding`` may be flat ("COVID-19", "COVID-19, ARDS") or hierarchical
("Pneumonia/Viral/COVID-19"); any COVID-19 component gives label ``covid``, "todo"/blank gives
``unknown``, anything else ``negative``. ``location`` is free text naming hospitals and cities:
only the country part (after the last comma) is kept as ``site``, and only when it looks like a
plain place name. Dates, DOIs, URLs, clinical and other notes are never copied.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path, PurePosixPath

import pandas as pd

from covidcxr import manifest
from covidcxr.datasets import (
    check_on_missing,
    finish,
    join,
    make_image_id,
    normalise_sex,
    parse_age,
    read_table,
    require_columns,
    require_file,
)

log = logging.getLogger(__name__)

SOURCE = "cohen"
METADATA = "metadata.csv"
MASK_DIR = "masks_v7labs"
REQUIRED = ("patientid", "sex", "age", "finding", "view", "modality", "filename")

_UNKNOWN_FINDINGS = {"", "todo", "unknown", "?"}
# A site kept from `location` must look like a bare country/region name, not an institution.
_PLACE = re.compile(r"^[A-Za-z][A-Za-z .'-]{1,39}$")
_INSTITUTION = re.compile(
    r"hospital|clinic|centre|center|universit|institut|medical|school|radiolog|infirmary",
    re.IGNORECASE,
)


def load(root: str | os.PathLike, *, on_missing: str = "raise") -> pd.DataFrame:
    """Manifest of the X-ray rows of ``root/metadata.csv`` (see the module docstring)."""
    check_on_missing(on_missing)
    file = require_file(Path(root) / METADATA, "Cohen metadata file")
    df = read_table(file)
    require_columns(df, REQUIRED, file)
    if "folder" not in df.columns:
        df["folder"] = "images"

    modality = df["modality"].str.strip()
    xray = modality.str.lower() == "x-ray"
    if not xray.all():
        counts = modality[~xray].replace("", "<blank>").value_counts().to_dict()
        log.info("cohen: left out %d non-X-ray row(s) of %s: %s", int((~xray).sum()), file, counts)
    df = df.loc[xray]

    masks = _mask_stems(Path(root) / MASK_DIR)
    records = df.to_dict("records")
    rows = [_row(root, record, masks) for record in records]
    _log_unlisted(Path(root), {_relative(record) for record in records})
    return finish(rows, SOURCE, on_missing, file)


def _relative(record: dict) -> str:
    return f"{record['folder'].strip() or 'images'}/{record['filename'].strip()}"


def _row(root: str | os.PathLike, record: dict, masks: set[str]) -> dict:
    relative = _relative(record)
    view = record["view"].strip().upper()
    view = "" if view == "?" else view
    stem = PurePosixPath(relative).stem
    return {
        "image_id": make_image_id(SOURCE, relative),
        "path": join(root, relative),
        "patient_id": f"{SOURCE}:{record['patientid'].strip()}",
        "projection": projection(view),
        "view_position": view or pd.NA,
        "label": label(record["finding"]),
        "finding": record["finding"].strip() or pd.NA,
        "site": site(record.get("location", "")),
        "sex": normalise_sex(record["sex"]),
        "age": parse_age(record["age"]),
        "mask_path": join(root, MASK_DIR, f"{stem}.png") if stem in masks else pd.NA,
    }


def projection(view: str) -> str:
    """Projection of a Cohen ``view`` value."""
    return manifest.projection_from_view(view)  # the one view map knows Cohen's own spellings (APS, ...)


def label(finding: str) -> str:
    """covid / negative / unknown from a flat or hierarchical Cohen finding."""
    text = finding.strip()
    if text.lower() in _UNKNOWN_FINDINGS:
        return "unknown"
    parts = {p.strip().lower() for p in re.split(r"[/,]", text)}
    return "covid" if "covid-19" in parts else "negative"


def site(location: str) -> str:
    """Country part of the free-text ``location`` (after its last comma), or ``unknown``."""
    part = (location or "").rsplit(",", 1)[-1].strip()
    if _PLACE.match(part) and not _INSTITUTION.search(part):
        return part
    return "unknown"


def _log_unlisted(root: Path, listed: set[str]) -> None:
    folders = {PurePosixPath(r).parent for r in listed}
    on_disk = {f"{d}/{p.name}" for d in folders if (root / d).is_dir() for p in (root / d).iterdir()}
    if on_disk - listed:
        log.debug("cohen: %d file(s) not in metadata.csv ignored", len(on_disk - listed))


def _mask_stems(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    return {p.stem for p in folder.iterdir() if p.suffix.lower() == ".png"}
