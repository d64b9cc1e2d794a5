"""The demo dataset (covidcxr.datasets.demo) and the phantoms it is drawn from (covidcxr.phantoms)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless
from scipy import ndimage

from covidcxr import io, manifest
from covidcxr.datasets import DatasetLayoutError, demo
from covidcxr.phantoms import SiteStyle, chest_phantom

SMALL = 12  # patients in the quick generations
MARKER_SITES = {s.name for s in demo.SITES if s.style.marker}


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _display(ds: pydicom.Dataset) -> np.ndarray:
    """Stored values as MONOCHROME2 (air dark), scaled to [0, 1] per image."""
    values = ds.pixel_array.astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = (2 ** ds.BitsStored - 1) - values
    return (values - values.min()) / (values.max() - values.min())


def _mediastinum(mask: np.ndarray) -> np.ndarray:
    """A central vertical strip over the rows the lungs span: mediastinum and spine."""
    rows = np.flatnonzero(mask.any(axis=1))
    strip = np.zeros_like(mask)
    half = mask.shape[1] // 2
    strip[rows[0] : rows[-1] + 1, half - mask.shape[1] // 40 : half + mask.shape[1] // 40] = True
    return strip & ~mask


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def full(demo_data) -> tuple[Path, dict]:
    """One full-size generation with the defaults (the data the pipeline ships): the run's shared copy, written by
    `covidcxr demo-data` (tests/conftest.py), with the counts it printed. Read only."""
    return demo_data.root, demo_data.counts


@pytest.fixture(scope="module")
def labels(full) -> pd.DataFrame:
    return pd.read_csv(full[0] / "labels.csv", dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def defective(full) -> dict[str, str]:
    """defect kind -> file, as the README documents them."""
    text = (full[0] / "README.md").read_text()
    found = re.findall(r"^- `(images/[^`]+\.dcm)`: (truncated|valid DICOM whose pixels all have one value)", text, re.M)
    return {("truncated" if kind == "truncated" else "constant"): file for file, kind in found}


@pytest.fixture(scope="module")
def datasets(full, labels, defective) -> dict[str, pydicom.Dataset]:
    """Every DICOM file, pixels decoded (the truncated one: header only)."""
    root = full[0]
    out = {}
    for file in labels["file"]:
        ds = pydicom.dcmread(root / file, stop_before_pixels=file == defective.get("truncated"))
        if "PixelData" in ds:
            _ = ds.pixel_array  # decode once, cached on the dataset
        out[file] = ds
    return out


@pytest.fixture(scope="module")
def frontal(full, labels, datasets, defective) -> list[tuple[pd.Series, np.ndarray, np.ndarray]]:
    """(labels row, display image, lung mask) of every frontal, non-defective image."""
    out = []
    for _, row in labels.iterrows():
        ds = datasets[row["file"]]
        if ds.ViewPosition == "LL" or row["file"] in defective.values():
            continue
        mask = np.asarray(Image.open(full[0] / "masks" / f"{Path(row['file']).stem}.png")) > 0
        out.append((row, _display(ds), mask))
    return out


@pytest.fixture(scope="module")
def frame(full) -> pd.DataFrame:
    return demo.load(full[0])


# ---------------------------------------------------------------- determinism and output folder


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small") / "a"
    demo.generate(root, n_patients=SMALL, workers=2)
    return root


def test_generation_is_byte_identical(small, tmp_path):
    again = tmp_path / "b"
    demo.generate(again, n_patients=SMALL, workers=1)
    first, second = _hashes(small), _hashes(again)
    assert list(first) == list(second)
    assert first == second
    assert len(first) > 2 * SMALL  # images, masks, labels.csv, README.md


def test_regenerating_replaces_a_previous_output_exactly(small, tmp_path):
    root = tmp_path / "out"
    demo.generate(root, seed=1, n_patients=SMALL, workers=1)
    other = _hashes(root)
    assert other != _hashes(small)  # the seed matters
    (root / "images" / "site_a" / "stale.dcm").write_bytes(b"left over")
    demo.generate(root, seed=0, n_patients=SMALL, workers=1)
    assert _hashes(root) == _hashes(small)


def test_refuses_a_folder_that_is_not_a_demo_output(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a covidcxr demo dataset"):
        demo.generate(tmp_path, n_patients=SMALL)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_refuses_a_demo_output_holding_foreign_files(small, tmp_path):
    root = tmp_path / "copy"
    root.mkdir()
    (root / "README.md").write_bytes((small / "README.md").read_bytes())
    (root / "results.csv").write_text("precious")
    with pytest.raises(FileExistsError, match="results.csv"):
        demo.generate(root, n_patients=SMALL)
    assert (root / "results.csv").read_text() == "precious"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"n_patients": 3}, "n_patients"), ({"size": 32}, "size"), ({"workers": 0}, "workers")],
)
def test_generate_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        demo.generate(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- content


def test_counts_sizes_and_files_agree(full, labels):
    root, counts = full
    assert 270 <= counts["images"] <= 340 and 150 <= counts["patients"] <= 200
    assert counts["images"] == len(labels) == len(list((root / "images").rglob("*.dcm")))
    assert counts["covid"] == (labels["label"] == "covid").sum()
    assert counts["negative"] == (labels["label"] == "negative").sum()
    assert counts["patients"] == labels["patient"].nunique()
    assert counts["masks"] == len(list((root / "masks").glob("*.png")))
    assert counts["bytes"] == sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert counts["bytes"] < 50e6
    assert list(labels.columns) == list(demo.LABEL_COLUMNS)
    assert list(labels["file"]) == sorted(labels["file"])
    for row in labels.itertuples():
        assert row.file == f"images/{row.site}/{row.patient}/{Path(row.file).name}"
        assert Path(row.file).stem.startswith(f"{row.patient}_")
    readme = (root / "README.md").read_text()
    assert readme.startswith(demo.README_TITLE) and "synthetic" in readme and "seed 0" in readme
    assert f"images: {counts['images']} " in readme


def test_class_and_projection_balance(full, labels, datasets):
    counts = full[1]
    views = labels["file"].map(lambda f: datasets[f].ViewPosition)
    assert 0.10 <= (views == "LL").mean() <= 0.20
    assert counts["lateral"] == (views == "LL").sum()
    assert 0.35 <= (labels["label"] == "covid").mean() <= 0.65
    share = labels.groupby("site")["label"].apply(lambda s: (s == "covid").mean())
    assert set(share.index) == {s.name for s in demo.SITES}
    assert share.between(0.05, 0.95).all()  # both classes at every site
    assert share.max() > 0.7 and share.min() < 0.3  # a shortcut to audit, not a perfect one
    for site in demo.SITES:
        in_site = labels["site"] == site.name
        assert counts[f"{site.name}_covid"] == (in_site & (labels["label"] == "covid")).sum()
        # Each class has frontal images at every site.
        frontal = in_site & (views != "LL")
        assert set(labels.loc[frontal, "label"]) == {"covid", "negative"}
    assert set(labels["finding"]) == set(demo.FINDING_TEXT.values())


def test_multi_image_patients_and_curation_candidates(full, labels, datasets):
    per_patient = labels.groupby("patient")
    assert (per_patient.size() > 1).sum() >= 20
    pairs = [
        p for p, g in per_patient
        if {datasets[f].ViewPosition for f in g["file"]} >= {"PA", "LL"}
    ]
    assert len(pairs) >= 10  # frontal + lateral pairs
    mixed = [p for p, g in per_patient if set(g["label"]) == {"covid", "negative"}]
    assert 3 <= len(mixed) == full[1]["negative_then_covid_patients"]
    for patient in mixed:
        rows = labels[labels["patient"] == patient]
        dates = {lab: [datasets[f].StudyDate for f in g["file"]] for lab, g in rows.groupby("label")}
        assert max(dates["negative"]) < min(dates["covid"])  # negative first, positive later
    assert labels.groupby("patient")["site"].nunique().eq(1).all()


def test_masks_exist_exactly_for_frontal_images(full, labels, datasets, defective):
    root = full[0]
    frontal = {
        Path(f).stem for f in labels["file"]
        if datasets[f].ViewPosition in ("PA", "AP") and f not in defective.values()
    }
    assert {p.stem for p in (root / "masks").glob("*.png")} == frontal
    for stem in sorted(frontal)[::5]:
        mask = np.asarray(Image.open(root / "masks" / f"{stem}.png"))
        assert mask.dtype == np.uint8 and mask.shape == (256, 256)
        assert set(np.unique(mask)) == {0, 255}
        components, n = ndimage.label(mask > 0)
        assert n == 2, stem
        assert 0.15 <= (mask > 0).mean() <= 0.45, stem
        centres = [np.argwhere(components == k)[:, 1].mean() for k in (1, 2)]
        assert min(centres) < 128 < max(centres)  # one lung on each side


def test_defective_files(full, labels, datasets, defective):
    root = full[0]
    assert set(defective) == {"truncated", "constant"}
    assert set(defective.values()) <= set(labels["file"])
    truncated = pydicom.dcmread(root / defective["truncated"], stop_before_pixels=True)
    assert truncated.ViewPosition == "PA"  # the header is intact
    assert (root / defective["truncated"]).stat().st_size < 2 * truncated.Rows * truncated.Columns
    with pytest.raises(Exception):  # noqa: B017 - pydicom's error type for short pixel data varies by version
        _ = pydicom.dcmread(root / defective["truncated"]).pixel_array
    assert np.ptp(datasets[defective["constant"]].pixel_array) == 0
    good = [f for f in labels["file"] if f not in defective.values()]
    assert all(np.ptp(datasets[f].pixel_array) > 1000 for f in good)


# ---------------------------------------------------------------- headers


def test_header_variety(datasets):
    def values(key: str) -> set[str]:
        return {str(ds.get(key)) for ds in datasets.values()}

    assert values("Modality") == {"CR", "DX"}
    assert values("PhotometricInterpretation") == {"MONOCHROME1", "MONOCHROME2"}
    assert values("ViewPosition") == {"PA", "AP", "LL"}
    assert values("BitsStored") == {"12"} and values("BitsAllocated") == {"16"} and values("HighBit") == {"11"}
    assert values("PixelRepresentation") == {"0"} and values("SamplesPerPixel") == {"1"}
    assert values("BodyPartExamined") == {"CHEST"}
    assert values("PatientSex") == {"M", "F"}
    syntaxes = {ds.file_meta.TransferSyntaxUID for ds in datasets.values()}
    assert syntaxes == {ExplicitVRLittleEndian, JPEG2000Lossless}
    windowed = sum("WindowCenter" in ds for ds in datasets.values())
    assert 0 < windowed < len(datasets)
    sop = [ds.SOPInstanceUID for ds in datasets.values()]
    assert len(set(sop)) == len(sop) and all(UID(u).is_valid for u in sop)
    for file, ds in datasets.items():
        assert re.fullmatch(r"\d{3}Y", ds.PatientAge) and 20 <= int(ds.PatientAge[:3]) <= 90, file
        birth, study = ds.PatientBirthDate, ds.StudyDate
        years = int(study[:4]) - int(birth[:4]) - (study[4:] < birth[4:])
        assert years == int(ds.PatientAge[:3]), file
        assert re.fullmatch(r"DEMO\^PATIENT\^\d{4}", str(ds.PatientName)), file
        assert ds.BurnedInAnnotation == ("YES" if file.split("/")[1] in MARKER_SITES else "NO")
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Rows == ds.Columns == 256 and float(ds.PixelSpacing[0]) > 1.0
        if "PixelData" in ds:
            assert 0 <= ds.pixel_array.min() and ds.pixel_array.max() <= 4095


def test_site_equipment_is_consistent(datasets):
    seen = {}
    for file, ds in datasets.items():
        seen.setdefault(file.split("/")[1], set()).add((ds.Modality, ds.PhotometricInterpretation, ds.InstitutionName))
    assert all(len(v) == 1 for v in seen.values())
    assert len(seen) == len(demo.SITES)


def test_monochrome1_inverted_looks_like_monochrome2(full, frontal, datasets):
    checked = {"MONOCHROME1": 0, "MONOCHROME2": 0}
    for row, display, mask in frontal:
        ds = datasets[row["file"]]
        centre = _mediastinum(mask)
        assert display[mask].mean() < display[centre].mean() - 0.15, row["file"]
        raw = ds.pixel_array.astype(np.float64)
        lungs_darker_raw = raw[mask].mean() < raw[centre].mean()
        assert lungs_darker_raw == (ds.PhotometricInterpretation == "MONOCHROME2"), row["file"]
        checked[ds.PhotometricInterpretation] += 1
    assert min(checked.values()) > 50


def test_covid_raises_lung_density_inside_the_lungs(frontal):
    rows = pd.DataFrame(
        [{"site": r["site"], "covid": r["label"] == "covid", "inside": d[m].mean(), "outside": d[~m].mean()}
         for r, d, m in frontal]
    )
    means = rows.groupby("covid")[["inside", "outside"]].mean()
    inside = means.loc[True, "inside"] - means.loc[False, "inside"]
    outside = means.loc[True, "outside"] - means.loc[False, "outside"]
    assert inside > 0.015
    assert inside > outside + 0.015
    by_site = rows.groupby(["site", "covid"])["inside"].mean().unstack()
    assert (by_site[True] > by_site[False] + 0.02).all()  # within every site, too


def test_files_read_through_covidcxr_io(full, datasets, defective, frontal):
    root = full[0]
    with pytest.raises(io.TruncatedImageError):
        io.read_image(root / defective["truncated"])
    with pytest.raises(io.ZeroVarianceImageError):
        io.read_image(root / defective["constant"])
    for row, _, mask in frontal[::4]:
        pixels, header = io.read_image(root / row["file"])
        assert pixels.shape == (256, 256) and header["bits_stored"] == 12
        assert pixels[mask].mean() < pixels[_mediastinum(mask)].mean(), row["file"]  # air dark after LUTs
    lateral = [f for f, ds in datasets.items() if ds.ViewPosition == "LL"]
    for file in lateral[:5]:
        _, header = io.read_image(root / file)
        assert header["view_position"] == "LL"


# ---------------------------------------------------------------- load()


def test_load_conforms_to_the_manifest(full, frame, labels, datasets, defective):
    root = full[0]
    assert list(frame.columns) == manifest.COLUMNS
    assert frame.dtypes.to_dict() == manifest.conform(frame).dtypes.to_dict()
    assert len(frame) == len(labels) and frame["image_id"].is_unique
    assert (frame["source"] == "demo").all()
    assert frame["patient_id"].str.fullmatch(r"demo:P\d{4}").all()
    assert list(frame["image_id"]) == sorted(frame["image_id"])
    by_file = frame.set_index(frame["path"].map(lambda p: Path(p).relative_to(root).as_posix()))
    for row in labels.itertuples():
        got, ds = by_file.loc[row.file], datasets[row.file]
        assert got["image_id"] == "demo/" + row.file.removesuffix(".dcm")
        assert got["patient_id"] == f"demo:{row.patient}"
        assert (got["label"], got["finding"], got["site"]) == (row.label, row.finding, row.site)
        assert got["view_position"] == ds.ViewPosition and got["modality"] == ds.Modality
        assert got["projection"] == manifest.projection_from_view(ds.ViewPosition)
        assert got["sex"] == ds.PatientSex and got["age"] == float(ds.PatientAge[:3])
        has_mask = ds.ViewPosition != "LL" and row.file not in defective.values()
        assert pd.notna(got["mask_path"]) == has_mask
        if has_mask:
            assert Path(got["mask_path"]).is_file()
    assert set(frame["projection"]) == {"frontal", "lateral"}
    assert frame[["width", "height", "photometric", "bits_stored", "sha256"]].isna().all().all()


def test_load_leaks_no_identifying_values(full, frame, datasets):
    phi = set()
    for ds in datasets.values():
        phi |= {str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber,
                ds.StudyInstanceUID, ds.SOPInstanceUID}
    assert len(phi) > 4 * len({ds.PatientID for ds in datasets.values()})
    cells = [str(v) for v in frame.astype("string").fillna("").to_numpy().ravel()]
    cells += list(frame.columns)
    text = "\n".join(cells)
    leaked = sorted(v for v in phi if v in text)
    assert leaked == []
    labels_text = (full[0] / "labels.csv").read_text() + (full[0] / "README.md").read_text()
    assert sorted(v for v in phi if v in labels_text) == []


def test_load_errors(full, tmp_path):
    with pytest.raises(DatasetLayoutError, match="labels.csv"):
        demo.load(tmp_path)
    (tmp_path / "labels.csv").write_text("file,patient,label,finding,site\nimages/x.dcm,P1,maybe,?,site_a\n")
    with pytest.raises(DatasetLayoutError, match="maybe"):
        demo.load(tmp_path)
    (tmp_path / "labels.csv").write_text("file,patient,label,finding,site\nimages/x.dcm,P1,covid,COVID-19,site_a\n")
    with pytest.raises(DatasetLayoutError, match="missing"):
        demo.load(tmp_path)
    assert demo.load(tmp_path, on_missing="skip").empty
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.dcm").write_text("not a dicom")
    with pytest.raises(DatasetLayoutError, match="x.dcm"):
        demo.load(tmp_path)


def test_registry_loads_the_demo(full, frame):
    from covidcxr import datasets

    pd.testing.assert_frame_equal(datasets.load("demo", full[0]), frame)


# ---------------------------------------------------------------- phantoms


@pytest.mark.parametrize("finding", ["covid", "nodule", "consolidation"])
def test_findings_change_only_the_lungs(finding):
    style = SiteStyle(marker="R", noise=0.02)
    clean, mask = chest_phantom(np.random.default_rng(7), 256, projection="frontal", covid=False, site=style)
    sick, mask2 = chest_phantom(
        np.random.default_rng(7), 256, projection="frontal", covid=finding == "covid", site=style,
        finding=finding if finding != "covid" else "none", severity=0.6,
    )
    assert np.array_equal(mask, mask2)
    diff = sick - clean
    assert np.abs(diff[~mask]).max() == 0.0
    assert diff[mask].max() > 0.1 and diff[mask].sum() > 5.0


def test_covid_opacities_are_bilateral_lower_and_peripheral():
    clean, mask = chest_phantom(np.random.default_rng(3), 256, projection="frontal", covid=False, site={})
    sick, _ = chest_phantom(np.random.default_rng(3), 256, projection="frontal", covid=True, site={}, severity=0.8)
    diff = np.where(mask, sick - clean, 0.0)
    left, right = diff[:, :128].sum(), diff[:, 128:].sum()
    assert min(left, right) > 0.2 * max(left, right)
    rows = np.flatnonzero(mask.any(axis=1))
    middle = (rows[0] + rows[-1]) // 2
    assert diff[middle:].sum() > diff[:middle].sum()
    cols = np.arange(256)[None, :]
    outer = mask & (np.abs(cols - 128) > 60)
    inner = mask & (np.abs(cols - 128) <= 60)
    assert diff[outer].mean() > diff[inner].mean()


def test_phantom_outputs_and_projections():
    rng = np.random.default_rng(0)
    image, mask = chest_phantom(rng, 128, projection="frontal", covid=False, site={"gamma": 1.2, "marker": "L"})
    assert image.shape == mask.shape == (128, 128) and mask.dtype == bool
    assert 0.0 <= image.min() and image.max() <= 1.0
    lateral, none = chest_phantom(rng, 128, projection="lateral", covid=True, site=SiteStyle())
    assert none is None and lateral.shape == (128, 128)
    assert np.abs(lateral - image).mean() > 0.05  # a different picture, not the same one relabelled
    again, _ = chest_phantom(np.random.default_rng(0), 128, projection="frontal", covid=False,
                             site={"gamma": 1.2, "marker": "L"})
    assert np.array_equal(again, image)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"projection": "oblique"}, "projection"),
        ({"finding": "fracture"}, "finding"),
        ({"severity": 1.5}, "severity"),
        ({"site": {"marker": "Q"}}, "glyph"),
        ({"site": {"marker_corner": "middle"}}, "marker_corner"),
    ],
)
def test_phantom_rejects_bad_arguments(kwargs, message):
    args = {"projection": "frontal", "covid": True, "site": {}, **kwargs}
    with pytest.raises(ValueError, match=message):
        chest_phantom(np.random.default_rng(0), 128, **args)


def test_a_blurring_site_keeps_findings_inside_the_lungs():
    style = SiteStyle(blur=1.0)
    clean, mask = chest_phantom(np.random.default_rng(5), 256, projection="frontal", covid=False, site=style)
    sick, _ = chest_phantom(np.random.default_rng(5), 256, projection="frontal", covid=True, site=style, severity=1.0)
    diff = np.abs(sick - clean)
    assert diff[mask].mean() > 0.02
    assert diff[~mask].max() == 0.0
