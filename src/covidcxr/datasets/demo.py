"""The demo dataset: deterministic synthetic chest radiograph phantoms written as DICOM files.

:func:`generate` writes (``covidcxr demo-data OUT_DIR``)::

    OUT_DIR/README.md                              what this is: synthetic phantoms, seed, counts
    OUT_DIR/labels.csv                             file, patient, label, finding, site (ground truth)
    OUT_DIR/images/<site>/<patient>/<image>.dcm    12-bit CR/DX DICOM, PA/AP/LL views
    OUT_DIR/masks/<image>.png                      lung mask (both lungs, 0/255) of every frontal image

Everything every later stage needs is in it: frontal and lateral views, exact lung masks, COVID-like
ground-glass opacities inside the lungs (and non-COVID findings among negatives), four sites with
their own look, burned-in markers and class balance (a shortcut to audit), multi-image patients,
negative patients who later turn positive, fake identifying header values (to check they never
leak) and two defective files that ingest must reject. The output is byte-identical for a given
seed and size on every machine with the pinned libraries: no clock, no random UIDs, seeded streams
per patient and per image, fixed order.

:func:`load` reads ``labels.csv`` plus whitelisted DICOM header fields (never pixels, never names,
IDs or dates) into the manifest schema.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import os
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import pydicom
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
)

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
    require_file,
)
from covidcxr.parallel import worker_pool
from covidcxr.phantoms import SiteStyle, chest_phantom, draw_anatomy

log = logging.getLogger(__name__)

SOURCE = "demo"
DEFAULT_PATIENTS = 170
MIN_PATIENTS = 12
LABELS_FILE = "labels.csv"
README_FILE = "README.md"
LABEL_COLUMNS = ("file", "patient", "label", "finding", "site")
README_TITLE = "# covidcxr demo dataset: synthetic chest radiograph phantoms"
_OWNED = ("README.md", "images", "labels.csv", "masks")
_HEADER_TAGS = ("ViewPosition", "Modality", "PatientSex", "PatientAge")  # all that load() reads

FINDING_TEXT = {
    "covid": "COVID-19",
    "none": "No Finding",
    "nodule": "Nodule",
    "consolidation": "Bacterial pneumonia",
}
BITS_STORED = 12
_MAX_VALUE = 2**BITS_STORED - 1
_FIRST_DATE = dt.date(2020, 3, 2)
_UID_NAMESPACE = uuid.UUID("6f1c3a52-5d0e-4c1b-9a57-3d1f0c2b7e44")  # fixed: UIDs depend on seed and names only
_IMPLEMENTATION_UID = "2.25.215964775525515915778636257534380575988"  # fixed, not pydicom's (version-dependent)
_IMPLEMENTATION_VERSION = "COVIDCXR_DEMO_1"
_DEFECT_TEXT = {
    "truncated": "truncated DICOM, cut in the middle of the pixel data (header intact)",
    "constant": "valid DICOM whose pixels all have one value (zero variance)",
}


@dataclass(frozen=True)
class Site:
    """One (fake) hospital: its equipment, its look and its share of patients and of COVID cases."""

    name: str
    institution: str
    manufacturer: str
    modality: str  # CR | DX
    photometric: str  # MONOCHROME1 | MONOCHROME2
    style: SiteStyle
    patients: float  # share of all patients
    covid: float  # share of this site's patients who have COVID-19
    field_mm: float  # detector field of view (sets PixelSpacing)
    stored: tuple[int, int]  # MONOCHROME2-equivalent stored values of black and white
    windowed: float  # share of images with a VOI window in the header
    kvp: str


SITES: tuple[Site, ...] = (
    Site("site_a", "DEMO NORTH GENERAL HOSPITAL", "DEMO IMAGING CR", "CR", "MONOCHROME1",
         SiteStyle(exposure=1.05, contrast=1.1, gamma=1.15, noise=0.02, mottle=0.012, blur=0.8,
                   marker="L", marker_corner="top-right", marker_value=0.97),
         patients=0.3, covid=0.8, field_mm=430.0, stored=(0, 4095), windowed=1.0, kvp="110"),
    Site("site_b", "DEMO UNIVERSITY CLINIC", "DEMO DETECTORS DR", "DX", "MONOCHROME2",
         SiteStyle(exposure=0.95, brightness=0.02, gamma=0.9, noise=0.01, mottle=0.006,
                   marker="R", marker_corner="top-left", marker_value=0.92, marker_box=True),
         patients=0.3, covid=0.2, field_mm=410.0, stored=(64, 4031), windowed=0.5, kvp="120"),
    Site("site_c", "DEMO COMMUNITY HOSPITAL", "DEMO IMAGING CR", "CR", "MONOCHROME2",
         SiteStyle(contrast=0.9, noise=0.025, mottle=0.015, blur=1.0),
         patients=0.2, covid=0.5, field_mm=400.0, stored=(0, 4095), windowed=0.0, kvp="115"),
    Site("site_d", "DEMO FIELD HOSPITAL", "DEMO PORTABLE DR", "DX", "MONOCHROME1",
         SiteStyle(exposure=1.1, brightness=-0.03, contrast=1.2, gamma=1.1, noise=0.015, mottle=0.01,
                   blur=0.4, marker="DX2", marker_corner="bottom-left", marker_value=1.0),
         patients=0.2, covid=0.4, field_mm=380.0, stored=(200, 3895), windowed=1.0, kvp="100"),
)
_SITES = {s.name: s for s in SITES}


@dataclass(frozen=True)
class _Patient:
    index: int
    key: str  # non-identifying key used in labels.csv ("P0042")
    site: Site
    sex: str
    birth: dt.date
    name: str  # fake identifying values: header only, never in labels.csv or the manifest
    mrn: str


@dataclass(frozen=True)
class _Shot:
    """One image to write."""

    patient: _Patient
    number: int  # image number within the patient, from 1
    study: int
    date: dt.date
    time: str
    accession: str
    label: str  # covid | negative
    finding: str  # key of FINDING_TEXT
    view: str  # PA | AP | LL
    windowed: bool
    compressed: bool
    defect: str = ""  # "" | truncated | constant

    @property
    def stem(self) -> str:
        return f"{self.patient.key}_{self.number:02d}"

    @property
    def file(self) -> str:
        return f"images/{self.patient.site.name}/{self.patient.key}/{self.stem}.dcm"


@dataclass
class _Plan:
    patients: list[_Patient] = field(default_factory=list)
    shots: list[_Shot] = field(default_factory=list)


# ---------------------------------------------------------------- generate


def generate(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_patients: int = DEFAULT_PATIENTS,
    size: int = 256,
    workers: int | None = None,
) -> dict[str, int]:
    """Write the demo dataset into ``out_dir`` and return its counts.

    ``out_dir`` must be missing, empty or a previous demo output (whose files are replaced). The
    result is byte-identical for the same ``seed``, ``n_patients`` and ``size``, whatever the
    number of ``workers`` (processes drawing images; default: the usable CPUs, at most 4).
    """
    if n_patients < MIN_PATIENTS:
        raise ValueError(
            f"n_patients must be at least {MIN_PATIENTS} (every site needs both classes), got {n_patients}"
        )
    if not 64 <= size <= 2048:
        raise ValueError(f"size must be between 64 and 2048 pixels, got {size}")
    if workers is None:
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(usable, 4)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    out = Path(out_dir)
    _prepare(out)
    # Mark the folder as ours first, so that an interrupted run can simply be run again.
    (out / README_FILE).write_text(f"{README_TITLE}\n\nIncomplete: generation was interrupted.\n", encoding="utf-8")
    plan = _plan(seed, n_patients)
    jobs = [(shot, seed, size) for shot in plan.shots]
    if workers == 1:
        files = map(_render_files, jobs)
    else:
        pool = worker_pool(workers)  # each with freed memory kept: a phantom makes hundreds of 0.5 MB arrays
        files = pool.map(_render_files, jobs, chunksize=max(1, len(jobs) // (4 * workers)))
    try:
        for shot, (dicom, mask_png) in zip(plan.shots, files):
            target = out / shot.file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(dicom)
            if mask_png is not None:
                (out / "masks").mkdir(exist_ok=True)
                (out / "masks" / f"{shot.stem}.png").write_bytes(mask_png)
    finally:
        if workers > 1:
            pool.shutdown(cancel_futures=True)
    _write_labels(out / LABELS_FILE, plan.shots)
    counts = _counts(plan)
    (out / README_FILE).write_text(_readme(plan, counts, seed, size), encoding="utf-8", newline="\n")
    counts["bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log.info("demo: wrote %d images of %d patients to %s", counts["images"], counts["patients"], out)
    return counts


def _prepare(out: Path) -> None:
    """Make ``out`` ready: create it, or empty a previous demo output; refuse anything else."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a directory")
    if not out.exists():
        out.mkdir(parents=True)
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    readme = out / README_FILE
    is_demo = readme.is_file() and readme.read_text(encoding="utf-8", errors="replace").startswith(README_TITLE)
    if not is_demo:
        raise FileExistsError(
            f"{out}: not empty and not a covidcxr demo dataset (no {README_FILE} starting with "
            f"{README_TITLE!r}); refusing to write into it"
        )
    foreign = [e for e in entries if e not in _OWNED]
    if foreign:
        raise FileExistsError(f"{out}: previous demo output also holds files it did not write: {foreign}")
    for name in entries:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def _plan(seed: int, n_patients: int) -> _Plan:
    """Who is seen where, when, in which views, with which label: everything but the pixels."""
    rng = _rng(seed, 0)
    sites = _allocate(n_patients, [s.patients for s in SITES])
    site_of = np.concatenate([np.full(n, i) for i, n in enumerate(sites)])
    rng.shuffle(site_of)
    covid = np.zeros(n_patients, dtype=bool)
    for i, site in enumerate(SITES):
        members = np.flatnonzero(site_of == i)
        n_covid = min(max(round(site.covid * len(members)), 1), len(members) - 1)
        covid[rng.choice(members, size=n_covid, replace=False)] = True
    studies = rng.choice([1, 2, 3], size=n_patients, p=[0.66, 0.25, 0.09])
    # Negative patients who test positive at a later visit (experiment 2 removes them).
    negatives = np.flatnonzero(~covid)
    converters = set(rng.choice(negatives, size=max(1, round(0.05 * n_patients)), replace=False).tolist())
    for i in converters:
        studies[i] = max(studies[i], 2)
    mrns = rng.choice(9_000_000, size=n_patients, replace=False) + 1_000_000
    plan = _Plan()
    number = 0
    for i in range(n_patients):
        patient, first = _patient(rng, i, SITES[site_of[i]], int(mrns[i]), bool(covid[i]))
        plan.patients.append(patient)
        date, n_image = first, 0
        for study in range(1, int(studies[i]) + 1):
            if study > 1:
                date = date + dt.timedelta(days=int(rng.integers(5, 45)))
            label = "covid" if covid[i] or (i in converters and study == studies[i]) else "negative"
            if label == "covid":
                finding = "covid"
            else:
                finding = str(rng.choice(["none", "nodule", "consolidation"], p=[0.76, 0.12, 0.12]))
            ap = rng.uniform() < (0.35 if label == "covid" else 0.15)
            views = ["AP"] if ap else (["PA", "LL"] if rng.uniform() < 0.25 else ["PA"])
            time = f"{int(rng.integers(7, 21)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
            accession = _accession(rng)
            for view in views:
                n_image += 1
                number += 1
                plan.shots.append(_Shot(
                    patient=patient, number=n_image, study=study, date=date, time=time, accession=accession,
                    label=label, finding=finding, view=view,
                    windowed=bool(rng.uniform() < patient.site.windowed), compressed=number % 20 == 7,
                ))
    _add_defects(rng, plan)
    plan.shots.sort(key=lambda s: s.file)
    return plan


def _accession(rng: np.random.Generator) -> str:
    return f"A{int(rng.integers(10_000_000, 100_000_000))}"


def _allocate(total: int, shares: list[float]) -> list[int]:
    """Split ``total`` by ``shares`` (largest remainders), at least 3 each."""
    raw = [total * s / sum(shares) for s in shares]
    counts = [max(3, int(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (int(raw[i]) - raw[i], i))
    k = 0
    while sum(counts) < total:
        counts[order[k % len(order)]] += 1
        k += 1
    while sum(counts) > total:
        j = max(range(len(counts)), key=lambda i: (counts[i], -i))
        counts[j] -= 1
    return counts


def _patient(rng: np.random.Generator, i: int, site: Site, mrn: int, covid: bool) -> tuple[_Patient, dt.date]:
    """A patient with fake identifying values, and the date of their first study."""
    first = _FIRST_DATE + dt.timedelta(days=int(rng.integers(0, 240)))
    age = int(np.clip(round(rng.normal(58.0 if covid else 50.0, 16.0)), 20, 89))
    birthday = dt.date(first.year - age, first.month, first.day)
    birth = birthday - dt.timedelta(days=int(rng.integers(1, 365)))
    sex = "M" if rng.uniform() < 0.5 else "F"
    key = f"P{i + 1:04d}"
    return _Patient(i, key, site, sex, birth, f"DEMO^PATIENT^{i + 1:04d}", f"DM{mrn}"), first


def _add_defects(rng: np.random.Generator, plan: _Plan) -> None:
    """One extra, defective image for two patients: a truncated file and a constant one."""
    chosen = rng.choice(len(plan.patients), size=2, replace=False)
    for defect, i in zip(("truncated", "constant"), sorted(int(c) for c in chosen)):
        last = max((s for s in plan.shots if s.patient.index == i), key=lambda s: s.number)
        plan.shots.append(_Shot(
            patient=last.patient, number=last.number + 1, study=last.study + 1,
            date=last.date + dt.timedelta(days=1), time=last.time, accession=_accession(rng),
            label=last.label, finding="covid" if last.label == "covid" else "none", view="PA",
            windowed=False, compressed=False, defect=defect,
        ))


def _render_files(job: tuple[_Shot, int, int]) -> tuple[bytes, bytes | None]:
    """The DICOM file's bytes and the lung mask's PNG bytes (None when the image has no mask)."""
    shot, seed, size = job
    pixels, mask = _pixels(shot, seed, size)
    dicom = _encode(shot, pixels, seed, size)
    if mask is None:
        return dicom, None
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    return dicom, buffer.getvalue()


def _pixels(shot: _Shot, seed: int, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Stored 12-bit pixel values (uint16) and the lung mask (frontal, non-defective images only)."""
    site = shot.patient.site
    if shot.defect == "constant":
        return np.full((size, size), 2048, dtype=np.uint16), None
    image, mask = chest_phantom(
        _rng(seed, 1, shot.patient.index, shot.number),
        size,
        projection="lateral" if shot.view == "LL" else "frontal",
        covid=shot.label == "covid",
        site=site.style,
        finding="none" if shot.finding == "covid" else shot.finding,
        anatomy=draw_anatomy(_rng(seed, 2, shot.patient.index)),
        ap=shot.view == "AP",
    )
    lo, hi = site.stored
    values = (lo + np.rint(image * (hi - lo))).astype(np.uint16)
    if site.photometric == "MONOCHROME1":
        values = (_MAX_VALUE - values).astype(np.uint16)
    return values, (None if shot.defect else mask)


# ---------------------------------------------------------------- DICOM


def _uid(seed: int, *parts: object) -> str:
    """A UID derived from the seed and ``parts``: "2.25." and a name-based (SHA-1) UUID as an integer.

    (pydicom's ``generate_uid(prefix=None)`` ignores its entropy sources and is random.)
    """
    name = "/".join(["covidcxr-demo", str(seed), *map(str, parts)])
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _encode(shot: _Shot, pixels: np.ndarray, seed: int, size: int) -> bytes:
    """The DICOM file's bytes (explicit VR little endian, or JPEG 2000 lossless when ``compressed``)."""
    p, site = shot.patient, shot.patient.site
    sop_class = ComputedRadiographyImageStorage if site.modality == "CR" else DigitalXRayImageStorageForPresentation
    sop_uid = _uid(seed, p.key, shot.number, "sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    date, spacing = shot.date.strftime("%Y%m%d"), f"{site.field_mm / size:.4f}"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = shot.time
    ds.AccessionNumber = shot.accession
    ds.Modality = site.modality
    ds.Manufacturer = site.manufacturer
    ds.InstitutionName = site.institution
    ds.ReferringPhysicianName = "DEMO^REFERRER"
    ds.StudyDescription = "CHEST X-RAY"
    ds.SeriesDescription = f"CHEST {shot.view}"
    ds.PatientName = p.name
    ds.PatientID = p.mrn
    ds.PatientBirthDate = p.birth.strftime("%Y%m%d")
    ds.PatientSex = p.sex
    ds.PatientAge = f"{_age(p.birth, shot.date):03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.KVP = site.kvp
    ds.ViewPosition = shot.view
    ds.StudyInstanceUID = _uid(seed, p.key, shot.study, "study")
    ds.SeriesInstanceUID = _uid(seed, p.key, shot.number, "series")
    ds.StudyID = str(shot.study)
    ds.SeriesNumber = 2 if shot.view == "LL" else 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["P", "F"] if shot.view == "LL" else ["L", "F"]
    ds.BurnedInAnnotation = "YES" if site.style.marker else "NO"
    if site.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = site.photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [spacing, spacing]
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    if shot.windowed:
        ds.WindowCenter, ds.WindowWidth = _window(pixels)
    ds.LossyImageCompression = "00"
    if shot.compressed:
        ds.compress(JPEG2000Lossless, pixels, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    else:
        ds.PixelData = pixels.astype("<u2").tobytes()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    data = buffer.getvalue()
    if shot.defect == "truncated":
        data = data[: len(data) - pixels.nbytes // 2]  # cut in the middle of the pixel data
    return data


def _age(birth: dt.date, on: dt.date) -> int:
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


def _window(pixels: np.ndarray) -> tuple[str, str]:
    """A VOI window (centre, width) spanning the 0.5-99.5 percentiles of the stored values, as integers."""
    cumulative = np.cumsum(np.bincount(pixels.ravel(), minlength=_MAX_VALUE + 1))
    tail = pixels.size // 200
    lo = int(np.searchsorted(cumulative, tail + 1))
    hi = int(np.searchsorted(cumulative, pixels.size - tail))
    return str((lo + hi + 1) // 2), str(max(hi - lo, 2))


# ---------------------------------------------------------------- labels, README, counts


def _write_labels(path: Path, shots: list[_Shot]) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(LABEL_COLUMNS)
        for s in shots:
            writer.writerow([s.file, s.patient.key, s.label, FINDING_TEXT[s.finding], s.patient.site.name])


def _counts(plan: _Plan) -> dict[str, int]:
    shots = plan.shots
    counts = {
        "patients": len(plan.patients),
        "images": len(shots),
        "covid": sum(s.label == "covid" for s in shots),
        "negative": sum(s.label == "negative" for s in shots),
        "frontal": sum(s.view != "LL" for s in shots),
        "lateral": sum(s.view == "LL" for s in shots),
        "masks": sum(s.view != "LL" and not s.defect for s in shots),
        "defective": sum(bool(s.defect) for s in shots),
        "compressed": sum(s.compressed for s in shots),
        "multi_image_patients": sum(n > 1 for n in Counter(s.patient.key for s in shots).values()),
        "negative_then_covid_patients": len(_converters(shots)),
    }
    for site in SITES:
        for label in ("covid", "negative"):
            counts[f"{site.name}_{label}"] = sum(s.patient.site is site and s.label == label for s in shots)
    return counts


def _converters(shots: list[_Shot]) -> list[str]:
    labels: dict[str, set[str]] = {}
    for s in shots:
        labels.setdefault(s.patient.key, set()).add(s.label)
    return sorted(k for k, v in labels.items() if v == {"covid", "negative"})


def _readme(plan: _Plan, counts: dict[str, int], seed: int, size: int) -> str:
    defects = sorted((s for s in plan.shots if s.defect), key=lambda s: s.defect)
    site_rows = "\n".join(
        f"| {s.name} | {s.modality} | {s.photometric} | {s.style.marker or '(none)'} | "
        f"{counts[f'{s.name}_covid']} | {counts[f'{s.name}_negative']} |"
        for s in SITES
    )
    defect_rows = "\n".join(f"- `{s.file}`: {_DEFECT_TEXT[s.defect]}" for s in defects)
    return f"""{README_TITLE}

Every image here is a **synthetic phantom** drawn by `covidcxr.phantoms`: no real patient, no real
radiograph. Names, IDs, birth dates and accession numbers in the DICOM headers are fake, there to
check that no identifying value ever leaks into manifests, logs or models.

Generated by `covidcxr demo-data` with seed {seed}, {len(plan.patients)} patients, {size}x{size} pixels.
The same seed and size give byte-identical files on every machine with the pinned libraries.

## Counts

- images: {counts['images']} ({counts['frontal']} frontal PA/AP, {counts['lateral']} lateral LL) \
of {counts['patients']} patients
- labels: {counts['covid']} covid, {counts['negative']} negative
- lung masks: {counts['masks']} (every frontal image except the defective ones)
- patients with more than one image: {counts['multi_image_patients']}
- negative patients with a later positive image: {counts['negative_then_covid_patients']}
- JPEG 2000 lossless files: {counts['compressed']} (all others uncompressed, explicit VR little endian)

| site | modality | photometric | burned-in marker | covid | negative |
|---|---|---|---|---|---|
{site_rows}

The class balance differs by site on purpose (a shortcut for the audit to find); every site has both.

## Layout

- `labels.csv`: `file` (relative path), `patient` (non-identifying key), `label` (covid/negative),
  `finding` ({', '.join(FINDING_TEXT.values())}), `site`.
- `images/<site>/<patient>/<patient>_<nn>.dcm`: 12-bit (BitsStored 12, BitsAllocated 16) CR or DX
  files; view position, sex, age, modality and photometric interpretation are in the headers.
- `masks/<patient>_<nn>.png`: both lungs in one 0/255 mask, exactly the lung fields drawn.

## Defective files (ingest must reject them, with a reason)

{defect_rows}
"""


# ---------------------------------------------------------------- load


def load(root: str | os.PathLike, *, on_missing: str = "raise") -> pd.DataFrame:
    """Manifest of a demo dataset: ``labels.csv`` plus view, modality, sex and age from the DICOM headers."""
    check_on_missing(on_missing)
    file = require_file(Path(root) / LABELS_FILE, "demo labels file (write one with `covidcxr demo-data`)")
    df = read_table(file)
    require_columns(df, LABEL_COLUMNS, file)
    bad = sorted(set(df["label"]) - {"covid", "negative"})
    if bad:
        raise DatasetLayoutError(f"{file}: unknown label(s) {bad}; expected covid or negative")
    masks = Path(root) / "masks"
    rows = []
    for r in df.itertuples(index=False):
        rel = PurePosixPath(r.file)
        row = {
            "image_id": make_image_id(SOURCE, r.file),
            "path": join(root, r.file),
            "patient_id": f"{SOURCE}:{r.patient}",
            "label": r.label,
            "finding": r.finding,
            "site": r.site,
            "mask_path": join(root, "masks", f"{rel.stem}.png") if (masks / f"{rel.stem}.png").is_file() else pd.NA,
        }
        path = Path(root) / r.file
        if path.is_file():
            row.update(_header_fields(path))
        rows.append(row)
    return finish(rows, SOURCE, on_missing, file)


def _header_fields(path: Path) -> dict:
    """The whitelisted header fields of one DICOM file, without reading its pixels."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
    except (pydicom.errors.InvalidDicomError, OSError, ValueError) as err:
        raise DatasetLayoutError(f"{path}: not a readable DICOM header ({err})") from err
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    age = parse_age(ds.get("PatientAge", None))
    return {
        "view_position": view or pd.NA,
        "projection": manifest.projection_from_view(view),
        "modality": str(ds.get("Modality", "") or "").strip().upper() or pd.NA,
        "sex": normalise_sex(ds.get("PatientSex", "")),
        "age": pd.NA if age is None else age,
    }
