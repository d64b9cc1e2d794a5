"""Montgomery and Shenzhen adapters: official NLM layouts, the merged layout, the real corpus."""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidcxr import manifest
from covidcxr.datasets import DatasetLayoutError, load, montgomery


def png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def official_montgomery(base: Path) -> Path:
    readings = {
        "MCUCXR_0001_0": "Patient's Sex: F\nPatient's Age: 040Y\n\nnormal\n",
        "MCUCXR_0104_1": "Patient's Sex: M\r\nPatient's Age: 052Y\r\nright upper lobe cavitary TB\r\n",
    }
    for stem, text in readings.items():
        png(base / "CXR_png" / f"{stem}.png", 100)
        png(base / "ManualMask" / "leftMask" / f"{stem}.png", 255)
        png(base / "ManualMask" / "rightMask" / f"{stem}.png", 255)
        (base / "ClinicalReadings").mkdir(parents=True, exist_ok=True)
        (base / "ClinicalReadings" / f"{stem}.txt").write_text(text)
    (base / "CXR_png" / "Thumbs.db").write_bytes(b"\x00")
    return base


def official_shenzhen(base: Path) -> Path:
    readings = {"CHNCXR_0001_0": "male 45yrs\nnormal\n", "CHNCXR_0327_1": "Female,23yrs\nSTB,ATB\n"}
    for stem, text in readings.items():
        png(base / "CXR_png" / f"{stem}.png", 100)
        (base / "ClinicalReadings").mkdir(parents=True, exist_ok=True)
        (base / "ClinicalReadings" / f"{stem}.txt").write_text(text)
    png(base / "mask" / "CHNCXR_0001_0_mask.png", 255)  # 0327 has no mask, as in the release
    return base


def merged(base: Path) -> Path:
    for stem in ("MCUCXR_0002_0", "MCUCXR_0075_1", "CHNCXR_0002_0", "CHNCXR_0330_1"):
        png(base / "images" / f"{stem}.png", 100)
        png(base / "masks" / f"{stem}.png", 255)
    return base


def test_official_montgomery(tmp_path):
    root = official_montgomery(tmp_path / "MontgomerySet")
    df = load("montgomery", root)
    assert list(df.columns) == manifest.COLUMNS
    assert df["image_id"].tolist() == ["montgomery/CXR_png/MCUCXR_0001_0", "montgomery/CXR_png/MCUCXR_0104_1"]
    assert df["patient_id"].tolist() == ["montgomery:0001", "montgomery:0104"]
    assert df["finding"].tolist() == ["no finding", "tuberculosis"]
    assert df["sex"].tolist() == ["F", "M"] and df["age"].tolist() == [40.0, 52.0]
    assert set(df["label"]) == {"negative"} and set(df["projection"]) == {"frontal"}
    assert set(df["view_position"]) == {"PA"} and set(df["site"]) == {"montgomery"}
    left, right = df.loc[0, "mask_path"].split(";")
    assert left == f"{root}/ManualMask/leftMask/MCUCXR_0001_0.png"
    assert right == f"{root}/ManualMask/rightMask/MCUCXR_0001_0.png"
    assert not any("cavitary" in str(v) for v in df.to_numpy().ravel())


def test_official_folder_name_below_root(tmp_path):
    official_montgomery(tmp_path / "MontgomerySet")
    df = montgomery.load(tmp_path)
    assert df["path"].tolist()[0] == f"{tmp_path}/MontgomerySet/CXR_png/MCUCXR_0001_0.png"
    assert df["image_id"].tolist()[0] == "montgomery/MontgomerySet/CXR_png/MCUCXR_0001_0"


def test_official_shenzhen_keeps_images_without_mask(tmp_path):
    root = official_shenzhen(tmp_path / "ChinaSet_AllFiles")
    df = load("shenzhen", root).set_index("patient_id")
    assert df.index.tolist() == ["shenzhen:0001", "shenzhen:0327"]
    assert df.loc["shenzhen:0001", "mask_path"] == f"{root}/mask/CHNCXR_0001_0_mask.png"
    assert pd.isna(df.loc["shenzhen:0327", "mask_path"])
    assert df["sex"].tolist() == ["M", "F"] and df["age"].tolist() == [45.0, 23.0]
    assert df["finding"].tolist() == ["no finding", "tuberculosis"]
    assert set(df["site"]) == {"shenzhen"}


@pytest.mark.parametrize(
    "name, stems",
    [("montgomery", ["MCUCXR_0002_0", "MCUCXR_0075_1"]), ("shenzhen", ["CHNCXR_0002_0", "CHNCXR_0330_1"])],
)
def test_merged_layout_selects_by_prefix(tmp_path, name, stems):
    root = merged(tmp_path)
    df = load(name, root)
    assert df["path"].tolist() == [f"{root}/images/{s}.png" for s in stems]
    assert df["mask_path"].tolist() == [f"{root}/masks/{s}.png" for s in stems]
    assert df["image_id"].tolist() == [f"{name}/images/{s}" for s in stems]
    assert set(df["sex"]) == {"unknown"} and df["age"].isna().all()


def test_patient_ids_do_not_collide_between_sets(tmp_path):
    root = merged(tmp_path)
    both = pd.concat([montgomery.load(root), montgomery.load_shenzhen(root)])
    assert both["patient_id"].is_unique  # 0002 exists in both sets


@pytest.mark.parametrize(
    "text, sex, age",
    [
        ("Patient's Sex: F\nPatient's Age: 040Y\nnormal", "F", 40.0),
        ("Patient's Sex: M\nPatient's Age: 008M\n", "M", 8 / 12),
        ("male 35yrs\nnormal", "M", 35.0),
        ("Female,23yrs\nPTB in the left upper field", "F", 23.0),
        ("female  1 yrs\n", "F", 1.0),
        ("normal\n", "unknown", None),
    ],
)
def test_parse_reading(text, sex, age):
    got_sex, got_age = montgomery.parse_reading(text)
    assert got_sex == sex
    assert got_age == pytest.approx(age) if age is not None else got_age is None


def test_reading_without_image_is_a_missing_image(tmp_path, caplog):
    root = official_montgomery(tmp_path / "m")
    (root / "CXR_png" / "MCUCXR_0104_1.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"MCUCXR_0104_1\.png"):
        montgomery.load(root)
    with caplog.at_level(logging.WARNING):
        df = montgomery.load(root, on_missing="skip")
    assert df["patient_id"].tolist() == ["montgomery:0001"]
    assert "missing on disk" in caplog.text


def test_mask_without_image_in_merged_layout(tmp_path):
    root = merged(tmp_path)
    (root / "images" / "CHNCXR_0330_1.png").unlink()
    with pytest.raises(DatasetLayoutError, match="CHNCXR_0330_1"):
        montgomery.load_shenzhen(root)
    assert len(montgomery.load(root)) == 2  # the other set is untouched


def test_missing_layout(tmp_path):
    with pytest.raises(DatasetLayoutError, match="CXR_png"):
        montgomery.load(tmp_path)


def test_real_corpus(real_data):
    root = real_data / "montgomery_shenzhen"
    m, s = montgomery.load(root), montgomery.load_shenzhen(root)
    both = pd.concat([m, s])
    assert len(both) == 556 and set(m["source"]) == {"montgomery"} and set(s["source"]) == {"shenzhen"}
    assert both["mask_path"].notna().all()
    assert both["mask_path"].map(lambda p: Path(p).is_file()).all()
    assert both["path"].map(lambda p: Path(p).is_file()).all()
    assert both["image_id"].is_unique and both["patient_id"].is_unique
    assert m["path"].str.contains("/MCUCXR_").all() and s["path"].str.contains("/CHNCXR_").all()
