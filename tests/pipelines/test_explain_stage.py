"""The explain stage on a tiny project of its own (an untrained 32 px classifier, phantom films): with
``explain.images: false`` it measures the same figures and writes and logs no image of a film."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidcxr import models, phantoms, preprocess
from pipelines import _common
from pipelines import explain as stage
from tests.helpers import SIZE, save_component

N = 12  # 6 validation, 6 test films, alternately COVID-19 and negative
CLASSIFIERS = {"variants": ["c"], "backbones": ["vgg16"]}


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    """What explain reads: the manifest and its original files, the working-size cache, the lung masks, and the
    c_vgg16 folder with predictions whose scores put TP, FN, TN and FP films in the test split."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    films, lungs, rows = [], [], []
    for i in range(N):
        image, mask = phantoms.chest_phantom(rng, 64, projection="frontal", covid=bool(i % 2), site={})
        path = tmp_path / "films" / f"f{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.round(255 * np.clip(image, 0, 1)).astype(np.uint8)).save(path)
        films.append(preprocess.resize(image, SIZE))
        lungs.append(preprocess.resize(mask.astype(np.float32), SIZE) >= 0.5)
        rows.append({"image_id": f"demo/f{i}", "path": str(path)})
    images, masks = np.stack(films).astype(np.float32), np.stack(lungs)
    index = pd.DataFrame(rows)[["image_id"]]
    Path(_common.CACHE_DIR).mkdir(parents=True)
    preprocess.save_cache(_common.CACHE_DIR, index, images, masks)
    Path(_common.MASKS_DIR).mkdir(parents=True)
    np.save(_common.MASKS, masks.astype(np.float32))
    pd.DataFrame(rows).to_csv(_common.MANIFEST, index=False)
    folder = Path(_common.model_dir("c", "vgg16"))
    save_component(folder, models.build_vgg(16, (SIZE, SIZE, 1), width=1 / 32, head=(4,)), images, threshold=0.5)
    pd.DataFrame({"image_id": index["image_id"], "split": ["val"] * 6 + ["test"] * 6,
                  "label": ["covid", "negative"] * 6,
                  "score": [0.9, 0.1, 0.2, 0.8, 0.7, 0.3] * 2}).to_csv(folder / _common.PREDICTIONS, index=False)
    return tmp_path


def run_with(images: bool, store: Path, monkeypatch) -> tuple[dict, mlflow.entities.Run]:
    """The stage with ``explain.images`` set, tracking into ``store``; its summary and the classifier's MLflow run."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    summary = stage.run({"per_group": 1, "display_size": 64, "images": images}, CLASSIFIERS, "demo")
    (found,) = mlflow.search_runs(experiment_names=[_common.mlflow_experiment("demo")], output_format="list")
    return summary, found


def test_with_images_off_the_figures_are_measured_and_no_film_is_written_or_logged(
        project, mlflow_db, _empty_mlflow_store, tmp_path, monkeypatch):
    drawn, drawn_run = run_with(True, mlflow_db, monkeypatch)
    grids = project / "reports/explain/gradcam"
    assert sorted(p.name for p in grids.iterdir()) == ["c_vgg16.png"]  # the setup draws a film's grid when asked
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(drawn_run.info.run_id, "gradcam")] == [
        "gradcam/c_vgg16.png"]

    second = tmp_path / "second.db"  # a store of its own: the first run's artifact is not this run's
    shutil.copyfile(_empty_mlflow_store, second)
    summary, run = run_with(False, second, monkeypatch)

    assert summary == drawn  # every figure, as with images
    assert json.loads((project / _common.EXPLAIN_METRICS).read_text()) == json.loads(json.dumps(drawn))
    assert summary["c_vgg16"]["val"]["n_maps"] == 6 and summary["c_vgg16"]["test"]["n_maps"] == 6
    assert sorted(p.name for p in grids.iterdir()) == [stage.IMAGES_OFF]  # the earlier run's grid is gone
    assert "explain.images is false" in (grids / stage.IMAGES_OFF).read_text()
    assert not [p for p in project.joinpath("reports").rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    assert mlflow.MlflowClient().list_artifacts(run.info.run_id) == []
    assert {k for k in run.data.metrics if k.startswith("gradcam.val.")} >= {"gradcam.val.n_maps"}
