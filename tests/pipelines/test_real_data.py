"""The data stages of the real `dvc repro` on the real chest X-ray corpus (params pointing at COVIDCXR_REAL_DATA)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from covidcxr import datasets
from tests.pipelines.conftest import copy_project, run

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def real_project(tmp_path_factory: pytest.TempPathFactory, real_data: Path) -> Path:
    """A project copy after `dvc repro split` on the four real sources, salted as the experiments salt them: its
    manifest is the one every experiment overlay ingests, so the overlays' test reads it instead of ingesting the
    corpus again (a file's tests share one worker)."""
    project = copy_project(tmp_path_factory.mktemp("real") / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ingest"]["sources"] = [
        {"name": "cohen", "root": str(real_data / "cohen")},
        {"name": "kermany", "root": str(real_data / "kermany")},
        {"name": "montgomery", "root": str(real_data / "montgomery_shenzhen")},
        {"name": "shenzhen", "root": str(real_data / "montgomery_shenzhen")},
    ]
    params["ingest"]["salt"] = "covidcxr-real"
    params["split"]["experiment"] = "comparison"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (project / "data").mkdir()  # the pipeline's declared data folder (unused by these params)
    run(["dvc", "repro", "split"], project)
    return project


def test_data_stages_on_real_corpus(real_project: Path, real_data: Path):
    project = real_project

    summary = json.loads((project / "reports/ingest/summary.json").read_text())
    # All of it: 560 Cohen X-rays, 773 Kermany images, 556 Montgomery/Shenzhen pairs, nothing lost.
    assert summary["listed"] == 560 + 773 + 556
    assert summary["accepted"] + summary["rejected"] + summary["duplicates"] + summary["missing"] == summary["listed"]
    rejects = pd.read_csv(project / "reports/ingest/rejects.csv")
    assert set(rejects["kind"]) <= {"image", "mask"} and summary["rejected"] == (rejects["kind"] == "image").sum()
    duplicates = pd.read_csv(project / "reports/ingest/duplicates.csv")
    assert len(duplicates) == summary["duplicates"] >= 1  # the corpus holds byte-identical copies
    # no two patients' films within manifest.NEAR_DUPLICATE_DISTANCE (the closest are 0.059 apart): nothing listed
    assert summary["near_duplicates"] == 0 and pd.read_csv(project / "reports/ingest/near_duplicates.csv").empty

    manifest = pd.read_csv(project / "artifacts/manifest.csv")
    assert manifest["sha256"].is_unique
    assert (manifest["source"] == "cohen").sum() + (duplicates["image_id"].str.startswith("cohen/")).sum() \
        + (rejects[rejects["kind"] == "image"]["source"] == "cohen").sum() == 560
    assert (manifest.loc[manifest["source"] == "cohen", "projection"] == "lateral").sum() >= 38
    raw = set(datasets.load("cohen", real_data / "cohen")["patient_id"])
    assert raw.isdisjoint(manifest["patient_id"])  # pseudonymised
    assert manifest["patient_id"].str.fullmatch(r"(cohen|kermany|montgomery|shenzhen):[0-9a-f]{16}").all()

    split = pd.read_csv(project / "artifacts/splits/covid.csv")
    assert set(split["label"]) == {"covid", "negative"}
    assert (split.groupby("patient_id")["split"].nunique() == 1).all()
    checks = json.loads((project / "reports/split/validation.json").read_text())
    assert checks["n_critical_failed"] == 0


def test_every_experiment_splits_its_data_on_real_corpus(real_data: Path, real_project: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    """Every run of every overlay of experiments/ (python -m pipelines.experiment NAME, its held-out runs included)
    through the split stage's own rules (:func:`pipelines.split.task_tables`) on the manifest the ingest stage makes
    of the real corpus (patient keys merged across byte-identical files): each selection finds both classes, leaves
    both to train on, and no patient the held-out rules match is in the train or val split of any task (the
    classifier's, the projection filter's, the U-Net's); the U-Net's masks split as the overlay says."""
    from covidcxr import manifest, splits
    from pipelines import _params, experiment, ingest
    from pipelines import split as split_stage

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    defaults = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())

    def section(name: str, params: dict) -> dict:
        given = {k.partition(".")[2]: v for k, v in params.items() if k.partition(".")[0] == name}
        return _params.validate(name, {**defaults[name], **given}, source=f"{name} of an overlay's run")

    # The overlays share their sources: ingest each set once; the set `real_project`'s ingest stage ran is read there
    staged = _params.validate("ingest", yaml.safe_load((real_project / "params.yaml").read_text())["ingest"])
    manifests: dict[str, pd.DataFrame] = {
        json.dumps(staged, sort_keys=True, default=str): manifest.read_csv(real_project / ingest.MANIFEST)}
    ingested: set[str] = set()  # the overlays' sets of sources
    checked: set[str] = set()
    for name in experiment.available():
        spec = experiment.load(name)
        for run_name, params in experiment.runs(name, spec) + experiment.heldout_runs(name, spec):
            params = experiment._substitute(params, real_data)
            ingest_p, split_p = section("ingest", params), section("split", params)
            sources = json.dumps(ingest_p, sort_keys=True, default=str)
            ingested.add(sources)
            if sources not in manifests:
                workdir = tmp_path / f"ingest-{len(manifests)}"
                workdir.mkdir()
                monkeypatch.chdir(workdir)
                ingest.run(ingest_p)
                manifests[sources] = manifest.read_csv(workdir / ingest.MANIFEST)
            key = json.dumps([sources, split_p], sort_keys=True, default=str)
            if key in checked:  # the ablation's levers share a handful of selections
                continue
            checked.add(key)
            m = manifests[sources]
            tables, _ = split_stage.task_tables(m, split_p)
            suites = split_stage.check_tables(tables, split_p, m, str(ROOT / "expectations"))
            failed = [(s.name, e.label, e.examples) for s in suites for e in s.critical_failed]
            assert not failed, (run_name, failed)  # both classes (frontal and lateral too) in every split
            covid = tables["covid"]
            counts = covid["label"].value_counts().reindex(["covid", "negative"], fill_value=0)
            least = 50 if split_p["experiment"] == "cohen-pneumonia" else 300  # Cohen's other pneumonias: under 100
            assert counts.min() >= least, (run_name, dict(counts))
            assert set(covid.loc[covid["split"] == "train", "label"]) == {"covid", "negative"}, run_name
            held = set(m.loc[splits.rule_matches(m, split_p["holdout"] or []), "patient_id"])
            for task, table in tables.items():
                learned = table[table["split"].isin(["train", "val"])]
                assert not set(learned["patient_id"]) & held, (run_name, task)
            if held:  # the held-out patients' covid-task films are all test, and those of hospitals both classes
                rows = covid[covid["patient_id"].isin(held)]
                assert len(rows) and set(rows["split"]) == {"test"}, run_name
                if run_name.endswith("hospitals"):  # a real AUC
                    assert rows["label"].value_counts().reindex(["covid", "negative"]).min() >= 50, run_name
            seg = tables["segmentation"].assign(source=lambda t: t["label"])  # labelled by source
            external = set(split_p["segmentation_external"])
            trained = set(seg.loc[seg["split"] == "train", "source"])
            assert external <= set(seg.loc[seg["split"] == "external", "source"]), run_name
            assert trained and not trained & external, run_name
            if not external and not held:  # every source's masks, split by patient: each source in train and test
                for part in ("train", "test"):
                    assert set(seg.loc[seg["split"] == part, "source"]) == {"cohen", "montgomery", "shenzhen"}, \
                        (run_name, part)
    assert len(ingested) == 1 and len(checked) >= 10  # every overlay ingests the four sources; the selections
