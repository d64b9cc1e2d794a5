"""The data stages of the real `dvc repro` on the real chest X-ray corpus (params pointing at COVIDCXR_REAL_DATA)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from covidcxr import datasets
from tests.pipelines.conftest import run

pytestmark = pytest.mark.slow


def test_data_stages_on_real_corpus(project: Path, real_data: Path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ingest"]["sources"] = [
        {"name": "cohen", "root": str(real_data / "cohen")},
        {"name": "kermany", "root": str(real_data / "kermany")},
        {"name": "montgomery", "root": str(real_data / "montgomery_shenzhen")},
        {"name": "shenzhen", "root": str(real_data / "montgomery_shenzhen")},
    ]
    params["split"]["experiment"] = "comparison"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (project / "data").mkdir()  # the pipeline's declared data folder (unused by these params)
    run(["dvc", "repro", "split"], project)

    summary = json.loads((project / "reports/ingest/summary.json").read_text())
    # All of it: 560 Cohen X-rays, 773 Kermany images, 556 Montgomery/Shenzhen pairs, nothing lost.
    assert summary["listed"] == 560 + 773 + 556
    assert summary["accepted"] + summary["rejected"] + summary["duplicates"] == summary["listed"]
    rejects = pd.read_csv(project / "reports/ingest/rejects.csv")
    assert set(rejects["kind"]) <= {"image", "mask"} and summary["rejected"] == (rejects["kind"] == "image").sum()
    duplicates = pd.read_csv(project / "reports/ingest/duplicates.csv")
    assert len(duplicates) == summary["duplicates"] >= 1  # the corpus holds byte-identical copies

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


def test_every_experiment_selects_its_data_on_real_corpus(real_data: Path):
    """Each overlay of experiments/ (python -m pipelines.experiment NAME) finds both classes, and every held-out
    source of leave-one-source-out leaves both classes to train on; the U-Net's masks split as the overlay says."""
    from covidcxr import splits
    from pipelines import experiment

    selections = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())["split"]
    loaded: dict[str, pd.DataFrame] = {}  # the overlays share their sources: read each once
    for name in experiment.available():
        spec = experiment.load(name)
        params = experiment._substitute(spec["params"], real_data)
        for s in params["ingest.sources"]:
            loaded.setdefault(json.dumps(s, sort_keys=True), datasets.load(s["name"], s["root"]))
        m = pd.concat([loaded[json.dumps(s, sort_keys=True)] for s in params["ingest.sources"]], ignore_index=True)
        rules = selections["experiments"][params["split.experiment"]]
        covid = splits.select_experiment(m, rules["positives"], rules["negatives"])
        assert (covid["label"] == "covid").sum() >= 300 and (covid["label"] == "negative").sum() >= 300, name
        held_out = dict(experiment._named((spec.get("matrix") or {}).get("split.holdout", {})))
        held_out |= dict(experiment._named((spec.get("heldout") or {}).get("matrix", {})))
        for label, rules in held_out.items():
            split = splits.split_with_holdout(covid, rules, fractions={"train": 0.75, "val": 0.25})
            assert set(covid.loc[split == "train", "label"]) == {"covid", "negative"}, (name, label)
            test = covid[split == "test"]
            if label == "hospitals":  # held-out hospitals with both classes: a real AUC
                assert (test["label"] == "covid").sum() >= 50 and (test["label"] == "negative").sum() >= 50
                assert set(test.loc[test["source"] == "cohen", "site"]) == {"Germany"}
            else:
                assert set(test["source"]) == {label}, (name, label)
        seg = m[m["mask_path"].notna()]
        external = params["split.segmentation_external"]
        if external:  # Cohen's V7 masks test a U-Net that learned from Montgomery's and Shenzhen's
            split = splits.split_with_holdout(seg, [{"source": s} for s in external], holdout_split="external")
            assert set(seg.loc[split == "external", "source"]) == {"cohen"}, name
            assert set(seg.loc[split == "train", "source"]) == {"montgomery", "shenzhen"}, name
        else:  # every source's masks, split by patient: each source in train and in test
            split = splits.split_patients(seg, seed=42)
            for part in ("train", "test"):
                assert set(seg.loc[split == part, "source"]) == {"cohen", "montgomery", "shenzhen"}, (name, part)
