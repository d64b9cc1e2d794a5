"""Stage `model_card` on small report fixtures against a throwaway sqlite MLflow registry with a registered version."""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from PIL import Image

from covidcxr.modelcard import ModelCardError
from pipelines import model_card

NAME = "covidcxr"
PARAMS = {"model_card": {"images": True, "gradcam_all_variants": True, "heldout_untouched": False}}
CLASSIFIER_RUN = "f" * 32  # the registered classifier's training run, which evaluate measured
SERVING = {"size": 64, "variant": "c", "frontal_threshold": 0.5, "min_area": 0.05, "max_area": 0.8, "min_age": 18.0}


def write(path: Path, content: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content) if not isinstance(content, str) else content)


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def evaluation(auc: float) -> dict:
    at = {"accuracy": 0.875, "sensitivity": 0.75, "specificity": 1.0, "precision": 1.0, "f1": 0.857, "roc_auc": auc,
          "average_precision": 0.9, "n": 8, "n_positive": 4, "tp": 3, "fn": 1, "tn": 4, "fp": 0}
    block = {"at_operating": at, "ci_at_operating": {"roc_auc": {"low": 0.701, "high": 1.0}}, "ece": 0.12}
    return {"operating_threshold": 0.4321, "test": block, "val": block, "run_id": CLASSIFIER_RUN}


@pytest.fixture
def project(tmp_path, monkeypatch, mlflow_db):
    """Reports of a finished run (two classifiers), split tables, a manifest, and version 1 of the model, registered."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{mlflow_db}")
    mlflow.set_tracking_uri(None)  # an earlier test's mlflow.set_tracking_uri would outrank the variable
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    for name, auc in (("c_vgg16", 0.9312), ("e_vgg16", 0.5)):
        write(tmp_path / f"reports/evaluate/{name}/metrics.json", evaluation(auc))
        write(tmp_path / f"reports/evaluate/{name}/roc.json", [{"fpr": 0, "tpr": 0}, {"fpr": 0, "tpr": 0.75},
                                                               {"fpr": 1, "tpr": 1}])
        write(tmp_path / f"reports/evaluate/{name}/pr.json", [{"recall": 1, "precision": 0.5}])
        write(tmp_path / f"reports/evaluate/{name}/reliability.json",
              [{"mean_predicted": 0.2, "observed_frequency": 0.0, "count": 4}])
        (tmp_path / "reports/explain/gradcam").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"reports/explain/gradcam/{name}.png").write_bytes(png(len(name) + int(auc * 10)))
    write(tmp_path / "reports/evaluate/summary.json", {"c_vgg16": {"test_auc": 0.9312}, "e_vgg16": {"test_auc": 0.5}})
    write(tmp_path / "reports/explain/metrics.json", {"c_vgg16": {"test": {"lung_mass_share": 0.61}}})
    write(tmp_path / "reports/audit/audit.json", {"status": "warn", "checks": [
        {"name": "lung_mass_share", "subject": "c_vgg16", "value": 0.61, "warn": 0.7, "fail": 0.5,
         "status": "warn", "reason": "under 70% of the heat map inside the lungs"}]})
    rows = [(f"IMG{i:02d}", f"PATIENT-{i // 2:02d}", "covid" if i % 4 < 2 else "negative",
             ("train", "val", "test")[(i // 2) % 3]) for i in range(12)]
    write(tmp_path / "artifacts/splits/covid.csv",
          "image_id,patient_id,label,split\n" + "".join(",".join(r) + "\n" for r in rows))
    write(tmp_path / "artifacts/manifest.csv", "image_id,path,source,patient_id\n" + "".join(
        f"{r[0]},data/demo/images/{r[1]}/{r[0]}.dcm,demo,{r[1]}\n" for r in rows))

    client = mlflow.MlflowClient()
    experiment = client.create_experiment("covidcxr-demo", artifact_location=str(tmp_path / "mlruns"))
    run = client.create_run(experiment, run_name="register-c_vgg16")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(NAME)
    version = client.create_model_version(NAME, source=f"runs:/{run.info.run_id}/covidcxr", run_id=run.info.run_id)
    client.set_registered_model_alias(NAME, "champion", version.version)
    write(tmp_path / "reports/register/registered.json",
          {"model_name": NAME, "version": int(version.version), "alias": "champion", "classifier": "c_vgg16",
           "selected_by": "val_roc_auc", "candidate_value": 0.95, "git_commit": "abc123", "data_version": "d41d8.dir",
           "serving": SERVING, "mask_threshold": 0.5, "experiment": "demo",
           "component_runs": {"projection": "a" * 32, "unet": "b" * 32, "classifier": CLASSIFIER_RUN},
           "candidates": [{"classifier": "c_vgg16", "val_roc_auc": 0.95, "heldout": 0.4567, "audit_status": "warn",
                           "chosen": True, "reason": "chosen: best worst held-out specificity (0.4567)"}],
           "heldout": {"figure": "worst held-out specificity", "select": ["site_c"],
                       "by_classifier": {"c_vgg16": 0.4567},
                       "sources": {"site_c": {"c_vgg16": {"n_covid": 0, "n_negative": 30, "specificity": 0.4567,
                                                          "specificity_low": 0.3, "specificity_high": 0.6,
                                                          "threshold": 0.4321, "used_to_choose": True}}}}})
    yield tmp_path, client, run.info.run_id
    mlflow.set_tracking_uri(None)


def test_stage_writes_the_card_and_logs_it_with_the_model(project):
    root, client, run_id = project
    result = model_card.run(PARAMS["model_card"])

    card = root / "reports/model_card/covidcxr-v1.html"
    page = card.read_text(encoding="utf-8")
    assert (root / "reports/model_card/index.html").read_text(encoding="utf-8") == page
    assert "Model card: covidcxr v1 (alias at registration: champion)" in page and "0.4321" in page and "64 px" in page
    assert "0.931" in page and "0.701" in page  # registered classifier's metrics and CI
    assert "no patient appears in more than one split" in page
    assert page.count("data:image/png;base64,") == 2  # the registered grid and the other variant's
    assert "under 70% of the heat map inside the lungs" in page and "0.457 [0.300, 0.600]" in page  # audit, held out
    assert "chosen: best worst held-out specificity" in page and "development figure" in page
    # register's selected_by reaches the card: validation chose (val_roc_auc), so no held-out row is said to have
    assert "the validation figure did (val roc_auc)" in page and "used to choose" not in page
    assert "synthetic phantoms" in page and run_id in page
    # the footer said "git commit unknown, data version unknown" whatever register recorded; now it says what it is
    assert "git commit abc123, data version d41d8.dir (SHA-256 of the manifest" in page
    assert "data version</td><td>d41d8.dir" in page and "split table the figures were computed on" in page
    assert "intended population</td><td>aged 18 and over: a DICOM giving a younger age is refused" in page
    for secret in ("PATIENT-", "IMG0", "data/demo/images"):  # no identifiers, no file paths of patient data
        assert secret not in page

    # Logged to the run that produced the registered version; the version points at it.
    assert result["run_id"] == run_id
    tag = client.get_model_version(NAME, "1").tags[model_card.TAG]
    assert tag == f"runs:/{run_id}/model_card/covidcxr-v1.html" == result["artifact_uri"]
    logged = mlflow.artifacts.download_artifacts(tag, dst_path=str(root / "download"))
    assert Path(logged).read_text(encoding="utf-8") == page


def test_the_card_judges_each_ci_by_the_bootstrap_s_resamples(project):
    """`evaluate.n_boot` reaches the card: a CI whose metric was undefined in most resamples is not shown."""
    root, _, _ = project
    report = evaluation(0.9312)
    report["test"] = {**report["test"], "ci_at_operating": {
        "roc_auc": {"low": 0.701, "high": 1.0, "n_skipped": 0},
        "sensitivity": {"low": 0.5, "high": 1.0, "n_skipped": 300}}}
    write(root / "reports/evaluate/c_vgg16/metrics.json", report)
    model_card.run(PARAMS["model_card"], n_boot=500)
    page = (root / "reports/model_card/index.html").read_text(encoding="utf-8")
    assert "500 resamples" in page and "undefined in 60% of resamples" in page and "300 of 500" in page


def test_a_card_of_data_that_is_not_public_holds_no_radiograph(project):
    """The Grad-CAM grids are test films with whatever text is burned into them: `images: false` leaves every one out
    and the card says why."""
    root, _, _ = project
    model_card.run({**PARAMS["model_card"], "images": False})
    page = (root / "reports/model_card/index.html").read_text(encoding="utf-8")
    assert "data:image" not in page and "<img" not in page
    assert "Grad-CAM grids left out of this card" in page and "burned into a film" in page


def test_missing_audit_and_heldout_results_are_stated(project):
    root, _, _ = project
    (root / "reports/audit/audit.json").unlink()
    registered = json.loads((root / "reports/register/registered.json").read_text())
    write(root / "reports/register/registered.json", {**registered, "heldout": None})
    model_card.run(PARAMS["model_card"])
    page = (root / "reports/model_card/index.html").read_text(encoding="utf-8")
    assert "audit not run" in page and "No held-out-source results for this model's settings" in page


def test_bad_inputs_name_the_file(project):
    root, _, _ = project
    write(root / "reports/audit/audit.json", "{not json")
    with pytest.raises(ModelCardError, match=r"reports/audit/audit.json: not valid JSON"):
        model_card.run(PARAMS["model_card"])
    registered = json.loads((root / "reports/register/registered.json").read_text())
    write(root / "reports/register/registered.json", {**registered, "version": 7})
    with pytest.raises(ModelCardError, match="covidcxr v7, which the registry"):
        model_card.run(PARAMS["model_card"])
    assert not (root / "reports/model_card").exists()


def test_figures_of_other_weights_than_the_registered_ones_are_refused_naming_both_runs(project):
    """Nothing tied evaluate's figures to the registered weights: a classifier retrained and evaluated again after
    register got a card of the new weights' figures for the old weights."""
    root, _, _ = project
    write(root / "reports/evaluate/c_vgg16/metrics.json", {**evaluation(0.9312), "run_id": "e" * 32})
    with pytest.raises(ModelCardError, match=f"measured the weights of run {'e' * 32}, but covidcxr v1 bundles those "
                                             f"of run {CLASSIFIER_RUN}"):
        model_card.run(PARAMS["model_card"])
    write(root / "reports/evaluate/c_vgg16/metrics.json", {k: v for k, v in evaluation(0.9312).items()
                                                           if k != "run_id"})
    with pytest.raises(ModelCardError, match=r"metrics.json \(run_id\) does not say which classifier run"):
        model_card.run(PARAMS["model_card"])
    assert not (root / "reports/model_card").exists()


def test_a_registration_that_records_no_classifier_run_is_refused_naming_it(project):
    """registered.json without component_runs (written before register recorded them): the card's figures cannot be
    checked against the registered weights, and the error says which file lacks what, and the report's run."""
    root, _, _ = project
    path = root / "reports/register/registered.json"
    registered = json.loads(path.read_text())
    write(path, {k: v for k, v in registered.items() if k != "component_runs"})
    with pytest.raises(ModelCardError, match=r"registered.json \(component_runs\) does not say which classifier run "
                                             rf"covidcxr v1 bundles .*figures of run {CLASSIFIER_RUN} cannot be "
                                             r"checked.*rerun evaluate and register"):
        model_card.run(PARAMS["model_card"])
    assert not (root / "reports/model_card").exists()


def test_the_intended_population_of_a_model_registered_before_the_age_limit_is_any_age():
    registered = {"model_name": NAME, "version": "1", "classifier": "c_vgg16",
                  "serving": {k: v for k, v in SERVING.items() if k != "min_age"}}
    assert model_card.model_facts(registered, {}, "run")["intended_population"] == "any age"
