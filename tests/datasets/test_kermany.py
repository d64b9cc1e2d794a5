"""Kermany adapter on a fixture in the Kaggle chest_xray layout, and on the real corpus."""

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidcxr import manifest
from covidcxr.datasets import DatasetLayoutError, kermany, load

FILES = [
    "train/NORMAL/IM-0115-0001.jpeg",
    "train/NORMAL/IM-0435-0001-0002.jpeg",
    "train/NORMAL/NORMAL2-IM-0427-0001.jpeg",
    "train/PNEUMONIA/person1_bacteria_1.jpeg",
    "train/PNEUMONIA/person1_bacteria_2.jpeg",
    "test/PNEUMONIA/person22_virus_55.jpeg",
    "val/NORMAL/IM-0117-0001.jpeg",
]


def write_fixture(base: Path, files=FILES) -> None:
    base.mkdir(parents=True, exist_ok=True)
    for relative in files:
        path = base / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 90, np.uint8)).save(path, format="JPEG")
    for folder in base.glob("*/*"):
        (folder / ".DS_Store").write_bytes(b"\x00")


@pytest.fixture
def root(tmp_path):
    write_fixture(tmp_path / "chest_xray")
    return tmp_path


def test_rows_ids_patients_findings(root):
    df = load("kermany", root)
    assert list(df.columns) == manifest.COLUMNS
    assert len(df) == len(FILES)  # .DS_Store ignored
    row = df.set_index("image_id").loc["kermany/chest_xray/train/PNEUMONIA/person1_bacteria_2"]
    assert row["path"] == f"{root}/chest_xray/train/PNEUMONIA/person1_bacteria_2.jpeg"
    assert set(df["projection"]) == {"frontal"} and set(df["label"]) == {"negative"}
    assert set(df["site"]) == {"guangzhou"} and df["age"].isna().all()
    assert set(df["sex"]) == {"unknown"}


@pytest.mark.parametrize(
    "relative, patient, finding",
    [
        ("train/NORMAL/IM-0115-0001.jpeg", "kermany:IM-0115", "normal"),
        ("train/NORMAL/IM-0435-0001-0002.jpeg", "kermany:IM-0435", "normal"),
        ("train/NORMAL/NORMAL2-IM-0427-0001.jpeg", "kermany:NORMAL2-IM-0427", "normal"),
        ("train/PNEUMONIA/person1_bacteria_1.jpeg", "kermany:person1", "bacterial pneumonia"),
        ("test/PNEUMONIA/person22_virus_55.jpeg", "kermany:person22", "viral pneumonia"),
    ],
)
def test_patient_and_finding_from_file_name(root, relative, patient, finding):
    df = kermany.load(root).set_index("path")
    row = df.loc[f"{root}/chest_xray/{relative}"]
    assert (row["patient_id"], row["finding"]) == (patient, finding)


def test_one_patient_many_images(root):
    df = kermany.load(root)
    assert (df["patient_id"] == "kermany:person1").sum() == 2


def test_root_may_be_the_chest_xray_folder(root):
    df = kermany.load(root / "chest_xray")
    assert len(df) == len(FILES)
    assert df["image_id"].str.match(r"kermany/(train|test|val)/").all()
    assert not df["path"].str.contains("chest_xray/chest_xray").any()


def test_unknown_file_name_keeps_its_stem_and_warns(tmp_path, caplog):
    write_fixture(tmp_path / "chest_xray", ["train/PNEUMONIA/odd name.jpeg"])
    with caplog.at_level(logging.WARNING):
        df = kermany.load(tmp_path)
    assert df["patient_id"].tolist() == ["kermany:odd name"]
    assert df["finding"].tolist() == ["pneumonia"]
    assert "unknown form" in caplog.text


def test_missing_layout(tmp_path):
    (tmp_path / "chest_xray").mkdir()
    with pytest.raises(DatasetLayoutError, match="chest_xray"):
        kermany.load(tmp_path)


def test_real_corpus(real_data):
    df = kermany.load(real_data / "kermany")
    assert len(df) == 773
    normal = df["finding"] == "normal"
    assert normal.sum() == 253 and (~normal).sum() == 520
    assert set(df.loc[~normal, "finding"]) == {"bacterial pneumonia", "viral pneumonia"}
    assert df["path"].map(lambda p: Path(p).is_file()).all()
    assert df["image_id"].is_unique
    assert not df["patient_id"].str.contains(r"\.jpe?g$").any()
