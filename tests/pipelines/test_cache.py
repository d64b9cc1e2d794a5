"""The projection filter's cache: a copy of the working-size cache at the same size, never a second decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidcxr import preprocess
from pipelines import _common, cache_projection


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
