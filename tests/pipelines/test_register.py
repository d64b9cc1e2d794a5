"""The register stage's parts: the registry's champion and next version, candidates from the reports, pins."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest

from covidcxr import audit, selection
from pipelines import _common, register

NAME = "covidcxr"


@pytest.fixture
def client(mlflow_db):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{mlflow_db}", registry_uri=f"sqlite:///{mlflow_db}")


def test_champion_and_next_version_from_the_registry(client, tmp_path):
    assert register.next_version(client, NAME) == 1
    assert register.current_champion(client, NAME, "val_roc_auc") == (None, None, "")
    client.create_registered_model(NAME)
    for _ in range(2):
        client.create_model_version(NAME, source=str(tmp_path), tags={"val_roc_auc": "0.81"})
    assert register.next_version(client, NAME) == 3
    assert register.current_champion(client, NAME, "val_roc_auc") == (None, None, "")
    # A deleted newest version: the registry still numbers after it, and the stage's tag remembers it.
    client.create_model_version(NAME, source=str(tmp_path))
    client.set_registered_model_tag(NAME, register.LAST_VERSION_TAG, "3")  # as register.run records it
    client.delete_model_version(NAME, "3")
    assert register.next_version(client, NAME) == 4
    assert client.create_model_version(NAME, source=str(tmp_path)).version in (4, "4")
    client.delete_model_version(NAME, "4")
    client.set_registered_model_alias(NAME, selection.CHAMPION, "2")
    assert register.current_champion(client, NAME, "val_roc_auc") == (2, 0.81, "")
    assert register.current_champion(client, NAME, "val_f1") == (2, None, "")


def test_a_champion_figure_of_other_data_or_another_measure_is_no_yardstick(client, tmp_path):
    client.create_registered_model(NAME)
    client.create_model_version(NAME, source=str(tmp_path), tags={
        "heldout": "0.41", "data_version": "aaa", register.FIGURE_TAG: "worst held-out specificity"})
    client.set_registered_model_alias(NAME, selection.CHAMPION, "1")
    same = register.current_champion(client, NAME, "heldout", data_version="aaa", figure="worst held-out specificity")
    assert same == (1, 0.41, "")
    version, value, why = register.current_champion(client, NAME, "heldout", data_version="bbb",
                                                    figure="worst held-out specificity")
    assert (version, value) == (1, None) and "data_version aaa" in why and "bbb" in why
    version, value, why = register.current_champion(client, NAME, "heldout", data_version="aaa",
                                                    figure="mean held-out AUC")
    assert (version, value) == (1, None) and "worst held-out specificity" in why
    assert "another measure" in why
    # Chosen by another measure, the champion has no tag of ours: the reason is the other measure, not "no figure"
    # (the new version became champion "(no val_roc_auc recorded)")
    version, value, why = register.current_champion(client, NAME, "val_roc_auc", data_version="aaa",
                                                    figure="val_roc_auc")
    assert (version, value) == (1, None)
    assert why == "its figure is of another measure: selection_figure worst held-out specificity, not this val_roc_auc"
    version, value, why = register.current_champion(client, NAME, "val_roc_auc", data_version="bbb",
                                                    figure="val_roc_auc")
    assert (version, value) == (1, None) and "other data: data_version aaa, not this bbb" in why
    # A champion registered before the tags existed is compared as it was.
    client.create_model_version(NAME, source=str(tmp_path), tags={"heldout": "0.30"})
    client.set_registered_model_alias(NAME, selection.CHAMPION, "2")
    assert register.current_champion(client, NAME, "heldout", data_version="bbb", figure="x") == (2, 0.30, "")


def write_model_folder(root: Path, name: str, run_id: str) -> None:
    """A classifier folder as far as its run info goes (what register checks evaluate's report against)."""
    folder = root / _common.model_dir(*name.split("_", 1))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.keras").write_bytes(b"")
    (folder / "standardizer.json").write_text("{}")
    (folder / "run.json").write_text(json.dumps({"run_id": run_id}))


def write_reports(root: Path, values: dict[str, float | None]) -> None:
    for name, value in values.items():
        path = root / _common.EVALUATE_DIR / name / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"val": {"at_operating": {"roc_auc": value}}, "run_id": f"run-{name}",
                                    "ood_action": "refuse"}))
        write_model_folder(root, name, f"run-{name}")
    checks = [audit.lungs_removed_check("vgg16", 0.99, 0.98, warn=0.3, fail=0.6),  # c_vgg16 and e_vgg16 fail
              audit.heatmap_check("d_vgg19/covid", 0.3, 0.25, warn=1.5, fail=1.0)]  # warn
    (root / _common.AUDIT_REPORT).parent.mkdir(parents=True)
    (root / _common.AUDIT_REPORT).write_text(json.dumps(audit.report(checks)))


#: register's params as candidates reads them: any variant and backbone, the OOD action evaluate measured under.
BEST = {"variant": "best", "backbone": "best", "ood_action": "refuse"}


@pytest.mark.parametrize("variant, backbone, chosen", [
    ("best", "best", "d_vgg16"),  # c_vgg16 scores higher but failed its audit
    ("c", "best", "c_vgg19"),
    ("e", "vgg19", "e_vgg19"),
])
def test_candidates_carry_their_own_audit_and_validation(tmp_path, monkeypatch, variant, backbone, chosen):
    write_reports(tmp_path, {"c_vgg16": 0.95, "c_vgg19": 0.7, "d_vgg16": 0.9, "d_vgg19": None, "e_vgg16": 0.99,
                             "e_vgg19": 0.6})
    monkeypatch.chdir(tmp_path)
    classifiers = {"variants": ["c", "d", "e"], "backbones": ["vgg16", "vgg19"]}
    p = {"variant": variant, "backbone": backbone, "ood_action": "refuse"}
    pool = register.candidates(p, classifiers, register.read_audit())
    assert {c.name: c.audit_status for c in pool}.get("c_vgg16", "fail") == "fail"
    assert selection.select(pool, "roc_auc").chosen.name == chosen
    with pytest.raises(_common.ParamsError, match="match no trained classifier"):
        register.candidates({"variant": "d", "backbone": "vgg19", "ood_action": "refuse"},
                            {"variants": ["c"], "backbones": ["vgg16"]}, {})


def test_best_never_takes_the_lungs_removed_control(tmp_path, monkeypatch):
    write_reports(tmp_path, {"c_vgg16": 0.6, "d_vgg16": 0.7, "e_vgg16": 0.99})
    monkeypatch.chdir(tmp_path)
    report = {"status": "pass", "checks": []}  # e passes its audit and scores best: still not a candidate of best
    classifiers = {"variants": ["c", "d", "e"], "backbones": ["vgg16"]}
    pool = register.candidates(BEST, classifiers, report)
    assert [c.name for c in pool] == ["c_vgg16", "d_vgg16"]
    assert selection.select(pool, "roc_auc").chosen.name == "d_vgg16"
    assert [c.name for c in register.candidates({**BEST, "variant": "e"}, classifiers, report)] == [
        "e_vgg16"]  # named, it is registered on purpose
    with pytest.raises(_common.ParamsError, match="never takes the lungs-removed control"):
        register.candidates(BEST, {"variants": ["e"], "backbones": ["vgg16"]}, report)


def test_figures_evaluate_measured_on_other_weights_are_refused_naming_both_runs(tmp_path, monkeypatch):
    """Nothing tied evaluate's figures to the weights in the folder: after one classifier was retrained, `dvc repro -f
    -s register` (or a hand-run register) registered the new weights with the old weights' metrics."""
    write_reports(tmp_path, {"c_vgg16": 0.6, "d_vgg16": 0.7})
    monkeypatch.chdir(tmp_path)
    classifiers, report = {"variants": ["c", "d"], "backbones": ["vgg16"]}, {"status": "pass", "checks": []}
    assert register.evaluated("d", "vgg16", "refuse")["run_id"] == "run-d_vgg16"
    write_model_folder(tmp_path, "d_vgg16", "retrained")  # d retrained; evaluate not rerun
    with pytest.raises(ValueError, match=r"metrics.json measured the weights of run run-d_vgg16, but "
                                         r".*classifier_d_vgg16.* holds those of run retrained"):
        register.candidates(BEST, classifiers, report)
    path = tmp_path / _common.EVALUATE_DIR / "d_vgg16" / "metrics.json"  # a report from before run_id was recorded
    path.write_text(json.dumps({"val": {"at_operating": {"roc_auc": 0.7}}}))
    with pytest.raises(ValueError, match="does not say which weights it measured .*run retrained"):
        register.evaluated("d", "vgg16", "refuse")


def test_a_model_folder_or_report_that_records_no_run_is_refused_naming_the_file(tmp_path, monkeypatch):
    """A model folder whose run.json records no run id was a bare KeyError('run_id'), naming neither the folder nor
    what to rerun; a report that is not a JSON object was said to lack its run id. Both now name the file (the rule
    model_card checks by too: _common.evaluation_of_weights)."""
    write_reports(tmp_path, {"d_vgg16": 0.7})
    monkeypatch.chdir(tmp_path)
    run_json = tmp_path / _common.model_dir("d", "vgg16") / "run.json"
    run_json.write_text(json.dumps({"stage": "train_classifier"}))  # written before the run id was recorded
    with pytest.raises(ValueError, match=r"classifier_d_vgg16/run.json \(run_id\) does not say which classifier run "
                                         r".*classifier_d_vgg16 holds .*figures of run run-d_vgg16 cannot be checked"
                                         r".*rerun evaluate"):
        register.evaluated("d", "vgg16", "refuse")
    write_model_folder(tmp_path, "d_vgg16", "run-d_vgg16")
    (tmp_path / _common.EVALUATE_DIR / "d_vgg16" / "metrics.json").write_text("[]")
    with pytest.raises(ValueError, match=r"d_vgg16/metrics.json: not an evaluate report \(not a JSON object\)"):
        register.evaluated("d", "vgg16", "refuse")


def write_component_reports(root: Path, projection: str = "proj-a", unet: str = "unet-a", **rules) -> None:
    """filter_frontal's and segment's reports as far as what they applied goes (the run of each folder, the rules)."""
    for path, record in ((_common.FRONTAL_REPORT, {"projection_run_id": projection}),
                         (_common.SEGMENT_REPORT, {"unet_run_id": unet, "min_area": 0.1, "max_area": 0.7, **rules})):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(json.dumps({k: v for k, v in record.items() if v is not None}))


PARTS = {"projection": _common.PROJECTION_MODEL, "unet": _common.UNET_MODEL}
SEGMENT = {"min_area": 0.1, "max_area": 0.7}


def test_a_filter_or_u_net_or_mask_rule_other_than_the_classifiers_learnt_from_is_refused(tmp_path, monkeypatch):
    """register checked only the classifier's weights against evaluate's report: the projection filter and U-Net it
    bundled, and the mask rules it served (params read when it ran), were never compared with those that made
    artifacts/frontal.csv and artifacts/masks. filter_frontal and segment now record them; register refuses others,
    by the rule it checks the classifier by (_common.made_with), naming the file, both values and what to rerun."""
    monkeypatch.chdir(tmp_path)
    write_component_reports(tmp_path)
    register.components_applied(PARTS, {"projection": "proj-a", "unet": "unet-a"}, SEGMENT)
    with pytest.raises(ValueError, match=r"reports/segment/metrics.json applied the weights of run unet-a, but "
                                         r"artifacts/models/unet holds those of run unet-b \(a U-Net retrained "
                                         r"since\): its masks are not of these weights; rerun segment and every stage "
                                         r"after it \(`dvc repro register`\)"):
        register.components_applied(PARTS, {"projection": "proj-a", "unet": "unet-b"}, SEGMENT)
    with pytest.raises(ValueError, match=r"reports/filter_frontal/metrics.json applied the weights of run proj-a, but "
                                         r"artifacts/models/projection holds those of run proj-b \(a projection "
                                         r"filter retrained since\).*rerun filter_frontal"):
        register.components_applied(PARTS, {"projection": "proj-b", "unet": "unet-a"}, SEGMENT)
    with pytest.raises(ValueError, match=r"reports/segment/metrics.json: segment applied max_area 0.7, but "
                                         r"params.yaml segment.max_area is 0.6 \(changed since segment ran\)"):
        register.components_applied(PARTS, {"projection": "proj-a", "unet": "unet-a"}, {**SEGMENT, "max_area": 0.6})
    with pytest.raises(ValueError, match=r"artifacts/models/unet/run.json \(run_id\) does not say which U-Net run"):
        register.components_applied(PARTS, {"projection": "proj-a", "unet": None}, SEGMENT)
    write_component_reports(tmp_path, unet=None)  # written before segment recorded its U-Net run
    with pytest.raises(ValueError, match=r"segment/metrics.json \(unet_run_id\) does not say which U-Net run it is "
                                         r"of \(written before segment recorded it\).*run unet-a"):
        register.components_applied(PARTS, {"projection": "proj-a", "unet": "unet-a"}, SEGMENT)
    write_component_reports(tmp_path, min_area=None)
    with pytest.raises(ValueError, match=r"segment/metrics.json \(min_area\) does not say which min_area segment "
                                         r"applied .*params.yaml segment.min_area \(0.1\)"):
        register.components_applied(PARTS, {"projection": "proj-a", "unet": "unet-a"}, SEGMENT)
    (tmp_path / _common.FRONTAL_REPORT).unlink()
    with pytest.raises(FileNotFoundError, match="filter_frontal/metrics.json: missing; run the filter_frontal stage"):
        register.components_applied(PARTS, {"projection": "proj-a", "unet": "unet-a"}, SEGMENT)


def test_figures_of_another_ood_action_than_the_one_served_are_refused(tmp_path, monkeypatch):
    """evaluate's served figures follow register.ood_action; register read it from params when it ran, so with
    `dvc repro -s register` after changing it, the figures registered were of the other action."""
    write_reports(tmp_path, {"d_vgg16": 0.7})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"d_vgg16/metrics.json: evaluate applied ood_action 'refuse', but "
                                         r"params.yaml register.ood_action is 'flag' \(changed since evaluate ran\)"
                                         r".*rerun evaluate"):
        register.evaluated("d", "vgg16", "flag")


def test_register_stops_before_any_run_when_the_u_net_was_retrained_after_segment(tmp_path, monkeypatch, mlflow_db):
    """The defect's own scenario: `dvc repro -f -s train_unet` then `dvc repro -s register` served a new U-Net whose
    masks no classifier was trained or evaluated on, and nothing errored. The stage now stops before any MLflow run
    or registration."""
    import mlflow

    write_reports(tmp_path, {"d_vgg16": 0.7})
    for part, run_id in (("projection", "proj-a"), ("unet", "unet-b")):  # the U-Net retrained: run unet-b
        folder = tmp_path / PARTS[part]
        folder.mkdir(parents=True)
        (folder / "model.keras").write_bytes(b"")
        (folder / "standardizer.json").write_text("{}")
        (folder / "run.json").write_text(json.dumps({"run_id": run_id}))
    write_component_reports(tmp_path)  # segment ran with run unet-a
    for path in (_common.MANIFEST, _common.split_table("covid")):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("image_id\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the stage's own store: mlflow.db here
    params = _common.params("register", _common.PROJECT / _common.PARAMS_FILE)
    with pytest.raises(ValueError, match="holds those of run unet-b"):
        register.run({**params, "variant": "d", "backbone": "vgg16", "heldout": None},
                     {"variants": ["d"], "backbones": ["vgg16"]}, size=32, segment=SEGMENT)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{mlflow_db}")
    assert client.search_experiments(filter_string="name LIKE 'covidcxr-%'") == []
    assert client.search_registered_models() == []
    assert not (tmp_path / _common.REGISTERED).exists()


def test_a_missing_or_malformed_audit_names_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="audit.json: missing; run the audit stage"):
        register.read_audit()
    (tmp_path / "bad.json").write_text('{"status": "pass"}')
    with pytest.raises(ValueError, match="bad.json: not an audit report"):
        register.read_audit(tmp_path / "bad.json")


def test_pins_are_the_installed_versions_of_the_lock_file():
    from covidcxr import tracking

    lock = dict(line.split("==", 1) for line in (_common.PROJECT / "requirements.lock").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    norm = {k.lower().replace("_", "-").replace(".", "-"): v for k, v in lock.items()}
    for pin in tracking.pins(register.SERVING_PACKAGES):
        name, version = pin.split("==")
        assert norm[name.lower()] == version, pin
    with pytest.raises(RuntimeError, match="not installed"):
        tracking.pins(["no-such-distribution-xyz"])


def cache_of_the_corpus(root: Path, size: int) -> np.ndarray:
    """A working-size cache and masks index where the stage reads them, every image usable (the old example was the
    first usable one), and the cached images as an 8-bit PNG of them holds them."""
    import pandas as pd

    from covidcxr import preprocess
    from tests.helpers import phantom

    images = np.stack([preprocess.resize(phantom(seed=s), size) for s in range(10, 16)])  # the corpus' films
    ids = pd.DataFrame({"image_id": [f"img{i}" for i in range(len(images))]})
    for folder in (_common.CACHE_DIR, _common.PROJECTION_CACHE_DIR):
        (root / folder).mkdir(parents=True)
        preprocess.save_cache(root / folder, ids, images, images > 0.5)
    (root / _common.MASKS_INDEX).parent.mkdir(parents=True, exist_ok=True)
    ids.assign(flag="").to_csv(root / _common.MASKS_INDEX, index=False)
    stored = preprocess.load_cache(root / _common.CACHE_DIR)[1].astype(np.float32)  # float16 on disk
    return np.round(255 * np.clip(stored, 0, 1)).astype(np.uint8)


def pixels(example: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(example))))


def test_the_logged_input_example_is_a_phantom_not_a_corpus_image(tmp_path, monkeypatch, mlflow_db):
    """Every registered version carried a cached radiograph of the corpus, base64 in its input_example.json and
    serving_input_example.json, even for data that is not public. Now a fixed phantom at the working size, which
    MLflow still scores as a server would read it."""
    import mlflow

    from tests.helpers import SIZE, build_bundle

    bundle = build_bundle(tmp_path / "bundle")
    cached = cache_of_the_corpus(tmp_path, SIZE)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{mlflow_db}")
    try:
        mlflow.set_experiment("register-test")
        with mlflow.start_run():
            info = register.log_pyfunc(bundle, register.stage_code(tmp_path), SIZE)
        model = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "logged")))
        logged = json.loads((model / "input_example.json").read_text())
        serving_input = json.loads((model / "serving_input_example.json").read_text())
        answer = mlflow.pyfunc.load_model(info.model_uri).predict(logged)
    finally:
        mlflow.set_tracking_uri(None)
    [example] = logged["image"]
    assert serving_input["inputs"]["image"] == [example]  # what `mlflow models serve` is shown as a request
    shown = pixels(example)
    assert shown.shape == (SIZE, SIZE) and not any(np.array_equal(shown, image) for image in cached)
    assert example == register.input_example(SIZE)["image"][0]  # the same phantom for every version
    assert len(answer) == 1 and answer[0]["model_version"] is not None  # a request the model answers


@pytest.mark.parametrize("size", [32, 64, 128])
def test_the_input_example_is_drawn_at_the_working_size(size):
    """The served model reads a request at both working sizes: register asks for the larger, so that neither model is
    shown an upsampled image that production never sends it."""
    shown = pixels(register.input_example(size)["image"][0])
    assert shown.shape == (size, size) and shown.std() > 10  # a chest, not a blank


#: A stand-in for a stage that changes the MLflow registry (outside the repository, out of DVC's sight): each run adds
#: a version, and writes each declared output (a file, or a folder holding one) naming it.
REGISTER = """\
import json, pathlib, sys
registry = pathlib.Path(sys.argv[1])
version = len(registry.read_text().splitlines()) + 1 if registry.exists() else 1
registry.write_text("".join(f"v{v}\\n" for v in range(1, version + 1)))
for out in map(pathlib.Path, sys.argv[2:]):
    path = out if out.suffix else out / "index.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": version}))
"""


@pytest.mark.parametrize("stage", ["register", "model_card"])
def test_dvc_never_restores_a_stage_that_changes_the_registry_from_its_run_cache(tmp_path, stage):
    """register and model_card change the MLflow registry, which DVC does not see: after v1, then v2 (under
    register.allow_failed_audit: true, its audit failed, made champion), reverting the param restored v1's
    registered.json from DVC's run cache ('Stage is cached - skipping run') while the registry's champion stayed v2;
    and after `make clean` a fresh mlflow.db never got a model. Their outputs, as dvc.yaml declares them, keep both out
    of the run cache: each such repro runs (real dvc, on a stand-in command)."""
    import sys

    import yaml

    from tests.pipelines.conftest import ROOT, run

    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in declared.get("outs", []) + declared.get("metrics", [])]
    repo, registry = tmp_path / "repo", tmp_path / "registry.txt"
    repo.mkdir()
    (repo / "register.py").write_text(REGISTER)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {stage: {
        "cmd": " ".join([sys.executable, "register.py", str(registry), *outs]), "deps": ["register.py"],
        "params": ["register"], **{k: declared[k] for k in ("outs", "metrics") if k in declared}}}}))

    def repro(allow_failed_audit: bool) -> int:
        (repo / "params.yaml").write_text(yaml.safe_dump({"register": {"allow_failed_audit": allow_failed_audit}}))
        run(["dvc", "repro"], repo, timeout=120)
        return json.loads((repo / outs[0] / ("" if Path(outs[0]).suffix else "index.html")).read_text())["version"]

    run(["dvc", "init", "--no-scm", "-q"], repo)
    assert repro(False) == 1
    assert repro(True) == 2
    assert repro(False) == 3  # run again: the registry's champion is the version the output names
    assert registry.read_text().split() == ["v1", "v2", "v3"]


def png16(path: Path, values: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(values.astype(np.uint16)).save(path, format="PNG")


def test_the_drift_reference_shows_the_model_each_film_as_the_cache_read_it(tmp_path, monkeypatch):
    """A MONOCHROME1 PNG export (BIMCV, PadChest) went to the reference as its raw file: the cache inverts it by the
    manifest's photometric and bits_stored, serving, given bytes only, read it air bright, so the reference's
    intensities and OOD scores were of films inverted against training and evaluate; a JSRT raw file, bytes without
    a suffix, came back not_an_image. Both now go as users are told to send them (air dark, a lossless 16-bit PNG),
    and a film that cannot be sent is counted in the reference's meta, not lost."""
    import pandas as pd

    from covidcxr import predlog, serving, sites
    from tests.helpers import build_bundle, phantom

    bundle = build_bundle(tmp_path / "bundle")
    monkeypatch.setenv(predlog.ENV, "none")
    monkeypatch.setenv(sites.ENV, "")
    films = tmp_path / "films"
    films.mkdir()
    film = np.round(4095 * phantom(seed=3, size=64)).astype(np.uint16)  # 12-bit stored values, air dark
    png16(films / "m2.png", film)
    png16(films / "m1.png", 4095 - film)  # the same film exported as MONOCHROME1 stores it: air bright
    big = np.kron(film, np.ones((32, 32), np.uint16))  # JSRT's 2048 x 2048, big-endian, high value = dark film
    (films / "jsrt.IMG").write_bytes((4095 - big).astype(">u2").tobytes())
    (films / "bad.png").write_bytes((films / "m2.png").read_bytes()[:200])  # truncated: the cache cannot read it
    rows = pd.DataFrame({"image_id": ["m2", "m1", "jsrt", "bad"],
                         "path": [str(films / n) for n in ("m2.png", "m1.png", "jsrt.IMG", "bad.png")],
                         "photometric": ["I;16", "MONOCHROME1", "MONOCHROME1", "I;16"],
                         "bits_stored": [16, 12, 12, 16]})
    (tmp_path / _common.SPLITS_DIR).mkdir(parents=True)
    rows.to_csv(tmp_path / _common.MANIFEST, index=False)
    rows[["image_id"]].assign(split="val").to_csv(tmp_path / _common.split_table("covid"), index=False)
    monkeypatch.chdir(tmp_path)

    reference = register.drift_reference(bundle, serving.Config.load(bundle["config"]))
    frame = reference.frame.drop(columns="time")
    assert len(frame) == reference.meta["n"] == 3  # m2, m1, jsrt: in the manifest's order
    # the MONOCHROME1 export is shown to the model as its air-dark film
    pd.testing.assert_series_equal(frame.iloc[1], frame.iloc[0], check_names=False)
    assert frame.iloc[0]["intensity_mean"] is not None
    assert frame.iloc[2]["reason"] != "not_an_image" and frame.iloc[2]["intensity_mean"] is not None
    assert reference.meta["reencoded"] == 2 and reference.meta["not_scored"] == {"truncated": 1}
    assert register.as_sent(str(films / "m2.png"), "I;16", 16)[1] == "file"  # read the same from its bytes: as is
