"""JSRT chest radiograph database (Shiraishi et al. 2000, AJR 174(1)) with SCR lung masks
(van Ginneken et al. 2006, Med Image Anal 10(1)).

Images: 247 raw files ``JPCLN001.IMG`` ... ``JPCLN154.IMG`` (nodule) and ``JPCNN001.IMG`` ...
``JPCNN093.IMG`` (non-nodule): 2048 x 2048 pixels, 12 bits stored in 2-byte big-endian words, no
header (JSRT database user's guide). They are found anywhere under ``root`` (the download puts
them in ``All247images/``, ``Nodule154images/`` or ``NonNodule93images/``).

Clinical lists (optional, anywhere under ``root``, any case): ``CLNDAT_EN.txt`` (tab separated:
file name, subtlety, size [mm], age, sex, x, y, malignant/benign, location, diagnosis) and
``CNNDAT_EN.txt`` (space separated: file name, age, sex, "non-nodule"). Records are found by their
file names, so a list whose line breaks were lost still parses. Only age and sex are read. When a
list is present it is the authority for its group (a listed image missing on disk is a missing
image; an image not listed is ignored); a group without a list is taken from the files on disk.

SCR masks (optional): ``<...>/masks/left lung/JPCLN001.gif`` and ``<...>/masks/right lung/...``
(``scr/masks/...`` or ``fold1|fold2/masks/...``), 1024 x 1024, one file per lung; both are
stored in ``mask_path`` joined with ";" (their union is the lung mask).

Every image is frontal (PA), label ``negative``, finding "nodule" or "non-nodule", site "jsrt".
``width``/``height`` = 2048 and ``bits_stored`` = 12 come from the format specification.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path, PurePosixPath

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

SOURCE = "jsrt"
SIZE = 2048
BITS_STORED = 12
LISTS = {"LN": "CLNDAT_EN.txt", "NN": "CNNDAT_EN.txt"}
FINDINGS = {"LN": "nodule", "NN": "non-nodule"}
AGE_FIELD = {"LN": 2, "NN": 0}  # position of the age after the file name

_IMAGE = re.compile(r"^JPC(LN|NN)\d{3}\.IMG$", re.IGNORECASE)
_RECORD = re.compile(r"(JPC(?:LN|NN)\d{3}\.IMG)", re.IGNORECASE)
_LUNG_FOLDERS = {"left lung": 0, "right lung": 1}


def load(root: str | os.PathLike, *, on_missing: str = "raise") -> pd.DataFrame:
    """Manifest of the JSRT images under ``root`` (see the module docstring)."""
    check_on_missing(on_missing)
    images, lists, masks = _scan(Path(root))
    if not images and not lists:
        raise DatasetLayoutError(f"{root}: missing JSRT images (JPCLNnnn.IMG / JPCNNnnn.IMG)")
    rows = []
    for group in ("LN", "NN"):
        on_disk = {n: p for n, p in images.items() if n[3:5] == group}
        if group in lists:
            records = parse_list(lists[group].read_text(encoding="latin-1"), group)
            ignored = sorted(set(on_disk) - set(records))
            if ignored:
                log.debug("jsrt: %d image(s) not in %s ignored", len(ignored), lists[group].name)
        else:
            log.info("jsrt: no %s under %s; %s images taken from disk", LISTS[group], root, group)
            records = {name: ("unknown", None) for name in on_disk}
        folder = str(PurePosixPath(next(iter(on_disk.values()))).parent) if on_disk else ""
        for name, (sex, age) in sorted(records.items()):
            relative = on_disk.get(name) or str(PurePosixPath(folder, f"{name}.IMG"))
            rows.append(_row(root, name, group, relative, sex, age, masks.get(name)))
    described_by = ", ".join(str(p) for p in lists.values()) or str(root)
    return finish(rows, SOURCE, on_missing, described_by)


def _row(
    root: str | os.PathLike,
    name: str,
    group: str,
    relative: str,
    sex: str,
    age: float | None,
    mask: tuple[str, str] | None,
) -> dict:
    return {
        "image_id": make_image_id(SOURCE, relative),
        "path": join(root, relative),
        "patient_id": f"{SOURCE}:{name}",
        "projection": "frontal",
        "view_position": "PA",
        "label": "negative",
        "finding": FINDINGS[group],
        "site": SOURCE,
        "sex": sex,
        "age": age,
        "width": SIZE,
        "height": SIZE,
        "bits_stored": BITS_STORED,
        "mask_path": ";".join(join(root, p) for p in mask) if mask else pd.NA,
    }


def parse_list(text: str, group: str) -> dict[str, tuple[str, float | None]]:
    """{image name without suffix: (sex, age)} from the text of CLNDAT_EN.txt or CNNDAT_EN.txt."""
    parts = _RECORD.split(text)
    records = {}
    for name, rest in zip(parts[1::2], parts[2::2]):
        line = rest.strip().split("\n", 1)[0]
        fields = [f.strip() for f in (line.split("\t") if "\t" in line else line.split())]
        sex = next((normalise_sex(f) for f in fields if f.lower() in ("male", "female")), "unknown")
        position = AGE_FIELD[group]
        age = parse_age(fields[position]) if len(fields) > position else None
        records[name.upper()[:-4]] = (sex, age)
    return {n: v for n, v in records.items() if n[3:5] == group}


def _scan(root: Path) -> tuple[dict[str, str], dict[str, Path], dict[str, tuple[str, str]]]:
    """Images {name: relative path}, clinical lists {group: file}, masks {name: (left, right)}."""
    images: dict[str, str] = {}
    lists: dict[str, Path] = {}
    lungs: dict[str, list[str | None]] = {}
    wanted = {v.lower(): k for k, v in LISTS.items()}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        folder = Path(dirpath)
        relative_folder = folder.relative_to(root).as_posix()
        side = _LUNG_FOLDERS.get(folder.name.lower())
        for filename in sorted(filenames):
            relative = str(PurePosixPath(relative_folder, filename))
            if _IMAGE.match(filename):
                images.setdefault(filename.upper()[:-4], relative)
            elif filename.lower() in wanted:
                lists.setdefault(wanted[filename.lower()], folder / filename)
            elif side is not None and filename.lower().endswith(".gif"):
                pair = lungs.setdefault(filename.upper()[:-4], [None, None])
                pair[side] = pair[side] or relative
    masks = {n: (p[0], p[1]) for n, p in lungs.items() if p[0] and p[1]}
    if len(masks) < len(lungs):
        log.info("jsrt: %d mask(s) with only one lung ignored", len(lungs) - len(masks))
    return images, lists, masks
