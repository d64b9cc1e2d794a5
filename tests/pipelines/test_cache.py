"""The cache stages: a MONOCHROME1 PNG export cached air dark; the projection filter's cache a copy of the
working-size cache at the same size, never a second decode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidcxr import manifest, preprocess
from covidcxr.datasets import bimcv
from pipelines import _common, cache, cache_projection


def film(height: int = 48, width: int = 40) -> np.ndarray:
    """A 12-bit MONOCHROME1 film as BIMCV's PNGs store it: air (the border) bright, the body (the middle) dark."""
    rng = np.random.default_rng(0)
    stored = rng.integers(3800, 4000, (height, width), dtype=np.uint16)
    stored[8:-8, 6:-6] = rng.integers(300, 900, (height - 16, width - 12), dtype=np.uint16)
    return stored


def bimcv_series(root: Path, subject: str, pixels: np.ndarray, photometric: str) -> None:
    rx = root / subject / "ses-E1" / "mod-rx"
    rx.mkdir(parents=True)
    stem = rx / f"{subject}_ses-E1_run-1_bp-chest_vp-pa_cr"
    Image.fromarray(pixels).save(f"{stem}.png")
    stem.with_suffix(".json").write_text(json.dumps({"00280004": {"vr": "CS", "Value": [photometric]},
                                                     "00280101": {"vr": "US", "Value": [12]}}))


def test_a_monochrome1_png_export_is_cached_air_dark(tmp_path: Path, monkeypatch):
    """BIMCV (and PadChest) PNGs keep MONOCHROME1's stored values, and the manifest says MONOCHROME1, but the cache
    decoded them as stored: air bright, where the same film as a DICOM (or from a PACS, in serving) is inverted."""
    monkeypatch.chdir(tmp_path)
    root = Path("data/bimcv_covid19_posi_subjects_1")
    root.mkdir(parents=True)
    (root / "participants.tsv").write_text("participant\tgender\nsub-S1\tF\nsub-S2\tM\n")
    stored = film()
    bimcv_series(root, "sub-S1", stored, "MONOCHROME1")
    bimcv_series(root, "sub-S2", 4095 - stored, "MONOCHROME2")  # the same film, exported air dark
    described, rejects = manifest.describe_images(bimcv.load(root))
    assert rejects.empty and list(described["photometric"]) == ["MONOCHROME1", "MONOCHROME2"]
    Path(_common.MANIFEST).parent.mkdir(parents=True)
    _common.write_csv(_common.MANIFEST, described)

    cache.run({"size": 16, "workers": 1})
    _, images, _ = preprocess.load_cache(_common.CACHE_DIR)
    inverted, as_exported = images
    border = np.ones((16, 16), bool)
    border[3:-3, 3:-3] = False
    assert inverted[border].mean() < 0.2 < 0.6 < inverted[~border].mean()  # air dark, body bright
    np.testing.assert_array_equal(inverted, as_exported)


@pytest.mark.parametrize("size", [None, 16])
def test_at_the_cache_s_size_the_projection_cache_is_a_copy(tmp_path: Path, monkeypatch, size):
    monkeypatch.chdir(tmp_path)  # stages write relative to the project root
    index = pd.DataFrame({"image_id": ["a", "b"], "has_mask": [True, False]})
    images = np.random.default_rng(0).random((2, 16, 16)).astype(np.float16)
    masks = images > 0.5
    Path(_common.CACHE_DIR).mkdir(parents=True)
    preprocess.save_cache(_common.CACHE_DIR, index, images, masks)
    cache_projection.run(size, {"size": 16, "workers": 1})  # no manifest here: a decode would fail
    for name in (preprocess.CACHE_INDEX, preprocess.CACHE_IMAGES, preprocess.CACHE_MASKS):
        assert (Path(_common.PROJECTION_CACHE_DIR) / name).read_bytes() == (Path(_common.CACHE_DIR) / name).read_bytes()
