"""pipelines._tracking: where a stage logs its runs."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from pipelines import _tracking

CLUSTER = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}


@pytest.mark.parametrize(("index", "chief"), [(0, True), (1, False)])
def test_only_the_chief_worker_logs_to_the_team_store(monkeypatch, tmp_path: Path, index: int, chief: bool):
    team = f"sqlite:///{tmp_path / 'team.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": CLUSTER, "task": {"type": "worker", "index": index}}))
    previous = mlflow.get_tracking_uri()
    try:
        _tracking.setup_tracking()
        uri = mlflow.get_tracking_uri()
    finally:
        mlflow.set_tracking_uri(previous)
    assert (uri == team) is chief
    if not chief:
        assert uri.startswith("sqlite:///") and "covidcxr-worker-mlruns-" in uri


def write_data(root: Path, splits: list[str], sha: str = "ab" * 32) -> None:
    """A manifest of two images and the covid split table over them, where a stage reads them."""
    from pipelines import _common

    (root / _common.SPLITS_DIR).mkdir(parents=True, exist_ok=True)
    (root / _common.MANIFEST).write_text(f"image_id,path,sha256\na,a.png,{sha}\nb,b.png,{'cd' * 32}\n")
    rows = "".join(f"{i},p{i},covid,{s}\n" for i, s in zip("ab", splits, strict=True))
    (root / _common.split_table("covid")).write_text("image_id,patient_id,label,split\n" + rows)


def test_the_data_version_is_of_the_manifest_and_split_the_figures_were_computed_on(tmp_path, monkeypatch):
    """data.dvc does not track the real corpus: every real-data version carried the hash of an empty folder listing.
    The data version hashes the manifest and the split table, and a champion of other data is no yardstick."""
    from covidcxr import selection
    from pipelines import register

    monkeypatch.chdir(tmp_path)
    write_data(tmp_path, ["train", "val"])
    first = _tracking.repro_tags("register", "demo")
    write_data(tmp_path, ["val", "train"])  # another split seed or selection
    other_split = _tracking.repro_tags("register", "demo")["data_version"]
    write_data(tmp_path, ["train", "val"], sha="ef" * 32)  # another download of the same names
    other_corpus = _tracking.repro_tags("register", "demo")["data_version"]
    write_data(tmp_path, ["train", "val"])
    again = _tracking.repro_tags("register", "demo")["data_version"]
    assert len({first["data_version"], other_split, other_corpus}) == 3 and again == first["data_version"]
    assert first["data_dvc"] == "unknown"  # no data.dvc here: it is kept under its own tag, and decides nothing

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("covidcxr")
    client.create_model_version("covidcxr", source=str(tmp_path), tags={
        "val_roc_auc": "0.9", "data_version": first["data_version"], register.FIGURE_TAG: "val_roc_auc"})
    client.set_registered_model_alias("covidcxr", selection.CHAMPION, "1")
    assert register.current_champion(client, "covidcxr", "val_roc_auc", data_version=again,
                                      figure="val_roc_auc") == (1, 0.9, "")
    version, value, why = register.current_champion(client, "covidcxr", "val_roc_auc", data_version=other_split,
                                                    figure="val_roc_auc")
    assert (version, value) == (1, None) and first["data_version"] in why and other_split in why


def test_the_data_version_names_a_missing_file_and_a_stage_without_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="manifest.csv: missing; the data version"):
        _tracking.repro_tags("train_classifier", "demo")
    assert "data_version" not in _tracking.repro_tags("ingest", "demo")  # it makes the manifest: none yet to hash
    with pytest.raises(ValueError, match="stage 'evaluate' has no entry"):
        _tracking.repro_tags("evaluate", "demo")
    write_data(tmp_path, ["train", "val"])
    roles = _tracking.stage_data("pretrain")
    assert roles == {"manifest": "artifacts/manifest.csv", "split:covid": "artifacts/splits/covid.csv",
                     "split:projection": "artifacts/splits/projection.csv"}
    assert _tracking.data_version({"x": roles["manifest"]}) != _tracking.data_version({"y": roles["manifest"]})


def test_every_file_a_stage_s_data_version_hashes_is_one_of_its_dvc_deps():
    """pretrain, the trainings and the audit hashed the manifest for their runs' data version without DVC knowing
    they read it: a manifest that changed alone left their runs tagged with a version they were not computed on."""
    import yaml

    stages = yaml.safe_load((Path(__file__).resolve().parents[2] / "dvc.yaml").read_text())["stages"]
    for stage in _tracking.STAGE_SPLITS:
        deps = set(stages[stage]["deps"])
        assert set(map(str, _tracking.stage_data(stage).values())) <= deps, stage
