"""PadChest adapter on a labels CSV fixture with the published columns."""

import csv
import gzip
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidcxr import manifest
from covidcxr.datasets import DatasetLayoutError, load, padchest

COLUMNS = [
    "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
    "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric",
    "Modality_DICOM", "Manufacturer_DICOM", "PhotometricInterpretation_DICOM",
    "PixelRepresentation_DICOM", "PixelAspectRatio_DICOM", "SpatialResolution_DICOM",
    "BitsStored_DICOM", "WindowCenter_DICOM", "WindowWidth_DICOM", "Rows_DICOM", "Columns_DICOM",
    "XRayTubeCurrent_DICOM", "Exposure_DICOM", "ExposureInuAs_DICOM", "ExposureTime",
    "RelativeXRayExposure_DICOM", "ReportID", "Report", "MethodLabel", "Labels", "Localizations",
    "LabelsLocalizationsBySentence", "labelCUIS", "LocalizationsCUIS",
]  # fmt: skip
# ImageID, ImageDir, StudyDate, PatientID, PatientBirth, Sex, Projection, Labels, Photometric
IMAGES = [
    ("111_a.png", "0", "20150622", "p1", "1940.0", "F", "PA", "['pleural effusion', 'cardiomegaly']", "MONOCHROME1"),
    ("111_b.png", "0", "20150622", "p1", "1940.0", "F", "L", "['pleural effusion', 'cardiomegaly']", "MONOCHROME1"),
    ("222_a.png", "1", "20120101", "p2", "", "M", "AP_horizontal", "['normal']", "MONOCHROME2"),
    ("333_a.png", "1", "20170309", "p3", "1980", "O", "COSTAL", "['']", "MONOCHROME2"),
    ("444_a.png", "54", "20160101", "p4", "1950.0", "M", "EXCLUDE", "['exclude']", ""),
]  # fmt: skip
CSV_NAME = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"


def write_fixture(root: Path, images=IMAGES, gz: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for image_id, folder, date, patient, birth, sex, projection, labels, photometric in images:
        record = dict.fromkeys(COLUMNS, "")
        record.update(
            ImageID=image_id, ImageDir=folder, StudyDate_DICOM=date, StudyID=f"s-{image_id}",
            PatientID=patient, PatientBirth=birth, PatientSex_DICOM=sex, Projection=projection,
            ViewPosition_DICOM="POSTEROANTERIOR", Modality_DICOM="CR",
            PhotometricInterpretation_DICOM=photometric, BitsStored_DICOM="12",
            Rows_DICOM="2000", Columns_DICOM="1800.0", MethodLabel="Physician",
            Report="paciente admitted on 22/06/2015, derrame pleural", Labels=labels,
        )  # fmt: skip
        records.append(record)
        path = root / folder / image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 5), 3000, np.uint16)).save(path)
    opener = gzip.open if gz else open
    with opener(root / (CSV_NAME + (".gz" if gz else "")), "wt", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(records)
    return root


@pytest.fixture
def root(tmp_path):
    return write_fixture(tmp_path / "padchest")


def test_rows_and_fields(root):
    df = load("padchest", root)
    assert list(df.columns) == manifest.COLUMNS
    assert df["image_id"].tolist() == [
        "padchest/0/111_a", "padchest/0/111_b", "padchest/1/222_a", "padchest/1/333_a", "padchest/54/444_a",
    ]  # fmt: skip
    assert df["path"].tolist()[0] == f"{root}/0/111_a.png"
    assert df["patient_id"].tolist()[:2] == ["padchest:p1", "padchest:p1"]
    assert df["finding"].tolist()[0] == "pleural effusion|cardiomegaly"
    assert df["finding"].tolist()[2] == "normal" and pd.isna(df["finding"].tolist()[3])
    assert set(df["label"]) == {"negative"} and set(df["site"]) == {"padchest"}
    assert df["sex"].tolist() == ["F", "F", "M", "unknown", "M"]
    assert df["age"].tolist()[:2] == [75.0, 75.0] and pd.isna(df["age"].tolist()[2])
    assert df["age"].tolist()[3:] == [37.0, 66.0]
    first = df.iloc[0]
    assert (first["photometric"], first["bits_stored"], first["width"], first["height"]) == (
        "MONOCHROME1",
        12,
        1800,
        2000,
    )
    assert first["modality"] == "CR" and pd.isna(df["photometric"].tolist()[4])


@pytest.mark.parametrize(
    "image, projection, view",
    [
        ("111_a", "frontal", "PA"),
        ("111_b", "lateral", "L"),
        ("222_a", "frontal", "AP_HORIZONTAL"),
        ("333_a", "unknown", "COSTAL"),
        ("444_a", "unknown", "EXCLUDE"),
    ],
)
def test_projection(root, image, projection, view):
    df = padchest.load(root)
    row = df.loc[df["image_id"].str.endswith(image)].iloc[0]
    assert (row["projection"], row["view_position"]) == (projection, view)


def test_no_report_dates_or_birth_years_copied(root):
    values = [str(v) for v in padchest.load(root).to_numpy().ravel()]
    for forbidden in ("admitted", "derrame", "2015", "1940", "s-111"):
        assert not any(forbidden in v for v in values), forbidden


def test_gzipped_csv(tmp_path):
    assert len(padchest.load(write_fixture(tmp_path, gz=True))) == len(IMAGES)


def test_missing_image(root, caplog):
    (root / "54" / "444_a.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"PADCHEST.*54/444_a\.png"):
        padchest.load(root)
    with caplog.at_level(logging.WARNING):
        assert len(padchest.load(root, on_missing="skip")) == 4
    assert "missing on disk" in caplog.text


def test_missing_csv_or_column(tmp_path, root):
    with pytest.raises(DatasetLayoutError, match="PADCHEST_chest_x_ray"):
        padchest.load(tmp_path / "empty")
    df = pd.read_csv(root / CSV_NAME, dtype=str).drop(columns=["PatientBirth"])
    df.to_csv(root / "other.csv", index=False)
    with pytest.raises(DatasetLayoutError, match=r"other\.csv.*'PatientBirth'"):
        padchest.load(root, csv="other.csv")


@pytest.mark.parametrize(
    "study, birth, age",
    [("20150622", "1940.0", 75.0), ("20150622", "", None), ("", "1940", None), ("20000101", "2010", None)],
)
def test_age_from_years(study, birth, age):
    assert padchest.age(study, birth) == age
