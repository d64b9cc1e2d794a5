"""The audit stage's reading of the classifiers' predictions and the explain report: graded on validation, never on
test; the lungs-removed share paired on the same validation images and patients."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidcxr import audit
from pipelines import _common
from pipelines import audit as stage

CLASSIFIERS = {"variants": ["c", "d", "e"], "backbones": ["vgg16"]}
LUNGS_REMOVED = {"warn": 0.3, "fail": 0.6, "min_c_auc": 0.6, "n_boot": 300}
HEATMAP = {"warn": 1.5, "fail": 1.0, "min_maps": 5}


def write(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def figures(mass: float) -> dict:
    return {f"{k}_{label}": v for label in ("covid", "negative")
            for k, v in (("lung_mass_share", mass), ("lung_area_share", 0.25), ("n_maps", 20), ("n_empty", 0))}


def predictions(patients: int, rng: np.random.Generator) -> dict[str, pd.DataFrame]:
    """c, d and e scoring the same validation and test images (two films per patient). On validation e scores at
    chance (it keeps nothing of c); on test e scores exactly as c (it keeps all of it: a fail, were test graded)."""
    frames = {}
    y = np.repeat(np.arange(patients) % 2, 2)
    strong = y + rng.normal(0, 0.3, len(y))
    noise = rng.normal(0, 1, len(y))
    for variant, val, test in (("c", strong, strong), ("d", strong, strong), ("e", noise, strong)):
        frames[variant] = pd.concat([
            pd.DataFrame({"image_id": [f"{part}-{i}" for i in range(len(y))],
                          "patient_id": np.repeat([f"{part}-p{i}" for i in range(patients)], 2), "split": part,
                          "label": np.where(y == 1, "covid", "negative"), "score": score, "raw_score": score})
            for part, score in (("val", val), ("test", test))])
    return frames


def write_predictions(frames: dict[str, pd.DataFrame]) -> None:
    for variant, frame in frames.items():
        folder = Path(_common.model_dir(variant, "vgg16"))
        folder.mkdir(parents=True, exist_ok=True)
        frame.to_csv(folder / _common.PREDICTIONS, index=False)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """Predictions and heat-map figures whose validation and test figures disagree: validation passes, test fails,
    every check."""
    monkeypatch.chdir(tmp_path)
    frames = predictions(400, np.random.default_rng(0))
    write_predictions(frames)
    write(_common.EXPLAIN_METRICS, {name: {"val": figures(0.6), "test": figures(0.1)}
                                    for name in ("c_vgg16", "d_vgg16", "e_vgg16")})
    return frames


def test_the_audit_grades_the_validation_split_never_test(project):
    (removed,) = stage.lungs_removed_checks(LUNGS_REMOVED, CLASSIFIERS)
    val = {v: f[f["split"] == "val"] for v, f in project.items()}
    auc = {v: audit._auc((f["label"] == "covid").to_numpy(int), f["score"].to_numpy()) for v, f in val.items()}
    assert removed.value == pytest.approx(audit.kept_share(auc["c"], auc["e"]))  # test would read 1.0: fail
    assert removed.status == "pass" and removed.high < 0.3 and removed.low == 0.0, removed
    assert "validation AUC" in removed.reason
    graded = {c.subject: c for c in stage.heatmap_checks(HEATMAP, CLASSIFIERS)}
    assert {s: c.status for s, c in graded.items() if not s.startswith("e_")} == dict.fromkeys(
        ["c_vgg16/covid", "c_vgg16/negative", "d_vgg16/covid", "d_vgg16/negative"], "pass")  # test: 0.4x, fail
    assert graded["c_vgg16/covid"].value == pytest.approx(2.4)
    result = audit.report([removed])
    assert stage.metrics_of(result)["lungs_removed_auc"]["c_vgg16"] == {
        "value": removed.value, "low": removed.low, "high": removed.high, "status": "pass"}


def test_the_share_pairs_c_and_e_by_image_and_resamples_their_patients(project, monkeypatch):
    """e's file in another row order is the same pairing (rows are matched by image id, not by place); the share is
    computed on the validation images only, with their patient ids and the stage's n_boot."""
    (before,) = stage.lungs_removed_checks(LUNGS_REMOVED, CLASSIFIERS)
    write_predictions({"e": project["e"].sample(frac=1.0, random_state=1)})
    (shuffled,) = stage.lungs_removed_checks(LUNGS_REMOVED, CLASSIFIERS)
    assert (shuffled.value, shuffled.low, shuffled.high) == (before.value, before.low, before.high)
    seen = []

    def spy(y, score_c, score_e, patients, **kwargs):
        seen.append((y, score_c, score_e, patients, kwargs))
        return audit.KeptShare(0.9, 0.5, 0.0, 0.1, kwargs["n_boot"])

    monkeypatch.setattr(audit, "paired_kept_share", spy)
    stage.lungs_removed_checks(LUNGS_REMOVED, CLASSIFIERS)
    ((y, score_c, score_e, patients, kwargs),) = seen
    val = {v: f[f["split"] == "val"].set_index("image_id") for v, f in project.items()}
    assert kwargs["n_boot"] == 300 and len(y) == len(val["c"])
    assert list(score_c) == list(val["c"]["score"]) and list(score_e) == list(val["e"]["score"].loc[val["c"].index])
    assert list(patients) == list(val["c"]["patient_id"]) and len(set(patients)) == len(val["c"]) // 2


def test_c_and_e_of_other_validation_images_are_an_error(project):
    write_predictions({"e": project["e"][project["e"]["image_id"] != "val-3"]})
    with pytest.raises(ValueError, match="c_vgg16 and e_vgg16 scored different val images"):
        stage.lungs_removed_checks(LUNGS_REMOVED, CLASSIFIERS)
    e = project["e"].copy()
    e.loc[e["image_id"] == "val-3", "patient_id"] = "someone-else"
    write_predictions({"e": e})
    with pytest.raises(ValueError, match="disagree on the label or patient"):
        stage.lungs_removed_checks(LUNGS_REMOVED, CLASSIFIERS)


def test_a_variant_not_trained_skips_the_check_without_reading_predictions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (check,) = stage.lungs_removed_checks(LUNGS_REMOVED, {"variants": ["c", "d"], "backbones": ["vgg16"]})
    assert check.status == "skipped" and "e_vgg16 not trained" in check.reason


def test_an_explain_report_without_validation_figures_is_an_error_not_a_skipped_check(project):
    """A report of an older explain (its figures flat, test only) would skip every heat-map check, which the verdict
    ignores: the gate would pass without measuring."""
    write(_common.EXPLAIN_METRICS, {"c_vgg16": figures(0.1), "d_vgg16": figures(0.1), "e_vgg16": figures(0.1)})
    with pytest.raises(ValueError, match="no val figures for c_vgg16: rerun the explain stage"):
        stage.heatmap_checks(HEATMAP, CLASSIFIERS)
