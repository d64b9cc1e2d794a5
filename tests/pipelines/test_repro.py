"""End to end: the real `dvc repro` on the demo data with tiny params, as a user's `make run` does it."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.pipelines.conftest import ROOT, run

pytestmark = pytest.mark.slow

TINY = {
    "cache": {"size": 32},
    "train_projection": {"epochs": 2, "width": 0.0625},
    "tune_unet": {"n_trials": 2, "epochs": 1},
    "train_unet": {"epochs": 2, "f0": 4, "use_tuned": False},
    "train_classifier": {"epochs": 2, "width": 0.0625},
    "evaluate": {"n_boot": 50},
    "explain": {"per_group": 1},
}


def set_params(project: Path, changes: dict) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def test_dvc_repro_on_demo_data(project: Path):
    run(["covidcxr", "demo-data", "data/demo"], project)
    # The generator is byte-deterministic: adding the data reproduces the committed data.dvc exactly.
    run(["dvc", "add", "data"], project)
    assert (project / "data.dvc").read_text() == (ROOT / "data.dvc").read_text()

    set_params(project, TINY)
    out = run(["dvc", "repro"], project)
    for stage in ("ingest", "cache", "train_projection", "filter_frontal", "train_unet", "segment",
                  "train_classifier@e-vgg19", "evaluate", "explain"):
        assert f"Running stage '{stage}'" in out.stdout, stage
    for stage in ("validate", "split"):  # outputs committed and inputs identical: DVC rightly skips them
        assert f"Running stage '{stage}'" in out.stdout or f"Stage '{stage}' didn't change" in out.stdout, stage

    # Nothing lost: every listed file is in the manifest or in the rejects, with its reason.
    manifest = pd.read_csv(project / "artifacts/manifest.csv")
    rejects = pd.read_csv(project / "reports/ingest/rejects.csv")
    listed = pd.read_csv(project / "data/demo/labels.csv")
    assert manifest["image_id"].is_unique
    assert set(rejects.loc[rejects["kind"] == "image", "reason"]) == {"truncated", "zero_variance"}
    assert len(manifest) + (rejects["kind"] == "image").sum() == len(listed)
    splits = pd.read_csv(project / "artifacts/splits/covid.csv")
    assert (splits.groupby("patient_id")["split"].nunique() == 1).all()

    # Every model stage produced its model, metrics and reports.
    for variant in "cde":
        for backbone in ("vgg16", "vgg19"):
            d = project / f"artifacts/models/classifier_{variant}_{backbone}"
            assert {"model.keras", "standardizer.json", "threshold.json", "predictions.csv", "run.json"} <= {
                p.name for p in d.iterdir()}
            assert (project / f"reports/explain/gradcam/{variant}_{backbone}.png").stat().st_size > 1000
    table = pd.read_csv(project / "reports/evaluate/comparison.csv")
    assert set(table["Part"]) == {"c", "d", "e"}
    unet = json.loads((project / "reports/train_unet/metrics.json").read_text())
    assert {"dice", "iou", "paper_pixel_dice"} <= set(unet["val"])

    # Standardizers are fitted on the training split only.
    for variant in "cde":
        std = json.loads((project / f"artifacts/models/classifier_{variant}_vgg16/standardizer.json").read_text())
        pred = pd.read_csv(project / f"artifacts/models/classifier_{variant}_vgg16/predictions.csv")
        assert std["n_images"] == (pred["split"] == "train").sum()

    metrics = run(["dvc", "metrics", "show", "--json"], project).stdout
    assert "test_auc" in metrics and "lung_mass_share" in metrics
    plots = run(["dvc", "plots", "show", "-o", "plots_html"], project)
    html = (project / "plots_html" / "index.html").read_text()
    assert "vega" in html and "<script src" not in html  # renders offline: libraries inlined, no CDN

    # Clean afterwards, and a second repro does nothing.
    assert json.loads(run(["dvc", "status", "--json"], project).stdout or "{}") == {}
    assert "Running stage" not in run(["dvc", "repro"], project).stdout

    # MLproject entry points run through mlflow itself.
    run(["mlflow", "run", ".", "-e", "evaluate", "--env-manager", "local"], project)

    # The data stages do not depend on model params: their results equal the committed ones (determinism).
    for name in ("reports/ingest/summary.json", "reports/split/summary.json", "reports/validate/manifest.json"):
        assert (project / name).read_text() == (ROOT / name).read_text(), name

    # MLflow recorded one run per model in the experiment's store, with the reproducibility tags.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("covidcxr-demo")
    runs = client.search_runs([experiment.experiment_id])
    names = {r.info.run_name for r in runs}
    assert {"projection-vgg19", "unet-f04", "classifier-c-vgg16", "classifier-e-vgg19"} <= names
    classifier = next(r for r in runs if r.info.run_name == "classifier-d-vgg16")
    assert classifier.data.tags["data_version"] == yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]["md5"]
    assert "eval.test.at_0.5.roc_auc" in classifier.data.metrics or "eval.test.at_0.5.accuracy" in classifier.data.metrics

    # The register stage ran with the others; then the registry and the served model (tests/pipelines/test_serve.py).
    assert "Running stage 'register'" in out.stdout
    from tests.pipelines.test_serve import check_register_and_serve

    check_register_and_serve(project)
