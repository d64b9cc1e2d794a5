"""Stage `segment`: lung masks for every frontal image, cleaned, with area sanity checks (flagged, never silently used)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr import metrics, preprocess, training
from pipelines import _common

OUT_MASKS = "artifacts/masks/masks.npy"
OUT_INDEX = "artifacts/masks/index.csv"
METRICS = "reports/segment/metrics.json"


def run(p: dict) -> dict:
    log = _common.setup_logging()
    index, images, true_masks = _common.load_cache()
    frontal = pd.read_csv("artifacts/frontal.csv")
    is_frontal = (frontal.set_index("image_id").loc[index["image_id"], "predicted"] == "frontal").to_numpy()
    model, std, _ = _common.load_model_dir("artifacts/models/unet")
    prob = training.predict(model, std.transform(images[is_frontal]))[..., 0] if is_frontal.any() \
        else np.zeros((0,) + images.shape[1:], dtype=np.float32)  # Keras' predict fails on an empty batch

    masks = np.zeros(images.shape, dtype=bool)
    masks[is_frontal] = np.stack([preprocess.clean_mask(m, threshold=float(p["threshold"])) for m in prob]) \
        if len(prob) else masks[is_frontal]
    area = masks.reshape(len(masks), -1).mean(axis=1)
    flag = np.where(~is_frontal, "not_frontal",
                    np.where(area < float(p["min_area"]), "mask_too_small",
                             np.where(area > float(p["max_area"]), "mask_too_large", "")))
    out = pd.DataFrame({"image_id": index["image_id"], "lung_area_fraction": np.round(area, 6), "flag": flag})

    with_truth = is_frontal & index["has_mask"].to_numpy()
    summary = {
        "segmented": int(is_frontal.sum()),
        "flagged": {k: int(v) for k, v in out.loc[out["flag"] != "", "flag"].value_counts().sort_index().items()},
        "mean_lung_area_fraction": float(area[is_frontal].mean()) if is_frontal.any() else None,
        "dice_vs_true_masks": float(np.mean(metrics.dice(true_masks[with_truth], masks[with_truth])))
        if with_truth.any() else None,
        "n_with_true_masks": int(with_truth.sum()),
    }
    with _common.atomic_dir(Path(OUT_MASKS).parent) as folder:  # artifacts/masks appears whole, or not at all
        _common.save_npy(folder / Path(OUT_MASKS).name, masks)
        _common.write_csv(folder / Path(OUT_INDEX).name, out)
    _common.write_json(METRICS, summary)
    log.info("segmentation: %s", summary)
    return summary


if __name__ == "__main__":
    run(_common.params("segment"))
