"""BIMCV-COVID19+ (de la Iglesia Vayá et al. 2020, arXiv:2006.01174) and BIMCV-COVID19-, from the
Medical Imaging Databank of the Valencia Region (github.com/BIMCV-CSUSP/BIMCV-COVID-19).

Both collections use the same MIDS (BIDS-like) layout; ``root`` is the unpacked collection, its
subjects directly below it or below one level of archive folders::

    root/[<archive>/]participants.tsv     participant, modality_dicom, body_parts, age, gender (every such
                                          file is read: the collection ships one per iteration, head_iter1/2)
    root/[<archive>/]derivatives/labels/labels_*.tsv   (optional) PatientID, ReportID, Labels, ...
    root/[<archive>/]sub-S0xxxx/ses-Exxxxx/mod-rx/
        sub-S0xxxx_ses-Exxxxx_run-1[_bp-chest][_vp-pa]_cr.png   (or ..._dx.png)
        sub-S0xxxx_ses-Exxxxx_run-1[_bp-chest][_vp-pa]_cr.json  DICOM tags as DICOM JSON, e.g.
            "00185101": {"vr": "CS", "Value": ["PA"]}

(``<archive>`` is e.g. ``bimcv_covid19_posi_subjects_1`` or ``covid19_posi``.) Only CR and DX
radiographs are kept; CT volumes and other series are left out and counted in a log message. A
sidecar JSON whose PNG is missing counts as a missing image; subjects of ``participants.tsv``
without any image on disk (a partial download) are only counted in a log message. Images of a
subject no ``participants.tsv`` lists are kept (sex and age from their sidecars), with a warning.

From the sidecar (the image's own; the only one of a folder that holds one image; falling back to
the file name and participants.tsv): view position (0018,5101)
or the ``vp-`` entity, sex (0010,0040), age (0010,1010), and the stored-image facts the PNG keeps
from its DICOM: photometric interpretation (0028,0004; a MONOCHROME1 PNG keeps the stored values, air
bright, and the cache stages invert it by this column, :func:`covidcxr.io.read_image`'s
``photometric``), bits stored (0028,0101), rows/columns (0028,0010/0011) and modality (0008,0060).
``finding`` is the session's report labels from ``derivatives/labels`` (joined with "|") when that
file is present, else "COVID-19" / "COVID-19 negative". Report texts, dates and session notes are never read.

``label`` is the collection's: the positive and negative collections are separate downloads, so
option ``label="covid"|"negative"`` says which one ``root`` is; by default it is read from a
folder name containing "posi" or "neg" (e.g. ``bimcv_covid19_posi_subjects_1``). Patient ids keep
the raw ``sub-S0xxxx`` so ``bimcv:sub-S0xxxx`` matches between the two collections (experiment 2
of the paper removes negative patients who also appear among the positives).
"""

from __future__ import annotations

import json
import logging
import os
import re
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
    normalise_sex,
    parse_age,
    read_table,
    require_columns,
)

log = logging.getLogger(__name__)

SOURCE = "bimcv"
MODALITIES = ("cr", "dx")
DEFAULT_FINDING = {"covid": "COVID-19", "negative": "COVID-19 negative"}
UNLISTED = {"sex": "", "age": None}  # a subject that no participants.tsv lists
TAG_VIEW, TAG_SEX, TAG_AGE = "00185101", "00100040", "00101010"
TAG_PHOTOMETRIC, TAG_BITS, TAG_ROWS, TAG_COLUMNS = "00280004", "00280101", "00280010", "00280011"
TAG_MODALITY = "00080060"

_VIEW_ENTITY = re.compile(r"_vp-([a-z0-9]+)", re.IGNORECASE)
_QUOTED = re.compile(r"'([^']*)'|\"([^\"]*)\"")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def load(
    root: str | os.PathLike,
    *,
    label: str | None = None,
    site: str = SOURCE,
    on_missing: str = "raise",
) -> pd.DataFrame:
    """Manifest of the CR/DX radiographs of one BIMCV-COVID19 collection (see module docstring)."""
    check_on_missing(on_missing)
    base = Path(root)
    if not base.is_dir():
        raise DatasetLayoutError(f"{base}: missing BIMCV collection folder")
    label = label or infer_label(base)
    if label not in DEFAULT_FINDING:
        raise ValueError(f"bimcv: label must be 'covid' or 'negative', not {label!r}")
    participants = _participants(base)
    findings = _session_findings(base)

    files = sorted(
        p.relative_to(base).as_posix()
        for pattern in ("sub-*/ses-*/mod-rx/*", "*/sub-*/ses-*/mod-rx/*")
        for p in base.glob(pattern)
        if p.suffix.lower() in (".png", ".json")
    )
    images = {f[: -len(".png")] for f in files if f.lower().endswith(".png")}
    sidecars = {f[: -len(".json")] for f in files if f.lower().endswith(".json")}
    by_folder: dict[str, tuple[list[str], list[str]]] = {}  # folder: (its images, its sidecars)
    for stem in sorted(images | sidecars):
        held = by_folder.setdefault(str(PurePosixPath(stem).parent), ([], []))
        for kind, present in enumerate((stem in images, stem in sidecars)):
            if present:
                held[kind].append(stem)
    rows, other, unlisted, seen = [], 0, {}, set()
    for stem in sorted(images | sidecars):
        if stem.rsplit("_", 1)[-1].lower() not in MODALITIES:
            other += stem in images
            continue
        subject = PurePosixPath(stem).parts[-4]
        if subject not in participants:
            unlisted[subject] = unlisted.get(subject, 0) + 1
        seen.add(subject)
        tags = _tags(base, stem, by_folder)
        rows.append(_row(root, stem, tags, participants.get(subject, UNLISTED), findings, label, site))
    if other:
        log.info("bimcv: left out %d image(s) that are not CR/DX radiographs", other)
    if unlisted:
        log.warning("bimcv: %d image(s) of %d subject(s) that no participants.tsv lists: kept, sex and age from "
                    "their sidecars", sum(unlisted.values()), len(unlisted))
        log.debug("bimcv: subjects not in participants.tsv: %s", listing(sorted(unlisted)))
    absent = sorted(set(participants) - seen)
    if absent:
        log.info("bimcv: %d participant(s) have no CR/DX image on disk", len(absent))
    return finish(rows, SOURCE, on_missing, base)


def _row(
    root: str | os.PathLike,
    stem: str,
    tags: dict,
    participant: dict,
    findings: dict[str, str],
    label: str,
    site: str,
) -> dict:
    subject, session = PurePosixPath(stem).parts[-4:-2]
    entity = _VIEW_ENTITY.search(PurePosixPath(stem).name)
    view = (_tag(tags, TAG_VIEW) or (entity.group(1) if entity else "")).strip().upper()
    sex = normalise_sex(_tag(tags, TAG_SEX) or participant["sex"])
    age = parse_age(_tag(tags, TAG_AGE))
    modality = _tag(tags, TAG_MODALITY) or stem.rsplit("_", 1)[-1]
    return {
        "image_id": make_image_id(SOURCE, f"{stem}.png"),
        "path": join(root, f"{stem}.png"),
        "patient_id": f"{SOURCE}:{subject}",
        "projection": manifest.projection_from_view(view),
        "view_position": view or pd.NA,
        "label": label,
        "finding": findings.get(session, DEFAULT_FINDING[label]),
        "site": site,
        "sex": sex,
        "age": age if age is not None else participant["age"],
        "width": _int(_tag(tags, TAG_COLUMNS)),
        "height": _int(_tag(tags, TAG_ROWS)),
        "photometric": _tag(tags, TAG_PHOTOMETRIC) or pd.NA,
        "bits_stored": _int(_tag(tags, TAG_BITS)),
        "modality": modality.strip().upper(),
    }


def infer_label(root: Path) -> str:
    """covid / negative from the collection's folder names ("posi" / "neg")."""
    names = [root.resolve().name] + sorted(p.name for p in root.iterdir() if p.is_dir())
    found = set()
    for name in names:
        low = name.lower()
        if "covid" in low or "bimcv" in low:
            found |= {"covid"} if "posi" in low else set()
            found |= {"negative"} if "neg" in low else set()
    if len(found) != 1:
        raise ValueError(
            f"bimcv: cannot tell from the folder names under {root} whether this is "
            "BIMCV-COVID19+ or BIMCV-COVID19-; pass label='covid' or label='negative'"
        )
    return found.pop()


def _participants(base: Path) -> dict[str, dict]:
    """{participant: {"sex", "age"}} from every participants.tsv at ``base`` or one folder below (a participant listed
    twice keeps the first listing's values)."""
    files = [f for f in [base / "participants.tsv", *sorted(base.glob("*/participants.tsv"))] if f.is_file()]
    if not files:
        raise DatasetLayoutError(f"{base / 'participants.tsv'}: missing BIMCV participants file")
    out: dict[str, dict] = {}
    for file in files:
        df = read_table(file, sep="\t")
        require_columns(df, ("participant",), file)
        for record in df.to_dict("records"):
            ages = {float(a) for a in _NUMBER.findall(record.get("age", ""))}
            out.setdefault(record["participant"].strip(), {
                "sex": record.get("gender", ""),
                "age": parse_age(ages.pop()) if len(ages) == 1 else None,
            })
    return out


def _session_findings(base: Path) -> dict[str, str]:
    """{session id: report labels joined with "|"} from derivatives/labels/*.tsv, if present."""
    candidates = sorted(base.glob("derivatives/labels/*.tsv")) + sorted(
        base.glob("*/derivatives/labels/*.tsv")
    )
    findings: dict[str, str] = {}
    for file in (f for f in candidates if "label" in f.name.lower()):  # every iteration's
        df = read_table(file, sep="\t", usecols=lambda c: c.strip() in ("ReportID", "Labels"))
        require_columns(df, ("ReportID", "Labels"), file)
        for session, labels in zip(df["ReportID"], df["Labels"]):
            findings.setdefault(session.strip(), parse_labels(labels))
    return {k: v for k, v in findings.items() if v}


def parse_labels(text: str) -> str:
    """ "['COVID 19' 'pneumonia']" or "['normal']" -> "COVID 19|pneumonia" / "normal"."""
    quoted = [a or b for a, b in _QUOTED.findall(text)]
    items = quoted if quoted else ([text.strip(" []")] if text.strip(" []") else [])
    unique = list(dict.fromkeys(i.strip() for i in items if i.strip()))
    return "|".join(unique)


def _tags(base: Path, stem: str, by_folder: dict[str, tuple[list[str], list[str]]]) -> dict:
    """The DICOM JSON sidecar of ``stem``, else the only sidecar of a folder that holds only this image, else {}: a
    folder's other image's sidecar (another view, another photometric) is never borrowed."""
    images, same_folder = by_folder.get(str(PurePosixPath(stem).parent), ([], []))
    if stem not in same_folder:
        if len(same_folder) != 1 or images != [stem]:
            return {}
        stem = same_folder[0]
    file = base / f"{stem}.json"
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetLayoutError(f"{file}: unreadable DICOM JSON sidecar: {err}") from err


def _tag(tags: dict, key: str) -> str:
    value = tags.get(key, {})
    values = value.get("Value") if isinstance(value, dict) else None
    return str(values[0]) if values else ""


def _int(text: str) -> int | None:
    return int(float(text)) if text and _NUMBER.fullmatch(text) else None
