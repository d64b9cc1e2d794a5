"""The model stages' own figures: the projection filter's recall per source and class, the U-Net's Dice of the masks
that are used (cleaned)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from covidcxr import metrics
from pipelines import train_projection, train_unet
from tests.pipelines.conftest import run


def test_projection_recalls_count_the_frontals_refused():
    y = np.array([1, 1, 1, 1, 0, 0])  # 1 = frontal
    called = np.array([0.9, 0.8, 0.3, 0.6, 0.1, 0.7]) >= 0.5  # the rule's calls (frontal: True)
    r = train_projection.recalls(y, called)
    assert r == {"frontal_recall": 0.75, "lateral_recall": 0.5, "n_frontal": 4, "n_lateral": 2, "frontal_refused": 1,
                 "lateral_refused": 1}
    only_frontals = train_projection.recalls(np.ones(3), np.array([True, True, False]))
    assert only_frontals["lateral_recall"] is None and only_frontals["frontal_recall"] == pytest.approx(2 / 3)


def test_the_lateral_check_is_fitted_on_training_laterals_and_set_on_validation_ones():
    import keras

    from covidcxr import models, preprocess

    keras.utils.set_random_seed(4)
    images = np.random.default_rng(4).random((20, 32, 32)).astype(np.float32)
    filt = models.Component(models.build_vgg(16, (32, 32, 1), width=1 / 16, head=(4,)),
                            preprocess.Standardizer().fit(images))
    y = {"train": np.array([1] * 6 + [0] * 6), "val": np.array([1, 1, 0, 0, 0])}  # 1 = frontal
    parts = {"train": (np.arange(12), None), "val": (np.arange(12, 17), None)}
    check = train_projection.fit_lateral_check(filt, images, parts, y, {"lateral_quantile": 0.95})
    assert check["status"] == "fitted" and check["n_fit"] == 6 and check["n_calibration"] == 3
    val_scores = models.out_of_distribution(filt, images[14:17], None, "c").score
    assert check["threshold"] == filt.ood.threshold == val_scores.max()  # 0.95 of three scores: the highest

    bare = models.Component(filt.model, filt.standardizer)
    few = {"train": np.array([1] * 11 + [0]), "val": y["val"]}
    skipped = train_projection.fit_lateral_check(bare, images, parts, few, {"lateral_quantile": 0.95})
    assert skipped == {"status": "skipped", "reason": "1 training and 3 validation laterals (needs 2 and 1)"}
    assert bare.ood is None  # nothing to fit on: the network decides alone


def test_the_stage_s_figures_are_the_rule_s_and_the_filter_alone_s_beside_them():
    """filter_frontal and serving decide by a file's DICOM View Position first: the stage's recalls are that rule's
    (they were the network's alone, as if no file carried one); the filter's alone are reported under filter_only."""
    import keras

    from covidcxr import models, preprocess

    keras.utils.set_random_seed(5)
    images = np.random.default_rng(5).random((5, 32, 32)).astype(np.float32)
    filt = models.Component(models.build_vgg(16, (32, 32, 1), width=1 / 16, head=(4,)),
                            preprocess.Standardizer().fit(images), threshold={"threshold": 1.0})  # calls all lateral
    y = np.array([1, 1, 1, 0, 0])  # 1 = frontal
    source = np.array(["a", "a", "a", "a", "b"])
    views = np.array(["PA", "AP", None, "LL", float("nan")], dtype=object)  # the cache index's: NaN where none
    got = train_projection.split_figures(filt, images, y, source, views)
    assert got["by_header"] == 3 and got["n"] == 5
    assert got["frontal_accuracy"] == pytest.approx(2 / 3) and got["lateral_accuracy"] == 1.0
    assert got["by_source"]["a"] == {"frontal_recall": pytest.approx(2 / 3), "lateral_recall": 1.0, "n_frontal": 3,
                                     "n_lateral": 1, "frontal_refused": 1, "lateral_refused": 1}
    alone = got["filter_only"]
    assert "by_header" not in alone and alone["frontal_accuracy"] == 0.0 and alone["accuracy"] == 0.4
    assert alone["by_source"]["a"]["frontal_refused"] == 3


def test_unet_scores_include_the_cleaned_masks():
    truth = np.zeros((2, 16, 16), np.float32)
    truth[:, 4:12, 2:7] = truth[:, 4:12, 9:14] = 1
    prob = truth.copy()
    prob[:, 0, 15] = 0.9  # a speck the cleaning removes (third component)
    prob[:, 7, 4] = 0.1  # a hole it fills
    scores = train_unet.mask_scores(truth, prob, 0.5)
    assert scores["dice"] < 1.0 and scores["dice_clean"] == pytest.approx(1.0) and scores["iou_clean"] == 1.0
    assert scores["n"] == 2


def test_no_trial_in_a_study_of_its_own_tunes_nothing_and_says_so(tmp_path, monkeypatch):
    """`n_trials: 0` on the local sqlite file: no study, no data read; train_unet refuses to take tuned values from it
    and trains from params when told to."""
    from covidcxr import tuning
    from pipelines import _common, tune_unet

    p = _common.params("tune_unet", Path(__file__).resolve().parents[2] / _common.PARAMS_FILE)
    monkeypatch.delenv(tuning.STORAGE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # no cache, no split table here: a stage that read them would fail
    result = tune_unet.run({**p, "n_trials": 0})
    assert result["best_params"] is None and "nothing was tuned" in result["reason"]
    assert not (tmp_path / "artifacts/tune/optuna.db").exists()
    assert (tmp_path / "reports/tune_unet/trials.csv").read_text().startswith("number,state,value")
    unet = {"use_tuned": False, "epochs": 3}
    assert train_unet.effective_params(unet) == unet
    with pytest.raises(_common.ParamsError, match="use_tuned is true but artifacts/tune/unet.json holds no tuned"):
        train_unet.effective_params({**unet, "use_tuned": True})


def test_tuned_values_asked_for_and_absent_are_refused(tmp_path, monkeypatch):
    """`use_tuned: true` without artifacts/tune/unet.json trained from params and recorded their mask threshold as
    the tuned one (threshold source 'validation'); now it names the missing file."""
    from pipelines import _common

    monkeypatch.chdir(tmp_path)
    with pytest.raises(_common.ParamsError, match="use_tuned is true but artifacts/tune/unet.json does not exist"):
        train_unet.effective_params({"use_tuned": True, "epochs": 3, "mask_threshold": 0.5})


def test_exporting_a_study_that_does_not_exist_creates_none(tmp_path, monkeypatch):
    """`n_trials: 0` on a shared storage exports the study `covidcxr tune` workers filled; a mistyped study name
    created an empty study (and an MLflow parent run) in the team's database before failing. Now it names the
    problem, before any data is read, and the storage holds no study."""
    import optuna

    from covidcxr import tuning
    from pipelines import _common, tune_unet

    p = _common.params("tune_unet", Path(__file__).resolve().parents[2] / _common.PARAMS_FILE)
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv(tuning.STORAGE_ENV, shared)
    monkeypatch.chdir(tmp_path)  # no cache, no split table here: a stage that read them would fail otherwise
    with pytest.raises(_common.ParamsError, match=r"tune_unet.study 'unet-dmeo' is no study of sqlite:///"):
        tune_unet.run({**p, "study": "unet-dmeo", "n_trials": 0})
    assert optuna.get_all_study_names(storage=shared) == []


def test_the_mask_threshold_is_chosen_on_the_network_s_own_validation_dice():
    """A tuned mask threshold was the best of a short trial's network: the trained U-Net's own validation
    probabilities choose it again (ties to the one nearest the tuned value)."""
    from pipelines import train_unet

    truth = np.zeros((4, 8, 8), np.float32)
    truth[:, 2:6, 2:6] = 1.0
    prob = np.where(truth > 0, 0.3, 0.1).astype(np.float32)  # a less confident network: lungs at 0.3
    assert train_unet.choose_mask_threshold(truth, prob, prefer=0.5) == 0.3  # 0.15 to 0.3 all perfect: nearest 0.5
    assert train_unet.choose_mask_threshold(truth, prob, prefer=0.2) == 0.2
    confident = np.where(truth > 0, 0.9, 0.6).astype(np.float32)
    assert train_unet.choose_mask_threshold(truth, confident, prefer=0.5) == 0.65


def test_the_mask_threshold_is_chosen_on_the_cleaned_masks_segment_and_serving_use():
    """Specks of background at 0.5 and the lungs' top row at 0.3: the raw output's Dice chose 0.55 (no specks, no
    top row), but `segment` and serving clean the specks away, and their masks are best at 0.3 (the whole lungs)."""
    truth = np.zeros((4, 32, 32), np.float32)
    truth[:, 8:24, 4:12] = truth[:, 8:24, 20:28] = 1.0
    prob = np.where(truth > 0, 0.9, 0.05).astype(np.float32)
    prob[:, 8, 4:12] = prob[:, 8, 20:28] = 0.3
    prob[:, 0, ::2] = prob[:, 31, ::2] = 0.5  # 32 single-pixel specks: the cleaning keeps the two largest components
    raw = [float(np.mean(metrics.dice(truth, prob, threshold=float(t)))) for t in train_unet.MASK_THRESHOLDS]
    assert train_unet.MASK_THRESHOLDS[int(np.argmax(raw))] == 0.55  # what the old choice took
    assert train_unet.choose_mask_threshold(truth, prob, prefer=0.5) == 0.3
    assert train_unet.mask_scores(truth, prob, 0.3)["dice_clean"] == 1.0


EXPORT = """\
import json, pathlib, sys
best = pathlib.Path(sys.argv[1]).read_text()  # the shared study: outside the repository, out of DVC's sight
for path, text in (("artifacts/tune/unet.json", json.dumps({"best_value": best})),
                   ("reports/tune_unet/trials.csv", f"number,value\\n0,{best}\\n"),
                   ("reports/tune_unet/metrics.json", json.dumps({"best_value": best}))):
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(path).write_text(text)
"""


def test_dvc_never_restores_an_export_of_a_shared_study_from_its_run_cache(tmp_path):
    """DVC sees neither $COVIDCXR_OPTUNA_STORAGE nor the trials runners add to the study: an export run again with
    the same params, after more trials, was restored from DVC's run cache (saved by `dvc commit`, shared by
    `dvc push --run-cache`) with the old best. The stage's outputs, as dvc.yaml declares them, keep it out of the run
    cache (real dvc, on a stand-in command)."""
    declared = yaml.safe_load((Path(__file__).resolve().parents[2] / "dvc.yaml").read_text())["stages"]["tune_unet"]
    repo, study = tmp_path / "repo", tmp_path / "study.txt"
    repo.mkdir()
    (repo / "export.py").write_text(EXPORT)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"tune_unet": {
        "cmd": f"{sys.executable} export.py {study}", "deps": ["export.py"], "params": ["tune_unet"],
        "outs": declared["outs"], "metrics": declared["metrics"]}}}))

    def dvc(*args: str) -> None:
        run(["dvc", *args], repo, timeout=120)

    def export(n_trials: int) -> None:
        (repo / "params.yaml").write_text(yaml.safe_dump({"tune_unet": {"study": "unet-paper", "n_trials": n_trials}}))
        dvc("repro")

    dvc("init", "--no-scm", "-q")
    study.write_text("0.5")
    export(0)
    dvc("commit", "-f")  # what saves a run cache entry where DVC allows one
    export(4)  # another state of the stage (a demo study), recorded in dvc.lock
    study.write_text("0.9")  # runners added a better trial
    export(0)
    assert json.loads((repo / "artifacts/tune/unet.json").read_text())["best_value"] == "0.9"


def test_filter_frontal_and_segment_record_the_model_run_and_rules_they_applied(tmp_path, monkeypatch):
    """register could not tell whether the projection filter and U-Net it bundles made artifacts/frontal.csv and
    artifacts/masks, nor under which area rules: neither report said. They now record the folder's run id and (segment)
    min_area and max_area, which register checks (test_register)."""
    import pandas as pd

    from covidcxr import preprocess
    from pipelines import _common, filter_frontal, segment
    from tests.helpers import SIZE, build_bundle, phantom

    bundle = build_bundle(tmp_path / "bundle")  # its folders' run id: "test"
    monkeypatch.chdir(tmp_path)
    for part, folder in (("projection", _common.PROJECTION_MODEL), ("unet", _common.UNET_MODEL)):
        Path(folder).parent.mkdir(parents=True, exist_ok=True)
        Path(bundle[part]).rename(folder)
    images = np.stack([preprocess.resize(phantom(seed=s), SIZE) for s in range(3)])
    index = pd.DataFrame({"image_id": ["a", "b", "c"], "projection": "frontal", "header_view_position": "PA",
                          "has_mask": True})
    for folder in (_common.CACHE_DIR, _common.PROJECTION_CACHE_DIR):
        Path(folder).mkdir(parents=True)
        preprocess.save_cache(folder, index, images, images > 0.5)
    Path(_common.SPLITS_DIR).mkdir(parents=True)
    index[["image_id"]].assign(split="test").to_csv(_common.split_table("segmentation"), index=False)

    called = filter_frontal.run()
    masked = segment.run({"min_area": 0.05, "max_area": 0.8})
    assert called["projection_run_id"] == "test" and called["frontal"] == 3  # their DICOM view position decides
    assert (masked["unet_run_id"], masked["min_area"], masked["max_area"]) == ("test", 0.05, 0.8)
    assert json.loads(_common.FRONTAL_REPORT.read_text())["projection_run_id"] == "test"
    assert json.loads(_common.SEGMENT_REPORT.read_text())["unet_run_id"] == "test"
