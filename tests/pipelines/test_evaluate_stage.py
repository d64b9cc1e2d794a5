"""The evaluate stage run on a model folder's predictions: the paper's table of the network's own output at 0.5, the
metrics logged to MLflow as strict JSON, and what serving answers counting the films it refuses before scoring."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from covidcxr import metrics
from pipelines import _common
from pipelines import evaluate as stage

P = {"n_boot": 20, "seed": 0, "calibration_bins": 5, "site_calibration": {"n_per_class": 20, "draws": 10}}
# The calibration moves every score below 0.5: at 0.5 the served score calls nothing, the network's output calls the
# COVID-19 films of val and one of the test split's negatives (a split without positives: sensitivity, F1, AUC NaN).
PRED = pd.DataFrame({
    "split": ["val"] * 4 + ["test"] * 3,
    "label": ["covid", "negative", "covid", "negative", "negative", "negative", "negative"],
    "raw_score": [0.6, 0.4, 0.7, 0.45, 0.6, 0.2, 0.3],
    "score": [0.3, 0.2, 0.35, 0.25, 0.3, 0.1, 0.2],
    "patient_id": [f"p{i}" for i in range(7)],
})
# The films serving refuses before the classifier (train_classifier's refused.csv): no score, a reason.
REFUSED = pd.DataFrame({
    "image_id": [f"r{i}" for i in range(4)], "patient_id": [f"q{i}" for i in range(4)],
    "split": ["train", "val", "test", "test"], "label": ["covid", "negative", "negative", "covid"],
    "reason": ["lateral_view", "lung_mask_too_large", "lateral_view", "empty_lung_mask"],
})


def _strict(constant: str) -> float:
    raise ValueError(f"not strict JSON: {constant}")


@pytest.fixture
def evaluated(tmp_path: Path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    model_folder(PRED)
    return stage.run(P, {"variants": ["c"], "backbones": ["vgg16"]}, "demo", "flag")


def model_folder(pred: pd.DataFrame) -> Path:
    """c_vgg16's folder (in the current directory) with ``pred`` as its predictions and :data:`REFUSED`."""
    folder = Path(_common.model_dir("c", "vgg16"))
    folder.mkdir(parents=True)
    (folder / "model.keras").write_bytes(b"")
    (folder / "standardizer.json").write_text("{}")
    (folder / "run.json").write_text(json.dumps({"run_id": "0" * 32}))
    (folder / "threshold.json").write_text(json.dumps({"threshold": 0.28, "objective": "sensitivity",
                                                       "min_sensitivity": 0.9}))
    pred.to_csv(folder / _common.PREDICTIONS, index=False)
    REFUSED.to_csv(folder / _common.REFUSED, index=False)
    return folder


def test_the_paper_table_thresholds_the_network_s_output_at_0_5(evaluated):
    table = pd.read_csv(stage.OUT / "comparison.csv").set_index("split")
    for split in ("val", "test"):
        part = PRED[PRED["split"] == split]
        network = metrics.classification_metrics(part["label"] == "covid", part["raw_score"], threshold=0.5)
        assert evaluated["c_vgg16"][split]["network_at_0.5"] == pytest.approx(network, nan_ok=True)
        assert table.loc[split, ["Accuracy", "Sensitivity", "Specificity", "F1 Score"]].tolist() == pytest.approx(
            [network[k] for k in ("accuracy", "sensitivity", "specificity", "f1")], nan_ok=True)
    # the calibrated score at 0.5, kept beside it, is another operating point
    assert (table.loc["val", "Sensitivity"], evaluated["c_vgg16"]["val"]["at_0.5"]["sensitivity"]) == (1.0, 0.0)
    assert (table.loc["test", "Specificity"], evaluated["c_vgg16"]["test"]["at_0.5"]["specificity"]) == (
        pytest.approx(2 / 3), 1.0)
    header = (stage.OUT / "comparison.md").read_text().splitlines()[0]
    assert "the network's output at threshold 0.5, as the paper" in header


def test_the_logged_metrics_are_strict_json_with_an_undefined_metric_as_null(evaluated):
    (found,) = mlflow.search_runs(experiment_names=["covidcxr-demo"], output_format="list")
    path = mlflow.artifacts.download_artifacts(run_id=found.info.run_id, artifact_path="evaluation/metrics.json")
    logged = json.loads(Path(path).read_text(), parse_constant=_strict)
    assert logged == json.loads((stage.OUT / "c_vgg16" / "metrics.json").read_text(), parse_constant=_strict)
    assert logged["test"]["at_0.5"]["sensitivity"] is None and logged["test"]["network_at_0.5"]["f1"] is None
    # which weights the figures measured (the folder's run), so register refuses them for other weights
    assert logged["run_id"] == evaluated["c_vgg16"]["run_id"] == "0" * 32


def test_served_counts_every_film_of_the_split_and_the_metrics_only_those_scored(evaluated):
    """A film serving refuses before the classifier counts as refused, with its reason, in what serving answers (they
    were counted nowhere); the threshold metrics stay on the scored films, and ``films`` says how many each covers."""
    test = evaluated["c_vgg16"]["test"]
    assert test["films"] == {"n": 5, "scored": 3,
                             "refused_before_scoring": {"empty_lung_mask": 1, "lateral_view": 1}}
    served = test["served"]  # ood_action flag: none refused as out of distribution
    assert (served["n"], served["n_positive"], served["n_negative"], served["refused"]) == (5, 1, 4, 2)
    assert served["refused_by_reason"] == {"empty_lung_mask": 1, "lateral_view": 1}
    assert served["negatives_called_covid"] == pytest.approx(1 / 4)  # 0.3 >= 0.28, of 4 negatives, not of 3
    assert served["negatives_refused"] == pytest.approx(1 / 4) and served["positives_refused"] == 1.0
    assert test["at_operating"]["n"] == test["at_0.5"]["n"] == 3
    val = evaluated["c_vgg16"]["val"]
    assert val["films"]["n"] == val["served"]["n"] == 5 and val["at_operating"]["n"] == 4


def test_a_folder_without_its_refused_films_is_an_error_naming_the_file(tmp_path, monkeypatch):
    """Without refused.csv (a folder written before train_classifier wrote it) the served figures would leave the
    films refused before scoring out again."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"refused\.csv: no such file .* rerun train_classifier"):
        stage.read_refused(tmp_path / _common.REFUSED)
    REFUSED.drop(columns="reason").to_csv(tmp_path / _common.REFUSED, index=False)
    with pytest.raises(ValueError, match=r"refused\.csv: no column\(s\) \['reason'\]"):
        stage.read_refused(tmp_path / _common.REFUSED)


def test_a_split_whose_every_film_was_refused_before_scoring_is_an_error_naming_the_classifier_s_files(
        tmp_path, monkeypatch):
    """The test split's films all refused before scoring (none in predictions.csv): no threshold metric to measure,
    and the error says which classifier's files hold them."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    folder = model_folder(PRED[PRED["split"] == "val"])
    refused, scored = (re.escape(str(folder / name)) for name in (_common.REFUSED, _common.PREDICTIONS))
    with pytest.raises(ValueError, match=rf"^{refused} and {scored}: split\(s\) \['test'\] hold films refused "
                                         "before scoring and none scored"):
        stage.run(P, {"variants": ["c"], "backbones": ["vgg16"]}, "demo", "flag")
