"""BIMCV-COVID19+/- adapter on fixtures in the MIDS layout with DICOM JSON sidecars."""

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidcxr import manifest
from covidcxr.datasets import DatasetLayoutError, bimcv, load

PARTICIPANTS = (
    "participant\tmodality_dicom\tbody_parts\tage\tgender\n"
    "sub-S03047\t['CR', 'DX']\t[['CHEST']]\t[65]\tM\n"
    "sub-S03048\t['DX']\t[['CHEST']]\t[70, 71]\tF\n"
    "sub-S03049\t['CT']\t[['CHEST']]\t[50]\tF\n"
)
LABELS = (
    "PatientID\tReportID\tReport\tLabels\tLocalizations\n"
    "sub-S03047\tses-E06316\tpaciente admitted 12/03/2020 con neumonia\t"
    "['COVID 19' 'pneumonia' 'COVID 19']\t['bilateral']\n"
)


def tags(view=None, sex="M", age="065Y", photometric="MONOCHROME1") -> dict:
    out = {
        "00080060": {"vr": "CS", "Value": ["CR"]},
        "00080020": {"vr": "DA", "Value": ["20200312"]},
        "00100040": {"vr": "CS", "Value": [sex]},
        "00101010": {"vr": "AS", "Value": [age]},
        "00280004": {"vr": "CS", "Value": [photometric]},
        "00280010": {"vr": "US", "Value": [20]},
        "00280011": {"vr": "US", "Value": [16]},
        "00280101": {"vr": "US", "Value": [12]},
    }
    out["00185101"] = {"vr": "CS", "Value": [view]} if view else {"vr": "CS"}
    return out


def series(folder: Path, name: str, sidecar: dict | None, image: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if image:
        Image.fromarray(np.full((20, 16), 1000, np.uint16)).save(folder / f"{name}.png")
    if sidecar is not None:
        (folder / f"{name}.json").write_text(json.dumps(sidecar))


def positive(base: Path) -> Path:
    """Iteration-1 layout: metadata in a head folder, subjects in subjects_N folders."""
    head = base / "bimcv_covid19_posi_head_iter1"
    (head / "derivatives" / "labels").mkdir(parents=True)
    (head / "participants.tsv").write_text(PARTICIPANTS)
    (head / "derivatives" / "labels" / "labels_covid19_posi.tsv").write_text(LABELS)
    subjects = base / "bimcv_covid19_posi_subjects_1"
    rx = subjects / "sub-S03047" / "ses-E06316" / "mod-rx"
    series(rx, "sub-S03047_ses-E06316_run-1_bp-chest_vp-pa_cr", tags(view="PA"))
    series(rx, "sub-S03047_ses-E06316_run-2_bp-chest_vp-ll_cr", tags())
    rx2 = subjects / "sub-S03048" / "ses-E06400" / "mod-rx"
    series(rx2, "sub-S03048_ses-E06400_run-1_bp-chest_dx", None)
    (subjects / "sub-S03048" / "ses-E06401" / "mod-ct").mkdir(parents=True)
    (subjects / "sub-S03048" / "ses-E06401" / "mod-ct" / "x_ct.nii.gz").write_bytes(b"\x00")
    series(subjects / "sub-S09999" / "ses-E00001" / "mod-rx", "sub-S09999_ses-E00001_run-1_cr", tags("AP"))
    return base


def negative(base: Path) -> Path:
    """Iteration 1+2 layout: one covid19_neg folder holding metadata and subjects."""
    root = base / "covid19_neg"
    (root / "derivatives" / "labels").mkdir(parents=True)
    header = PARTICIPANTS.splitlines()[0]
    (root / "participants.tsv").write_text(f"{header}\nsub-S03047\t['DX']\t[]\t[66]\tM\n")
    rx = root / "sub-S03047" / "ses-E09000" / "mod-rx"
    series(rx, "sub-S03047_ses-E09000_run-1_bp-chest_vp-ap_dx", tags(view="AP", photometric="MONOCHROME2"))
    return base


@pytest.fixture
def pos(tmp_path):
    return positive(tmp_path / "posi")


def test_rows_and_fields(pos, caplog):
    with caplog.at_level(logging.INFO):
        df = load("bimcv", pos)
    assert list(df.columns) == manifest.COLUMNS
    assert len(df) == 4  # the CT volume is not an X-ray
    # sub-S09999 is in no participants.tsv: its image is kept (it was dropped with an INFO line), sex and age from its
    # sidecar
    assert "1 image(s) of 1 subject(s) that no participants.tsv lists: kept" in caplog.text
    assert "1 participant(s) have no CR/DX image" in caplog.text
    rows = df.set_index(df["image_id"].str.rsplit("/", n=1).str[-1])
    pa = rows.loc["sub-S03047_ses-E06316_run-1_bp-chest_vp-pa_cr"]
    stem = (
        "bimcv_covid19_posi_subjects_1/sub-S03047/ses-E06316/mod-rx/"
        "sub-S03047_ses-E06316_run-1_bp-chest_vp-pa_cr"
    )
    assert pa["image_id"] == f"bimcv/{stem}" and pa["path"] == f"{pos}/{stem}.png"
    assert pa["patient_id"] == "bimcv:sub-S03047"
    assert (pa["projection"], pa["view_position"], pa["label"]) == ("frontal", "PA", "covid")
    assert (pa["sex"], pa["age"], pa["site"]) == ("M", 65.0, "bimcv")
    assert (pa["photometric"], pa["bits_stored"], pa["width"], pa["height"]) == ("MONOCHROME1", 12, 16, 20)
    assert pa["modality"] == "CR" and pa["finding"] == "COVID 19|pneumonia"
    ll = rows.loc["sub-S03047_ses-E06316_run-2_bp-chest_vp-ll_cr"]
    assert (ll["projection"], ll["view_position"]) == ("lateral", "LL")  # view from the file name
    dx = rows.loc["sub-S03048_ses-E06400_run-1_bp-chest_dx"]
    assert (dx["projection"], dx["sex"], dx["modality"], dx["finding"]) == ("unknown", "F", "DX", "COVID-19")
    assert pd.isna(dx["age"]) and pd.isna(dx["photometric"])  # two ages listed, no sidecar
    unlisted = rows.loc["sub-S09999_ses-E00001_run-1_cr"]
    assert (unlisted["patient_id"], unlisted["sex"], unlisted["age"]) == ("bimcv:sub-S09999", "M", 65.0)


def test_no_report_text_or_dates_copied(pos):
    values = [str(v) for v in bimcv.load(pos).to_numpy().ravel()]
    assert not any("admitted" in v or "2020" in v or "bilateral" in v for v in values)


def test_negative_collection_and_patient_ids_match_across(tmp_path):
    pos, neg = bimcv.load(positive(tmp_path / "p")), bimcv.load(negative(tmp_path / "bimcv_covid19_neg"))
    assert set(neg["label"]) == {"negative"} and set(pos["label"]) == {"covid"}
    assert neg["finding"].tolist() == ["COVID-19 negative"]
    assert set(neg["patient_id"]) & set(pos["patient_id"]) == {"bimcv:sub-S03047"}
    assert neg["photometric"].tolist() == ["MONOCHROME2"]


@pytest.mark.parametrize("name, label", [("bimcv_covid19_posi", "covid"), ("BIMCV-neg", "negative")])
def test_label_from_folder_name(tmp_path, name, label):
    root = tmp_path / name
    root.mkdir()
    assert bimcv.infer_label(root) == label


def test_label_option_when_names_do_not_tell(tmp_path):
    root = negative(tmp_path / "data")
    (root / "covid19_neg").rename(root / "collection")
    with pytest.raises(ValueError, match="label="):
        bimcv.load(root)
    assert set(bimcv.load(root, label="negative")["label"]) == {"negative"}
    with pytest.raises(ValueError, match="'covid' or 'negative'"):
        bimcv.load(root, label="positive")


def test_sidecar_without_image_is_a_missing_image(pos, caplog):
    rx = pos / "bimcv_covid19_posi_subjects_1" / "sub-S03047" / "ses-E06316" / "mod-rx"
    (rx / "sub-S03047_ses-E06316_run-1_bp-chest_vp-pa_cr.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"missing on disk \(1: .*run-1_bp-chest_vp-pa_cr\.png"):
        bimcv.load(pos)
    with caplog.at_level(logging.WARNING):
        assert len(bimcv.load(pos, on_missing="skip")) == 3
    assert "missing on disk" in caplog.text


def test_missing_participants_file_or_column(pos):
    participants = pos / "bimcv_covid19_posi_head_iter1" / "participants.tsv"
    participants.write_text(PARTICIPANTS.replace("participant\t", "subject\t"))
    with pytest.raises(DatasetLayoutError, match=r"participants\.tsv.*'participant'"):
        bimcv.load(pos)
    participants.unlink()
    with pytest.raises(DatasetLayoutError, match="participants.tsv"):
        bimcv.load(pos)


def test_missing_labels_column(pos):
    labels = pos / "bimcv_covid19_posi_head_iter1" / "derivatives" / "labels" / "labels_covid19_posi.tsv"
    labels.write_text(LABELS.replace("\tLabels\t", "\tLabelz\t"))
    with pytest.raises(DatasetLayoutError, match=r"labels_covid19_posi\.tsv.*'Labels'"):
        bimcv.load(pos)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("['COVID 19' 'pneumonia']", "COVID 19|pneumonia"),
        ("['normal']", "normal"),
        ("['pneumonia', 'infiltrates']", "pneumonia|infiltrates"),
        ("[]", ""),
        ("", ""),
    ],
)
def test_parse_labels(text, expected):
    assert bimcv.parse_labels(text) == expected


def test_every_iterations_participants_and_labels_are_read(pos):
    """BIMCV-COVID19+ ships head_iter1 and head_iter2, each with its participants.tsv and labels: only the first found
    was read, so every subject of the second iteration lost its sex and age (and was dropped, before)."""
    head2 = pos / "bimcv_covid19_posi_head_iter2"
    (head2 / "derivatives" / "labels").mkdir(parents=True)
    header = PARTICIPANTS.splitlines()[0]
    (head2 / "participants.tsv").write_text(f"{header}\nsub-S09999\t['CR']\t[]\t[41]\tF\n")
    (head2 / "derivatives" / "labels" / "labels_covid19_posi.tsv").write_text(
        "PatientID\tReportID\tReport\tLabels\tLocalizations\n"
        "sub-S09999\tses-E00001\tx\t['COVID 19' 'infiltrates']\t[]\n")
    rows = load("bimcv", pos).set_index("patient_id")
    second = rows.loc["bimcv:sub-S09999"]
    assert second["finding"] == "COVID 19|infiltrates"  # from the second iteration's labels
    assert second["sex"] == "M" and second["age"] == 65.0  # the image's own sidecar still wins over participants.tsv


def test_a_folders_other_sidecar_is_never_borrowed(pos):
    """Two runs in one folder, only one with its sidecar: the other took that sidecar (its view PA and photometric
    MONOCHROME1 on a lateral). Now it keeps what its file name says."""
    rx = pos / "bimcv_covid19_posi_subjects_1" / "sub-S03047" / "ses-E06316" / "mod-rx"
    (rx / "sub-S03047_ses-E06316_run-2_bp-chest_vp-ll_cr.json").unlink()
    rows = load("bimcv", pos)
    by_name = rows.set_index(rows["image_id"].str.rsplit("/", n=1).str[-1])
    ll = by_name.loc["sub-S03047_ses-E06316_run-2_bp-chest_vp-ll_cr"]
    assert (ll["view_position"], ll["projection"]) == ("LL", "lateral") and pd.isna(ll["photometric"])
    # a folder of one image and one sidecar of another name: that sidecar is the image's
    alone = pos / "bimcv_covid19_posi_subjects_1" / "sub-S03048" / "ses-E06400" / "mod-rx"
    (alone / "sub-S03048_ses-E06400_run-1_bp-chest.json").write_text(json.dumps(tags(view="AP")))
    rows = load("bimcv", pos)
    dx = rows.set_index(rows["image_id"].str.rsplit("/", n=1).str[-1]).loc["sub-S03048_ses-E06400_run-1_bp-chest_dx"]
    assert dx["view_position"] == "AP"
