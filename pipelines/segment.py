"""Stage `segment`: lung masks for every frontal image, cleaned and checked by the rules serving applies
(:mod:`covidcxr.lungs`); a mask that fails them is flagged with the same reason code, never silently used. Its report
records the U-Net run and the area rules it applied: `register` serves them only when they are the bundled U-Net's
and the served rules (:func:`pipelines._common.made_with`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr import lungs, metrics
from pipelines import _common, _models

METRICS = _common.SEGMENT_REPORT


def run(p: dict) -> dict:
    log = _common.setup_logging()
    index, images, true_masks = _models.load_cache()
    frontal = pd.read_csv(_common.FRONTAL)
    is_frontal = (frontal.set_index("image_id").loc[index["image_id"], "predicted"] == "frontal").to_numpy()
    unet = _models.load_component(_common.UNET_MODEL)
    rules = lungs.MaskRules(threshold=unet.operating_threshold, min_area=float(p["min_area"]),
                            max_area=float(p["max_area"]))
    found, found_area, found_reason = lungs.masks(unet(images[is_frontal]), rules)
    masks = np.zeros(images.shape, dtype=bool)
    masks[is_frontal] = found
    area = np.zeros(len(index))
    area[is_frontal] = found_area
    flag = np.full(len(index), _models.NOT_FRONTAL, dtype=object)
    flag[is_frontal] = [reason or "" for reason in found_reason]
    out = pd.DataFrame({"image_id": index["image_id"], "lung_area_fraction": np.round(area, 6), "flag": flag})

    with_truth = is_frontal & index["has_mask"].to_numpy()
    # Per split of the segmentation task: the U-Net trained on `train` and was selected on `val`, so only `test` and
    # `external` say how its masks do on lungs it never saw; pooled, the training images dominated the figure.
    seg = pd.read_csv(_common.split_table("segmentation")).set_index("image_id")["split"]
    split_of = seg.reindex(index["image_id"]).fillna("none").to_numpy()
    dice = {str(s): {"dice": float(np.mean(metrics.dice(true_masks[with_truth & (split_of == s)],
                                                         masks[with_truth & (split_of == s)]))),
                     "n": int((with_truth & (split_of == s)).sum())}
            for s in sorted(set(split_of[with_truth]))}
    summary = {
        "segmented": int(is_frontal.sum()),
        "mask_threshold": rules.threshold,
        "min_area": rules.min_area,  # the rules the masks (and the classifiers trained on them) were made by
        "max_area": rules.max_area,
        "unet_run_id": unet.info.get("run_id"),  # the U-Net weights that made them
        "flagged": {k: int(v) for k, v in out.loc[out["flag"] != "", "flag"].value_counts().sort_index().items()},
        "mean_lung_area_fraction": float(area[is_frontal].mean()) if is_frontal.any() else None,
        "dice_vs_true_masks": dice,  # per segmentation split: the masks' per-image Dice and how many
        "n_with_true_masks": int(with_truth.sum()),
    }
    with _common.atomic_dir(_common.MASKS_DIR) as folder:  # artifacts/masks appears whole, or not at all
        _common.save_npy(folder / Path(_common.MASKS).name, masks)
        _common.write_csv(folder / Path(_common.MASKS_INDEX).name, out)
    _common.write_json(METRICS, summary)
    log.info("segmentation: %s", summary)
    return summary


if __name__ == "__main__":
    run(_common.params("segment"))
    _common.finish()
