"""Generic (bring-your-own-data) adapter: a manifest.csv as documented in its module docstring."""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidcxr import datasets, manifest
from covidcxr.datasets import DatasetLayoutError, generic, load

CSV = """path,patient_id,label,projection,finding,site,sex,age,view_position,mask_path,notes
images/p001_a.png,p001,covid,frontal,COVID-19 pneumonia,hospital-a,F,54,PA,masks/p001_l.png;masks/p001_r.png,x
images/p001_b.png,p001,COVID,Frontal,,hospital-a,f,54.5,ap,,
images/p002_a.png,p002,negative,lateral,,, M ,,LL,,
sub/p003.png,p003,unknown,unknown,No Finding,hospital-b,unknown,,,masks/p003.png,
"""


def png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)


def write_fixture(root: Path, text: str = CSV, name: str = "manifest.csv") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)
    for relative in ("images/p001_a.png", "images/p001_b.png", "images/p002_a.png", "sub/p003.png"):
        png(root / relative)
    for relative in ("masks/p001_l.png", "masks/p001_r.png", "masks/p003.png"):
        png(root / relative)
    return root


@pytest.fixture
def root(tmp_path):
    return write_fixture(tmp_path / "byo")


def test_rows_and_fields(root, caplog):
    with caplog.at_level(logging.INFO):
        df = load("generic", root)
    assert list(df.columns) == manifest.COLUMNS
    assert "ignored column(s) ['notes']" in caplog.text
    assert df["image_id"].tolist() == [
        "generic/images/p001_a", "generic/images/p001_b", "generic/images/p002_a", "generic/sub/p003",
    ]  # fmt: skip
    assert df["path"].tolist()[0] == f"{root}/images/p001_a.png"
    assert df["patient_id"].tolist() == ["generic:p001", "generic:p001", "generic:p002", "generic:p003"]
    assert df["label"].tolist() == ["covid", "covid", "negative", "unknown"]
    assert df["projection"].tolist() == ["frontal", "frontal", "lateral", "unknown"]
    assert df["sex"].tolist() == ["F", "F", "M", "unknown"]
    assert df["age"].tolist()[:2] == [54.0, 54.5] and df["age"].isna().tolist()[2:] == [True, True]
    assert df["site"].tolist() == ["hospital-a", "hospital-a", "generic", "hospital-b"]
    assert df["view_position"].tolist()[:3] == ["PA", "AP", "LL"]
    assert df["mask_path"].tolist()[0] == f"{root}/masks/p001_l.png;{root}/masks/p001_r.png"
    assert df["mask_path"].tolist()[3] == f"{root}/masks/p003.png"
    assert df["finding"].tolist()[0] == "COVID-19 pneumonia" and pd.isna(df["finding"].tolist()[1])


def test_csv_option_and_paths_relative_to_the_csv_folder(tmp_path):
    data = write_fixture(tmp_path / "data", name="cohort.csv")
    df = generic.load(tmp_path, csv="data/cohort.csv")
    assert df["path"].tolist()[0] == f"{data}/images/p001_a.png"
    assert generic.load(tmp_path / "elsewhere", csv=str(data / "cohort.csv"))["path"].equals(df["path"])


def test_relative_root_stays_relative(root, monkeypatch):
    monkeypatch.chdir(root.parent)
    df = generic.load("byo")
    assert df["path"].str.startswith("byo/").all()


def test_absolute_image_paths_are_accepted(root, tmp_path):
    outside = tmp_path / "outside.png"
    png(outside)
    write_fixture(root, f"path,patient_id,label,projection\n{outside},p9,negative,frontal\n")
    df = generic.load(root)
    assert df["path"].tolist() == [str(outside)]


@pytest.mark.parametrize(
    "row, message",
    [
        ("images/p001_a.png,p001,positive,frontal", r"line 3: 'positive'"),
        ("images/p001_a.png,p001,covid,oblique", r"projection must be frontal/lateral/unknown .*'oblique'"),
        ("images/p001_a.png,,covid,frontal", r"patient_id must be non-empty .*line 3"),
        (",p001,covid,frontal", r"path must be non-empty .*line 3"),
        ("images/p002_a.png,p002,covid,frontal", r"path must be unique .*line 2: .*line 3"),
    ],
)
def test_bad_values_name_file_line_and_value(root, row, message):
    text = "path,patient_id,label,projection\nimages/p002_a.png,p002,negative,frontal\n" + row + "\n"
    write_fixture(root, text)
    with pytest.raises(DatasetLayoutError, match=r"manifest\.csv: .*" + message):
        generic.load(root)


def test_all_problems_reported_at_once(root):
    text = "path,patient_id,label,projection,sex,age\na.png,p,maybe,side,X,-3\nb.png,q,covid,frontal,F,400\n"
    write_fixture(root, text)
    with pytest.raises(DatasetLayoutError) as error:
        generic.load(root)
    message = str(error.value)
    for part in ("label must be", "'maybe'", "projection must be", "'side'", "sex must be", "'X'",
                 "age must be", "line 2: '-3'", "line 3: '400'"):  # fmt: skip
        assert part in message, part


def test_missing_csv_and_required_column(tmp_path, root):
    with pytest.raises(DatasetLayoutError, match="manifest.csv: missing CSV"):
        generic.load(tmp_path / "nothing")
    write_fixture(root, "path,patient_id,label\na.png,p,covid\n")
    with pytest.raises(DatasetLayoutError, match=r"manifest\.csv: missing column\(s\) \['projection'\]"):
        generic.load(root)


def test_missing_image(root, caplog):
    (root / "sub" / "p003.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"manifest\.csv.*sub/p003\.png"):
        generic.load(root)
    with caplog.at_level(logging.WARNING):
        assert len(generic.load(root, on_missing="skip")) == 3
    assert "missing on disk" in caplog.text


def test_a_skipped_image_is_named_by_the_frame(root):
    """Skipped files were only logged: the ingest stage could not report them (datasets.skipped now names them)."""
    assert datasets.skipped(generic.load(root)).empty  # nothing skipped
    (root / "sub" / "p003.png").unlink()
    loaded = datasets.load("generic", root, on_missing="skip")
    assert "generic/sub/p003" not in set(loaded["image_id"])
    assert datasets.skipped(loaded).to_dict("records") == [
        {"image_id": "generic/sub/p003", "path": f"{root.as_posix()}/sub/p003.png"}]
