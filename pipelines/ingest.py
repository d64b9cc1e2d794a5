"""Stage `ingest`: every configured source -> one manifest, with rejects and duplicates reported, never dropped silently."""

from __future__ import annotations

import os

import pandas as pd

from covidcxr import datasets, io, manifest
from pipelines import _common

MANIFEST = "artifacts/manifest.csv"
REJECTS = "reports/ingest/rejects.csv"
DUPLICATES = "reports/ingest/duplicates.csv"
SUMMARY = "reports/ingest/summary.json"


class TooManyRejects(RuntimeError):
    """More images were rejected than params allow."""


def pseudonymize_patients(frame: pd.DataFrame, salt: str) -> pd.DataFrame:
    """Replace the raw part of ``source:id`` patient keys by a salted hash (equal ids stay equal)."""
    out = frame.copy()
    parts = out["patient_id"].str.split(":", n=1, expand=True)
    out["patient_id"] = parts[0] + ":" + parts[1].map(lambda raw: io.pseudonymize(raw, salt))
    return out


def run(p: dict) -> dict:
    log = _common.setup_logging()
    frames = []
    for source in p["sources"]:
        options = {k: v for k, v in source.items() if k not in ("name", "root")}
        frame = datasets.load(source["name"], source["root"], **options)
        log.info("%s: %d images listed under %s", source["name"], len(frame), source["root"])
        frames.append(frame)
    listed = manifest.conform(pd.concat(frames, ignore_index=True))

    described, rejects = manifest.describe_images(
        listed, max_pixels=p["max_pixels"], workers=int(p.get("workers") or os.cpu_count() or 1),
        progress=_common.show_progress(),
    )
    duplicates = manifest.find_duplicates(described)
    result = described[~described["image_id"].isin(duplicates["image_id"])].reset_index(drop=True)
    if p.get("pseudonymize", True):
        salt = os.environ.get("COVIDCXR_PSEUDONYM_SALT") or str(p["salt"])
        result = pseudonymize_patients(result, salt)
    if p.get("max_age") is not None:  # ages above the cap are identifying (HIPAA safe harbour: 90+)
        result["age"] = result["age"].clip(upper=float(p["max_age"]))

    rejected = int((rejects["kind"] == "image").sum())
    summary = {
        "listed": len(listed),
        "accepted": len(result),
        "rejected": rejected,
        "masks_rejected": int((rejects["kind"] == "mask").sum()),
        "duplicates": len(duplicates),
        "reject_fraction": round(rejected / max(len(listed), 1), 6),
        "by_source": {s: int(n) for s, n in result["source"].value_counts().sort_index().items()},
        "by_label": {s: int(n) for s, n in result["label"].value_counts().sort_index().items()},
        "by_projection": {s: int(n) for s, n in result["projection"].value_counts().sort_index().items()},
        "rejects_by_reason": {s: int(n) for s, n in rejects["reason"].value_counts().sort_index().items()},
        "patients": int(result["patient_id"].nunique()),
    }
    _common.write_csv(MANIFEST, result)
    _common.write_csv(REJECTS, rejects)
    _common.write_csv(DUPLICATES, duplicates)
    _common.write_json(SUMMARY, summary)
    for row in rejects.itertuples():
        log.warning("rejected %s of %s (%s): %s", row.kind, row.image_id, row.reason, row.problem)
    log.info("manifest: %d images of %d patients; %d images and %d masks rejected, %d duplicates", len(result),
             summary["patients"], rejected, summary["masks_rejected"], len(duplicates))
    if summary["reject_fraction"] > float(p["max_reject_fraction"]):
        raise TooManyRejects(
            f"{rejected} of {len(listed)} images rejected ({summary['reject_fraction']:.1%}), more than "
            f"ingest.max_reject_fraction={p['max_reject_fraction']}: see {REJECTS}"
        )
    return summary


if __name__ == "__main__":
    run(_common.params("ingest"))
