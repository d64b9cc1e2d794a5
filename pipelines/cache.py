"""Stage `cache`: decode every manifest image once at the working size (and its true lung mask, where the source has
one), with :func:`covidcxr.preprocess.read_working_image`, the decode and transform serving applies to every request."""

from __future__ import annotations

import pandas as pd

from covidcxr import manifest, preprocess
from pipelines import _common

INDEX_COLUMNS = ["image_id", "source", "patient_id", "label", "projection", "site", "header_view_position", "has_mask"]


def run(p: dict) -> None:
    log = _common.setup_logging()
    m = manifest.read_csv(_common.MANIFEST)
    mask_paths = [None if pd.isna(x) else str(x) for x in m["mask_path"]]
    with _common.atomic_dir(_common.CACHE_DIR) as out:  # the folder appears whole, or not at all
        images, masks, has_mask = preprocess.build_cache(
            list(m["path"]), mask_paths, int(p["size"]), workers=int(p["workers"]), progress=_common.show_progress(),
        )
        preprocess.save_cache(out, m.assign(has_mask=has_mask)[INDEX_COLUMNS], images, masks)
    log.info("cached %d images at %d px (%d with lung masks)", len(m), p["size"], int(has_mask.sum()))


if __name__ == "__main__":
    run(_common.params("cache"))
