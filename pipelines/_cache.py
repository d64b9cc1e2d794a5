"""What the two cache stages share: the manifest's images decoded at one working size into a cache folder."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from covidcxr import manifest, preprocess
from pipelines import _common

INDEX_COLUMNS = ["image_id", "source", "patient_id", "label", "projection", "site", "header_view_position", "has_mask"]


def write(folder: str | Path, size: int, workers: int, log: logging.Logger) -> None:
    """Decode every manifest image (and its true lung mask, where the source has one) at ``size`` into ``folder``,
    with :func:`covidcxr.preprocess.read_working_image`, the decode and transform serving applies to every request,
    told each row's ``photometric`` and ``bits_stored`` (a MONOCHROME1 PNG export, BIMCV's or PadChest's, is inverted
    for air dark as its DICOM would be); the folder appears whole, or not at all."""
    m = manifest.read_csv(_common.MANIFEST)
    mask_paths = [None if pd.isna(x) else str(x) for x in m["mask_path"]]
    photometric, bits_stored = manifest.decode_hints(m)
    with _common.atomic_dir(folder) as out:
        images, masks, has_mask = preprocess.build_cache(
            list(m["path"]), mask_paths, int(size), workers=int(workers), progress=_common.show_progress(),
            photometric=photometric, bits_stored=bits_stored,
        )
        preprocess.save_cache(out, m.assign(has_mask=has_mask)[INDEX_COLUMNS], images, masks)
    log.info("%s: cached %d images at %d px (%d with lung masks)", folder, len(m), size, int(has_mask.sum()))

