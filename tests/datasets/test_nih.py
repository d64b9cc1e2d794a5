"""NIH ChestX-ray14 adapter on a Data_Entry_2017.csv fixture in the published format."""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidcxr import manifest
from covidcxr.datasets import DatasetLayoutError, load, nih

HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
)
ROWS = [
    "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,",
    "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143,",
    "00000003_000.png,Hernia,0,3,81,F,AP,2582,2991,0.143,0.143,",
    "00000004_000.png,No Finding,0,4,412,M,AP,2500,2048,0.168,0.168,",
]
# Kaggle layout: images spread over images_001/images, images_002/images.
LOCATION = {
    "00000001_000.png": "images_001/images",
    "00000001_001.png": "images_001/images",
    "00000003_000.png": "images_002/images",
    "00000004_000.png": "images_002/images",
}


def png(path: Path, value: int = 80) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def write_fixture(root: Path, rows=ROWS, location=LOCATION) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "Data_Entry_2017.csv").write_text(HEADER + "\n".join(rows) + "\n")
    for name, folder in location.items():
        png(root / folder / name)
    return root


@pytest.fixture
def root(tmp_path):
    return write_fixture(tmp_path / "nih")


def test_rows_and_fields(root, caplog):
    with caplog.at_level(logging.INFO):
        df = load("nih", root)
    assert list(df.columns) == manifest.COLUMNS
    assert df["image_id"].tolist() == [f"nih/{Path(n).stem}" for n in sorted(LOCATION)]
    assert df["path"].tolist()[2] == f"{root}/images_002/images/00000003_000.png"
    assert df["patient_id"].tolist() == ["nih:1", "nih:1", "nih:3", "nih:4"]
    assert df["finding"].tolist()[1] == "Cardiomegaly|Emphysema"
    assert df["view_position"].tolist() == ["PA", "PA", "AP", "AP"]
    assert set(df["projection"]) == {"frontal"} and set(df["label"]) == {"negative"}
    assert df["sex"].tolist() == ["M", "M", "F", "M"]
    assert df["age"].tolist()[:3] == [58.0, 58.0, 81.0] and pd.isna(df["age"].tolist()[3])
    assert "1 age(s)" in caplog.text
    assert df["width"].isna().all() and df["mask_path"].isna().all()


def test_images_folder_layout_and_v2020_csv(tmp_path):
    root = write_fixture(tmp_path, location={n: "images" for n in LOCATION})
    (root / "Data_Entry_2017.csv").rename(root / "Data_Entry_2017_v2020.csv")
    df = nih.load(root)
    assert df["path"].tolist()[0] == f"{root}/images/00000001_000.png"


def test_xlsor_masks_beside_images(root):
    xlsor = root / "xlsor"
    png(xlsor / "00000005_000.png")  # an image only present in the XLSor folder
    png(xlsor / "00000005_000_mask.png", 255)
    png(xlsor / "00000003_000_mask.png", 255)
    (root / "Data_Entry_2017.csv").write_text(
        HEADER + "\n".join(ROWS + ["00000005_000.png,Mass,0,5,40,F,PA,2048,2500,0.168,0.168,"]) + "\n"
    )
    df = nih.load(root, masks="xlsor").set_index("image_id")
    assert df.loc["nih/00000003_000", "mask_path"] == f"{root}/xlsor/00000003_000_mask.png"
    assert df.loc["nih/00000005_000", "path"] == f"{root}/xlsor/00000005_000.png"
    assert df["mask_path"].notna().sum() == 2
    only = nih.load(root, masks="xlsor", masked_only=True)
    assert only["image_id"].tolist() == ["nih/00000003_000", "nih/00000005_000"]


def test_mask_only_folder(root):
    png(root / "segmentations" / "00000001_000.png", 255)
    df = nih.load(root, masks="segmentations")
    assert df["mask_path"].tolist()[0] == f"{root}/segmentations/00000001_000.png"
    assert df["path"].tolist()[0] == f"{root}/images_001/images/00000001_000.png"
    assert df["mask_path"].notna().sum() == 1


def test_masked_only_lets_a_subset_load_without_the_full_download(tmp_path):
    root = write_fixture(tmp_path, location={})
    png(root / "xlsor" / "00000004_000.png")
    png(root / "xlsor" / "00000004_000_mask.png", 255)
    with pytest.raises(DatasetLayoutError, match="missing on disk"):
        nih.load(root, masks="xlsor")
    df = nih.load(root, masks="xlsor", masked_only=True)
    assert df["path"].tolist() == [f"{root}/xlsor/00000004_000.png"]


def test_missing_image(root, caplog):
    (root / "images_002" / "images" / "00000003_000.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"Data_Entry_2017\.csv.*00000003_000\.png"):
        nih.load(root)
    with caplog.at_level(logging.WARNING):
        assert len(nih.load(root, on_missing="skip")) == 3
    assert "missing on disk" in caplog.text


def test_missing_csv_and_column(tmp_path, root):
    with pytest.raises(DatasetLayoutError, match="Data_Entry_2017.csv"):
        nih.load(tmp_path / "elsewhere")
    (root / "Data_Entry_2017.csv").write_text(HEADER.replace("View Position", "View") + ROWS[0])
    with pytest.raises(DatasetLayoutError, match="View Position"):
        nih.load(root)


def test_bad_mask_options(root):
    with pytest.raises(ValueError, match="masks="):
        nih.load(root, masked_only=True)
    with pytest.raises(DatasetLayoutError, match="nope"):
        nih.load(root, masks="nope")
