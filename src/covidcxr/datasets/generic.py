"""Bring your own data: any chest X-ray collection described by one CSV file.

Put a ``manifest.csv`` in the folder that holds your images (or pass ``csv="other.csv"``,
relative to ``root`` unless absolute)::

    path,patient_id,label,projection,finding,site,sex,age,view_position,mask_path
    images/p001_a.png,p001,covid,frontal,COVID-19 pneumonia,hospital-a,F,54,PA,masks/p001_a.png
    images/p002_a.dcm,p002,negative,lateral,,hospital-b,M,,LL,

Required columns:

- ``path``: the image file (PNG, JPEG or DICOM), relative to the CSV's folder (absolute paths are
  accepted but make the manifest machine-specific);
- ``patient_id``: your patient key; images of one patient never end up in different splits, so
  give every image of a patient the same id (it is stored as ``generic:<patient_id>``);
- ``label``: ``covid``, ``negative`` or ``unknown``;
- ``projection``: ``frontal``, ``lateral`` or ``unknown``.

Optional columns: ``finding`` (free label text, e.g. "No Finding"; never put report text or
names here), ``site`` (hospital or scanner group; default "generic"), ``sex`` (``M``, ``F`` or
``unknown``), ``age`` (years, 0-120), ``view_position`` (PA, AP, LL, ...), ``mask_path`` (lung
mask, relative like ``path``; several files joined with ";" are merged). Other columns are
ignored. Values are trimmed and label/projection/sex are case-insensitive; blanks in optional
columns mean unknown.

Every value is checked before anything is loaded: a wrong value raises
:class:`~covidcxr.datasets.DatasetLayoutError` naming the CSV, the line numbers (the header is
line 1) and the bad values. An image listed but missing on disk raises too, unless
``on_missing="skip"``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path, PurePosixPath

import pandas as pd

from covidcxr import manifest
from covidcxr.datasets import (
    DatasetLayoutError,
    check_on_missing,
    finish,
    join,
    listing,
    make_image_id,
    parse_age,
    read_table,
    require_columns,
)

log = logging.getLogger(__name__)

SOURCE = "generic"
CSV_NAME = "manifest.csv"
REQUIRED = ("path", "patient_id", "label", "projection")
OPTIONAL = ("finding", "site", "sex", "age", "view_position", "mask_path")


def load(
    root: str | os.PathLike,
    *,
    csv: str | os.PathLike = CSV_NAME,
    on_missing: str = "raise",
) -> pd.DataFrame:
    """Manifest of the images listed in ``root/manifest.csv`` (see the module docstring)."""
    check_on_missing(on_missing)
    csv_path = join(root, os.fspath(csv))
    file = Path(csv_path)
    if not file.is_file():
        raise DatasetLayoutError(f"{file}: missing CSV describing the images")
    df = read_table(file)
    require_columns(df, REQUIRED, file)
    ignored = [c for c in df.columns if c not in REQUIRED + OPTIONAL]
    if ignored:
        log.info("generic: %s: ignored column(s) %s", file, ignored)
    for column in OPTIONAL:
        if column not in df.columns:
            df[column] = ""
    df = df.map(str.strip)
    _validate(df, file)

    folder = str(PurePosixPath(csv_path).parent)
    rows = []
    for record in df.to_dict("records"):
        relative = record["path"]
        masks = [m.strip() for m in record["mask_path"].split(";") if m.strip()]
        view = record["view_position"].upper()
        rows.append(
            {
                "image_id": make_image_id(SOURCE, relative.lstrip("/")),
                "path": join(folder, relative),
                "patient_id": f"{SOURCE}:{record['patient_id']}",
                "projection": record["projection"].lower(),
                "view_position": view or pd.NA,
                "label": record["label"].lower(),
                "finding": record["finding"] or pd.NA,
                "site": record["site"] or SOURCE,
                "sex": {"m": "M", "f": "F"}.get(record["sex"].lower(), "unknown"),
                "age": parse_age(record["age"]),
                "mask_path": ";".join(join(folder, m) for m in masks) or pd.NA,
            }
        )
    return finish(rows, SOURCE, on_missing, file)


def _validate(df: pd.DataFrame, file: Path) -> None:
    """Raise DatasetLayoutError listing every bad value with its CSV line number."""
    line = pd.Series(range(2, len(df) + 2), index=df.index)
    problems = []

    def check(column: str, bad: pd.Series, expected: str) -> None:
        if bad.any():
            values = [f"line {n}: {v!r}" for n, v in zip(line[bad], df.loc[bad, column])]
            problems.append(f"{column} must be {expected} ({listing(values)})")

    for column in ("path", "patient_id"):
        check(column, df[column] == "", "non-empty")
    check("label", ~df["label"].str.lower().isin(manifest.LABELS), "/".join(manifest.LABELS))
    check(
        "projection",
        ~df["projection"].str.lower().isin(manifest.PROJECTIONS),
        "/".join(manifest.PROJECTIONS),
    )
    check("sex", ~df["sex"].str.lower().isin(("m", "f", "unknown", "")), "M/F/unknown or blank")
    ages = df["age"].map(parse_age)
    check("age", (df["age"] != "") & ages.isna(), "a number of years between 0 and 120 or blank")
    duplicated = df["path"].duplicated(keep=False) & (df["path"] != "")
    check("path", duplicated, "unique")
    if problems:
        raise DatasetLayoutError(f"{file}: " + "; ".join(problems))
