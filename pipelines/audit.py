"""Stage `audit`: the shortcut audit of every classifier (README, "Shortcut audit").

Reads variants c's and e's validation predictions (each classifier's ``predictions.csv``: the lungs-removed share and
its paired patient-bootstrap interval) and the explain report, trains the source classifier on the classifiers' own
images, grades every check against params (`audit`) on the validation split (the audit gates the registered model:
nothing is chosen on the test split, whose source reading is reported beside it), writes reports/audit/audit.json (the
shape the model card and `register` read) and logs it to MLflow as the run `audit`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr import audit, preprocess, tracking, training
from pipelines import _common, _models, _tracking

OUT = _common.AUDIT_REPORT.parent


#: The split the audit grades (it gates the registered model's choice: never the test split) and the one it only
#: reports.
GRADED, REPORTED = "val", "test"


#: The lungs-removed share's bootstrap is seeded: the same predictions give the same interval, and the same verdict.
BOOT_SEED = 0


def graded_predictions(variant: str, backbone: str, split: str = GRADED) -> pd.DataFrame:
    """A classifier's predictions of ``split`` (its ``predictions.csv``, as evaluate reads it: image, patient, label,
    the served score), by image id."""
    path = Path(_common.model_dir(variant, backbone)) / _common.PREDICTIONS
    pred = pd.read_csv(path)
    missing = {"image_id", "patient_id", "split", "label", "score"} - set(pred)
    if missing:
        raise ValueError(f"{path}: no {sorted(missing)} column(s); rerun train_classifier")
    return pred[pred["split"] == split].set_index("image_id")


def paired_share(backbone: str, n_boot: int) -> audit.KeptShare:
    """Variants c's and e's validation AUCs and the paired patient-bootstrap interval of the share e keeps
    (:func:`covidcxr.audit.paired_kept_share`). Both were trained on the same split and score the same images; other
    images (a folder left from another split) are an error, as c and e could not be compared."""
    c, e = (graded_predictions(v, backbone) for v in ("c", "e"))
    if set(c.index) != set(e.index):
        raise ValueError(f"c_{backbone} and e_{backbone} scored different {GRADED} images ({len(c)} and {len(e)}, "
                         f"{len(set(c.index) ^ set(e.index))} in one only): rerun train_classifier for both")
    e = e.loc[c.index]
    if not (c["label"].astype(str).equals(e["label"].astype(str))
            and c["patient_id"].astype(str).equals(e["patient_id"].astype(str))):
        raise ValueError(f"c_{backbone} and e_{backbone} disagree on the label or patient of a {GRADED} image: rerun "
                         "train_classifier for both")
    return audit.paired_kept_share((c["label"] == "covid").to_numpy(int), c["score"].to_numpy(),
                                   e["score"].to_numpy(), c["patient_id"].astype(str).to_numpy(), n_boot=n_boot,
                                   seed=BOOT_SEED)


def lungs_removed_checks(p: dict, classifiers: dict) -> list[audit.Check]:
    """Per backbone, the share of c's validation AUC above chance that e keeps, graded on its paired patient-bootstrap
    interval (skipped where c or e was not trained)."""
    trained = set(classifiers["variants"])
    grades = {"warn": float(p["warn"]), "fail": float(p["fail"]), "min_c_auc": float(p["min_c_auc"])}
    checks = []
    for b in classifiers["backbones"]:
        if not {"c", "e"} <= trained:  # skipped, naming the variant not trained (None); the other's AUC is not read
            checks.append(audit.lungs_removed_check(b, math.nan if "c" in trained else None,
                                                    math.nan if "e" in trained else None, **grades))
            continue
        share = paired_share(b, int(p["n_boot"]))
        checks.append(audit.lungs_removed_check(b, share.auc_c, share.auc_e, interval=(share.low, share.high),
                                                unbounded=share.n_unbounded, undefined=share.n_skipped, **grades))
    return checks


def heatmap_checks(p: dict, classifiers: dict) -> list[audit.Check]:
    """The heat-map checks of every classifier, on the explain report's validation figures; a classifier without them
    (a report of an older explain, or of other classifiers) is an error, never a skipped check the verdict ignores."""
    explain = _common.read_report(_common.EXPLAIN_METRICS, "explain")
    checks = []
    for name in (f"{v}_{b}" for v in classifiers["variants"] for b in classifiers["backbones"]):
        if not isinstance(explain.get(name), dict) or not isinstance(explain[name].get(GRADED), dict):
            raise ValueError(f"{_common.EXPLAIN_METRICS}: no {GRADED} figures for {name}: rerun the explain stage")
        checks += audit.heatmap_checks(name, explain[name][GRADED], warn=float(p["warn"]), fail=float(p["fail"]),
                                       min_maps=int(p["min_maps"]))
    return checks


def sources_of(index, image_ids, split: np.ndarray, min_images: int) -> np.ndarray:
    """Each image's site (manifest `site`), or its dataset source where the site is unknown or has fewer than
    ``min_images`` training images (``audit.group_sources``)."""
    frame = index.set_index("image_id").loc[list(image_ids)]
    source = frame["source"].astype(str).to_numpy()
    site = frame["site"] if "site" in frame else None
    if site is None:
        return source.astype(object)
    site = np.where(site.isna() | (site.astype(str).str.strip() == ""), source, site.astype(str))
    return audit.group_sources(site, source, split == "train", min_images)


def source_reading(p: dict, classifier: dict, log) -> tuple[audit.SourceReading | None, str, dict]:
    """Train the source classifier on the classifiers' images (train split, its epoch chosen on validation), read the
    validation split (graded) and the test split (reported only).

    Returns (the validation reading or None, the reason when None, details for reports/audit/source_classifier.json).
    """
    index, images, _ = _models.load_cache()
    masks = _models.load_masks()
    table, _ = _models.usable()
    split = table["split"].to_numpy()
    source = sources_of(index, table["image_id"], split, int(p["min_site_images"]))
    y = (table["label"] == "covid").to_numpy(int)
    counts = {s: {str(k): int(v) for k, v in zip(*np.unique(source[split == s], return_counts=True))}
              for s in ("train", "val", "test")}
    if len(counts["train"]) < 2:
        return None, f"one source in training ({list(counts['train'])}): nothing to tell apart", {"counts": counts}
    rows = preprocess.rows_for(index, table["image_id"])
    # what a classifier of this variant reads: its input transform (lung crop, intensity), then the variant
    inputs = preprocess.InputTransform(**classifier["input"]).apply(images[rows], masks[rows], p["variant"]).images
    std = preprocess.Standardizer().fit(inputs[split == "train"])
    x = {s: std.transform(inputs[split == s]) for s in ("train", "val", "test")}
    backbone = str(p["backbone"])
    depth = int(backbone.removeprefix("vgg"))
    model, classes, epoch = audit.train_source_classifier(
        x["train"], source[split == "train"], x["val"], source[split == "val"],
        depth=depth, width=float(classifier["width"]), head=classifier["head"],
        weights=_models.vgg_weights(classifier["weights"], depth), fold=classifier["fold"], lr=float(classifier["lr"]),
        epochs=int(p["epochs"]), batch_size=int(p["batch_size"]), seed=int(p["seed"]),
        on_epoch_end=lambda epoch, logs: tracking.log_epoch(epoch, {f"source.{k}": v for k, v in logs.items()}),
    )
    patients = table["patient_id"].astype(str).to_numpy()
    readings, confusion = {}, {}
    for part in (GRADED, REPORTED):
        proba = training.predict(model, x[part])
        readings[part] = audit.read_sources(classes, proba, source[split == part], y[split == part],
                                            source[split == "train"], y[split == "train"],
                                            patients=patients[split == part],
                                            split={"val": "validation"}.get(part, part), seed=int(p["seed"]))
        called = np.asarray(classes, dtype=object)[proba.argmax(axis=1)]
        confusion[part] = {t: {c: int(((source[split == part] == t) & (called == c)).sum()) for c in classes}
                           for t in sorted(set(source[split == part]))}
    reading = readings[GRADED]
    covid_share = {c: float(y[(split == "train") & (source == c)].mean()) for c in classes}
    log.info("source classifier (validation): balanced accuracy %.3f (chance %.3f), label AUC via the read source "
             "%.3f", reading.balanced_accuracy, reading.chance, reading.label_auc_read_source)
    details = {**dataclasses.asdict(reading), "classes": list(classes), "restored_epoch": epoch,
               "backbone": backbone, "variant": p["variant"], "counts": counts, "train_covid_share": covid_share,
               "confusion": confusion[GRADED], REPORTED: {**dataclasses.asdict(readings[REPORTED]),
                                                          "confusion": confusion[REPORTED]}}
    return reading, "", details


def metrics_of(result: dict) -> dict:
    """Flat, DVC-friendly metrics: overall status and each check's value and status by name and subject."""
    out: dict = {"status": result["status"]}
    for c in result["checks"]:
        out.setdefault(c["name"], {})[c["subject"]] = {"value": c["value"], "low": c.get("low"),
                                                       "high": c.get("high"), "status": c["status"]}
    return out


def run(p: dict, classifier: dict, experiment: str = "demo") -> dict:
    import mlflow

    log = _common.setup_logging()
    _tracking.setup_tracking()
    with tracking.run(_common.mlflow_experiment(experiment), "audit", params=p,
                      tags=_tracking.repro_tags("audit", experiment)):
        checks = lungs_removed_checks(p["lungs_removed"], classifier) + heatmap_checks(p["heatmap"], classifier)
        src = p["source"]
        reading, why, details = source_reading(src, classifier, log)
        checks.append(audit.source_check(reading, warn=float(src["warn"]), fail=float(src["fail"]), skip_reason=why))
        result = audit.report(checks)
        _common.write_json(_common.AUDIT_REPORT, result)
        _common.write_json(OUT / "source_classifier.json", details)
        _common.write_json(OUT / "metrics.json", metrics_of(result))
        mlflow.log_metrics({f"audit.{c.name}.{c.subject}{part}": v for c in checks
                            for part, v in (("", c.value), (".low", c.low), (".high", c.high))
                            if v is not None and math.isfinite(v)})
        mlflow.set_tags({"audit.status": result["status"],
                         **{f"audit.{c.name}.{c.subject}": c.status for c in checks}})
        mlflow.log_artifact(str(_common.AUDIT_REPORT), "audit")
        mlflow.log_artifact(str(OUT / "source_classifier.json"), "audit")
    for c in checks:
        log.info("audit %-18s %-20s %-7s %s", c.name, c.subject, c.status, c.reason)
    print(f"audit: {result['status']}")
    return result


if __name__ == "__main__":
    run(_common.params("audit"), _common.params("train_classifier"), _common.params("split.experiment"))
    _common.finish()
