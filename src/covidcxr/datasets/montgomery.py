"""Montgomery County (USA) and Shenzhen (China) tuberculosis chest X-ray sets of the U.S. National
Library of Medicine (Jaeger et al. 2014, Quant Imaging Med Surg 4(6); NLM LHNCBC
"Tuberculosis Chest X-ray Image Data Sets" release notes).

Official layouts (root may also be the parent of ``MontgomerySet/`` or ``ChinaSet_AllFiles/``)::

    Montgomery: CXR_png/MCUCXR_xxxx_y.png
                ManualMask/leftMask/MCUCXR_xxxx_y.png, ManualMask/rightMask/MCUCXR_xxxx_y.png
                ClinicalReadings/MCUCXR_xxxx_y.txt   ("Patient's Sex: M", "Patient's Age: 045Y")
    Shenzhen:   CXR_png/CHNCXR_xxxx_y.png
                mask/CHNCXR_xxxx_y_mask.png          (Stirenko et al. 2018 masks, Kaggle
                                                      "shcxr-lung-mask"; 566 of the 662 images)
                ClinicalReadings/CHNCXR_xxxx_y.txt   ("male 35yrs", "Female,23yrs", ...)

Merged layout (both sets in one folder, same file name for image and mask, e.g. the corpus in
``real-data/montgomery_shenzhen``)::

    root/images/{MCUCXR,CHNCXR}_xxxx_y.png
    root/masks/{MCUCXR,CHNCXR}_xxxx_y.png              (both lungs in one mask)

The layout is detected from the folders present. ``montgomery`` loads only ``MCUCXR_*`` files and
``shenzhen`` only ``CHNCXR_*``. ``y`` is 1 for tuberculosis and 0 for normal: finding
"tuberculosis" / "no finding", label ``negative``. Patient id is the 4-digit number. Images are
postero-anterior (PA, frontal). Montgomery's separate left and right masks are stored together
in ``mask_path`` joined with ";" (their union is the lung mask); an image without a mask keeps
``mask_path`` <NA>. Only sex and age are read from the clinical readings; their free-text
findings are never copied.

A clinical reading or mask whose image is missing counts as a missing image.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from covidcxr.datasets import (
    DatasetLayoutError,
    check_on_missing,
    finish,
    join,
    make_image_id,
    normalise_sex,
    parse_age,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Set:
    source: str
    prefix: str  # file-name prefix
    official_dir: str  # folder name of the official download
    masks: tuple[tuple[str, str], ...]  # official layout: (folder, file-name suffix) per mask part


_MONTGOMERY = _Set(
    "montgomery",
    "MCUCXR",
    "MontgomerySet",
    (("ManualMask/leftMask", ""), ("ManualMask/rightMask", "")),
)
_SHENZHEN = _Set("shenzhen", "CHNCXR", "ChinaSet_AllFiles", (("mask", "_mask"),))

_NAME = re.compile(r"^(MCUCXR|CHNCXR)_(\d{4})_([01])$", re.IGNORECASE)
_FINDING = {"1": "tuberculosis", "0": "no finding"}
_SEX_FIELD = re.compile(r"sex\s*:\s*([a-z]+)", re.IGNORECASE)
_AGE_FIELD = re.compile(r"age\s*:\s*(\d+\s*[a-z]*)", re.IGNORECASE)
_SEX_WORD = re.compile(r"\b(female|male)\b", re.IGNORECASE)
_AGE_WORD = re.compile(r"(\d+(?:\.\d+)?)\s*(yrs?|years?|y|months?|mo|days?|d)?\b", re.IGNORECASE)


def load(root: str | os.PathLike, *, on_missing: str = "raise") -> pd.DataFrame:
    """Manifest of the Montgomery County set at ``root`` (official or merged layout)."""
    return _load(root, _MONTGOMERY, on_missing)


def load_shenzhen(root: str | os.PathLike, *, on_missing: str = "raise") -> pd.DataFrame:
    """Manifest of the Shenzhen set at ``root`` (official or merged layout)."""
    return _load(root, _SHENZHEN, on_missing)


def _load(root: str | os.PathLike, tb: _Set, on_missing: str) -> pd.DataFrame:
    check_on_missing(on_missing)
    base = Path(root)
    if (base / tb.official_dir / "CXR_png").is_dir():
        return _official(root, f"{tb.official_dir}/", tb, on_missing)
    if (base / "CXR_png").is_dir():
        return _official(root, "", tb, on_missing)
    if (base / "images").is_dir():
        return _merged(root, tb, on_missing)
    raise DatasetLayoutError(
        f"{root}: missing {tb.source} image folder (expected CXR_png/, "
        f"{tb.official_dir}/CXR_png/ or images/ + masks/)"
    )


def _official(root: str | os.PathLike, sub: str, tb: _Set, on_missing: str) -> pd.DataFrame:
    base = Path(root) / sub
    images = _stems(base / "CXR_png", tb.prefix)
    readings = _stems(base / "ClinicalReadings", tb.prefix, ".txt")
    rows = []
    for stem in sorted(set(images) | set(readings)):
        parts = [f"{sub}{folder}/{stem}{suffix}.png" for folder, suffix in tb.masks]
        has_mask = all((Path(root) / p).is_file() for p in parts)
        sex, age = ("unknown", None)
        if stem in readings:
            sex, age = parse_reading(readings[stem].read_text(encoding="latin-1"))
        mask = ";".join(join(root, p) for p in parts) if has_mask else None
        rows.append(_row(root, tb, f"{sub}CXR_png/{stem}.png", stem, mask, sex, age))
    _log_unmasked(tb, rows)
    return finish(rows, tb.source, on_missing, base / "CXR_png")


def _merged(root: str | os.PathLike, tb: _Set, on_missing: str) -> pd.DataFrame:
    base = Path(root)
    images = _stems(base / "images", tb.prefix)
    masks = _stems(base / "masks", tb.prefix)
    rows = []
    for stem in sorted(set(images) | set(masks)):
        mask = join(root, f"masks/{stem}.png") if stem in masks else None
        rows.append(_row(root, tb, f"images/{stem}.png", stem, mask, "unknown", None))
    _log_unmasked(tb, rows)
    return finish(rows, tb.source, on_missing, base / "images")


def _row(
    root: str | os.PathLike,
    tb: _Set,
    relative: str,
    stem: str,
    mask: str | None,
    sex: str,
    age: float | None,
) -> dict:
    _, number, tuberculosis = _NAME.match(stem).groups()
    return {
        "image_id": make_image_id(tb.source, relative),
        "path": join(root, relative),
        "patient_id": f"{tb.source}:{number}",
        "projection": "frontal",
        "view_position": "PA",
        "label": "negative",
        "finding": _FINDING[tuberculosis],
        "site": tb.source,
        "sex": sex,
        "age": age,
        "mask_path": mask if mask is not None else pd.NA,
    }


def _stems(folder: Path, prefix: str, suffix: str = ".png") -> dict[str, Path]:
    """Files ``<prefix>_xxxx_y<suffix>`` in ``folder`` by stem; other files are ignored."""
    if not folder.is_dir():
        return {}
    found = {}
    for file in folder.iterdir():
        match = _NAME.match(file.stem)
        if file.suffix.lower() == suffix and match and match.group(1).upper() == prefix:
            found[file.stem] = file
        else:
            log.debug("%s: ignored %s", prefix, file)
    return found


def parse_reading(text: str) -> tuple[str, float | None]:
    """(sex, age) from a clinical-reading text; its findings are not read.

    Montgomery has fields ("Patient's Sex: F", "Patient's Age: 040Y"); Shenzhen has them on the
    first line ("male 35yrs", "Female,23yrs").
    """
    sex_field, age_field = _SEX_FIELD.search(text), _AGE_FIELD.search(text)
    if sex_field or age_field:
        sex = normalise_sex(sex_field.group(1)) if sex_field else "unknown"
        return sex, parse_age(age_field.group(1)) if age_field else None
    first = next((line for line in text.splitlines() if line.strip()), "")
    sex_word, age_word = _SEX_WORD.search(first), _AGE_WORD.search(first)
    sex = normalise_sex(sex_word.group(1)) if sex_word else "unknown"
    age = parse_age(age_word.group(1) + (age_word.group(2) or "")) if age_word else None
    return sex, age


def _log_unmasked(tb: _Set, rows: list[dict]) -> None:
    unmasked = sum(1 for r in rows if r["mask_path"] is pd.NA)
    if unmasked:
        log.info("%s: %d of %d image(s) have no lung mask", tb.source, unmasked, len(rows))
