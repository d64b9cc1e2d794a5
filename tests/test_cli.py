"""The command line: no dead end when the champion alias is missing, and -v before or after the command."""

from __future__ import annotations

import mlflow
import pytest

from covidcxr import cli


@pytest.fixture
def registry(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    mlflow.set_tracking_uri(None)


def test_predict_without_a_champion_says_why_and_what_to_run(registry, tmp_path, capsys):
    registry.create_registered_model("covidcxr")
    version = registry.create_model_version("covidcxr", source=str(tmp_path), tags={
        "decision": "challenger", "audit_status": "fail",
        "decision_reason": "audit failed (source_classifier:all): champion refused"})
    registry.set_registered_model_alias("covidcxr", "challenger", version.version)
    image = tmp_path / "x.png"
    image.write_bytes(b"not read before the model is found")

    assert cli.main(["predict", str(image)]) == 1
    err = capsys.readouterr().err
    assert "has no version with alias 'champion'" in err and "audit failed (source_classifier:all)" in err
    assert "models:/covidcxr@challenger" in err and "register.allow_failed_audit=true" in err
    assert "Traceback" not in err


def test_predict_with_nothing_registered_says_to_run_the_pipeline(registry, tmp_path, capsys):
    registry.search_registered_models()  # creates the empty store
    assert cli.main(["predict", "--model-uri", "models:/covidcxr@champion", str(tmp_path / "x.png")]) == 1
    assert "run the pipeline first" in capsys.readouterr().err


def test_verbose_flag_before_or_after_the_command():
    parser = cli.build_parser()
    assert parser.parse_args(["-v", "inspect", "a.png"]).verbose is True
    assert parser.parse_args(["inspect", "a.png", "-v"]).verbose is True
    assert parser.parse_args(["inspect", "a.png"]).verbose is False


def test_calibrate_site_refuses_a_table_it_cannot_use_before_loading_any_model(tmp_path, capsys):
    table = tmp_path / "labels.csv"
    table.write_text("file,label\na.png,covid\nb.png,healthy\n,negative\n")
    assert cli.main(["calibrate-site", str(table)]) == 1
    err = capsys.readouterr().err
    assert "needs the columns file and label (covid or negative)" in err and "lines [3, 4]" in err
    assert cli.main(["calibrate-site", str(tmp_path / "missing.csv")]) == 1
    assert "cannot read" in capsys.readouterr().err
