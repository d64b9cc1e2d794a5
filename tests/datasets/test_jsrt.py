"""JSRT adapter on raw .IMG files, the JSRT clinical lists and SCR masks written in their formats."""

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidcxr import manifest
from covidcxr.datasets import DatasetLayoutError, jsrt, load

CLNDAT = (
    "JPCLN001.IMG\t3\t15\t53\tmale\t1634\t692\tmalignant\tl.upper lobe\tlung cancer\r\n"
    "JPCLN002.IMG\t5\t30\t?\tfemale\t1138\t1002\tbenign\tr.lower lobe\thamartoma\r\n"
)
CNNDAT = "JPCNN001.IMG   61  female non-nodule\r\n"


def raw_image(path: Path, seed: int) -> None:
    """A JSRT raw image: 2048 x 2048 big-endian 16-bit words holding 12-bit values, no header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((2048, 2048), dtype=">u2")
    pixels[::64, :] = (np.arange(2048) * (seed + 1)) % 4096
    pixels.tofile(path)


def gif_mask(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 2:7] = 255
    Image.fromarray(mask).save(path, format="GIF")


def write_fixture(root: Path, lists: bool = True) -> Path:
    for seed, name in enumerate(["JPCLN001", "JPCLN002"]):
        raw_image(root / "Nodule154images" / f"{name}.IMG", seed)
    raw_image(root / "NonNodule93images" / "JPCNN001.IMG", 7)
    if lists:
        (root / "Clinical_Information").mkdir(parents=True)
        (root / "Clinical_Information" / "CLNDAT_EN.txt").write_bytes(CLNDAT.encode("latin-1"))
        (root / "Clinical_Information" / "CNNDAT_EN.TXT").write_bytes(CNNDAT.encode("latin-1"))
    for lung in ("left lung", "right lung"):
        gif_mask(root / "scr" / "masks" / lung / "JPCLN001.gif")
        gif_mask(root / "fold2" / "masks" / lung / "JPCNN001.gif")
    gif_mask(root / "scr" / "masks" / "left lung" / "JPCLN002.gif")  # right lung missing
    gif_mask(root / "scr" / "masks" / "heart" / "JPCLN002.gif")
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("jsrt"))


def test_fixture_is_in_the_raw_format(root):
    assert (root / "Nodule154images" / "JPCLN001.IMG").stat().st_size == 2048 * 2048 * 2


def test_rows_and_fields(root):
    df = load("jsrt", root)
    assert list(df.columns) == manifest.COLUMNS
    assert df["image_id"].tolist() == [
        "jsrt/Nodule154images/JPCLN001",
        "jsrt/Nodule154images/JPCLN002",
        "jsrt/NonNodule93images/JPCNN001",
    ]
    assert df["path"].tolist()[0] == f"{root}/Nodule154images/JPCLN001.IMG"
    assert df["patient_id"].tolist() == ["jsrt:JPCLN001", "jsrt:JPCLN002", "jsrt:JPCNN001"]
    assert df["finding"].tolist() == ["nodule", "nodule", "non-nodule"]
    assert df["sex"].tolist() == ["M", "F", "F"]
    assert df["age"].tolist()[0] == 53.0 and pd.isna(df["age"].tolist()[1]) and df["age"].tolist()[2] == 61.0
    assert set(df["width"]) == {2048} and set(df["height"]) == {2048} and set(df["bits_stored"]) == {12}
    assert set(df["projection"]) == {"frontal"} and set(df["label"]) == {"negative"}
    assert set(df["site"]) == {"jsrt"} and df["photometric"].isna().all()
    assert not any("hamartoma" in str(v) or "lobe" in str(v) for v in df.to_numpy().ravel())


def test_masks_both_lungs_joined(root):
    df = jsrt.load(root).set_index("patient_id")
    assert df.loc["jsrt:JPCLN001", "mask_path"] == (
        f"{root}/scr/masks/left lung/JPCLN001.gif;{root}/scr/masks/right lung/JPCLN001.gif"
    )
    assert df.loc["jsrt:JPCNN001", "mask_path"].startswith(f"{root}/fold2/masks/left lung/")
    assert pd.isna(df.loc["jsrt:JPCLN002", "mask_path"])  # only one lung annotated
    for paths in df["mask_path"].dropna():
        assert all(Path(p).is_file() for p in paths.split(";"))


def test_records_without_line_breaks_still_parse():
    mashed = CLNDAT.replace("\r\n", "")
    assert jsrt.parse_list(mashed, "LN") == {"JPCLN001": ("M", 53.0), "JPCLN002": ("F", None)}
    assert jsrt.parse_list(CNNDAT, "NN") == {"JPCNN001": ("F", 61.0)}


def test_list_is_the_authority_for_its_group(tmp_path, caplog):
    root = write_fixture(tmp_path)
    raw_image(root / "Nodule154images" / "JPCLN099.IMG", 3)  # on disk, not in CLNDAT
    text = CLNDAT + "JPCLN003.IMG\t2\t12\t40\tmale\t100\t100\tbenign\tr.upper lobe\tx\r\n"
    (root / "Clinical_Information" / "CLNDAT_EN.txt").write_text(text)
    with pytest.raises(DatasetLayoutError, match=r"CLNDAT_EN\.txt.*missing on disk \(1: .*JPCLN003\.IMG"):
        jsrt.load(root)
    with caplog.at_level(logging.WARNING):
        df = jsrt.load(root, on_missing="skip")
    assert "jsrt:JPCLN099" not in set(df["patient_id"]) and "jsrt:JPCLN003" not in set(df["patient_id"])
    assert len(df) == 3 and "missing on disk" in caplog.text


def test_without_lists_images_come_from_disk(tmp_path, caplog):
    root = write_fixture(tmp_path, lists=False)
    with caplog.at_level(logging.INFO):
        df = jsrt.load(root)
    assert len(df) == 3 and set(df["sex"]) == {"unknown"} and df["age"].isna().all()
    assert df["finding"].tolist() == ["nodule", "nodule", "non-nodule"]
    assert "CLNDAT_EN.txt" in caplog.text


@pytest.mark.parametrize("folder", ["empty", "absent"])
def test_folder_without_jsrt_files(tmp_path, folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match=f"{folder}: missing JSRT images"):
        jsrt.load(tmp_path / folder)
