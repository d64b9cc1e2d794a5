"""The command line: no dead end when the champion alias is missing, and -v before or after the command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from covidcxr import cli


@pytest.fixture
def registry(mlflow_db, monkeypatch):
    uri = f"sqlite:///{mlflow_db}"  # a copy of a migrated empty store: migrating a new one costs over a CPU-second
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


def _ood_site(tmp_path: Path):
    """Real serving code (tiny untrained networks) and a site of 24 labelled films (odd: COVID-19) whose OOD check
    refuses the 12 furthest: the pipeline, a scorer of it, the site's folder and labels table, the films' base64 and
    their entries without an OOD limit."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from covidcxr import models, ood, preprocess, serving
    from tests.helpers import SIZE, build_bundle, phantom

    pipeline = serving.Pipeline.load(build_bundle(tmp_path / "bundle", variant="c"))
    work = np.stack([preprocess.resize(phantom(seed=s), SIZE) for s in range(6)])
    pipeline.classifier.ood = ood.MahalanobisDetector(n_components=2).fit(
        models.ood_features(pipeline.classifier, work, np.ones_like(work, bool), "c"))
    pyfunc = serving.CovidCxrModel()
    pyfunc.pipeline = pipeline

    def score(images: list[str], params: dict) -> list[dict]:
        return pyfunc.predict(None, pd.DataFrame({serving.INPUT_COLUMN: images}), params)

    site = tmp_path / "site"
    site.mkdir()
    for i in range(24):
        Image.fromarray((phantom(seed=100 + i) * 255).astype(np.uint8)).save(site / f"f{i}.png")
    table = site / "labels.csv"
    table.write_text("file,label\n" + "".join(f"f{i}.png,{'covid' if i % 2 else 'negative'}\n" for i in range(24)))
    images = [serving.encode_file(site / f"f{i}.png") for i in range(24)]
    everything = score(images[:12], {"ood_threshold": 1e300}) + score(images[12:], {"ood_threshold": 1e300})
    pipeline.classifier.ood.threshold_ = sorted(e["ood_score"] for e in everything)[11]  # the 12 nearest answered
    return pipeline, score, site, table, images, everything


def test_calibrate_site_admits_the_films_the_model_refuses_as_out_of_distribution(tmp_path, monkeypatch, capsys,
                                                                                    mlflow_db):
    """Real serving code (tiny untrained networks) whose OOD check refuses half of a site's films: without --admit
    the threshold cannot be chosen (too few films answered); with it, every film joins and the site's OOD threshold is
    the highest OOD score among them, which a request then uses to answer them all."""
    import json

    from covidcxr import sites

    pipeline, score, site, table, images, everything = _ood_site(tmp_path)
    ood_scores = sorted(e["ood_score"] for e in everything)
    monkeypatch.setattr(cli, "_scorer", lambda *args: score)

    assert cli.main(["calibrate-site", str(table), "--min-sensitivity", "0.9"]) == 1
    assert "10 COVID-19 and 10 negative films" in capsys.readouterr().err
    thresholds = tmp_path / "site.json"
    assert cli.main(["calibrate-site", str(table), "--min-sensitivity", "0.9", "--admit", "--output",
                     str(thresholds)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert json.loads(thresholds.read_text()) == out
    assert (out["n_covid"], out["n_negative"], out["admitted"], out["model_answered"]) == (12, 12, 12, 12)
    assert out["ood_threshold"] == ood_scores[-1] and out["model_ood_threshold"] == ood_scores[11]
    assert out["refused"] == {} and out["promised_sensitivity"] == 12 / 13
    assert out["threshold"] == min(e["covid_probability"] for i, e in enumerate(everything) if i % 2)
    at_site = {"threshold": out["threshold"], "ood_threshold": out["ood_threshold"]}
    served = score(images[:12], at_site) + score(images[12:], at_site)
    assert all(e["accepted"] for e in served)  # the site's films, answered at its thresholds
    assert out["n_covid_patients"] is None and "assumes one film per patient" in out["promise"]
    # a patient column: the promise counts patients (6, of 2 COVID-19 films each), each at their lowest film
    by_patient = site / "patients.csv"
    by_patient.write_text("file,label,patient\n" + "".join(
        f"f{i}.png,{'covid' if i % 2 else 'negative'},{f'p{i // 4}' if i % 2 else f'n{i}'}\n" for i in range(24)))
    assert cli.main(["calibrate-site", str(by_patient), "--min-sensitivity", "0.9", "--admit"]) == 1
    assert "6 COVID-19 patients cannot promise sensitivity 0.9" in capsys.readouterr().err
    assert cli.main(["calibrate-site", str(by_patient), "--min-sensitivity", "0.8", "--admit"]) == 0
    patients = json.loads(capsys.readouterr().out)
    assert (patients["n_covid"], patients["n_covid_patients"], patients["promised_sensitivity"]) == (12, 6, 6 / 7)
    assert "6 COVID-19 patients" in patients["promise"]
    # none of 6 patients below the threshold, where 12 films would let one fall below it
    assert patients["threshold"] == min(e["covid_probability"] for i, e in enumerate(everything) if i % 2)

    # predict --site: the site's two thresholds on every file, as the PACS worker's --site does
    assert cli.main(["predict", *[str(site / f"f{i}.png") for i in range(24)], "--site", str(thresholds)]) == 0
    table_out = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    header, rows = table_out[0], table_out[1:]
    assert len(rows) == 24 and {r[header.index("accepted")] for r in rows} == {"True"}
    assert [float(r[header.index("threshold")]) for r in rows] == [pytest.approx(out["threshold"], abs=5e-5)] * 24
    site_ood = pytest.approx(out["ood_threshold"], rel=1e-4)
    assert [float(r[header.index("ood_threshold")]) for r in rows] == [site_ood] * 24
    # --log: the calibration as an MLflow run; the bundle's version ("unregistered") is in no registry: no tags
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{mlflow_db}")  # an empty store, already migrated
    assert cli.main(["calibrate-site", str(table), "--min-sensitivity", "0.9", "--admit", "--log", "ward-7"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == out and "is not in the registry: no version tags" in captured.err
    mlflow.set_tracking_uri(f"sqlite:///{mlflow_db}")
    [run] = mlflow.search_runs(experiment_names=[sites.EXPERIMENT], output_format="list")
    assert run.data.tags["site"] == "ward-7" and run.data.params["objective"] == "sensitivity"
    metrics = run.data.metrics
    assert metrics["threshold"] == out["threshold"] and metrics["ood_threshold"] == out["ood_threshold"]
    # the figures at the site's threshold are of the films it was chosen on, and say so (not a plain sensitivity)
    assert metrics["sensitivity_on_calibration_films"] == out["sensitivity"]
    assert metrics["specificity_on_calibration_films"] == out["specificity"]
    assert "sensitivity" not in metrics and "specificity" not in metrics
    assert metrics["model_sensitivity"] == out["model_sensitivity"] and "optimistic" in run.data.tags["measured_on"]
    logged = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="site",
                                                 dst_path=str(tmp_path / "logged"))
    assert [json.loads(p.read_text()) for p in Path(logged).glob("*.json")] == [out]
    assert cli.main(["calibrate-site", str(table), "--log", "ward 7; drop"]) == 2
    assert "--log: site name 'ward 7; drop': 1 to 64 letters" in capsys.readouterr().err

    # a model that answers at a site's thresholds ($COVIDCXR_SITE) cannot be calibrated against: its own are refused
    pipeline.site = sites.SiteThresholds(out["threshold"], out["ood_threshold"], out["model_version"])
    assert cli.main(["calibrate-site", str(table), "--min-sensitivity", "0.9"]) == 1
    assert "answers at a site's thresholds ($COVIDCXR_SITE)" in capsys.readouterr().err
    # nor can the PACS worker send it a site's thresholds (it would refuse every request): said before any PACS call
    assert cli.main(["pacs", "--dicomweb-url", "http://127.0.0.1:9/dicom-web", "--site", str(thresholds),
                     "--lock-file", str(tmp_path / "pacs.lock")]) == 2
    assert "already answers at a site's thresholds ($COVIDCXR_SITE on the server)" in capsys.readouterr().err
    pipeline.site = None

    # chosen on another version's scores: no answer at thresholds that mean nothing for the model answering
    thresholds.write_text(json.dumps({**out, "model_version": "9"}))
    assert cli.main(["predict", str(site / "f0.png"), "--site", str(thresholds)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "chosen on model version 9's scores; the model answering is version " \
        f"{out['model_version']}" in captured.err
    # the same version number of another registered model (covidcxr-real v2 against covidcxr v2): refused as well
    assert out["model_name"] == "covidcxr"
    thresholds.write_text(json.dumps({**out, "model_name": "covidcxr-real"}))
    assert cli.main(["predict", str(site / "f0.png"), "--site", str(thresholds)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and f"chosen on covidcxr-real v{out['model_version']}'s scores; the model answering " \
        f"is covidcxr v{out['model_version']}" in captured.err
    # a file written before calibrate-site recorded the name: read, but it cannot be checked by name, so refused
    thresholds.write_text(json.dumps({k: v for k, v in out.items() if k != "model_name"}))
    assert cli.main(["predict", str(site / "f0.png"), "--site", str(thresholds)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "record no model_name" in captured.err and "calibrate the site again" in captured.err
    thresholds.write_text('{"ood_threshold": 3}')
    assert cli.main(["predict", str(site / "f0.png"), "--site", str(thresholds)]) == 2
    assert "not a thresholds file of `covidcxr calibrate-site --output`" in capsys.readouterr().err


def test_calibrate_site_takes_its_answers_from_one_model_at_its_own_thresholds(tmp_path, monkeypatch, capsys):
    """calibrate-site took the model's name, version and threshold from the first answer and never looked at the
    others: a load balancer mid-rollout (two versions), a replica applying a site's file, or a second pass (--admit)
    answered by another version mixed them into one thresholds file. Now any of them is refused, naming the models."""
    import copy
    import dataclasses
    import itertools

    import pandas as pd

    from covidcxr import serving, sites

    pipeline, _, site, table, _, _ = _ood_site(tmp_path)

    def replica(**changes) -> serving.CovidCxrModel:
        served = copy.copy(pipeline)
        served.config = dataclasses.replace(pipeline.config, **{k: v for k, v in changes.items() if k != "site"})
        served.site = changes.get("site")
        pyfunc = serving.CovidCxrModel()
        pyfunc.pipeline = served
        return pyfunc

    def balancer(*replicas: serving.CovidCxrModel):
        turn = itertools.cycle(replicas)

        def score(images: list[str], params: dict) -> list[dict]:  # each request to the next replica
            return next(turn).predict(None, pd.DataFrame({serving.INPUT_COLUMN: images}), params)
        return lambda *args: score

    v1, v2 = replica(model_version="1"), replica(model_version="2")
    monkeypatch.setattr(cli, "_scorer", balancer(v1))
    assert cli.main(["calibrate-site", str(table), "--min-sensitivity", "0.9", "--admit"]) == 0  # one model: as before
    capsys.readouterr()
    monkeypatch.setattr(cli, "_scorer", balancer(v1, v2))  # mid-rollout
    assert cli.main(["calibrate-site", str(table), "--min-sensitivity", "0.9", "--admit"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "answered by 2 models (covidcxr v1 (" in captured.err
    assert "covidcxr v2 (" in captured.err
    assert "f0.png" not in captured.err

    def second_pass_elsewhere(*args):  # the first pass on v1, --admit's on v2
        def score(images: list[str], params: dict) -> list[dict]:
            served = v2 if "ood_threshold" in params else v1
            return served.predict(None, pd.DataFrame({serving.INPUT_COLUMN: images}), params)
        return score

    monkeypatch.setattr(cli, "_scorer", second_pass_elsewhere)
    assert cli.main(["calibrate-site", str(table), "--min-sensitivity", "0.9", "--admit"]) == 1
    assert "answered by 2 models (covidcxr v1 (24 films), covidcxr v2 (12 films))" in capsys.readouterr().err

    at_site = replica(model_version="1", site=sites.SiteThresholds(0.5, None, "1", "covidcxr"))
    monkeypatch.setattr(cli, "_scorer", balancer(v1, at_site))  # the probe reaches v1; some films the site's replica
    assert cli.main(["calibrate-site", str(table), "--min-sensitivity", "0.9"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "at other thresholds than the model's own (" in captured.err
    assert "at thresholds_from site" in captured.err


def test_calibrate_site_reads_the_rule_of_the_model_that_answered_not_the_model_uri_s(registry, tmp_path,
                                                                                    monkeypatch, capsys):
    """The threshold rule was read from --model-uri's registered name (covidcxr, by default) at the answering model's
    version, whatever model answered: a server of ward-model v1 had its rule read from covidcxr v1 (another model's,
    refused, or the same threshold and another rule, used). Now from the answering model's own name."""
    import copy
    import dataclasses
    import json

    import pandas as pd

    from covidcxr import serving

    pipeline, _, _, table, _, _ = _ood_site(tmp_path)
    ward = copy.copy(pipeline)
    ward.config = dataclasses.replace(pipeline.config, model_name="ward-model", model_version="1")
    pyfunc = serving.CovidCxrModel()
    pyfunc.pipeline = ward
    for name, rule in (("covidcxr", {"objective": "youden", "threshold": 0.7}),
                       ("ward-model", {"objective": "sensitivity", "min_sensitivity": 0.9,
                                       "threshold": pipeline.threshold})):
        model = tmp_path / name
        (model / "artifacts" / "classifier").mkdir(parents=True)
        (model / "artifacts" / "classifier" / "threshold.json").write_text(json.dumps(rule))
        registry.create_registered_model(name)
        registry.create_model_version(name, source=str(model))

    def score(images: list[str], params: dict) -> list[dict]:
        return pyfunc.predict(None, pd.DataFrame({serving.INPUT_COLUMN: images}), params)

    monkeypatch.setattr(cli, "_scorer", lambda *args: score)  # a server of ward-model v1, --model-uri the default
    assert cli.main(["calibrate-site", str(table), "--admit", "--url", "http://127.0.0.1:9"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["model_name"], out["model_version"], out["rule_from"]) == ("ward-model", "1", "model")
    assert (out["objective"], out["min_sensitivity"]) == ("sensitivity", 0.9)


def test_calibrate_site_refuses_an_unknown_objective_as_it_reads_the_command_line(capsys):
    """--objective took any word: a typo was refused only after every film had been scored."""
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args(["calibrate-site", "labels.csv", "--objective", "yoden"])
    assert caught.value.code == 2
    assert "invalid choice: 'yoden' (choose from youden, f1, sensitivity)" in capsys.readouterr().err
    assert cli.build_parser().parse_args(["calibrate-site", "labels.csv", "--objective", "f1"]).objective == "f1"


def test_calibrate_site_admitting_films_without_a_finite_ood_score_is_a_clear_refusal(tmp_path, monkeypatch, capsys):
    """A model that flags out-of-distribution films and answers them (ood_action: flag) answers a film whose OOD score
    cannot be compared (NaN, from a feature that overflowed) as well: --admit then failed in local_ood_threshold with a
    traceback. Now exit 1, saying why and on which lines of the table (no file name)."""
    import dataclasses

    import numpy as np

    pipeline, score, _, table, _, _ = _ood_site(tmp_path)
    pipeline.config = dataclasses.replace(pipeline.config, ood_action="flag")
    pipeline.classifier.ood.location_ = np.full_like(pipeline.classifier.ood.location_, np.nan)  # every score NaN
    monkeypatch.setattr(cli, "_scorer", lambda *args: score)
    assert cli.main(["calibrate-site", str(table), "--objective", "youden", "--admit"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "24 of the films answered have no finite OOD score" in captured.err
    assert "lines [2, 3, 4, 5, 6] ..." in captured.err and "f0.png" not in captured.err
    assert "Traceback" not in captured.err
    assert cli.main(["calibrate-site", str(table), "--objective", "youden"]) == 0  # without --admit: no OOD threshold


def test_calibrate_site_log_tags_the_model_that_answered_not_the_model_uri_s(registry, tmp_path, capsys):
    """--log tagged the registered version of --model-uri's name (covidcxr by default), whatever model answered (a
    server of covidcxr-real): covidcxr v2 got the site tags of thresholds chosen on covidcxr-real v2."""
    import argparse

    for name in ("covidcxr", "covidcxr-real"):
        registry.create_registered_model(name)
        for _ in range(2):
            registry.create_model_version(name, source=str(tmp_path))
    out = {"threshold": 0.3, "ood_threshold": None, "objective": "youden", "min_sensitivity": None,
           "model_name": "covidcxr-real", "model_version": "2"}
    args = argparse.Namespace(model_uri="models:/covidcxr@champion", output=None, log="ward-7")
    assert cli._log_site(out, args) == 0
    assert "tagged covidcxr-real v2 site.ward-7.*" in capsys.readouterr().err
    assert registry.get_model_version("covidcxr-real", "2").tags["site.ward-7.threshold"] == "0.3"
    assert not any(k.startswith("site.") for k in registry.get_model_version("covidcxr", "2").tags)
    [run] = mlflow.search_runs(experiment_names=["covidcxr-sites"], output_format="list")
    assert run.data.tags["model_name"] == "covidcxr-real"
    assert "optimistic" in run.data.tags["measured_on"]

    assert cli._log_site({**out, "model_name": None}, args) == 1  # a model that does not say which it is: no tags
    assert "does not report its name" in capsys.readouterr().err


def test_a_site_threshold_is_chosen_by_the_answering_models_own_rule_unless_the_flags_give_one(tmp_path, capsys):
    """calibrate-site read the rule from its flags' defaults (sensitivity 0.95), whatever rule the model was trained
    with: now the model's own (its classifier's threshold.json, of the version that answered), the flags overriding."""
    import argparse
    import json

    model = tmp_path / "model"
    (model / "artifacts" / "classifier").mkdir(parents=True)
    (model / "artifacts" / "classifier" / "threshold.json").write_text(json.dumps(
        {"objective": "sensitivity", "min_sensitivity": 0.8, "threshold": 0.4}))

    def rule(objective=None, min_sensitivity=None, uri=str(model)):
        args = argparse.Namespace(objective=objective, min_sensitivity=min_sensitivity, model_uri=uri)
        return cli._site_rule(args, "3", 0.4)

    assert rule() == ({"objective": "sensitivity", "min_sensitivity": 0.8}, "model")
    assert rule(min_sensitivity=0.9) == ({"objective": "sensitivity", "min_sensitivity": 0.9}, "flags")
    assert rule(objective="youden") == ({"objective": "youden", "min_sensitivity": None}, "flags")
    assert rule(objective="sensitivity") == ({"objective": "sensitivity", "min_sensitivity": 0.8}, "model and flags")
    assert rule(objective="youden", uri=str(tmp_path / "nowhere"))[1] == "flags"  # no model needed
    with pytest.raises(RuntimeError, match=r"threshold rule cannot be read from .*nowhere.*give --objective"):
        rule(uri=str(tmp_path / "nowhere"))
    args = argparse.Namespace(objective=None, min_sensitivity=None, model_uri=str(model))
    with pytest.raises(RuntimeError, match=r"another model's \(its threshold 0.4, the model answering 0.7\)"):
        cli._site_rule(args, "3", 0.7)  # a server of another model than --model-uri names
    (model / "artifacts" / "classifier" / "threshold.json").write_text(json.dumps({"threshold": 0.4}))
    with pytest.raises(RuntimeError, match="does not say by which rule"):
        rule()


@pytest.mark.parametrize("uri, parts, name", [
    ("models:/covidcxr@champion", ("covidcxr", "champion", None), "covidcxr"),
    ("models:/ward-model/12", ("ward-model", None, "12"), "ward-model"),
    ("models:/other/latest", ("other", None, None), "other"),  # neither alias nor version: name only
    ("models:/other", ("other", None, None), "other"),
    ("models:/other@champion/extra", ("other", None, None), "other"),
    ("models:/@champion", None, "covidcxr"),
    ("runs:/0123/covidcxr", None, "covidcxr"),
    ("/srv/models/covidcxr", None, "covidcxr"),
])
def test_one_reading_of_a_models_uri(uri, parts, name):
    """`_rule_before_scoring` parsed models:/NAME@ALIAS and models:/NAME/VERSION with its own regex (and
    `_missing_alias` with a third), beside `_registered_name`, which split the URI by hand: one parser now."""
    assert cli._models_uri(uri) == parts
    assert cli._registered_name(uri) == name


def test_the_rule_before_scoring_is_the_version_s_that_the_alias_or_version_names(registry, tmp_path):
    """The early reading of the threshold rule (before any film is scored) follows models:/NAME@ALIAS to its version
    and reads models:/NAME/VERSION's own; a URI naming neither is left to the usual reading after scoring."""
    import argparse
    import json

    for version, target in ((1, 0.8), (2, 0.95)):
        model = tmp_path / f"v{version}"
        (model / "artifacts" / "classifier").mkdir(parents=True)
        (model / "artifacts" / "classifier" / "threshold.json").write_text(json.dumps(
            {"objective": "sensitivity", "min_sensitivity": target, "threshold": 0.4}))
        if version == 1:
            registry.create_registered_model("ward")
        registry.create_model_version("ward", source=str(model))
    registry.set_registered_model_alias("ward", "champion", "1")

    def early(uri: str) -> dict | None:
        return cli._rule_before_scoring(argparse.Namespace(objective=None, min_sensitivity=None, model_uri=uri,
                                                           url=None))

    assert early("models:/ward@champion") == {"objective": "sensitivity", "min_sensitivity": 0.8}
    assert early("models:/ward/2") == {"objective": "sensitivity", "min_sensitivity": 0.95}
    assert early("models:/ward/latest") is None and early(str(tmp_path / "v1")) is None


def test_predict_writes_one_overlay_per_file_even_when_two_share_a_name(tmp_path, monkeypatch, capsys):
    """Two folders' scan.png: the second overlay overwrote the first; now scan.png and scan-2.png, in order."""
    import numpy as np
    from PIL import Image

    files = []
    for folder, value in (("ward-a", 10), ("ward-b", 200)):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.full((8, 8), value, np.uint8)).save(tmp_path / folder / "scan.png")
        files.append(str(tmp_path / folder / "scan.png"))

    def score(images: list[str], params: dict) -> list[dict]:  # each overlay: the file itself, to tell them apart
        return [{"accepted": True, "gradcam_png": image} for image in images]

    monkeypatch.setattr(cli, "_scorer", lambda *args: score)
    out = tmp_path / "overlays"
    assert cli.main(["predict", *files, "--explain", "--gradcam-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["scan-2.png", "scan.png"]
    for name, source in (("scan.png", files[0]), ("scan-2.png", files[1])):
        assert (out / name).read_bytes() == Path(source).read_bytes()
    assert "scan-2.png" not in capsys.readouterr().out  # the table names the files, not the overlays


def test_predict_prints_probabilities_and_thresholds_at_the_precision_they_are_compared_at(tmp_path, monkeypatch,
                                                                                           capsys):
    """0.99996 against a threshold of 0.999999 printed as 1.0000 negative 1.0000: now both at 6 decimals (the
    precision serving compares them at, models.PROBABILITY_DECIMALS), so the label follows from what is shown."""
    image = tmp_path / "scan.png"
    image.write_bytes(b"answered by the scorer below")

    def score(images: list[str], params: dict) -> list[dict]:
        return [{"accepted": True, "covid_probability": 0.99996, "label": "negative", "threshold": 0.999999,
                 "ood_score": 12.3456789, "ood_threshold": 19.1072, "model_name": "covidcxr", "model_version": "1",
                 "max_images": 16} for _ in images]

    monkeypatch.setattr(cli, "_scorer", lambda *args: score)
    assert cli.main(["predict", str(image)]) == 0
    header, row = (line.split("\t") for line in capsys.readouterr().out.splitlines())
    cells = dict(zip(header, row))
    assert (cells["covid_probability"], cells["label"], cells["threshold"]) == ("0.999960", "negative", "0.999999")
    assert (cells["ood_score"], cells["ood_threshold"]) == ("12.345679", "19.107200")


def test_score_files_pairs_each_file_with_its_own_answer_in_the_order_given(tmp_path):
    """A file given twice kept only its last position when the answers were put back in order: the rows came back
    reordered, and calibrate-site paired them with the wrong labels. Now each answer stays at its file's position."""
    import argparse
    import base64

    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(name.encode())
    files = [str(tmp_path / n) for n in ("a.png", "missing.png", "b.png", "a.png", "b.png")]
    seen = []

    def score(images: list[str], params: dict) -> list[dict]:  # each answer names the request it came in
        seen.append(len(images))
        return [{"accepted": True, "image": image, "request": len(seen), "max_images": 16} for image in images]

    args = argparse.Namespace(batch_size=2)
    rows = cli._score_files(files, args, {}, score)
    assert [path for path, _ in rows] == files
    assert [entry.get("request") for _, entry in rows] == [2, None, 2, 3, 3] and seen == [1, 2, 2]  # 1: the probe
    for path, entry in rows:
        if "image" in entry:
            assert base64.b64decode(entry["image"]) == Path(path).read_bytes()  # its own file's answer
    assert rows[1][1]["reason"] == "unreadable" and "No such file or directory" in rows[1][1]["message"]


def test_score_files_sends_no_more_images_a_request_than_the_model_takes(tmp_path):
    """predict and calibrate-site sent --batch-size images whatever the model's max_images: a model taking 2 refused
    every request of 8 as invalid. Now the probe's max_images caps the requests, as the PACS worker's."""
    import argparse

    from covidcxr import serving

    files = []
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(b"x")
        files.append(str(tmp_path / f"{i}.png"))
    seen = []

    def score(images: list[str], params: dict) -> list[dict]:
        if len(images) > 2:
            raise AssertionError(f"a request of {len(images)} images, the model takes 2")
        seen.append(len(images))
        return [{"accepted": True, "max_images": 2} for _ in images]

    rows = cli._score_files(files, argparse.Namespace(batch_size=8), {}, score)
    assert seen == [1, 2, 2, 1] and len(rows) == 5
    assert serving.request_size({"max_images": 2}, 8) == 2 and serving.request_size({"max_images": 32}, 8) == 8
    assert serving.request_size({"max_images": None}, 64) == serving.Limits().max_images


def test_calibrate_site_refuses_a_film_listed_twice_before_loading_any_model(tmp_path, capsys):
    table = tmp_path / "labels.csv"
    table.write_text("file,label\nf0.png,covid\nf1.png,negative\nf0.png,negative\n")
    assert cli.main(["calibrate-site", str(table)]) == 1
    err = capsys.readouterr().err
    assert f"calibrate-site: {table} lists a film more than once ('f0.png' on lines 2, 4)" in err


def test_predict_exits_1_naming_each_file_it_could_not_read(tmp_path, monkeypatch, capsys):
    """A missing file printed an `unreadable` row and exited 0, as if scored; now the table still lists it and the
    command says which file and why, and fails."""
    (tmp_path / "scan.png").write_bytes(b"read here, answered by the model below")

    def score(images: list[str], params: dict) -> list[dict]:
        return [{"accepted": True, "covid_probability": 0.25, "model_version": "1"} for _ in images]

    monkeypatch.setattr(cli, "_scorer", lambda *args: score)
    missing = tmp_path / "gone.dcm"
    assert cli.main(["predict", str(tmp_path / "scan.png"), str(missing)]) == 1
    captured = capsys.readouterr()
    rows = [line.split("\t") for line in captured.out.splitlines()]
    assert [r[0] for r in rows] == ["file", str(tmp_path / "scan.png"), str(missing)]
    assert rows[2][rows[0].index("reason")] == "unreadable" and rows[1][rows[0].index("accepted")] == "True"
    assert f"predict: {missing}: cannot read (No such file or directory)" in captured.err
    assert cli.main(["predict", str(tmp_path / "scan.png")]) == 0


@pytest.mark.parametrize("command", [["predict", "a.png"], ["calibrate-site", "labels.csv"],
                                     ["pacs", "--dicomweb-url", "http://pacs"]])
@pytest.mark.parametrize("value, message", [("0", "at least 1 image per request, got 0"),
                                            ("-1", "at least 1 image per request, got -1"),
                                            ("two", "a whole number of images")])
def test_batch_size_is_at_least_one(command, value, message, capsys):
    """--batch-size -1 scored nothing and exited 0; 0 failed with a vague error: now argparse refuses both."""
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args([*command, "--batch-size", value])
    assert caught.value.code == 2 and message in capsys.readouterr().err
    assert cli.build_parser().parse_args([*command, "--batch-size", "1"]).batch_size == 1


@pytest.mark.parametrize("command", [["predict", "a.png"], ["calibrate-site", "labels.csv"],
                                     ["pacs", "--dicomweb-url", "http://pacs"]])
@pytest.mark.parametrize("value, message", [("-1", "more than 0 seconds, got -1"), ("0", "more than 0 seconds, got 0"),
                                            ("nan", "more than 0 seconds"), ("soon", "a number of seconds")])
def test_a_timeout_is_a_number_of_seconds_above_0(command, value, message, capsys):
    """predict's and calibrate-site's --timeout were bare floats: -1 reached socket.settimeout at the first request,
    reported as a failed request ("predict failed: Timeout value out of range", exit 1), and 0 made the socket
    non-blocking. Like the worker's, they are now argparse errors (exit 2) naming the option."""
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args([*command, "--timeout", value])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and message in err and "--timeout" in err
    assert cli.build_parser().parse_args([*command, "--timeout", "0.5"]).timeout == 0.5


def test_pacs_leaves_the_batch_limit_to_the_model(tmp_path, capsys, caplog):
    """--batch-size was held to the default request limit (16), not to the served model's: a model taking 32 could not
    be sent 32, and one taking 4 was sent 8 (refused, study after study). The worker now asks the model its limit and
    cuts its batches to it (tests/test_pacs.py), so 17 is no error of its own: here the scoring server is
    unreachable."""
    assert cli.main(["pacs", "--dicomweb-url", "http://127.0.0.1:9/dicom-web", "--url", "http://127.0.0.1:9",
                     "--retries", "0", "--pacs-timeout", "1", "--batch-size", "17",
                     "--lock-file", str(tmp_path / "pacs.lock")]) == 1
    assert "--batch-size" not in capsys.readouterr().err and "scoring failed: URLError" in caplog.text


def test_an_interval_worker_outlives_a_pass_that_fails_unexpectedly(tmp_path, monkeypatch, caplog, capsys):
    """An exception the worker did not name (a bug, a library's surprise) ended an --interval worker with a traceback:
    the PACS went unscored until someone noticed. The pass now fails with its error's type logged, and the next runs."""
    import time

    from covidcxr import pacs

    calls = []

    def run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("a value that could be a patient's")
        return pacs.Summary(studies=0)

    class Stop(Exception):
        pass

    monkeypatch.setattr(pacs, "run", run)
    monkeypatch.setattr(cli, "_scorer", lambda *args: lambda images, params: [{} for _ in images])
    monkeypatch.setattr(time, "sleep", lambda seconds: None if len(calls) < 2 else (_ for _ in ()).throw(Stop()))
    with pytest.raises(Stop):
        cli.main(["pacs", "--dicomweb-url", "http://127.0.0.1:9/dicom-web", "--url", "http://127.0.0.1:9",
                  "--interval", "1", "--lock-file", str(tmp_path / "pacs.lock")])
    assert len(calls) == 2 and "the pass failed: KeyError" in caplog.text
    assert "patient" not in caplog.text and '"studies": 0' in capsys.readouterr().out


def test_the_pacs_worker_s_log_lines_carry_their_time(tmp_path):
    """The worker's own logging.basicConfig with a time came after runtime.configure's and did nothing: a long-running
    worker's log had no times. A real worker, whose scoring server is unreachable, logs the failed pass with one."""
    import os
    import re
    import subprocess
    import sys

    from covidcxr import runtime

    env = runtime.environment(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(["covidcxr", "pacs", "--dicomweb-url", "http://127.0.0.1:9/dicom-web", "--url",
                           "http://127.0.0.1:9", "--retries", "0", "--pacs-timeout", "1", "--once", "--lock-file",
                           str(tmp_path / "pacs.lock")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    line = next(line for line in proc.stderr.splitlines() if "covidcxr.pacs" in line)
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ERROR covidcxr\.pacs: ", line), line


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """The tiny untrained pipeline registered as covidcxr v1 @champion, as register logs it: its classifier's rule
    (sensitivity 0.8), a prediction log of its own in its configuration, a drift reference in its run; and 24 films of
    a site labelled by the model's own ranking (the top 12 COVID-19), so that it separates them."""
    import json
    from unittest import mock

    import numpy as np
    from PIL import Image

    from covidcxr import monitoring, predlog, serving
    from tests.helpers import build_bundle, phantom

    root = tmp_path_factory.mktemp("registered")
    log_url = f"sqlite:///{root / 'predictions.db'}"
    bundle = build_bundle(root / "bundle", model_version="1", prediction_log=log_url)
    Path(bundle["classifier"], "threshold.json").write_text(json.dumps(
        {"threshold": 0.5, "objective": "sensitivity", "min_sensitivity": 0.8}))
    site = root / "site"
    site.mkdir()
    for i in range(24):
        Image.fromarray((phantom(seed=100 + i) * 255).astype(np.uint8)).save(site / f"f{i}.png")
    images = [serving.encode_file(site / f"f{i}.png") for i in range(24)]
    with mock.patch.dict(os.environ, {predlog.ENV: "none"}):
        pipeline = serving.Pipeline.load(bundle)
    pipeline.prediction_log = sink = predlog.MemoryLog()
    entries = pipeline.score(images[:12]) + pipeline.score(images[12:])
    top = set(np.argsort([e["covid_probability"] for e in entries])[12:])
    labels = [(f"f{i}.png", "covid" if i in top else "negative") for i in range(24)]
    monitoring.Reference(sink.frame(), {"model_version": "1", "ood_threshold": None}).save(root / "reference.json")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("cli-test", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            mlflow.log_artifact(str(root / "reference.json"), Path(monitoring.REFERENCE_ARTIFACT).parent.as_posix())
            mlflow.pyfunc.log_model(name="model", python_model=serving.CovidCxrModel(), artifacts=bundle,
                                    signature=serving.signature(), pip_requirements=["mlflow"],
                                    registered_model_name="covidcxr")
        mlflow.MlflowClient().set_registered_model_alias("covidcxr", "champion", "1")
    finally:
        mlflow.set_tracking_uri(None)
    return {"root": root, "tracking_uri": uri, "log_url": log_url, "site": site, "labels": labels}


def _labels(folder: Path, rows: list[tuple[str, str]]) -> Path:
    table = folder / "labels.csv"
    table.write_text("file,label\n" + "".join(f"{name},{label}\n" for name, label in rows))
    return table


def _logged(url: str) -> int:
    """Rows in the prediction log at ``url`` (0 when it does not exist)."""
    import sqlite3

    path = Path(url.removeprefix("sqlite:///"))
    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        return db.execute("SELECT count(*) FROM predictions").fetchone()[0]


def test_calibrate_site_reads_the_rule_of_the_version_that_answered_when_the_first_film_is_unreadable(
        registered, monkeypatch, capsys):
    """The version and threshold came from the first film's entry: unreadable here, it had none, and the rule was read
    from models:/covidcxr/None/... (a stage to MLflow), failing with a misleading message. Now from the first film the
    model answered."""
    import json

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["tracking_uri"])
    monkeypatch.setenv("COVIDCXR_PREDICTION_LOG", "none")
    table = _labels(registered["site"], [("gone.png", "covid"), *registered["labels"]])
    try:
        assert cli.main(["calibrate-site", str(table)]) == 0
    finally:
        mlflow.set_tracking_uri(None)
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert (out["rule_from"], out["objective"], out["min_sensitivity"]) == ("model", "sensitivity", 0.8)
    assert out["model_version"] == "1" and out["model_threshold"] == 0.5 and out["refused"] == {"unreadable": 1}
    # its labels, paired right (the model ranks them perfectly): 12 films promise 0.8 with one below the threshold
    assert (out["n_covid"], out["n_negative"], out["sensitivity"], out["specificity"]) == (12, 12, 11 / 12, 1.0)
    assert f"calibrate-site: {registered['site'] / 'gone.png'}: cannot read (No such file or directory)" in captured.err


@pytest.mark.slow
def test_calibrate_site_keeps_its_films_out_of_the_prediction_log(registered, tmp_path):
    """Scoring in process loaded the model with its configured prediction log, so a site's labelled films (the
    refused ones twice with --admit) entered the monitored traffic. A real process, whose log is flushed at exit, runs
    `calibrate-site` then `predict` (one process, not two: each loads TensorFlow and the model): only `predict`'s film
    is logged, so `calibrate-site` logged none of its 24."""
    import json
    import os
    import subprocess
    import sys

    from covidcxr import runtime

    env = runtime.environment(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                              MLFLOW_TRACKING_URI=registered["tracking_uri"])
    env.pop("COVIDCXR_PREDICTION_LOG", None)
    table = _labels(tmp_path, [(str(registered["site"] / name), label) for name, label in registered["labels"]])
    commands = [["calibrate-site", str(table), "--admit"], ["predict", str(registered["site"] / "f0.png")]]
    script = ("import json, sys\nfrom covidcxr import cli\nfor argv in json.loads(sys.argv[1]):\n"
              "    if code := cli.main(argv):\n        sys.exit(f'{argv[0]} exited {code}')\n")

    before = _logged(registered["log_url"])
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(commands)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert _logged(registered["log_url"]) == before + 1  # the model does log what it serves; calibrate-site, none


def test_monitor_reads_the_registered_model_s_own_log_and_exits_3_when_it_cannot_measure(
        registered, tmp_path, monkeypatch, capsys):
    """Without --log or $COVIDCXR_PREDICTION_LOG, monitor read ./predictions.db (creating it), not the log the model
    writes to; with the log turned off (none) it did the same; a --log holding a password was used; and too few records
    to measure exited 0, as if no drift."""
    import json

    from covidcxr import predlog, serving

    pipeline = serving.Pipeline.load({k: str(registered["root"] / "bundle" / v) for k, v in (
        ("projection", "projection"), ("unet", "unet"), ("classifier", "classifier"), ("config", "serving.json"))})
    assert isinstance(pipeline.prediction_log, predlog.PredictionLog)  # the model's own log, where it writes
    pipeline.score([serving.encode_file(registered["site"] / f"f{i}.png") for i in range(12)])
    assert pipeline.prediction_log.flush(30)
    served = len(predlog.read(registered["log_url"], model_name="covidcxr", model_version="1"))
    assert served >= 12

    monkeypatch.chdir(tmp_path)  # a ./predictions.db here would be the wrong log
    monkeypatch.delenv("COVIDCXR_PREDICTION_LOG", raising=False)

    def monitor(*args: str) -> tuple[int, str, str]:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["tracking_uri"])  # set_tracking_uri(None) unsets it
        try:
            code = cli.main(["monitor", "--no-mlflow", "--since", "1d", "--out", str(tmp_path / "r.html"), *args])
        finally:
            mlflow.set_tracking_uri(None)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, out, err = monitor("--min-records", "5")
    assert code in (0, cli.MONITOR_DRIFT), err
    assert json.loads(out)["n_window"] == served
    assert json.loads((tmp_path / "r.json").read_text())["n_window"] == served
    code, out, err = monitor("--min-records", str(served + 1))
    assert code == cli.MONITOR_UNMEASURED == 3 and json.loads(out)["status"] == "insufficient_data", err
    monkeypatch.setenv("COVIDCXR_PREDICTION_LOG", "none")
    code, out, err = monitor()
    assert code == cli.MONITOR_ERROR and out == ""
    assert "$COVIDCXR_PREDICTION_LOG=none turns the prediction log off: there is no traffic to monitor" in err
    monkeypatch.delenv("COVIDCXR_PREDICTION_LOG")
    code, _, err = monitor("--log", f"sqlite:///{tmp_path / 'x.db'}?password=hunter2")
    assert code == cli.MONITOR_ERROR and "--log: the prediction log URL" in err and "holds a password" in err
    assert "hunter2" not in err
    assert not (tmp_path / "predictions.db").exists() and not (tmp_path / "x.db").exists()


def test_demo_data_into_a_folder_it_may_not_write_is_one_line_not_a_traceback(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("someone's files")
    assert cli.main(["demo-data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"demo-data: {tmp_path}: not empty and not a covidcxr demo dataset")
    assert "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]  # nothing written into it
    assert cli.main(["demo-data", str(tmp_path / "notes.txt")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_tune_with_a_cache_split_or_config_it_cannot_read_is_one_line_not_a_traceback(tmp_path, capsys):
    """load_unet_data ran outside the try: a wrong --cache-dir or --split was a traceback."""
    import numpy as np
    import pandas as pd

    from covidcxr import preprocess

    cache = tmp_path / "cache"
    cache.mkdir()
    preprocess.save_cache(cache, pd.DataFrame({"image_id": ["a", "b"]}), np.zeros((2, 16, 16)),
                          np.zeros((2, 16, 16), bool))
    split = tmp_path / "segmentation.csv"
    split.write_text("image_id,split\na,train\nb,val\n")
    (tmp_path / "bad.yaml").write_text("tune_unet: [unclosed\n")
    (tmp_path / "nof0.yaml").write_text("tune_unet: {space: {lr: 0.001}}\n")  # YAML, but no search space it can use
    (tmp_path / "nulls.yaml").write_text("tune_unet: {space: {f0: 8, lr: 0.001, dropout_scale: 0, batch_size: 8, "
                                         "mask_threshold: 0.5}, epochs: null}\n")
    (tmp_path / "other.csv").write_text("image_id,split\nz,train\n")
    (tmp_path / "nosplit.csv").write_text("image_id\na\n")
    base = ["tune", "--study", "s", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--no-tracking"]
    cases = [
        (["--cache-dir", str(tmp_path / "nowhere"), "--split", str(split)], "not a working-size cache"),
        (["--cache-dir", str(cache), "--split", str(tmp_path / "missing.csv")], "missing.csv"),
        (["--cache-dir", str(cache), "--split", str(tmp_path / "nosplit.csv")], "nosplit.csv: no 'split' column"),
        (["--cache-dir", str(cache), "--split", str(tmp_path / "other.csv")], "1 images are not in the cache"),
        (["--config", str(tmp_path / "missing.yaml"), "--cache-dir", str(cache), "--split", str(split)],
         "missing.yaml"),
        (["--config", str(tmp_path / "bad.yaml"), "--cache-dir", str(cache), "--split", str(split)],
         "bad.yaml: not YAML"),
        (["--config", str(tmp_path / "nof0.yaml"), "--cache-dir", str(cache), "--split", str(split)],
         "nof0.yaml: U-Net search space: missing ['f0', 'dropout_scale', 'batch_size', 'mask_threshold']"),
        (["--config", str(tmp_path / "nulls.yaml"), "--cache-dir", str(cache), "--split", str(split)], "nulls.yaml: "),
    ]
    for extra, message in cases:
        assert cli.main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("tune: ") and message in err and "Traceback" not in err, err
    assert not (tmp_path / "optuna.db").exists()  # refused before any storage was opened


def test_a_client_of_a_server_and_the_monitor_import_no_tensorflow_nor_scikit_learn():
    """`covidcxr monitor` reads the served configuration (serving.Config) and `pacs --url`/`predict --url` talk to a
    server: importing what they use loads neither TensorFlow nor Keras (about 4 CPU-seconds a start); the models load
    them when a pipeline is built. Nor scikit-learn, which metrics imports only where a curve or an AUC is computed:
    serving and folders read thresholds by metrics' rules."""
    code = ("import sys; from covidcxr import cli, folders, monitoring, pacs, serving; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
