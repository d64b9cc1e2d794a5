"""The audit stage's reading of the evaluate and explain reports: graded on validation, never on test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines import _common
from pipelines import audit as stage

CLASSIFIERS = {"variants": ["c", "d", "e"], "backbones": ["vgg16"]}
LUNGS_REMOVED = {"warn": 0.3, "fail": 0.6, "min_c_auc": 0.6}
HEATMAP = {"warn": 1.5, "fail": 1.0, "min_maps": 5}


def write(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def figures(mass: float) -> dict:
    return {f"{k}_{label}": v for label in ("covid", "negative")
            for k, v in (("lung_mass_share", mass), ("lung_area_share", 0.25), ("n_maps", 20), ("n_empty", 0))}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """Reports whose validation and test figures disagree: validation passes, test fails, every check."""
    monkeypatch.chdir(tmp_path)
    for name, val, test in (("c_vgg16", 0.95, 0.95), ("d_vgg16", 0.9, 0.9), ("e_vgg16", 0.55, 0.94)):
        write(_common.EVALUATE_DIR / name / "metrics.json",
              {"val": {"at_0.5": {"roc_auc": val}}, "test": {"at_0.5": {"roc_auc": test}}})
    write(_common.EXPLAIN_METRICS, {name: {"val": figures(0.6), "test": figures(0.1)}
                                    for name in ("c_vgg16", "d_vgg16", "e_vgg16")})
    return tmp_path


def test_the_audit_grades_the_validation_split_never_test(project):
    (removed,) = stage.lungs_removed_checks(LUNGS_REMOVED, CLASSIFIERS)
    assert removed.status == "pass" and removed.value == pytest.approx(0.05 / 0.45)  # test would read 0.44/0.45: fail
    assert "validation AUC" in removed.reason
    graded = {c.subject: c for c in stage.heatmap_checks(HEATMAP, CLASSIFIERS)}
    assert {s: c.status for s, c in graded.items() if not s.startswith("e_")} == dict.fromkeys(
        ["c_vgg16/covid", "c_vgg16/negative", "d_vgg16/covid", "d_vgg16/negative"], "pass")  # test: 0.4x, fail
    assert graded["c_vgg16/covid"].value == pytest.approx(2.4)


def test_an_explain_report_without_validation_figures_is_an_error_not_a_skipped_check(project):
    """A report of an older explain (its figures flat, test only) would skip every heat-map check, which the verdict
    ignores: the gate would pass without measuring."""
    write(_common.EXPLAIN_METRICS, {"c_vgg16": figures(0.1), "d_vgg16": figures(0.1), "e_vgg16": figures(0.1)})
    with pytest.raises(ValueError, match="no val figures for c_vgg16: rerun the explain stage"):
        stage.heatmap_checks(HEATMAP, CLASSIFIERS)
