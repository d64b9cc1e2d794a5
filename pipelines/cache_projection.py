"""Stage `cache_projection`: the projection filter's own working-size cache, at ``train_projection.size``.

The filter reads it in training and in `filter_frontal`, and serving reads each request at that size for the filter:
on the real corpus a filter at 128 px refused every test lateral in three seeds where the shared 64-px cache lost one
in five, without moving the classifiers and the U-Net to 128 px (reports/experiments/projection-robust-128.json).
``size: null`` (or the cache's own size): a copy of the `cache` stage's folder, nothing decoded twice.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from covidcxr import preprocess
from pipelines import _cache, _common


def run(size: int | None, cache: dict) -> None:
    log = _common.setup_logging()
    if size is None or int(size) == int(cache["size"]):
        with _common.atomic_dir(_common.PROJECTION_CACHE_DIR) as out:
            for name in (preprocess.CACHE_INDEX, preprocess.CACHE_IMAGES, preprocess.CACHE_MASKS):
                shutil.copyfile(Path(_common.CACHE_DIR) / name, Path(out) / name)
        log.info("%s: the cache at %d px, copied", _common.PROJECTION_CACHE_DIR, cache["size"])
        return
    _cache.write(_common.PROJECTION_CACHE_DIR, int(size), cache["workers"], log)


if __name__ == "__main__":
    run(_common.params("train_projection.size"), _common.params("cache"))
    _common.finish()
