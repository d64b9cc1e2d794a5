"""Cohen adapter on a fixture in the repository's own metadata.csv format, and on the real corpus."""

import csv
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidcxr import manifest
from covidcxr.datasets import DatasetLayoutError, cohen, load

COLUMNS = [
    "patientid", "offset", "sex", "age", "finding", "survival", "intubated", "went_icu", "view",
    "modality", "date", "location", "folder", "filename", "doi", "url", "license",
    "clinical_notes", "other_notes",
]  # fmt: skip
NOTE = "On January 22, 2020, a 65-year-old man was admitted; no “wet market” exposure"
# patientid, sex, age, finding, view, modality, location, folder, filename
ROWS = [
    ("2", "M", "65", "COVID-19", "PA", "X-ray", "Cho Ray Hospital, Ho Chi Minh City, Vietnam", "images", "a.jpeg"),
    ("2", "M", "65", "COVID-19", "L", "X-ray", "Cho Ray Hospital, Ho Chi Minh City, Vietnam", "images", "a_lat.jpg"),
    ("4", "F", "52", "Pneumonia/Viral/COVID-19", "AP Supine", "X-ray", "Italy", "images", "b.png"),
    ("5", "", "", "COVID-19, ARDS", "AP semi erect", "X-ray", "San Raffaele Hospital", "images", "c.png"),
    ("6", "M", "74", "todo", "?", "X-ray", "", "images", "d.png"),
    ("7", "F", "", "No Finding", "", "X-ray", "?", "images", "e.png"),
    ("8", "M", "40", "Streptococcus", "AP", "X-ray", "Madrid, Spain", "images", "f.png"),
    ("9", "M", "50", "COVID-19", "Axial", "CT", "Wuhan, China", "volumes", "g.nii.gz"),
]  # fmt: skip


def tiny_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(
        path, format="PNG" if path.suffix == ".png" else "JPEG"
    )


def write_fixture(root: Path, encoding: str = "cp1252", rows=ROWS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.csv", "w", newline="", encoding=encoding) as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for pid, sex, age, finding, view, modality, location, folder, filename in rows:
            writer.writerow(
                {
                    "patientid": pid, "offset": "0", "sex": sex, "age": age, "finding": finding,
                    "view": view, "modality": modality, "date": "January 22, 2020",
                    "location": location, "folder": folder, "filename": filename,
                    "doi": "10.1056/nejmc2001272", "url": "https://www.nejm.org/doi/x",
                    "license": "CC BY", "clinical_notes": NOTE, "other_notes": "credit: Dr. X",
                }
            )  # fmt: skip
            if modality == "X-ray":
                tiny_image(root / folder / filename)
    (root / "volumes").mkdir(exist_ok=True)
    (root / "volumes" / "g.nii.gz").write_bytes(b"\x00")
    tiny_image(root / "masks_v7labs" / "a.png")
    return root


@pytest.fixture
def fixture(tmp_path):
    return write_fixture(tmp_path / "cohen")


def by_file(df: pd.DataFrame) -> pd.DataFrame:
    return df.set_index(df["path"].map(lambda p: Path(p).name))


def test_rows_ids_and_fields(fixture, caplog):
    with caplog.at_level(logging.INFO, logger="covidcxr.datasets.cohen"):
        df = load("cohen", fixture)
    assert list(df.columns) == manifest.COLUMNS
    assert len(df) == 7  # the CT row is left out ...
    assert "CT" in caplog.text and "1 non-X-ray" in caplog.text  # ... and counted
    assert df["image_id"].is_unique and df["image_id"].is_monotonic_increasing
    rows = by_file(df)
    a = rows.loc["a.jpeg"]
    assert a["image_id"] == "cohen/images/a"
    assert a["path"] == f"{fixture}/images/a.jpeg"
    assert a["patient_id"] == "cohen:2" and rows.loc["a_lat.jpg", "patient_id"] == "cohen:2"
    assert (a["source"], a["sex"], a["age"], a["site"]) == ("cohen", "M", 65.0, "Vietnam")
    assert a["mask_path"] == f"{fixture}/masks_v7labs/a.png"
    assert rows["mask_path"].notna().sum() == 1
    assert rows.loc["c.png", "sex"] == "unknown" and pd.isna(rows.loc["c.png", "age"])
    assert df[["width", "height", "photometric", "bits_stored", "sha256"]].isna().all().all()


@pytest.mark.parametrize(
    "file, projection, view",
    [
        ("a.jpeg", "frontal", "PA"),
        ("a_lat.jpg", "lateral", "L"),
        ("b.png", "frontal", "AP SUPINE"),
        ("c.png", "frontal", "AP SEMI ERECT"),
        ("d.png", "unknown", None),
        ("e.png", "unknown", None),
        ("f.png", "frontal", "AP"),
    ],
)
def test_projection_from_view(fixture, file, projection, view):
    row = by_file(cohen.load(fixture)).loc[file]
    assert row["projection"] == projection
    assert (pd.isna(row["view_position"]) and view is None) or row["view_position"] == view


@pytest.mark.parametrize(
    "file, label, finding",
    [
        ("a.jpeg", "covid", "COVID-19"),
        ("b.png", "covid", "Pneumonia/Viral/COVID-19"),
        ("c.png", "covid", "COVID-19, ARDS"),
        ("d.png", "unknown", "todo"),
        ("e.png", "negative", "No Finding"),
        ("f.png", "negative", "Streptococcus"),
    ],
)
def test_label_and_finding(fixture, file, label, finding):
    row = by_file(cohen.load(fixture)).loc[file]
    assert (row["label"], row["finding"]) == (label, finding)


@pytest.mark.parametrize(
    "location, site",
    [
        ("Cho Ray Hospital, Ho Chi Minh City, Vietnam", "Vietnam"),
        ("Italy", "Italy"),
        ("San Raffaele Hospital", "unknown"),
        ("Madrid, Spain", "Spain"),
        ("?", "unknown"),
        ("", "unknown"),
        ("Wuhan, Jinyintan Hospital", "unknown"),
    ],
)
def test_site_keeps_only_a_coarse_place(location, site):
    assert cohen.site(location) == site


def test_no_notes_urls_or_dates_copied(fixture):
    values = [str(v) for v in cohen.load(fixture).to_numpy().ravel()]
    for forbidden in ("http", "admitted", "2020", "nejmc", "credit", "wet market", "Ho Chi Minh"):
        assert not any(forbidden in v for v in values), forbidden


@pytest.mark.parametrize("encoding", ["utf-8", "cp1252"])
def test_reads_both_published_encodings(tmp_path, encoding):
    df = cohen.load(write_fixture(tmp_path / "c", encoding=encoding))
    assert len(df) == 7


def test_relative_root_stays_relative(fixture, monkeypatch):
    monkeypatch.chdir(fixture.parent)
    df = cohen.load("cohen")
    assert df["path"].str.startswith("cohen/images/").all()
    assert df.loc[df["mask_path"].notna(), "mask_path"].tolist() == ["cohen/masks_v7labs/a.png"]


def test_missing_metadata_file(tmp_path):
    with pytest.raises(DatasetLayoutError, match="metadata.csv"):
        cohen.load(tmp_path)


def test_missing_column(fixture):
    df = pd.read_csv(fixture / "metadata.csv", encoding="cp1252").drop(columns=["view"])
    df.to_csv(fixture / "metadata.csv", index=False)
    with pytest.raises(DatasetLayoutError, match=r"metadata\.csv.*'view'"):
        cohen.load(fixture)


def test_missing_image_raises_or_is_skipped(fixture, caplog):
    (fixture / "images" / "b.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"missing on disk \(1: .*images/b\.png"):
        cohen.load(fixture)
    with caplog.at_level(logging.WARNING):
        df = cohen.load(fixture, on_missing="skip")
    assert len(df) == 6 and "b.png" not in " ".join(df["path"])
    assert "1 image file(s)" in caplog.text


def test_bad_on_missing_value(fixture):
    with pytest.raises(ValueError, match="on_missing"):
        cohen.load(fixture, on_missing="ignore")


def test_real_corpus(real_data):
    root = real_data / "cohen"
    df = cohen.load(root)
    assert len(df) == 560
    assert (df["projection"] == "lateral").sum() == 39
    assert df["path"].map(lambda p: Path(p).is_file()).all()
    masks = df["mask_path"].dropna()
    assert len(masks) == 380 and masks.map(lambda p: Path(p).is_file()).all()
    assert df["image_id"].is_unique
    assert df["patient_id"].nunique() == 302
    values = [str(v) for v in df.to_numpy().ravel()]
    assert not any("http" in v or "admitted" in v.lower() for v in values)


@pytest.mark.parametrize("view", ["AP semi-erect", "AP_SEMI_ERECT", "ap  semi erect", "APS"])
def test_every_spelling_of_a_semi_erect_ap_is_frontal(view):
    assert cohen.projection(view) == "frontal"
