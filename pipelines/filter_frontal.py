"""Stage `filter_frontal`: keep the images the projection filter calls frontal; report where it disagrees with labels."""

from __future__ import annotations

import numpy as np

from covidcxr import training
from pipelines import _common

OUT = "artifacts/frontal.csv"
DISAGREE = "reports/filter_frontal/disagreements.csv"
METRICS = "reports/filter_frontal/metrics.json"


def run(p: dict) -> dict:
    log = _common.setup_logging()
    index, images, _ = _common.load_cache()
    model, std, _ = _common.load_model_dir("artifacts/models/projection")
    p_frontal = training.predict(model, std.transform(images)).ravel()
    out = index[["image_id", "projection"]].assign(
        p_frontal=np.round(p_frontal, 6),
        predicted=np.where(p_frontal >= float(p["threshold"]), "frontal", "lateral"),
    )
    known = out["projection"].isin(["frontal", "lateral"])
    disagree = out[known & (out["projection"] != out["predicted"])]
    summary = {
        "frontal": int((out["predicted"] == "frontal").sum()),
        "lateral": int((out["predicted"] == "lateral").sum()),
        "disagreements": len(disagree),
        "agreement": float(1 - len(disagree) / max(int(known.sum()), 1)),
        "unknown_projection_called_frontal": int(((~known) & (out["predicted"] == "frontal")).sum()),
    }
    _common.write_csv(OUT, out)
    _common.write_csv(DISAGREE, disagree)
    _common.write_json(METRICS, summary)
    log.info("projection filter: %s", summary)
    return summary


if __name__ == "__main__":
    run(_common.params("filter_frontal"))
