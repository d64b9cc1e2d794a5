"""End to end: the real `dvc repro` on the demo data with tiny params, as a user's `make run` does it."""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml

from covidcxr import audit
from tests.pipelines.conftest import ROOT, run

pytestmark = pytest.mark.slow

TINY = {
    "cache": {"size": 32},
    # The projection filter at its own working size (stage cache_projection), as the real profile runs it; the served
    # model reads each request at both sizes. A two-filter seed ensemble decides, in the stages and when served.
    # threshold: not the default, so that a consumer applying 0.5 instead of the filter's saved threshold shows.
    "train_projection": {"epochs": 2, "width": 0.0625, "size": 64, "members": 2, "threshold": 0.45},
    "tune_unet": {"n_trials": 1, "epochs": 1},
    "train_unet": {"epochs": 2, "f0": 4, "use_tuned": False},
    # One backbone keeps the suite inside its budget; the matrix still expands over c, d and e, and the default
    # profile's two backbones run in every `make run` (dvc.lock, reports/). Two-network seed ensembles: what is
    # trained, evaluated, explained, registered and served is the ensemble. Its networks compute in bfloat16 (the
    # stages' `precision`), so that a mixed-precision model is proven through every stage and the served model.
    "train_classifier": {"epochs": 2, "width": 0.0625, "backbones": ["vgg16"], "members": 2,
                         "precision": "mixed_bfloat16"},
    "evaluate": {"n_boot": 50},
    "explain": {"per_group": 1},
    # The demo data carries a shortcut by design and the tiny models' audit verdicts are arbitrary; the refusal itself
    # is tested in tests/test_selection.py. Here the champion must exist for the serving checks.
    "register": {"allow_failed_audit": True},
    "audit": {"source": {"epochs": 2}},
}


def set_params(project: Path, changes: dict) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        for key, value in values.items():  # one level deeper for nested groups such as audit.source
            if isinstance(value, dict) and isinstance(params[section].get(key), dict):
                params[section][key].update(value)
            else:
                params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


# --- protected health information -----------------------------------------------------------------------------------

#: Header values that identify a patient or a study: names, ids, birth dates, accession numbers and the study, series
#: and instance UIDs (unique identifiers that lead back to the hospital's record). Not counted: sex and age (recorded,
#: not identifying on their own), dates of the study, and institution or physician names (not the patient's).
PHI_KEYWORDS = ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "AccessionNumber",
                "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_WINDOW = 8  # bytes compared at once; every needle is at least this long
_HASH_MULT, _HASH_SHIFT = np.uint64(0x9E3779B97F4A7C15), np.uint64(64 - 22)  # PhiScanner's prefilter: 2**22 bits


def phi_values(folder: Path) -> dict[str, str]:
    """Every identifying value (PHI_KEYWORDS) in the headers of the DICOM files under ``folder``, with its keyword."""
    values: dict[str, str] = {}
    files = sorted(folder.rglob("*.dcm"))
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        for keyword in PHI_KEYWORDS:
            value = ds.get(keyword)
            for item in value if isinstance(value, pydicom.multival.MultiValue) else [value]:
                if item is not None and str(item).strip():
                    values.setdefault(str(item).strip(), keyword)
    assert files and {"PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"} <= set(values.values())
    return values


class PhiScanner:
    """Finds any of the values, case-insensitively, in bytes: also as a name with spaces and a date as YYYY-MM-DD.

    A value starting or ending with a digit must not continue a longer number (a birth date inside a float's digits
    is no leak). Fast on large files: every 8-byte window is looked up at once with numpy.
    """

    def __init__(self, values: dict[str, str]) -> None:
        self.table: dict[int, list[tuple[bytes, str]]] = {}
        for value, keyword in values.items():
            forms = {value, value.replace("^", " ")}
            if keyword == "PatientBirthDate" and re.fullmatch(r"\d{8}", value):
                forms.add(f"{value[:4]}-{value[4:6]}-{value[6:]}")
            for form in forms:
                needle = form.lower().encode()
                assert len(needle) >= _WINDOW, f"{keyword} value too short to scan: {len(needle)} characters"
                key = int(np.frombuffer(needle[:_WINDOW], "<u8")[0])
                self.table.setdefault(key, []).append((needle, keyword))
        self.keys = np.array(sorted(self.table), dtype=np.uint64)
        # a window's multiplicative hash marks whether it can be a key: only those few are looked up (4x faster than
        # searching every window; a key's own bit is always set, so nothing is missed)
        self.maybe = np.zeros(1 << (64 - int(_HASH_SHIFT)), dtype=bool)
        self.maybe[(self.keys * _HASH_MULT) >> _HASH_SHIFT] = True

    def find(self, data: bytes) -> list[str]:
        low = data.lower()
        hits = []
        for offset in range(_WINDOW):
            count = (len(low) - offset) // _WINDOW
            if count <= 0:
                continue
            windows = np.frombuffer(low, dtype="<u8", count=count, offset=offset)
            candidates = np.flatnonzero(self.maybe[(windows * _HASH_MULT) >> _HASH_SHIFT])
            at = np.searchsorted(self.keys, windows[candidates])
            at[at == len(self.keys)] = 0
            for i in candidates[self.keys[at] == windows[candidates]]:
                pos = offset + int(i) * _WINDOW
                for needle, keyword in self.table[int(windows[i])]:
                    end = pos + len(needle)
                    if low[pos:end] != needle:
                        continue
                    if needle[:1].isdigit() and pos and low[pos - 1 : pos] in b"0123456789.":
                        continue
                    if needle[-1:].isdigit() and low[end : end + 1].isdigit():
                        continue
                    hits.append(f"{keyword} ({needle.decode()})")
        return hits

    def scan_file(self, path: Path) -> list[str]:
        """The file's bytes, and the members of a zip (a .keras model) decompressed."""
        return [f"{path}{h}" for h in self.scan_bytes(path.read_bytes())]

    def scan_bytes(self, data: bytes) -> list[str]:
        """:meth:`scan_file` of a file holding ``data``, each hit without the file's name."""
        hits = [f": {h}" for h in self.find(data)]
        if data[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for info in archive.infolist():
                    if info.compress_type != zipfile.ZIP_STORED:
                        hits += [f"!{info.filename}: {h}" for h in self.find(archive.read(info))]
        return hits


def outputs(project: Path) -> list[Path]:
    """Every file of the project after the run but its inputs: data/, DVC's cache (copies of data/) and .git."""
    return [p for p in sorted(project.rglob("*")) if p.is_file() and p.relative_to(project).parts[0] not in (
        ".git", "data") and p.relative_to(project).parts[:2] != (".dvc", "cache")]


def check_no_phi(project: Path, texts: list[str], scratch: Path) -> None:
    """No identifying header value of the data the run used in any output, log or answer."""
    values = phi_values(project / "data")
    scanner = PhiScanner(values)
    # The scanner finds what it should: a planted value in binary junk, in a compressed zip member, in a log line.
    name, birth = (next(v for v, k in values.items() if k == key) for key in ("PatientName", "PatientBirthDate"))
    planted = scratch / "planted.keras"
    with zipfile.ZipFile(planted, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", json.dumps({"note": name.replace("^", " ").lower()}))
    (scratch / "planted.bin").write_bytes(b"\x00\x17junk" + birth.encode() + b"\xff")
    assert scanner.scan_file(planted) and scanner.scan_file(scratch / "planted.bin")
    assert scanner.find(f"born {birth[:4]}-{birth[4:6]}-{birth[6:]}\n".encode())
    assert not scanner.find(f"0.{birth}1, 1{birth}".encode())  # digits inside a longer number are not a date

    files = outputs(project)
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "manifest.csv" for p in files)
    assert any(p.suffix == ".keras" for p in files) and any(p.suffix == ".png" for p in files)
    # The prediction log the served model wrote (sqlite under the project) is scanned like every other output.
    assert any(p.name == "predictions.db" and p.stat().st_size > 0 for p in files)
    found: dict[bytes, list[str]] = {}  # by content: the run copies models into MLflow's store (24 .keras, 14 unique)
    hits = []
    for path in files:
        data = path.read_bytes()
        digest = hashlib.blake2b(data).digest()
        if digest not in found:
            found[digest] = scanner.scan_bytes(data)
        hits += [f"{path}{h}" for h in found[digest]]
    hits += [f"log or answer {i}: {h}" for i, text in enumerate(texts) for h in scanner.find(text.encode())]
    assert not hits, f"{len(hits)} identifying values found in {len(files)} outputs and {len(texts)} logs:\n" + \
        "\n".join(hits[:20])


def test_dvc_repro_on_demo_data(project: Path, tmp_path: Path):
    run(["covidcxr", "demo-data", "data/demo"], project)
    # The generator is byte-deterministic: adding the data reproduces the committed data.dvc exactly.
    run(["dvc", "add", "data"], project)
    assert (project / "data.dvc").read_text() == (ROOT / "data.dvc").read_text()

    set_params(project, TINY)
    out = run(["dvc", "repro"], project)
    for stage in ("sources", "ingest", "cache", "cache_projection", "train_projection", "filter_frontal", "train_unet",
                  "segment", "train_classifier@e-vgg16", "evaluate", "explain", "audit"):
        assert f"Running stage '{stage}'" in out.stdout, stage
    for noise in ("cpu_feature_guard", "absl::InitializeLog", "oneDNN custom operations", "Calculating Metrics",
                  "node_def_util", "Downloading artifacts", "UserWarning"):
        lines = [line for line in (out.stdout + out.stderr).splitlines() if noise in line]
        assert not lines, f"third-party noise in the stages' output: {lines[:3]}"
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
        for backbone in TINY["train_classifier"]["backbones"]:
            d = project / f"artifacts/models/classifier_{variant}_{backbone}"
            assert {"model.keras", "member1.keras", "standardizer.json", "threshold.json", "predictions.csv",
                    "run.json"} <= {p.name for p in d.iterdir()}
            assert json.loads((d / "run.json").read_text())["member_seeds"] == [42, 1042]
            assert (project / f"reports/explain/gradcam/{variant}_{backbone}.png").stat().st_size > 1000
    table = pd.read_csv(project / "reports/evaluate/comparison.csv")
    assert set(table["Part"]) == {"c", "d", "e"}
    # What serving answers, per split: every film of the split; of those the classifier scored, refused by the
    # folder's detector as the classifier stage counted them; the others refused before it, with serving's reason
    for variant in "cde":
        test = json.loads((project / f"reports/evaluate/{variant}_vgg16/metrics.json").read_text())["test"]
        served, films = test["served"], test["films"]
        stage = json.loads((project / f"reports/train_classifier/{variant}_vgg16.json").read_text())["ood"]["refused"]
        by_reason = served["refused_by_reason"]
        assert by_reason.get("out_of_distribution", 0) / films["scored"] == pytest.approx(stage["test"])
        assert films["n"] == films["scored"] + sum(films["refused_before_scoring"].values()) == served["n"]
        assert served["refused"] == sum(by_reason.values()) == by_reason.get("out_of_distribution", 0) + sum(
            films["refused_before_scoring"].values())
        assert set(films["refused_before_scoring"]) <= {"lateral_view", "empty_lung_mask", "lung_mask_too_large"}
        assert 0.0 <= served["negatives_called_covid"] <= 1.0 and served["n"] == served["n_positive"] + \
            served["n_negative"]
    unet = json.loads((project / "reports/train_unet/metrics.json").read_text())
    assert {"dice", "iou", "paper_pixel_dice"} <= set(unet["val"])
    # segment's Dice per segmentation split (pooled, the U-Net's own training images dominated it), the counts whole
    segmented = json.loads((project / "reports/segment/metrics.json").read_text())
    by_split = segmented["dice_vs_true_masks"]
    assert {"train", "test"} <= set(by_split) and all(0.0 <= v["dice"] <= 1.0 for v in by_split.values())
    assert sum(v["n"] for v in by_split.values()) == segmented["n_with_true_masks"]

    # The projection filter learned and filtered at its own size; everything else at the cache's.
    assert np.load(project / "artifacts/cache_projection/images.npy", mmap_mode="r").shape[1:] == (64, 64)
    assert np.load(project / "artifacts/cache/images.npy", mmap_mode="r").shape[1:] == (32, 32)
    from covidcxr import models

    projection = models.Component.load(project / "artifacts/models/projection")
    assert projection.model.input_shape[1:3] == (64, 64) and len(projection.networks) == 2  # a two-filter ensemble
    classifier = models.Component.load(project / "artifacts/models/classifier_c_vgg16")  # what register bundles
    assert {n.get_layer("block1_conv1").compute_dtype for n in classifier.networks} == {"bfloat16"}
    assert projection.model.get_layer("block1_conv1").compute_dtype == "float32"  # the default
    check = json.loads((project / "reports/train_projection/metrics.json").read_text())["lateral_check"]
    assert check["status"] == "fitted" and projection.ood.threshold == check["threshold"]  # saved with the filter
    # Its frontal threshold too, and the stage's own figures are the rule's at that threshold, a file's view position
    # first as filter_frontal and serving apply it (register serves the same value: test_serve; the demo's DICOMs all
    # carry a view position, so filter_frontal's calls come from them), the filter's alone under filter_only.
    assert projection.operating_threshold == TINY["train_projection"]["threshold"]
    from covidcxr import preprocess
    from covidcxr import projection as rule

    index, images, _ = preprocess.load_cache(project / "artifacts/cache_projection")
    test = pd.read_csv(project / "artifacts/splits/projection.csv").query("split == 'test'")
    rows = preprocess.rows_for(index, list(test["image_id"]))
    p_frontal, like_lateral = models.frontal_evidence(projection, images[rows])
    called, decided_by = rule.decide(p_frontal, index["header_view_position"].to_numpy()[rows], 0.45, like_lateral)
    alone, _ = rule.decide(p_frontal, None, 0.45, like_lateral)
    stage = json.loads((project / "reports/train_projection/metrics.json").read_text())["test"]
    assert stage["accuracy"] == pytest.approx(float(np.mean(called == test["label"].to_numpy())))
    assert stage["by_header"] == int((decided_by == rule.BY_HEADER).sum()) > 0
    assert stage["filter_only"]["accuracy"] == pytest.approx(float(np.mean(alone == test["label"].to_numpy())))

    # Standardizers are fitted on the training split only.
    for variant in "cde":
        std = json.loads((project / f"artifacts/models/classifier_{variant}_vgg16/standardizer.json").read_text())
        pred = pd.read_csv(project / f"artifacts/models/classifier_{variant}_vgg16/predictions.csv")
        assert std["n_images"] == (pred["split"] == "train").sum()

    metrics = run(["dvc", "metrics", "show", "--json"], project).stdout
    assert "test_auc" in metrics and "lung_mass_share" in metrics
    run(["dvc", "plots", "show", "-o", "plots_html"], project)
    html = (project / "plots_html" / "index.html").read_text()
    assert "vega" in html and "<script src" not in html  # renders offline: libraries inlined, no CDN

    # Clean afterwards but for the corpus fingerprint DVC always runs, and a second repro runs nothing else: the
    # MLproject's main entry point (`dvc repro`) through mlflow itself, one process where the repro and an entry point
    # were two (about 5 CPU-s). Every entry point runs `dvc repro` of stages dvc.yaml has (a default in braces filled).
    assert json.loads(run(["dvc", "status", "--json"], project).stdout or "{}") == {"sources": ["always changed"]}
    mlflow_run = run(["mlflow", "run", ".", "-e", "main", "--env-manager", "local"], project)
    assert re.findall(r"Running stage '([^']+)'", mlflow_run.stdout) == ["sources"]
    stages = set(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    entry_points = yaml.safe_load((project / "MLproject").read_text())["entry_points"]
    for name, entry in entry_points.items():
        defaults = {key: spec["default"] for key, spec in entry.get("parameters", {}).items()}
        command = entry["command"].format(**defaults).split()
        assert command[:2] == ["dvc", "repro"] and set(command[2:]) <= stages, (name, command)
    assert {"main", "evaluate"} <= set(entry_points)

    # The data stages do not depend on model params: their results equal the committed ones (determinism).
    for name in ("reports/ingest/summary.json", "reports/split/summary.json", "reports/validate/manifest.json"):
        assert (project / name).read_text() == (ROOT / name).read_text(), name

    # MLflow recorded one run per model in the experiment's store, with the reproducibility tags.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("covidcxr-demo")
    runs = client.search_runs([experiment.experiment_id])
    names = {r.info.run_name for r in runs}
    assert {"projection-vgg19", "unet-f04", "classifier-c-vgg16", "classifier-e-vgg16"} <= names
    classifier = next(r for r in runs if r.info.run_name == "classifier-d-vgg16")
    assert classifier.data.tags["data_dvc"] == yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]["md5"]
    from pipelines import _tracking

    data = {role: project / path for role, path in _tracking.stage_data("train_classifier").items()}
    assert classifier.data.tags["data_version"] == _tracking.data_version(data)  # the manifest and covid split
    assert {"eval.test.at_0.5.roc_auc", "eval.test.at_0.5.accuracy"} & set(classifier.data.metrics)

    # The model card of the registered version: written, self-contained, logged with the model, no patient ids.
    assert "Running stage 'model_card'" in out.stdout
    registered = json.loads((project / "reports/register/registered.json").read_text())
    assert registered["data_version"] == classifier.data.tags["data_version"]  # the same data: the same version
    card = project / f"reports/model_card/{registered['model_name']}-v{registered['version']}.html"
    page = card.read_text(encoding="utf-8")
    assert page == (project / "reports/model_card/index.html").read_text(encoding="utf-8")
    assert not re.search(r"(?i)<[^>]*\b(src|href)\s*=\s*[\"']?\s*(https?:)?//", page) and "<script" not in page.lower()
    assert page.count("<svg") == 3 and "data:image/png;base64," in page and "Shortcut audit" in page
    assert not any(pid in page for pid in splits["patient_id"])
    version = client.get_model_version(registered["model_name"], str(registered["version"]))
    assert version.tags["model_card"] == f"runs:/{version.run_id}/model_card/{card.name}"

    # The shortcut audit graded every check; register read it (tests/test_audit.py covers the verdicts themselves).
    result = json.loads((project / "reports/audit/audit.json").read_text())
    assert result["status"] in {"pass", "inconclusive", "warn", "fail"} and {c["name"] for c in result["checks"]} == {
        "lungs_removed_auc", "heatmap_lung_mass", "source_classifier"}
    assert all(c["status"] in audit.STATUSES and c["reason"] for c in result["checks"])  # inconclusive included
    assert json.loads((project / "reports/register/registered.json").read_text())["audit_status"] in {
        "pass", "inconclusive", "warn", "fail"}

    # The register stage ran with the others; then the registry and the served model (tests/pipelines/test_serve.py).
    assert "Running stage 'register'" in out.stdout
    from tests.pipelines.test_serve import check_register_and_serve

    transcript = check_register_and_serve(project)

    # Protected health information: none of the headers' identifying values anywhere the run wrote or answered.
    logs = [out.stdout, out.stderr, mlflow_run.stdout, mlflow_run.stderr]
    check_no_phi(project, [*logs, *transcript], tmp_path)
