"""Stage `filter_frontal`: keep the images the projection rule calls frontal (:func:`covidcxr.projection.decide`: the
file's own DICOM view position, else the projection filter, at the threshold saved with it, and its lateral check), as
serving does; report where it disagrees with labels. No params of its own: the filter's folder holds its rule, and its
report records that folder's run, which `register` checks the filter it bundles against
(:func:`pipelines._common.made_with`)."""

from __future__ import annotations

import numpy as np

from covidcxr import models, projection
from pipelines import _common, _models

DISAGREE = "reports/filter_frontal/disagreements.csv"
METRICS = _common.FRONTAL_REPORT


def run() -> dict:
    log = _common.setup_logging()
    index, images, _ = _models.load_cache(_common.PROJECTION_CACHE_DIR)  # the filter's own working size
    projection_filter = _models.load_component(_common.PROJECTION_MODEL)
    p_frontal, like_lateral = models.frontal_evidence(projection_filter, images)
    views = index["header_view_position"].where(index["header_view_position"].notna(), None).tolist()
    predicted, decided_by = projection.decide(p_frontal, views, projection_filter.operating_threshold, like_lateral)
    out = index[["image_id", "projection"]].assign(p_frontal=np.round(p_frontal, 6), predicted=predicted,
                                                   decided_by=decided_by)
    known = out["projection"].isin(["frontal", "lateral"])
    disagree = out[known & (out["projection"] != out["predicted"])]
    summary = {
        "frontal": int((out["predicted"] == "frontal").sum()),
        "lateral": int((out["predicted"] == "lateral").sum()),
        "decided_by": {k: int(v) for k, v in out["decided_by"].value_counts().sort_index().items()},
        "disagreements": len(disagree),
        "agreement": float(1 - len(disagree) / max(int(known.sum()), 1)),
        "unknown_projection_called_frontal": int(((~known) & (out["predicted"] == "frontal")).sum()),
        "projection_run_id": projection_filter.info.get("run_id"),  # the filter weights (and rule) that made the calls
    }
    _common.write_csv(_common.FRONTAL, out)
    _common.write_csv(DISAGREE, disagree)
    _common.write_json(METRICS, summary)
    log.info("projection filter: %s", summary)
    return summary


if __name__ == "__main__":
    run()
    _common.finish()
