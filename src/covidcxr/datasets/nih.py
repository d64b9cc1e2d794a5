"""NIH ChestX-ray14 (Wang et al. 2017, CVPR; NIH Clinical Center release notes, README_CHESTXRAY).

Layout::

    root/Data_Entry_2017.csv   (or Data_Entry_2017_v2020.csv, or option ``csv=``) with columns
        Image Index, Finding Labels, Follow-up #, Patient ID, Patient Age, Patient Gender,
        View Position, OriginalImage[Width, Height], OriginalImagePixelSpacing[x, y]
    root/images/<Image Index>              (the NIH box download, unpacked)
    root/images_001/images/<Image Index>   (the Kaggle "nih-chest-xrays/data" layout), ...

``image_id`` is ``nih/<Image Index without suffix>``, the same whichever download layout holds
the file. ``finding`` is the Finding Labels text ("No Finding", "Effusion|Infiltration", ...); all
images predate COVID-19, so ``label`` is ``negative``. ``View Position`` PA/AP gives the projection.
Ages above 120 years (a few known entry errors) become <NA>. The distributed PNGs are resized
to 1024 x 1024, so the OriginalImage width/height are not copied.

Lung masks (option ``masks=``, a folder, relative to ``root`` unless absolute): the NIH subset
annotated for XLSor (Tang et al. 2019, github.com/rsummers11/CADLab, Lung_Segmentation_XLSor)
stores ``<stem>_mask.png`` beside each image; other releases (e.g. CXR8 "segmentations/") use
``<stem>.png``. Both names are looked up, and the images in that folder are used when the NIH
image folders lack them. ``masked_only=True`` keeps only the images that have a mask, so the
100-image XLSor subset loads without the full download.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path, PurePosixPath

import pandas as pd

from covidcxr import manifest
from covidcxr.datasets import (
    MAX_AGE,
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

SOURCE = "nih"
CSV_NAMES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
REQUIRED = (
    "Image Index",
    "Finding Labels",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
)


def load(
    root: str | os.PathLike,
    *,
    csv: str | os.PathLike | None = None,
    masks: str | os.PathLike | None = None,
    masked_only: bool = False,
    on_missing: str = "raise",
) -> pd.DataFrame:
    """Manifest of the images listed in the NIH Data_Entry CSV (see the module docstring)."""
    check_on_missing(on_missing)
    if masked_only and masks is None:
        raise ValueError("nih: masked_only=True needs a masks= folder")
    file = _csv(Path(root), csv)
    df = read_table(file, usecols=lambda c: c.strip() in REQUIRED)
    require_columns(df, REQUIRED, file)

    found = _image_index(root)
    mask_paths: dict[str, str] = {}
    if masks is not None:
        mask_dir = join(root, os.fspath(masks))
        if not Path(mask_dir).is_dir():
            raise DatasetLayoutError(f"{mask_dir}: missing NIH mask folder")
        mask_names, images_there = _mask_folder(Path(mask_dir))
        mask_paths = {stem: join(mask_dir, name) for stem, name in mask_names.items()}
        for name in images_there:
            found.setdefault(name, join(mask_dir, name))
        if masked_only:
            stems = df["Image Index"].str.strip().map(lambda n: PurePosixPath(n).stem)
            has_mask = stems.isin(mask_paths.keys())
            log.info("nih: %d of %d image(s) have a lung mask", int(has_mask.sum()), len(df))
            df = df.loc[has_mask]

    unlisted = len(set(found) - set(df["Image Index"].str.strip()))
    if unlisted:
        log.debug("nih: %d image file(s) not in %s ignored", unlisted, file.name)
    ages = df["Patient Age"].map(parse_age)
    absurd = int((ages.isna() & (df["Patient Age"].str.strip() != "")).sum())
    if absurd:
        log.info("nih: %d age(s) unreadable or above %g years set to <NA>", absurd, MAX_AGE)
    rows = []
    for record, age in zip(df.to_dict("records"), ages):
        name = record["Image Index"].strip()
        path = found.get(name) or join(root, "images", name)
        view = record["View Position"].strip().upper()
        patient = record["Patient ID"].strip()
        rows.append(
            {
                "image_id": make_image_id(SOURCE, name),
                "path": path,
                "patient_id": f"{SOURCE}:{patient.lstrip('0') or patient}",
                "projection": manifest.projection_from_view(view),
                "view_position": view or pd.NA,
                "label": "negative",
                "finding": record["Finding Labels"].strip() or pd.NA,
                "site": SOURCE,
                "sex": normalise_sex(record["Patient Gender"]),
                "age": age,
                "mask_path": mask_paths.get(PurePosixPath(name).stem, pd.NA),
            }
        )
    return finish(rows, SOURCE, on_missing, file)


def _csv(root: Path, csv: str | os.PathLike | None) -> Path:
    if csv is not None:
        file = root / csv
        if not file.is_file():
            raise DatasetLayoutError(f"{file}: missing NIH Data_Entry CSV")
        return file
    for name in CSV_NAMES:
        if (root / name).is_file():
            return root / name
    raise DatasetLayoutError(f"{root / CSV_NAMES[0]}: missing NIH Data_Entry CSV")


def _image_index(root: str | os.PathLike) -> dict[str, str]:
    """{Image Index: path} for images in root/images/ and root/images_*/images/."""
    base = Path(root)
    folders = ["images"] + sorted(
        f"{d.name}/images" for d in base.glob("images_*") if (d / "images").is_dir()
    )
    found: dict[str, str] = {}
    for folder in folders:
        for name in sorted(_images_in(base / folder)):
            found.setdefault(name, join(root, folder, name))
    return found


def _images_in(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return [e.name for e in os.scandir(folder) if e.name.lower().endswith(".png")]


def _mask_folder(folder: Path) -> tuple[dict[str, str], list[str]]:
    """({image stem: mask file name}, image file names) of a mask folder.

    A folder holding ``*_mask.png`` files follows the XLSor convention (image and mask side by
    side); otherwise every ``<stem>.png`` is a mask and the folder holds no images.
    """
    names = sorted(_images_in(folder))
    masks = [n for n in names if n.lower().endswith("_mask.png")]
    if masks:
        images = [n for n in names if not n.lower().endswith("_mask.png")]
        return {n[: -len("_mask.png")]: n for n in masks}, images
    return {n[: -len(".png")]: n for n in names}, []
