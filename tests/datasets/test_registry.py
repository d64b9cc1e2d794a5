"""The dataset registry, the helpers shared by the adapters, and all real sources together."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from covidcxr import datasets, manifest
from covidcxr.datasets import NAMES, DatasetLayoutError, load


def test_names():
    assert NAMES == (
        "bimcv", "cohen", "demo", "generic", "jsrt", "kermany", "montgomery", "nih", "padchest", "shenzhen",
    )  # fmt: skip


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown dataset 'covidx'.*cohen"):
        load("covidx", ".")


def test_unknown_option_is_refused(tmp_path):
    with pytest.raises(TypeError, match="colour"):
        load("kermany", tmp_path, colour="red")


def test_layout_error_is_a_value_error():
    assert issubclass(DatasetLayoutError, ValueError)


def test_adapters_are_imported_lazily():
    code = (
        "import sys, covidcxr.datasets as d; "
        "assert not [m for m in sys.modules if m.startswith('covidcxr.datasets.')], sys.modules.keys()"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shenzhen_is_served_by_the_montgomery_module(tmp_path):
    with pytest.raises(DatasetLayoutError, match="missing shenzhen image folder"):
        load("shenzhen", tmp_path)


@pytest.mark.parametrize(
    "source, relative, expected",
    [
        ("cohen", "images/a.b.jpeg", "cohen/images/a.b"),
        ("bimcv", "x/sub-1/ses-2/mod-rx/s_cr.png", "bimcv/x/sub-1/ses-2/mod-rx/s_cr"),
        ("kermany", "top.jpeg", "kermany/top"),
        ("jsrt", "vol/JPCLN001.IMG", "jsrt/vol/JPCLN001"),
        ("x", "v.nii.gz", "x/v"),
    ],
)
def test_make_image_id(source, relative, expected):
    assert datasets.make_image_id(source, relative) == expected


@pytest.mark.parametrize(
    "root, parts, expected",
    [("data/cohen", ("images/a.png",), "data/cohen/images/a.png"), ("/abs", ("a", "b.png"), "/abs/a/b.png")],
)
def test_join_keeps_root_as_given(root, parts, expected):
    assert datasets.join(root, *parts) == expected
    assert datasets.join(Path(root), *parts) == expected


@pytest.mark.parametrize(
    "value, years",
    [
        (58, 58.0), ("58", 58.0), ("058Y", 58.0), ("006M", 0.5), ("35yrs", 35.0), ("2 years", 2.0),
        ("014D", 14 / 365.25), (" 40 ", 40.0), ("412", None), ("-3", None), ("", None), ("?", None),
        ("12Q", None), (None, None), (float("nan"), None), (pd.NA, None),
    ],
)  # fmt: skip
def test_parse_age(value, years):
    got = datasets.parse_age(value)
    assert got == pytest.approx(years) if years is not None else got is None


@pytest.mark.parametrize(
    "value, sex",
    [("M", "M"), ("male", "M"), ("F", "F"), (" Female ", "F"), ("O", "unknown"), ("", "unknown")],
)
def test_normalise_sex(value, sex):
    assert datasets.normalise_sex(value) == sex


def test_listing_shows_a_few_and_counts():
    assert datasets.listing(["a", "b"]) == "2: a, b"
    assert datasets.listing([str(i) for i in range(8)]) == "8: 0, 1, 2, 3, 4 ... and 3 more"


REAL = [
    ("cohen", "cohen"),
    ("kermany", "kermany"),
    ("montgomery", "montgomery_shenzhen"),
    ("shenzhen", "montgomery_shenzhen"),
]


@pytest.fixture(scope="module")
def real_manifest(real_data):
    return pd.concat([load(name, real_data / folder) for name, folder in REAL], ignore_index=True)


def test_real_sources_together(real_manifest):
    df = real_manifest
    assert len(df) == 560 + 773 + 556
    assert manifest.conform(df).equals(df)
    assert df["image_id"].is_unique
    assert df["path"].map(lambda p: Path(p).is_file()).all()
    sources_per_patient = df.groupby("patient_id")["source"].nunique()
    assert (sources_per_patient == 1).all()
    assert (df["patient_id"].str.split(":").str[0] == df["source"]).all()
    assert df["projection"].isin(manifest.PROJECTIONS).all() and df["label"].isin(manifest.LABELS).all()
    assert df["sex"].isin(manifest.SEXES).all()


def test_real_manifest_is_deterministic(real_data, real_manifest):
    again = pd.concat([load(name, real_data / folder) for name, folder in REAL], ignore_index=True)
    assert again.equals(real_manifest)
    assert again.to_csv(index=False) == real_manifest.to_csv(index=False)
