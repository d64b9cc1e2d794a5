"""PadChest (Bustos et al. 2020, Med Image Anal 66:101797; bimcv.cipf.es/bimcv-projects/padchest).

Layout::

    root/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv[.gz]   (or option ``csv=``)
        ImageID, ImageDir, StudyDate_DICOM, StudyID, PatientID, PatientBirth, PatientSex_DICOM,
        ViewPosition_DICOM, Projection, MethodProjection, Pediatric, Modality_DICOM, ...,
        PhotometricInterpretation_DICOM, ..., BitsStored_DICOM, ..., Rows_DICOM, Columns_DICOM,
        ..., ReportID, Report, MethodLabel, Labels, Localizations, ...
    root/<ImageDir>/<ImageID>   16-bit PNG (ImageDir is the number of the zip archive, 0..54)

``Projection`` (reviewed) gives the projection: PA/AP/AP_horizontal -> frontal, L -> lateral,
COSTAL/EXCLUDE/UNK -> unknown; it is also kept as ``view_position``. ``age`` is the study year
minus the birth year (the dates themselves are not kept). ``finding`` is the Labels list joined
with "|"; PadChest predates COVID-19 (2009-2017), so ``label`` is ``negative``. The CSV's DICOM
fields give ``photometric`` (MONOCHROME1 PNGs are stored uninverted, air bright: the cache stages
invert them by this column, :func:`covidcxr.io.read_image`'s ``photometric``), ``bits_stored``,
``width``/``height`` (Columns/Rows) and ``modality``. Report texts are never read. All images come from
Hospital San Juan, Alicante: site "padchest".
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pandas as pd

from covidcxr import manifest
from covidcxr.datasets import (
    DatasetLayoutError,
    check_on_missing,
    finish,
    join,
    make_image_id,
    normalise_sex,
    parse_age,
    read_table,
    require_columns,
)

log = logging.getLogger(__name__)

SOURCE = "padchest"
CSV_NAME = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
REQUIRED = (
    "ImageID",
    "ImageDir",
    "PatientID",
    "Projection",
    "PatientSex_DICOM",
    "PatientBirth",
    "StudyDate_DICOM",
    "Labels",
)
OPTIONAL = (
    "Modality_DICOM",
    "PhotometricInterpretation_DICOM",
    "BitsStored_DICOM",
    "Rows_DICOM",
    "Columns_DICOM",
)
_QUOTED = re.compile(r"'([^']*)'")
_YEAR = re.compile(r"^\s*(\d{4})")


def load(
    root: str | os.PathLike,
    *,
    csv: str | os.PathLike | None = None,
    on_missing: str = "raise",
) -> pd.DataFrame:
    """Manifest of the images listed in the PadChest CSV (see the module docstring)."""
    check_on_missing(on_missing)
    file = _csv(Path(root), csv)
    wanted = set(REQUIRED) | set(OPTIONAL)
    df = read_table(file, usecols=lambda c: c.strip() in wanted)
    require_columns(df, REQUIRED, file)
    for column in OPTIONAL:
        if column not in df.columns:
            df[column] = ""

    rows = []
    for record in df.to_dict("records"):
        relative = f"{_dir(record['ImageDir'])}/{record['ImageID'].strip()}"
        view = record["Projection"].strip().upper()
        rows.append(
            {
                "image_id": make_image_id(SOURCE, relative),
                "path": join(root, relative),
                "patient_id": f"{SOURCE}:{record['PatientID'].strip()}",
                "projection": manifest.projection_from_view(view),
                "view_position": view or pd.NA,
                "label": "negative",
                "finding": parse_labels(record["Labels"]) or pd.NA,
                "site": SOURCE,
                "sex": normalise_sex(record["PatientSex_DICOM"]),
                "age": age(record["StudyDate_DICOM"], record["PatientBirth"]),
                "width": _int(record["Columns_DICOM"]),
                "height": _int(record["Rows_DICOM"]),
                "photometric": record["PhotometricInterpretation_DICOM"].strip() or pd.NA,
                "bits_stored": _int(record["BitsStored_DICOM"]),
                "modality": record["Modality_DICOM"].strip().upper() or pd.NA,
            }
        )
    return finish(rows, SOURCE, on_missing, file)


def age(study_date: str, birth_year: str) -> float | None:
    """Study year (from YYYYMMDD) minus birth year (e.g. "1993" or "1993.0"); None if unknown."""
    study, birth = _YEAR.match(study_date or ""), _YEAR.match(birth_year or "")
    if not (study and birth):
        return None
    return parse_age(int(study.group(1)) - int(birth.group(1)))


def parse_labels(text: str) -> str:
    """ "['pleural effusion', 'cardiomegaly']" -> "pleural effusion|cardiomegaly"."""
    items = [i.strip() for i in _QUOTED.findall(text or "")]
    return "|".join(dict.fromkeys(i for i in items if i))


def _csv(root: Path, csv: str | os.PathLike | None) -> Path:
    candidates = [root / csv] if csv is not None else [root / CSV_NAME, root / f"{CSV_NAME}.gz"]
    for file in candidates:
        if file.is_file():
            return file
    raise DatasetLayoutError(f"{candidates[0]}: missing PadChest labels CSV")


def _dir(image_dir: str) -> str:
    """"3" or "3.0" -> "3"."""
    text = image_dir.strip()
    return text[: -len(".0")] if text.endswith(".0") else text


def _int(text: str) -> int | None:
    text = (text or "").strip()
    try:
        return int(float(text)) if text else None
    except ValueError:
        return None
