"""Typed params: each stage validates its sections before any work, naming the key and what is allowed."""

from __future__ import annotations

import copy
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from covidcxr import datasets, manifest, metrics, preprocess, selection, training
from pipelines import _common, _params, experiment

ROOT = _common.PROJECT
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def literal(alias) -> tuple:
    return typing.get_args(alias)


def test_the_schema_speaks_the_library_s_vocabulary():
    assert _params.SOURCES == datasets.NAMES
    assert _params.MANIFEST_COLUMNS == tuple(manifest.COLUMNS)
    assert set(literal(_params.Variant)) == set(preprocess.VARIANTS)
    assert literal(_params.ThresholdObjective) == metrics.THRESHOLD_OBJECTIVES
    assert literal(_params.SelectionMetric) == selection.METRICS
    assert literal(_params.TuningStrategy) == training.STRATEGIES
    assert literal(_params.Strategy) == (*training.STRATEGIES, training.MULTI_WORKER)
    assert literal(_params.Precision) == training.PRECISIONS


def test_every_section_of_params_yaml_is_valid_and_covered():
    assert set(PARAMS) == set(_params.SECTIONS)
    for section, values in PARAMS.items():
        _params.validate(section, values)


def dotted(params: dict, overrides: dict) -> dict:
    """``params`` with ``a.b: value`` overrides applied (the `dvc exp run -S` form the experiment overlays use), on a
    deep copy (not a YAML round trip of the whole file: 0.1 s each, 315 ablation steps)."""
    out = copy.deepcopy(params)
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        node[last] = value
    return out


@pytest.mark.parametrize("overlay", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_experiment_overlay_gives_valid_params(overlay):
    spec = yaml.safe_load(overlay.read_text())
    base = yaml.safe_load((ROOT / "experiments" / f"{spec['base']}.yaml").read_text()) if spec.get("base") else {}
    merged = dotted(PARAMS, {**base.get("params", {}), **spec.get("params", {})})
    for key, values in (spec.get("matrix") or {}).items():
        merged = dotted(merged, {key: experiment._named(values)[0][1]})
    block = spec.get("heldout") or {}
    for _, rules in experiment._named(block.get("matrix", {})):
        held = dotted(merged, {"split.holdout": rules, **(block.get("params") or {})})
        for section, values in held.items():
            _params.validate(section, values)
    if block:  # the main runs carry the held-out runs' figures, as the runner makes them, to register
        model = {"test_specificity": {"value": 0.5, "low": 0.4, "high": 0.6}, "operating_threshold": 0.3,
                 "test_auc": {"value": None, "low": None, "high": None}, "test_classes": {"covid": 0, "negative": 9},
                 "test_sensitivity": {"value": None, "low": None, "high": None}}
        runs = [{"models": {"c_vgg16": model}}] * len(block.get("seeds") or [None])
        figures = experiment.heldout_figures(block, {label: runs for label, _ in experiment._named(block["matrix"])})
        merged = dotted(merged, {"register.heldout": figures})
    for section, values in merged.items():
        _params.validate(section, values)


@pytest.mark.parametrize("section, change, message", [
    ("cache", {"size": "big"}, "cache.size: Input should be a valid integer"),
    ("cache", {"size": 50}, "cache.size: Input should be a multiple of 16 (got 50)"),
    ("cache", {"sise": 64}, "cache.sise: unknown key (allowed: size, workers)"),
    ("train_classifier", {"variants": ["c", "x"]}, "train_classifier.variants[1]: Input should be 'c', 'd' or 'e'"),
    ("train_classifier", {"backbones": ["resnet50"]}, "train_classifier.backbones[0]: Input should be 'vgg16' or "
                                                      "'vgg19'"),
    ("train_classifier", {"variants": []}, "train_classifier.variants: List should have at least 1 item"),
    ("train_classifier", {"min_sensitivity": 1.5}, "train_classifier.min_sensitivity: Input should be less than or "
                                                   "equal to 1"),
    ("audit", {"lungs_removed": {"warn": 0.3, "fail": 0.6, "min_c_auc": 0.5}}, "audit.lungs_removed.min_c_auc: Input "
                                                                              "should be greater than 0.5 (got 0.5)"),
    ("train_classifier", {"min_sensitivity": 0}, "train_classifier.min_sensitivity: Input should be greater than 0 "
                                                 "(got 0)"),
    ("train_classifier", {"threshold_objective": "accuracy"}, "train_classifier.threshold_objective: Input should be "
                                                              "'youden', 'f1' or 'sensitivity'"),
    ("ingest", {"sources": [{"name": "padchets", "root": "x"}]}, "ingest.sources[0].name: Input should be 'bimcv'"),
    ("split", {"holdout": [{"source": "montgomry"}]}, "split.holdout[0]: unknown source 'montgomry'"),
    ("split", {"experiment": "exp9"}, "split: experiment 'exp9' is not one of the experiments defined here"),
    ("split", {"fractions": {"train": 0.7, "val": 0.2, "test": 0.2}}, "split.fractions: train + val + test must be 1"),
    ("register", {"variant": "f"}, "register.variant: Input should be 'c', 'd', 'e' or 'best'"),
    ("register", {"metric": "ece"}, "register.metric: Input should be 'roc_auc'"),
    ("segment", {"min_area": 0.9, "max_area": 0.1}, "min_area (0.9) must not exceed max_area (0.1)"),
    ("tune_unet", {"strategy": "multi-worker"}, "tune_unet.strategy: Input should be 'default' or 'mirrored'"),
    ("train_classifier", {"source_adversary": 0.3, "source_adversary_ramp": True, "strategy": "multi-worker"},
     "source_adversary_ramp cannot run under strategy multi-worker"),
])
def test_bad_values_name_the_key_and_what_is_allowed(section, change, message):
    with pytest.raises(_params.ParamsError) as err:
        _params.validate(section, {**PARAMS[section], **change})
    assert message in str(err.value)


def test_an_unknown_source_inside_an_experiment_rule_is_refused():
    experiments = {**PARAMS["split"]["experiments"], "demo": {"positives": [{"source": "cohn", "label": "covid"}],
                                                              "negatives": [{"site": "a"}]}}
    with pytest.raises(_params.ParamsError, match=r"split.experiments.demo.positives\[0\]: unknown source 'cohn'"):
        _params.validate("split", {**PARAMS["split"], "experiments": experiments})


def test_defaults_come_from_the_schema():
    assert _params.validate("explain", {}) == {"per_group": 3, "display_size": 224, "images": True}
    values = _params.validate("train_unet", {"epochs": 2, "batch_size": 4, "lr": 0.001})
    assert values["mask_threshold"] == 0.5 and values["strategy"] == "default" and values["use_tuned"] is True


def test_a_stage_with_bad_params_stops_before_any_work(tmp_path):
    bad = {**PARAMS, "cache": {"size": 50, "workers": 1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    proc = subprocess.run([sys.executable, "-m", "pipelines.cache"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)}, timeout=120)
    assert proc.returncode != 0
    assert "cache.size: Input should be a multiple of 16 (got 50)" in proc.stderr
    assert not (tmp_path / "artifacts").exists()  # it never reached the manifest, let alone wrote the cache


def test_the_levers_speak_the_library_s_vocabulary():
    assert literal(_params.AugmentLevel) == training.AUGMENT_LEVELS
    assert literal(_params.Sampling) == training.SAMPLINGS
    assert literal(_params.Intensity) == preprocess.INTENSITIES
    assert set(_params.AugmentSpec.model_fields) == set(training.Augmentation.__dataclass_fields__) - {"wrap"}
    assert set(_params.ClassifierInput.model_fields) == set(preprocess.InputTransform.__dataclass_fields__)


def test_every_ablation_step_gives_params_the_library_accepts():
    for name in experiment.available():
        spec = experiment.load(name)
        if spec["kind"] != experiment.ABLATION:
            continue
        for step in experiment.ablation_plan(name, spec):
            merged = dotted(PARAMS, step["params"])
            checked = {section: _params.validate(section, values) for section, values in merged.items()}
            classifier = checked["train_classifier"]
            preprocess.InputTransform(**classifier["input"])
            training.Augmentation.of(classifier["augment"])
            training.Augmentation.of(checked["pretrain"]["augment"])
            if classifier["weights"] == "pretrained":  # its encoder must fit the classifier
                assert set(classifier["backbones"]) <= set(checked["pretrain"]["backbones"]), step["name"]
                assert checked["pretrain"]["width"] == classifier["width"], step["name"]


@pytest.mark.parametrize("value", [False, True, "strong", {"rotate": 5.0, "gamma": 0.2}])
def test_augment_takes_a_flag_a_level_or_its_parts(value):
    got = _params.validate("train_unet", {**PARAMS["train_unet"], "augment": value})["augment"]
    assert training.Augmentation.of(got) == training.Augmentation.of(value)
    with pytest.raises(_params.ParamsError, match=r"train_unet.augment"):
        _params.validate("train_unet", {**PARAMS["train_unet"], "augment": {"rotate": 90}})


def test_the_learning_rate_schedule_is_one_the_library_knows():
    for stage in ("train_projection", "train_unet", "train_classifier", "tune_unet"):
        for schedule in training.LR_SCHEDULES:
            checked = _params.validate(stage, {**PARAMS[stage], "lr_schedule": schedule})
            assert checked["lr_schedule"] == schedule
        with pytest.raises(_params.ParamsError, match=rf"{stage}.lr_schedule"):
            _params.validate(stage, {**PARAMS[stage], "lr_schedule": "step"})
