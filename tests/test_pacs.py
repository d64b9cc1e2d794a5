"""PACS round trip against a real Orthanc (Debian's `orthanc` + `orthanc-dicomweb`) on 127.0.0.1: demo DICOMs with
planted identifiers go in, the `covidcxr pacs` worker scores them with a registered tiny pyfunc and stores an SR and a
Grad-CAM Secondary Capture back into each study; a second run adds nothing; no identifier leaves through the worker's
output or the MLflow store."""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import io
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests

from covidcxr import pacs, predlog, serving, sites
from covidcxr.datasets import demo
from tests.conftest import REAL_DATA_ENV, real_data_root
from tests.helpers import build_bundle
from tests.infra.conftest import BIN, base_env, free_port, missing, stop_group

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
MODEL_NAME = "covidcxr-pacs-test"
WORKER_TIMEOUT_S = 150
SITE_THRESHOLD = 0.25  # a hospital's own threshold (`--site`), not the model's 0.5: the results must record it


@dataclass(frozen=True)
class Orthanc:
    url: str
    user: str
    password: str

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def session(self) -> requests.Session:
        """A session as this Orthanc's user that never goes through the shell's proxy (as the worker's own: with
        http_proxy set and no no_proxy, requests sent the test's planted identifiers to the proxy)."""
        session = requests.Session()
        session.auth, session.trust_env = (self.user, self.password), False
        return session

    def get(self, path: str) -> requests.Response:
        with self.session() as session:
            response = session.get(f"{self.url}{path}", timeout=10)
        response.raise_for_status()
        return response

    def upload(self, data: bytes) -> requests.Response:
        """Store one DICOM instance (Orthanc's REST API)."""
        with self.session() as session:
            return session.post(f"{self.url}/instances", data=data, timeout=10)

    def instance_count(self) -> int:
        return int(self.get("/statistics").json()["CountInstances"])

    def client(self):
        from dicomweb_client.api import DICOMwebClient

        return DICOMwebClient(self.dicomweb, session=self.session(), timeout=10)


@contextlib.contextmanager
def running_orthanc(work: Path) -> Iterator[Orthanc]:
    """A private Orthanc in ``work``: throwaway config and storage, HTTP on a free port (loopback only), DIMSE off, a
    test user."""
    if not (ORTHANC.exists() and DICOMWEB_PLUGIN.exists()):
        missing("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")
    server = Orthanc(f"http://127.0.0.1:{free_port()}", "covidcxr", secrets.token_hex(12))
    config = {
        "Name": "COVIDCXR-TEST", "StorageDirectory": str(work / "db"), "IndexDirectory": str(work / "db"),
        "HttpPort": int(server.url.rsplit(":", 1)[1]), "RemoteAccessAllowed": False, "DicomServerEnabled": False,
        "AuthenticationEnabled": True, "RegisteredUsers": {server.user: server.password},
        "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "SaveJobs": False, "HttpThreadsCount": 4, "StorageCompression": False,
    }
    (work / "orthanc.json").write_text(json.dumps(config))
    log = work / "orthanc.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(ORTHANC), str(work / "orthanc.json")], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"Orthanc exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                server.get("/system")
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise AssertionError(f"Orthanc did not answer in 30 s:\n{log.read_text()[-3000:]}") from None
                time.sleep(0.2)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):  # its storage goes next: no graceful stop to wait for (2.5 s)
            os.killpg(proc.pid, signal.SIGKILL)
        stop_group(proc)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory) -> Iterator[Orthanc]:
    """The Orthanc the worker's round trips share."""
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture
def own_orthanc(tmp_path_factory) -> Iterator[Orthanc]:
    """An Orthanc of one test's own, whose every study is the test's."""
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Iterator[Path]:
    """A throwaway MLflow store with the tiny untrained pipeline registered as MODEL_NAME@champion (version 1)."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    bundle = build_bundle(root / "bundle", model_name=MODEL_NAME, model_version="1")
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment("pacs-test", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            mlflow.pyfunc.log_model(name="model", python_model=serving.CovidCxrModel(), artifacts=bundle,
                                    signature=serving.signature(), pip_requirements=["mlflow"],
                                    registered_model_name=MODEL_NAME)
        mlflow.MlflowClient().set_registered_model_alias(MODEL_NAME, "champion", "1")
    finally:
        mlflow.set_tracking_uri(None)
    shutil.rmtree(root / "bundle")
    yield root


def plant_and_upload(orthanc: Orthanc, folder: Path) -> dict[str, dict]:
    """Upload the demo DICOMs with planted identifiers; {study uid: {"phi": {...}, "sources": {sop uid, ...}}}."""
    studies: dict[str, dict] = {}
    for path in sorted(folder.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - the demo's deliberately broken files
            continue
        study = studies.setdefault(ds.StudyInstanceUID, {"phi": {
            "PatientName": f"Quxbaz^Planted{len(studies):03d}", "PatientID": f"PHI-{secrets.token_hex(4)}",
            "AccessionNumber": f"ACC{secrets.token_hex(5)}"}, "sources": set()})
        for keyword, value in study["phi"].items():
            setattr(ds, keyword, value)
        data = pydicom.filebase.DicomBytesIO()
        ds.save_as(data, enforce_file_format=True)
        if orthanc.upload(data.getvalue()).status_code == 200:
            study["sources"].add(ds.SOPInstanceUID)
    return {uid: s for uid, s in studies.items() if s["sources"]}


def run_worker(orthanc: Orthanc, registry: Path, *extra: str, status: int = 0) -> tuple[dict, str]:
    """`covidcxr pacs --once` in a subprocess (``extra``: more options) that exits with ``status``; (its summary, or
    {} when it printed none, and everything it printed)."""
    env = base_env(MLFLOW_TRACKING_URI=f"sqlite:///{registry / 'mlflow.db'}", COVIDCXR_PACS_USER=orthanc.user,
                   COVIDCXR_PACS_PASSWORD=orthanc.password)
    proc = subprocess.run([str(BIN / "python"), "-m", "covidcxr.cli", "pacs", "--dicomweb-url", orthanc.dicomweb,
                           "--model-uri", f"models:/{MODEL_NAME}@champion", "--once", "--retries", "1",
                           "--lock-file", str(registry / "pacs.lock"), *extra],
                          env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    output = proc.stdout + proc.stderr
    assert proc.returncode == status, output[-5000:]
    return (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}), output


def results_of(orthanc: Orthanc, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    """The SR and SC instances of a study, read back over WADO-RS."""
    client = orthanc.client()
    out: dict[str, list] = {"SR": [], "OT": []}
    for item in client.search_for_instances(study_instance_uid=study_uid, fields=["Modality", "SeriesInstanceUID"]):
        modality = pacs.qido_value(item, "Modality")
        if modality in out:
            out[modality].append(client.retrieve_instance(study_uid, pacs.qido_value(item, "SeriesInstanceUID"),
                                                          pacs.qido_value(item, "SOPInstanceUID")))
    return out


def check_sr(sr: pydicom.Dataset, phi: dict) -> tuple[str, dict]:
    """The source SOP uid an SR references, and its findings by concept name; checks modules and references."""
    import highdicom as hd

    assert sr.SOPClassUID == hd.sr.ComprehensiveSR.from_dataset(sr).SOPClassUID
    for keyword, value in phi.items():
        assert str(sr.get(keyword)) == value
    [evidence] = sr.CurrentRequestedProcedureEvidenceSequence
    [referenced] = [i for s in evidence.ReferencedSeriesSequence for i in s.ReferencedSOPSequence]
    findings: dict[str, object] = {}

    def walk(items) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else None
            if item.ValueType == "NUM":
                value = item.MeasuredValueSequence[0]
                findings[name] = (float(value.NumericValue), value.MeasurementUnitsCodeSequence[0].CodeValue)
            elif item.ValueType == "CODE":  # a value over 16 characters is a LongCodeValue (out_of_distribution)
                code = item.ConceptCodeSequence[0]
                findings[name] = code.get("CodeValue") or code.get("LongCodeValue")
            elif item.ValueType == "TEXT" and name == "Algorithm Parameters":
                findings.setdefault(name, []).append(item.TextValue)
            elif item.ValueType == "TEXT":
                findings.setdefault(name, item.TextValue)
            elif item.ValueType == "IMAGE":
                findings.setdefault("images", []).append(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    source = referenced.ReferencedSOPInstanceUID
    assert set(findings["images"]) == {source}  # image library and the measurement group's source image
    return source, findings


@dataclass(frozen=True)
class RoundTrip:
    """What the worker's passes over one PACS did: the studies uploaded (``real``: those of the corpus's two real CRs,
    empty without the corpus), the instance counts before and after them, and each pass's summary and output."""
    studies: dict[str, dict]
    real: dict[str, dict]
    before: int
    after_stale: int
    after: int
    after_again: int
    stale: tuple[dict, str]
    first: tuple[dict, str]
    again: tuple[dict, str]


@pytest.fixture(scope="module")
def round_trip(orthanc, registry, tmp_path_factory) -> RoundTrip:
    """Demo DICOMs (and the real CRs, where the corpus is set) with planted identifiers in the shared Orthanc, then
    three `covidcxr pacs --once` processes: at a site file chosen for another version (refused), at this hospital's
    own threshold, and again (nothing left to do). One pass serves the demo's and the real CRs' tests: each worker is a
    process of its own that loads TensorFlow and the model."""
    work = tmp_path_factory.mktemp("round-trip")
    demo.generate(work / "demo", n_patients=12, size=64, workers=1)
    studies = plant_and_upload(orthanc, work / "demo" / "images")
    real: dict[str, dict] = {}
    if os.environ.get(REAL_DATA_ENV):
        (work / "real").mkdir()
        for path in (real_data_root() / "dicom").glob("*.dcm"):
            shutil.copy(path, work / "real" / path.name)
        real = plant_and_upload(orthanc, work / "real")
        studies = {**studies, **real}
    before = orthanc.instance_count()

    site = work / "site.json"  # this hospital's own threshold (calibrate-site --output), on every image
    site.write_text(json.dumps({"threshold": SITE_THRESHOLD, "ood_threshold": None, "model_version": "2",
                                "model_name": MODEL_NAME}))
    stale = run_worker(orthanc, registry, "--site", str(site), status=1)  # chosen for another version
    after_stale = orthanc.instance_count()
    site.write_text(json.dumps({"threshold": SITE_THRESHOLD, "ood_threshold": None, "model_version": "1",
                                "model_name": MODEL_NAME}))
    first = run_worker(orthanc, registry, "--site", str(site))
    after = orthanc.instance_count()
    again = run_worker(orthanc, registry)
    return RoundTrip(studies, real, before, after_stale, after, orthanc.instance_count(), stale, first, again)


@pytest.mark.infra
def test_worker_writes_sr_and_overlay_into_each_study_once_and_leaks_no_phi(orthanc, registry, round_trip):
    studies, before, after = round_trip.studies, round_trip.before, round_trip.after
    n_sources = sum(len(s["sources"]) for s in studies.values())
    assert before == n_sources >= 12 + sum(len(s["sources"]) for s in round_trip.real.values())

    stale, stale_output = round_trip.stale
    assert stale == {} and "the model answering is version 1: calibrate the site again" in stale_output
    assert round_trip.after_stale == before
    summary, output = round_trip.first
    assert summary["studies"] == len(studies) and summary["images"] == n_sources and summary["already_done"] == 0
    assert summary["scored"] + summary["refused"] == n_sources and summary["scored"] > 0 and summary["refused"] > 0
    assert summary["stored_sr"] == n_sources and summary["stored_sc"] == summary["scored"]
    assert summary["failed_studies"] == 0
    assert after == before + n_sources + summary["scored"]

    scored = refused = 0
    for study_uid, study in studies.items():
        found = results_of(orthanc, study_uid)
        assert len(found["SR"]) == len(study["sources"])
        overlays = {}
        for sc in found["OT"]:
            assert sc.StudyInstanceUID == study_uid and sc.PhotometricInterpretation == "RGB"
            assert sc.SamplesPerPixel == 3 and sc.Rows > 0 and sc.pixel_array.shape[-1] == 3
            assert all(str(sc.get(k)) == v for k, v in study["phi"].items())
            [source] = sc.SourceImageSequence
            overlays[source.ReferencedSOPInstanceUID] = sc
        for sr in found["SR"]:
            assert sr.StudyInstanceUID == study_uid and sr.SOPInstanceUID not in study["sources"]
            source, findings = check_sr(sr, study["phi"])
            assert source in study["sources"]
            assert findings["Operating threshold"] == (SITE_THRESHOLD, "{probability}")
            if findings["Scoring status"] == "scored":
                scored += 1
                probability, unit = findings["COVID-19 probability"]
                assert 0.0 <= probability <= 1.0 and unit == "{probability}"
                assert findings["COVID-19 label"] == ("840539006" if probability >= SITE_THRESHOLD else "260385009")
                assert findings["Image View"] == "frontal" and source in overlays
            else:
                refused += 1
                assert findings["Reason not scored"] and "COVID-19 probability" not in findings
                assert source not in overlays
    assert (scored, refused) == (summary["scored"], summary["refused"])
    assert sum(r for r in summary["reasons"].values()) == refused and "lateral_view" in summary["reasons"]

    again, output_again = round_trip.again
    assert again["already_done"] == n_sources and again["stored_sr"] == again["stored_sc"] == 0
    assert round_trip.after_again == after

    # Identifiers went into the PACS only: not into the worker's output or log, nor into the MLflow store it read.
    secrets_ = [v for s in studies.values() for v in s["phi"].values()] + [orthanc.password]
    uids = list(studies) + [uid for s in studies.values() for uid in s["sources"]]
    printed = output + output_again + stale_output
    assert "pass over" in printed and "study " in printed  # it did log, with counts and hashed ids
    for value in secrets_ + uids:
        assert value not in printed, "an identifier reached the worker's output"
    for path in registry.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(v.encode() in data for v in secrets_), f"an identifier reached {path.name}"


def source_dataset(**elements) -> pydicom.Dataset:
    """A small CR of one study (``elements``: more attributes, by keyword), as retrieved from the PACS."""
    import numpy as np

    from tests.test_io import make_dicom

    data = make_dicom(np.full((8, 8), 100, np.uint16), StudyInstanceUID="1.2.826.0.1.3680043.8.498.7",
                      SeriesInstanceUID="1.2.826.0.1.3680043.8.498.8", **elements)
    return pydicom.dcmread(io.BytesIO(data))


def source_header(**elements) -> pydicom.Dataset:
    """The header of :func:`source_dataset`'s CR, as the worker copies it."""
    return pacs.header_only(source_dataset(**elements))


def sr_of(header: pydicom.Dataset, **changes) -> dict:
    """The SR of a film refused as out of distribution at a site's own OOD threshold, read back by check_sr."""
    entry = {**dict.fromkeys(serving.FIELDS), "accepted": False, "reason": "out_of_distribution",
             "message": "far from training", "projection": "frontal", "projection_probability": 0.97,
             "lung_area_fraction": 0.31, "ood_score": 41.5, "ood_threshold": 30.25, "threshold": 0.25,
             "thresholds_from": "site", "model_version": "3", **changes}
    model = pacs.ModelId("covidcxr", "3")
    built = pacs.build_sr(header, entry, model, pacs.series_uids(header.StudyInstanceUID, model)["sr"],
                          pacs.result_uids(header.SOPInstanceUID, model)["sr"], 1)
    buffer = io.BytesIO()
    built.save_as(buffer)
    sr = pydicom.dcmread(io.BytesIO(buffer.getvalue()))  # as the PACS would store and return it
    source, findings = check_sr(sr, {})
    assert source == header.SOPInstanceUID
    return findings


@pytest.mark.parametrize("described", [True, False])
def test_the_sr_records_the_ood_score_and_both_thresholds_that_decided(described):
    """A film far from training is where an auditor asks which limits were in force: the SR says by how much and at
    what, beside the operating threshold; with or without what the image library describes a radiograph by."""
    import numpy as np

    from tests.test_io import make_dicom

    described_by = {"PatientOrientation": ["L", "F"], "ImagerPixelSpacing": [0.2, 0.2]} if described else {}
    data = make_dicom(np.full((8, 8), 100, np.uint16), StudyInstanceUID="1.2.826.0.1.3680043.8.498.7",
                      SeriesInstanceUID="1.2.826.0.1.3680043.8.498.8", **described_by)
    header = pacs.header_only(pydicom.dcmread(io.BytesIO(data)))
    assert pacs.library_describes(header) is described
    findings = sr_of(header)
    assert findings["Out-of-distribution score"] == (41.5, "1")
    assert findings["Out-of-distribution threshold"] == (30.25, "1")
    assert findings["Operating threshold"] == (0.25, "{probability}")
    assert findings["Reason not scored"] == "out_of_distribution" and "COVID-19 probability" not in findings
    assert findings["Algorithm Parameters"] == ["threshold=0.25", "ood_threshold=30.25", "thresholds_from=site"]
    assert ("Horizontal Pixel Spacing" in findings) is described


def test_an_image_scored_with_the_out_of_distribution_flag_says_so_in_its_sr():
    """Under ood_action: flag a film far from training is answered (accepted) with reason out_of_distribution: its SR
    had the score and no word of the flag, which only a refused film's reason carried."""
    findings = sr_of(source_header(), accepted=True, covid_probability=0.8, label="covid",
                     message="out of distribution; the answer may be unreliable")
    assert findings["Scoring status"] == "scored" and findings["COVID-19 probability"] == (0.8, "{probability}")
    assert findings["Result flag"] == "out_of_distribution" and "Reason not scored" not in findings
    assert "Result flag" not in sr_of(source_header(), accepted=True, reason=None, covid_probability=0.8,
                                      label="covid")


def test_real_crs_without_imager_pixel_spacing_get_their_sr(real_data):
    """Both real CRs lack ImagerPixelSpacing (one has no patient orientation either), which highdicom's image library
    reads for a radiograph: their SRs were refused, so a PACS of such files would have failed every study forever."""
    files = sorted((real_data / "dicom").glob("*.dcm"))
    assert len(files) == 2
    for path in files:
        header = pacs.header_only(pydicom.dcmread(path, stop_before_pixels=True))
        assert not pacs.library_describes(header)
        findings = sr_of(header, accepted=True, reason=None, covid_probability=0.8, label="covid", ood_score=None,
                         ood_threshold=None, thresholds_from="model")  # a model without an OOD detector
        assert findings["COVID-19 probability"] == (0.8, "{probability}") and findings["Scoring status"] == "scored"
        assert findings["Algorithm Parameters"] == ["threshold=0.25", "thresholds_from=model"]
        assert "Out-of-distribution score" not in findings


@pytest.mark.parametrize("source, expected", [
    ({"BurnedInAnnotation": "NO"}, {"BurnedInAnnotation": "NO"}),
    ({"BurnedInAnnotation": "YES", "LossyImageCompression": "01", "LossyImageCompressionRatio": [12.5],
      "LossyImageCompressionMethod": ["ISO_10918_1"]},
     {"BurnedInAnnotation": "YES", "LossyImageCompression": "01", "LossyImageCompressionRatio": 12.5,
      "LossyImageCompressionMethod": "ISO_10918_1"}),
    ({}, {"BurnedInAnnotation": "YES", "LossyImageCompression": None}),
])
def test_the_overlay_keeps_what_the_source_says_of_its_burned_in_text_and_lossy_compression(source, expected):
    """The Grad-CAM SC is drawn on the source's pixels, but said nothing of the text burned into them (nor of the lossy
    compression they went through): a de-identifier trusting it would pass a name in the pixels. It now copies both;
    a source that does not say gets YES, as pixels nobody checked."""
    import numpy as np

    model = pacs.ModelId("covidcxr", "3")
    header = source_header(**source)
    sc = pacs.build_sc(header, serving.png_base64(np.zeros((8, 8, 3), np.uint8)), model,
                       pacs.series_uids(header.StudyInstanceUID, model)["sc"],
                       pacs.result_uids(header.SOPInstanceUID, model)["sc"], 1)
    buffer = io.BytesIO()
    sc.save_as(buffer)
    stored = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert {k: stored.get(k) for k in expected} == expected


@pytest.mark.infra
def test_real_crs_make_the_round_trip(own_orthanc, real_data, pipeline, caplog):
    """The corpus's two real CRs (JPEG 2000 and native; neither with ImagerPixelSpacing, one without patient
    orientation) through the PACS: each gets its SR, none of their studies fails, and no identifier reaches the log.
    The worker runs in this process: this test shared :func:`round_trip` with the demo's, and under pytest-xdist (whose
    groups do not hold with pytest 9) each of the two workers that ran them built it, a minute and more each."""
    caplog.set_level(logging.DEBUG)
    real = plant_and_upload(own_orthanc, real_data / "dicom")
    assert sum(len(s["sources"]) for s in real.values()) == 2
    summary = pacs.run(dicomweb(own_orthanc), scorer(pipeline)[0], "covidcxr")
    assert (summary.images, summary.stored_sr, summary.failed_studies) == (2, 2, 0)
    for study_uid, study in real.items():
        found = results_of(own_orthanc, study_uid)
        assert {check_sr(sr, study["phi"])[0] for sr in found["SR"]} == study["sources"]
    identifiers = [*real, *(v for s in real.values() for v in [*s["sources"], *s["phi"].values()])]
    assert "pass over" in caplog.text and not [v for v in identifiers if v in caplog.text]


@pytest.mark.infra
def test_wrong_credentials_are_a_typed_error_that_does_not_quote_them(orthanc):
    client = pacs.DicomWeb(orthanc.dicomweb, user=orthanc.user, password="not-the-password", retries=0)
    with pytest.raises(pacs.PacsError, match="HTTP 401 to QIDO-RS study search.*COVIDCXR_PACS_PASSWORD") as caught:
        client.find_studies()
    assert orthanc.url in str(caught.value) and "not-the-password" not in str(caught.value)
    assert not isinstance(caught.value, pacs.PacsUnavailable)


def test_unreachable_pacs_is_a_typed_error_naming_the_endpoint_after_bounded_retries():
    port = free_port()
    waits: list[float] = []
    client = pacs.DicomWeb(f"http://alice:s3cret@127.0.0.1:{port}/dicom-web", retries=2, backoff=0.05, timeout=2,
                           sleep=waits.append)
    with pytest.raises(pacs.PacsUnavailable) as caught:
        client.find_studies()
    message = str(caught.value)
    assert f"http://127.0.0.1:{port}/dicom-web" in message and "3 attempts" in message, message
    assert "s3cret" not in message and "alice" not in message
    assert waits == [0.05, 0.1]  # bounded: two retries with exponential backoff, then the error


def test_408_and_429_are_retried_after_their_retry_after_then_the_pacs_is_unavailable():
    """A 408 or 429 (the PACS busy) failed the study as if it were the study's own problem. They are now retried like
    a 5xx, after the answer's Retry-After (bounded) where it gives one, and once the retries run out the PACS is
    unavailable."""
    answers = [(429, "7"), (429, "3600"), (408, None)]

    class Busy(Quiet):
        def do_GET(self):  # noqa: N802 - the http.server API
            status, after = answers.pop(0) if answers else (200, None)
            body = b"[]" if status == 200 else b"busy"
            self.send_response(status)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            if after:
                self.send_header("Retry-After", after)
            self.end_headers()
            self.wfile.write(body)

    waits: list[float] = []
    with loopback(Busy) as port:
        url = f"http://127.0.0.1:{port}/dicom-web"
        assert pacs.DicomWeb(url, retries=3, backoff=0.5, sleep=waits.append).find_studies() == []
        assert waits == [7.0, serving.MAX_RETRY_AFTER, 0.5 * 2 ** 2]
        answers[:] = [(429, None)] * 2
        with pytest.raises(pacs.PacsUnavailable, match="HTTP 429 after 2 attempts"):
            pacs.DicomWeb(url, retries=1, backoff=0, sleep=waits.append).find_studies()


def test_a_worker_does_not_start_while_another_of_the_same_pacs_and_scorer_runs(tmp_path, capsys):
    """README's cron line (every 5 minutes, --once) let a slow pass overlap the next: both scored the same images (two
    prediction-log records each) and stored their results twice. A worker now holds a lock while it runs, and another
    of the same lock exits at once (75, EX_TEMPFAIL) saying so; the lock goes with the process that held it."""
    from covidcxr import cli

    lock = tmp_path / "pacs.lock"
    worker = ["pacs", "--dicomweb-url", "http://alice:s3cret@127.0.0.1:9/dicom-web", "--url", "http://127.0.0.1:9",
              "--retries", "0", "--pacs-timeout", "1", "--once", "--lock-file", str(lock)]
    holder = subprocess.Popen([str(BIN / "python"), "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert cli.main(worker) == cli.PACS_BUSY == 75
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert "another worker holds the lock" in err and str(lock) in err and "s3cret" not in err
    assert cli.main(worker) == 1  # the lock free again: the pass runs (and fails: nothing answers)
    with pacs.worker_lock(lock), pytest.raises(pacs.WorkerBusy):  # one lock per file, in one process too
        with pacs.worker_lock(lock):
            pass


def test_workers_of_one_pacs_and_scorer_meet_at_the_default_lock_whatever_their_session_and_spelling(tmp_path,
                                                                                                      monkeypatch,
                                                                                                      capsys):
    """The default lock was in $XDG_RUNTIME_DIR when set, else the temporary folder: a cron worker (no
    XDG_RUNTIME_DIR) and one started from a login shell or a systemd user unit (/run/user/UID) held different files
    and ran at once; and `http://127.0.0.1:5000` and `http://127.0.0.1:5000/` (or `/invocations`) were two scorers.
    The CLI's default is now one file in the temporary folder, keyed by the URLs as the requests reach them: a worker
    of the same PACS and scorer meets the lock however it was started and spelt, one of another PACS does not."""
    import tempfile

    from covidcxr import cli

    root = f"127.0.0.1:9/dicom-web-{secrets.token_hex(4)}"  # this test's own PACS: no other test process meets its lock
    cron_env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    holder = subprocess.Popen([str(BIN / "python"), "-c", "import fcntl, sys, time; from covidcxr import cli; "
                               "f = open(cli._pacs_lock_path(sys.argv[1], sys.argv[2]), 'w'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               f"http://alice:s3cret@{root}", "http://127.0.0.1:9"],
                              env=cron_env, stdout=subprocess.PIPE, text=True)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # a login shell's session
    options = ["--retries", "0", "--pacs-timeout", "1", "--once"]
    other = f"http://127.0.0.1:9/other-pacs-{secrets.token_hex(4)}"
    try:
        assert holder.stdout.readline() == "held\n"
        for scorer in ("http://127.0.0.1:9/", "HTTP://127.0.0.1:9/invocations", "http://127.0.0.1:9/invocations/"):
            assert cli.main(["pacs", "--dicomweb-url", f"HTTP://{root}/", "--url", scorer, *options]) == cli.PACS_BUSY
            assert "another worker holds the lock" in capsys.readouterr().err
        assert cli.main(["pacs", "--dicomweb-url", other, "--url", "http://127.0.0.1:9", *options]) == 1  # its own
        assert "another worker holds the lock" not in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
        for pacs_url in (f"http://{root}", other):
            cli._pacs_lock_path(pacs_url, "http://127.0.0.1:9").unlink(missing_ok=True)
    by = cli._pacs_lock_path
    assert by("http://a:x@pacs/dicom-web", "m") == by("HTTP://b:y@PACS:80/dicom-web/", "m") != by("http://pacs2/", "m")
    assert by("http://pacs/a", "m") != by("http://pacs/A", "m")  # a path keeps its case
    assert by("https://pacs/", "m") == by("https://pacs:443", "m") != by("http://pacs/", "m")
    assert by("http://pacs/", "models:/covidcxr@champion") != by("http://pacs/", "http://127.0.0.1:5000")
    assert by("http://pacs/", "http://127.0.0.1:5000") != by("http://pacs/", "http://127.0.0.1:5001")
    assert by("http://pacs/", "m").parent == Path(tempfile.gettempdir())
    assert "pacs" not in by("http://pacs/", "m").name.removeprefix("covidcxr-pacs-")


@pytest.mark.parametrize("option, value, message", [
    ("--retries", "-1", "at least 0 retries"), ("--pacs-timeout", "0", "more than 0 seconds"),
    ("--interval", "-1", "more than 0 seconds"), ("--timeout", "nan", "more than 0 seconds"),
    ("--dicomweb-url", "alice:s3cret@pacs.example.org/dicom-web", "an http:// or https:// URL with a host"),
    ("--dicomweb-url", "https://alice:s3cret@pacs.example.org:port/dicom-web", "an http:// or https:// URL"),
])
def test_the_workers_options_are_checked_by_argparse_and_never_echo_credentials(option, value, message, capsys):
    """--retries -1 made no request and called the PACS unreachable, --pacs-timeout 0 failed every request, --interval
    -1 ended the worker after its first pass, and a --dicomweb-url without its scheme was a traceback quoting the
    user and password. Each is now an argparse error (exit 2) that repeats no credentials."""
    from covidcxr import cli

    args = {"--dicomweb-url": "https://pacs.example.org/dicom-web", option: value}
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args(["pacs", *(x for pair in args.items() for x in pair)])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and message in err and option in err and "s3cret" not in err, err


@pytest.mark.parametrize("kind, body", [("text/html", b"<html><body>Please log in</body></html>"),
                                        ("application/dicom+json", b'[{"0020000D": {"vr": "UI", "Val'),
                                        ("application/dicom+json", b'"studies"')])
def test_a_search_answered_with_no_dicom_json_is_a_pacs_error_naming_the_operation(kind, body):
    """A login page answered 200, or JSON cut off, reached the worker as a bare JSONDecodeError (an untyped failed
    pass, or a study failed as 'ValueError'); JSON that is no list of records, as an AttributeError. Each is now a
    PacsError naming the endpoint and the operation."""

    class Page(Quiet):
        def do_GET(self):  # noqa: N802 - the http.server API
            self.answer(200, kind, body)

    with loopback(Page) as port, pytest.raises(pacs.PacsError, match="QIDO-RS study search") as caught:
        pacs.DicomWeb(f"http://127.0.0.1:{port}/dicom-web", retries=0).find_studies()
    assert f"127.0.0.1:{port}/dicom-web" in str(caught.value) and not isinstance(caught.value, pacs.PacsUnavailable)


def test_an_answer_cut_off_mid_transfer_is_retried_and_then_the_pacs_is_unavailable():
    """A chunked answer cut off mid-transfer (requests' ChunkedEncodingError) escaped the retries, untyped. It is now
    retried like a dropped connection."""
    requests_seen = []

    class CutOff(Quiet):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 - the http.server API
            requests_seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"40\r\n[{")
            self.wfile.flush()
            self.close_connection = True

    waits: list[float] = []
    with loopback(CutOff) as port, pytest.raises(pacs.PacsUnavailable, match="ChunkedEncodingError after 3 attempts"):
        pacs.DicomWeb(f"http://127.0.0.1:{port}/dicom-web", retries=2, backoff=0, sleep=waits.append).find_studies()
    assert len(requests_seen) == 3


def test_result_uids_are_deterministic_per_source_and_model():
    one, two = pacs.ModelId("covidcxr", "1"), pacs.ModelId("covidcxr", "2")
    assert pacs.result_uids("1.2.3", one) == pacs.result_uids("1.2.3", one)
    assert pacs.result_uids("1.2.3", one) != pacs.result_uids("1.2.3", two) != pacs.result_uids("1.2.4", two)
    assert len(set(pacs.result_uids("1.2.3", one).values())) == 2


def test_since_accepts_dates_and_days_back():
    assert pacs.parse_since("2024-03-01") == pacs.parse_since("20240301") == dt.date(2024, 3, 1)
    assert pacs.parse_since("7d", today=dt.date(2024, 3, 8)) == dt.date(2024, 3, 1)
    assert pacs.parse_since(None) is None
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        pacs.parse_since("last week")


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key, as a hospital's own CA would sign its PACS's: (cert, key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pacs.hospital.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "ca.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class Quiet(http.server.BaseHTTPRequestHandler):
    """A loopback test server's handler: :meth:`answer` sends one whole response; nothing is logged."""

    def answer(self, status: int, kind: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def loopback(handler: type[Quiet], tls: ssl.SSLContext | None = None) -> Iterator[int]:
    """``handler`` served on 127.0.0.1 (over TLS with ``tls``) in a thread while the block runs: its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_the_tests_own_requests_to_orthanc_never_go_through_the_shells_proxy(monkeypatch):
    """With http_proxy set and no no_proxy, the Orthanc helpers' requests (uploads with planted identifiers among
    them) went to the proxy; they go to 127.0.0.1 directly now, as the worker's own do. The proxy: a closed port."""
    seen = []

    class Store(Quiet):
        def do_GET(self):  # noqa: N802 - the http.server API
            seen.append(("GET", self.path))
            self.answer(200, "application/dicom+json" if "dicom-web" in self.path else "application/json", b"[]")

        def do_POST(self):  # noqa: N802 - the http.server API
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(("POST", self.path))
            self.answer(200, "application/json", b"{}")

    with socket.socket() as closed, loopback(Store) as port:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: a request sent to the proxy is refused
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{closed.getsockname()[1]}")
        server = Orthanc(f"http://127.0.0.1:{port}", "covidcxr", "secret")
        assert server.get("/system").json() == []
        assert server.upload(b"DICM").status_code == 200
        assert server.client().search_for_studies() == []
    assert [method for method, _ in seen] == ["GET", "POST", "GET"]


def test_an_https_pacs_signed_by_a_hospitals_own_ca_is_trusted_only_when_given(tmp_path):
    """The worker never reads REQUESTS_CA_BUNDLE (nor proxies): a PACS behind the hospital's own CA answered only
    'unreachable' after every retry. Its CA is now given explicitly; without it the error says so, at once."""
    cert, key = _self_signed(tmp_path)
    requests_seen = []

    class Qido(Quiet):
        def do_GET(self):  # noqa: N802 - the http.server API
            requests_seen.append(self.path)
            self.answer(200, "application/dicom+json", b"[]")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with loopback(Qido, context) as port:
        url = f"https://127.0.0.1:{port}/dicom-web"
        assert pacs.DicomWeb(url, ca_bundle=str(cert), retries=0, timeout=5).find_studies() == []
        assert requests_seen and requests_seen[0].startswith("/dicom-web/studies")
        waits: list[float] = []
        with pytest.raises(pacs.PacsError, match="TLS certificate is not trusted .*--pacs-ca-bundle") as caught:
            pacs.DicomWeb(url, retries=3, backoff=1.0, timeout=5, sleep=waits.append).find_studies()
        assert not isinstance(caught.value, pacs.PacsUnavailable) and waits == []  # no retries
        with pytest.raises(pacs.PacsError, match="no such file"):
            pacs.DicomWeb(url, ca_bundle=str(tmp_path / "missing.pem"))


# --- the worker in this process (pacs.run with the pyfunc's scorer), on a PACS of the test's own --------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> dict[str, str]:
    """The tiny untrained pipeline's artifacts (version 1): it scores every readable film (helpers.PERMISSIVE)."""
    return build_bundle(tmp_path_factory.mktemp("bundle"), model_version="1")


@pytest.fixture(scope="module")
def pipeline(bundle) -> serving.Pipeline:
    """The tiny pipeline, loaded here."""
    return serving.Pipeline.load(bundle)


def scorer(pipeline: serving.Pipeline, **config) -> tuple[serving.Scorer, predlog.MemoryLog]:
    """The worker's in-process scorer (the pyfunc's predict, which `serving.local_scorer` calls) over ``pipeline``'s
    networks under ``config``'s changes, and the prediction log it writes."""
    import dataclasses

    import pandas as pd

    changed = serving.Pipeline(pipeline.projection, pipeline.unet, pipeline.classifier,
                               dataclasses.replace(pipeline.config, **config), prediction_log=predlog.MemoryLog())
    model = serving.CovidCxrModel()
    model.pipeline = changed

    def score(images: list[str], params: dict) -> list[dict]:
        return model.predict(None, pd.DataFrame({serving.INPUT_COLUMN: images}), params)

    return score, changed.prediction_log


def upload_films(orthanc: Orthanc, n: int, *, study: str | None = None, sops: list[str] | None = None,
                 **elements) -> tuple[str, list[str]]:
    """A new study of ``n`` CR films (phantoms; ``elements``: more header attributes) in the PACS, or ``n`` more in
    ``study``'s series STUDY.1 (``sops``: their SOP Instance UIDs): its and their UIDs."""
    import numpy as np

    from tests.helpers import phantom
    from tests.test_io import make_dicom

    series = pydicom.uid.generate_uid() if study is None else f"{study}.1"
    study, new_sops, sops = study or pydicom.uid.generate_uid(), list(sops or []), []
    for i in range(n):
        sop = new_sops[i] if new_sops else pydicom.uid.generate_uid()
        data = make_dicom(np.round(phantom(seed=i) * 4000).astype(np.uint16), StudyInstanceUID=study,
                          SeriesInstanceUID=series, SOPInstanceUID=sop, PatientID="PHI-0042", **elements)
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.file_meta.MediaStorageSOPInstanceUID, ds.file_meta.MediaStorageSOPClassUID = sop, ds.SOPClassUID
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        orthanc.upload(buffer.getvalue()).raise_for_status()
        sops.append(sop)
    return study, sops


def dicomweb(orthanc: Orthanc) -> pacs.DicomWeb:
    return pacs.DicomWeb(orthanc.dicomweb, user=orthanc.user, password=orthanc.password, retries=0)


@pytest.mark.infra
def test_the_results_name_the_model_that_scored_them(own_orthanc, pipeline):
    """The name in the results (the SR's algorithm, both series' descriptions, and the result UIDs derived from it)
    was the CLI's (--model-name, else NAME of --model-uri, else covidcxr with --url) whatever model answered: another
    model of the same version number found the images already done. It is now the name the model reports, as its
    version; a model from before entries carried it gets the CLI's."""
    study, sops = upload_films(own_orthanc, 2)
    client = dicomweb(own_orthanc)
    ward, _ = scorer(pipeline, model_name="covidcxr-ward")
    summary = pacs.run(client, ward, "covidcxr")
    assert (summary.stored_sr, summary.stored_sc, summary.failed_studies) == (2, 2, 0)
    found = results_of(own_orthanc, study)
    model = pacs.ModelId("covidcxr-ward", "1")
    assert {sr.SOPInstanceUID for sr in found["SR"]} == {pacs.result_uids(sop, model)["sr"] for sop in sops}
    assert {check_sr(sr, {})[1]["Algorithm Name"] for sr in found["SR"]} == {"covidcxr-ward"}
    assert {ds.SeriesDescription for ds in found["SR"] + found["OT"]} == {
        "COVID-19 AI result, covidcxr-ward v1 (research use)", "COVID-19 AI heat map, covidcxr-ward v1 (research use)"}

    other, _ = scorer(pipeline, model_name="covidcxr-chest")  # another model, the same version number
    assert pacs.run(client, other, "covidcxr").already_done == 0
    assert pacs.run(client, ward, "covidcxr").already_done == 2

    def unnamed(images: list[str], params: dict) -> list[dict]:  # a server from before entries carried model_name
        return [{k: v for k, v in entry.items() if k != "model_name"} for entry in ward(images, params)]

    assert pacs.run(client, unnamed, "covidcxr-legacy").stored_sr == 2
    assert len(results_of(own_orthanc, study)["SR"]) == 6
    # ... but a site's thresholds are checked against the name the model answers with, never the CLI's fallback
    legacy = sites.SiteThresholds(0.3, None, "1", model_name="covidcxr-legacy", path="site.json")
    with pytest.raises(sites.SiteFileError, match="does not report its name"):
        pacs.run(client, unnamed, "covidcxr-legacy", site=legacy)


@contextlib.contextmanager
def served_over_http(score: serving.Scorer, down: int | None = None, busy: list[int] | None = None) -> Iterator[str]:
    """``score`` behind HTTP as `mlflow models serve` answers (/invocations; an MlflowException as its HTTP status and
    JSON); ``down``: that status, from a proxy, to every request after the first probe (the server gone after it
    answered one); ``busy``: statuses a proxy answers, one each, to the scoring requests (probes are answered)."""
    from mlflow.exceptions import MlflowException

    probed = threading.Event()

    class Invocations(Quiet):
        def do_POST(self):  # noqa: N802 - the http.server API
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            images = [record[serving.INPUT_COLUMN] for record in request["dataframe_records"]]
            try:
                if down and probed.is_set() or busy and images != [serving.probe_image()]:
                    status, body = down or busy.pop(0), b"<html>the service is unavailable</html>"
                else:
                    status, body = 200, json.dumps({"predictions": score(images, request["params"])}).encode()
                    probed.set()
            except MlflowException as err:
                status, body = err.get_http_status_code(), err.serialize_as_json().encode()
            self.answer(status, "application/json", body)

    with loopback(Invocations) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.mark.infra
def test_requests_hold_no_more_images_than_the_model_takes(own_orthanc, pipeline):
    """The worker's batch was held to the default limit (16), not to the model's: a model taking 4 was sent 8, and
    refused every study of more than 4 pending images, in process with a traceback that ended an --interval worker,
    over HTTP with a 400 that ended the pass at the same study every time. It now asks the model its limit."""
    client = dicomweb(own_orthanc)
    score, _ = scorer(pipeline, limits=serving.Limits(max_images=4))
    study, _ = upload_films(own_orthanc, 6)
    summary = pacs.run(client, score, "covidcxr", batch_size=8)
    assert (summary.stored_sr, summary.failed_studies) == (6, 0)
    with served_over_http(score) as url:
        upload_films(own_orthanc, 6)
        summary = pacs.run(client, serving.remote_scorer(url, timeout=60), "covidcxr", batch_size=8)
    assert (summary.studies, summary.already_done, summary.stored_sr, summary.failed_studies) == (2, 6, 6, 0)


@pytest.mark.infra
def test_a_study_the_scorer_fails_on_is_counted_and_the_pass_goes_on(own_orthanc, bundle, pipeline):
    """A scorer's failure on a study's images ended the pass (an in-process ServingError with a traceback, a server's
    error answer as ScoringError), at the same study on every pass: no later study was ever scored. Each such study is
    now counted in failed_studies and the pass goes on; only a scorer that is gone stops it."""
    client = dicomweb(own_orthanc)
    for _ in range(2):
        upload_films(own_orthanc, 1)

    def broken() -> serving.Scorer:  # its U-Net and classifier take 32 px: a 500. Networks of its own: a traced
        # function that failed in one thread hangs in another, which a server of its own process never meets
        return scorer(serving.Pipeline.load(bundle), size=48, projection_size=32)[0]

    summary = pacs.run(client, broken(), "covidcxr")
    assert (summary.studies, summary.failed_studies, summary.stored_sr) == (2, 2, 0)
    with served_over_http(broken()) as url:
        summary = pacs.run(client, serving.remote_scorer(url, timeout=60), "covidcxr")
    assert (summary.studies, summary.failed_studies, summary.stored_sr) == (2, 2, 0)
    score, _ = scorer(pipeline)
    with served_over_http(score, down=503) as url, pytest.raises(serving.ScoringError) as gone:
        pacs.run(client, serving.remote_scorer(url, timeout=60), "covidcxr")
    assert gone.value.status == 503


@contextlib.contextmanager
def dicomweb_answering(wado: dict[str, tuple[str, bytes] | int | list[tuple[str, bytes] | int]], *,
                       down_after: str | None = None, stored: list[str] | None = None,
                       refuse: Callable[[pydicom.Dataset], bool] | None = None) -> Iterator[str]:
    """A DICOMweb server whose QIDO-RS finds one CR image in each study of ``wado`` (or one per item of a list: SOP
    Instance UIDs STUDY.1.1, STUDY.1.2...), and the results stored into it, and whose WADO-RS answers an image with
    that study's (content type, body), or that HTTP status, read at each request; ``down_after``: a study after whose
    WADO-RS request every request is answered 503 (the PACS gone); STOW-RS takes everything (``stored``: the study
    UIDs stored into) but a request holding an instance that ``refuse`` picks (HTTP 409, none stored)."""
    from urllib.parse import urlparse

    def element(keyword: str, vr: str, value: str) -> dict:
        return {f"{pydicom.datadict.tag_for_keyword(keyword):08X}": {"vr": vr, "Value": [value]}}

    results: dict[str, list[dict]] = {}  # study: the QIDO records of the instances stored into it
    gone = threading.Event()

    def answers(study: str) -> list[tuple[str, bytes] | int]:
        return wado[study] if isinstance(wado[study], list) else [wado[study]]

    class Server(Quiet):
        def do_GET(self):  # noqa: N802 - the http.server API
            parts = urlparse(self.path).path.strip("/").split("/")[1:]  # after dicom-web
            if gone.is_set():
                self.answer(503, "text/plain", b"down")
                return
            if parts == ["studies"]:
                kind, body = "application/dicom+json", json.dumps(
                    [element("StudyInstanceUID", "UI", uid) for uid in wado]).encode()
            elif len(parts) == 3 and parts[2] == "instances":
                kind, body = "application/dicom+json", json.dumps([
                    element("Modality", "CS", "CR") | element("SeriesInstanceUID", "UI", f"{parts[1]}.1")
                    | element("SOPInstanceUID", "UI", f"{parts[1]}.1.{k + 1}")
                    for k in range(len(answers(parts[1])))] + results.get(parts[1], [])).encode()
            else:
                if parts[1] == down_after:
                    gone.set()
                answer = answers(parts[1])[int(parts[5].rsplit(".", 1)[1]) - 1]
                if isinstance(answer, int):
                    self.answer(answer, "text/plain", b"failed")
                    return
                kind, body = answer
            self.answer(200, kind, body)

        def do_POST(self):  # noqa: N802 - the http.server API
            study = urlparse(self.path).path.strip("/").split("/")[2]
            boundary = self.headers["Content-Type"].split("boundary=")[1].strip('"').encode()
            body = self.rfile.read(int(self.headers["Content-Length"]))
            datasets = [pydicom.dcmread(io.BytesIO(part.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n")))
                        for part in body.split(b"--" + boundary)[1:-1]]
            if refuse is not None and any(refuse(ds) for ds in datasets):
                self.answer(409, "application/dicom+json", b"{}")
                return
            results.setdefault(study, []).extend(
                element("Modality", "CS", ds.Modality) | element("SeriesInstanceUID", "UI", ds.SeriesInstanceUID)
                | element("SOPInstanceUID", "UI", ds.SOPInstanceUID)
                | element("InstanceNumber", "IS", str(ds.InstanceNumber)) for ds in datasets)
            if stored is not None:
                stored.append(study)
            self.answer(200, "application/dicom+json", b"{}")

    with loopback(Server) as port:
        yield f"http://127.0.0.1:{port}/dicom-web"


def wado_film(study_uid: str, k: int = 1, **elements) -> tuple[str, bytes]:
    """A WADO-RS answer (content type, body) holding the ``k``-th CR film that :func:`dicomweb_answering` finds in a
    study (``elements``: more header attributes)."""
    import numpy as np

    from tests.helpers import phantom
    from tests.test_io import make_dicom

    data = make_dicom(np.round(phantom(seed=0) * 4000).astype(np.uint16), StudyInstanceUID=study_uid,
                      SeriesInstanceUID=f"{study_uid}.1", SOPInstanceUID=f"{study_uid}.1.{k}", **elements)
    return ('multipart/related; type="application/dicom"; boundary=b0undary',
            b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--b0undary--\r\n")


def test_an_answer_holding_no_readable_instance_fails_its_study_only(pipeline):
    """A WADO-RS answer whose part is not DICOM (pydicom's InvalidDicomError) or that has no part at all (IndexError in
    dicomweb-client) ended the pass with a traceback. Each is now a PacsError of its study, counted, and the pass goes
    on."""
    multipart = 'multipart/related; type="application/dicom"; boundary=b0undary'
    with dicomweb_answering({
        "1.2.826.0.1.3680043.8.498.101": (multipart, b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n"
                                                     b"not a DICOM file\r\n--b0undary--\r\n"),
        "1.2.826.0.1.3680043.8.498.102": (multipart, b"--b0undary--\r\n"),
    }) as url:
        score, _ = scorer(pipeline)
        summary = pacs.run(pacs.DicomWeb(url, retries=0), score, "covidcxr")
    assert (summary.studies, summary.images, summary.failed_studies, summary.stored_sr) == (2, 2, 2, 0)


UIDS = [f"1.2.826.0.1.3680043.8.498.{200 + i}" for i in range(3)]


def test_a_pacs_failing_one_studys_request_fails_that_study_and_the_pass_goes_on(pipeline):
    """A 5xx (or timeout) on one study's request, after the retries, ended the whole pass at that study, on every pass
    (QIDO's order is stable): no later study was ever done, the study never counted toward GIVE_UP_AFTER, and the error
    named no study. When the PACS still answers a search right after, it is now that study's failure, counted, and the
    pass goes on; a PACS that does not answer stops the pass naming the (hashed) study."""
    score, _ = scorer(pipeline)
    stored: list[str] = []
    with dicomweb_answering({UIDS[0]: wado_film(UIDS[0]), UIDS[1]: 500, UIDS[2]: wado_film(UIDS[2])},
                            stored=stored) as url:
        failures: dict[str, int] = {}
        summary = pacs.run(pacs.DicomWeb(url, retries=1, backoff=0), score, "covidcxr", failures=failures)
    assert (summary.studies, summary.failed_studies, summary.stored_sr) == (3, 1, 2)
    assert set(stored) == {UIDS[0], UIDS[2]} and failures == {pacs.hashed(UIDS[1]): 1}
    with dicomweb_answering({UIDS[0]: wado_film(UIDS[0]), UIDS[1]: 500, UIDS[2]: wado_film(UIDS[2])},
                            down_after=UIDS[1]) as url, pytest.raises(pacs.PacsUnavailable) as gone:
        pacs.run(pacs.DicomWeb(url, retries=1, backoff=0), score, "covidcxr")
    assert f"at study {pacs.hashed(UIDS[1])}" in str(gone.value) and UIDS[1] not in str(gone.value)


def test_a_scorer_failing_one_studys_request_fails_that_study_and_the_pass_goes_on(pipeline):
    """A scorer's timeout (or a proxy's 502/503/504) on one study's images ended the pass at that study, every pass.
    When the scorer still answers a probe, it is now that study's failure; a scorer that is gone stops the pass."""
    import base64

    score, _ = scorer(pipeline)

    def timing_out(gone: bool) -> serving.Scorer:  # on UIDS[1]'s image; then on everything, when ``gone``
        state = {"gone": False}

        def score_or_time_out(images: list[str], params: dict) -> list[dict]:
            if state["gone"] or any(image != serving.probe_image() and pydicom.dcmread(
                    io.BytesIO(base64.b64decode(image))).StudyInstanceUID == UIDS[1] for image in images):
                state["gone"] = gone
                raise TimeoutError("timed out")
            return score(images, params)

        return score_or_time_out

    with dicomweb_answering({uid: wado_film(uid) for uid in UIDS}) as url:
        summary = pacs.run(pacs.DicomWeb(url, retries=0), timing_out(gone=False), "covidcxr")
        assert (summary.studies, summary.failed_studies, summary.stored_sr) == (3, 1, 2)
        with pytest.raises(TimeoutError):
            pacs.run(pacs.DicomWeb(url, retries=0), timing_out(gone=True), "covidcxr")


@contextlib.contextmanager
def qido_paging(n: int, cap: int, *, ignore_offset: bool = False, warning: str | None = None) -> Iterator[str]:
    """A DICOMweb server whose study search finds ``n`` studies and answers at most ``cap`` a page (PS3.18 lets it),
    honouring limit and offset unless ``ignore_offset``; ``warning``: its Warning header on a page that left some
    out."""
    from urllib.parse import parse_qs, urlparse

    uids = [f"1.2.826.0.1.3680043.8.498.{1000 + i}" for i in range(n)]

    class Server(Quiet):
        def do_GET(self):  # noqa: N802 - the http.server API
            query = {k: int(v[0]) for k, v in parse_qs(urlparse(self.path).query).items() if k in ("limit", "offset")}
            start = 0 if ignore_offset else query.get("offset", 0)
            page = uids[start:start + min(cap, query.get("limit", cap))]
            body = json.dumps([{"0020000D": {"vr": "UI", "Value": [uid]}} for uid in page]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            if warning and start + len(page) < n:
                self.send_header("Warning", warning)
            self.end_headers()
            self.wfile.write(body)

    with loopback(Server) as port:
        yield f"http://127.0.0.1:{port}/dicom-web"


def test_a_search_pages_on_past_a_page_shorter_than_its_limit(caplog):
    """PS3.18 lets a server answer fewer results than the limit; the worker took a short page as the last, so a server
    capped at 100 a page gave 100 of 1,200 studies, and the rest were never scored. It now pages on (from what it got)
    until a page is empty or brings nothing new, and says when a server ignores offset or warns of results left out."""
    with qido_paging(250, cap=100) as url:
        assert len(pacs.DicomWeb(url, retries=0, page_size=500).find_studies()) == 250
    caplog.set_level(logging.WARNING, logger="covidcxr.pacs")
    with qido_paging(250, cap=100, warning='299 pacs: "There are more results."') as url:
        assert len(pacs.DicomWeb(url, retries=0, page_size=500).find_studies()) == 250
    assert "Warning 299" in caplog.text and "more results" not in caplog.text
    caplog.clear()
    with qido_paging(250, cap=100, ignore_offset=True) as url:
        assert len(pacs.DicomWeb(url, retries=0, page_size=100).find_studies()) == 100
    assert "brought nothing new" in caplog.text and "ignore offset" in caplog.text


@pytest.mark.infra
def test_an_image_the_scorer_failed_on_gets_no_result_and_is_scored_on_the_next_pass(own_orthanc, pipeline):
    """An internal error, or a MemoryError (answered too_large, like a file over the limits), got an SR 'not scored'
    like any refusal, and an image with an SR is done: it was never scored by this model version. Such an image now
    gets no result, is counted, fails its study for this pass, and the next pass scores it."""
    study, sops = upload_films(own_orthanc, 3)
    client = dicomweb(own_orthanc)
    score, _ = scorer(pipeline)

    def failing(images: list[str], params: dict) -> list[dict]:  # the server short of memory, then a bug, on two
        entries = score(images, params)
        if len(images) == 3:
            serving.refuse(entries[1], "out_of_memory", "image[1] needs more memory than the server has now")
            serving.refuse(entries[2], "internal_error", "image[2]: internal error (KeyError)")
        return entries

    summary = pacs.run(client, failing, "covidcxr")
    assert (summary.stored_sr, summary.deferred, summary.refused, summary.failed_studies) == (1, 2, 0, 1)
    assert len(results_of(own_orthanc, study)["SR"]) == 1
    summary = pacs.run(client, score, "covidcxr")
    assert (summary.already_done, summary.stored_sr, summary.deferred, summary.failed_studies) == (1, 2, 0, 0)
    found = results_of(own_orthanc, study)
    assert {check_sr(sr, {})[0] for sr in found["SR"]} == set(sops)
    # numbered by their images' places among the study's images, whichever pass made them
    assert sorted(int(sr.InstanceNumber) for sr in found["SR"]) == [1, 2, 3]
    assert sorted(int(sc.InstanceNumber) for sc in found["OT"]) == [1, 2, 3]


def test_results_are_numbered_after_every_number_their_series_already_holds():
    """The results' InstanceNumber was their image's place among the study's images: an image that arrived after
    others were done, sorting before them, took the number of a result already in the series (two SRs numbered 1).
    New results are now numbered after the highest number the model's two result series hold; another model's series
    count for nothing. An image whose SC was stored but not its SR took a new number for its SR (and its SC, stored
    again): it now keeps its SC's number, and its SC is not stored again; when the PACS lists no number for that SC,
    its SR takes a new one."""
    model, other = pacs.ModelId("covidcxr", "1"), pacs.ModelId("covidcxr", "2")

    def result(k: int, kind: str, number: str | None, of: pacs.ModelId = model) -> dict:
        return {"SeriesInstanceUID": pacs.series_uids("1.2", of)[kind], "Modality": "SR" if kind == "sr" else "OT",
                "SOPInstanceUID": pacs.result_uids(f"1.2.1.{k}", of)[kind], "InstanceNumber": number}

    images = [{"SeriesInstanceUID": "1.2.1", "SOPInstanceUID": f"1.2.1.{k}", "Modality": "CR", "InstanceNumber": "1"}
              for k in (1, 2, 3, 4, 5)]
    done = [result(2, "sr", "1"), result(2, "sc", "1"), result(3, "sr", "2"), result(4, "sc", "5"),  # 4, 5: SC only
            result(1, "sr", "9", other), result(3, "sc", None), result(5, "sc", None)]
    pending, n_done = pacs.pending_sources(images + done, "1.2", model)
    assert n_done == 2
    assert [(s.sop_uid, s.number, s.sc_stored) for s in pending] == [("1.2.1.1", 6, False), ("1.2.1.4", 5, True),
                                                                      ("1.2.1.5", 7, True)]
    pending, _ = pacs.pending_sources(images, "1.2", model)  # none done yet: from 1, in their order
    assert [(s.number, s.sc_stored) for s in pending] == [(k, False) for k in (1, 2, 3, 4, 5)]


@pytest.mark.infra
def test_an_image_that_arrives_sorting_before_done_ones_gets_results_numbered_apart(own_orthanc, pipeline):
    """Against a real PACS (whose QIDO-RS answers the results' InstanceNumber): two films done, then a third of the
    same series that sorts before them. Its SR and SC were numbered 1, as the first film's were."""
    study = pydicom.uid.generate_uid()[:50]
    upload_films(own_orthanc, 2, study=study, sops=[f"{study}.1.2", f"{study}.1.3"])
    client, score = dicomweb(own_orthanc), scorer(pipeline)[0]
    assert pacs.run(client, score, "covidcxr").stored_sr == 2
    upload_films(own_orthanc, 1, study=study, sops=[f"{study}.1.1"])
    summary = pacs.run(client, score, "covidcxr")
    assert (summary.already_done, summary.stored_sr, summary.stored_sc) == (2, 1, 1)
    found = results_of(own_orthanc, study)
    assert {kind: sorted(int(ds.InstanceNumber) for ds in found[kind]) for kind in found} == {"SR": [1, 2, 3],
                                                                                            "OT": [1, 2, 3]}



def test_the_results_copy_no_patient_or_study_value_highdicom_would_refuse():
    """highdicom refuses a date such as '2020-01-01', a time such as '12:30:00' (which serving accepts) and a sex
    other than M, F or O for the whole SR and SC: such a study never got a result, and was scored again every pass.
    These type 2 values are now copied empty (unknown: no date is guessed at), the source's own left as they were."""
    odd = {"StudyDate": "2020-01-01", "StudyTime": "12:30:00", "PatientBirthDate": "1950-01-01",
           "PatientSex": "UNKNOWN"}
    source = source_dataset(**odd, AccessionNumber="ACC1")
    header = pacs.header_only(source)
    assert {k: header[k].value for k in odd} == dict.fromkeys(odd) and header.AccessionNumber == "ACC1"
    assert {k: source[k].value for k in odd} == odd
    assert sr_of(header)["Reason not scored"] == "out_of_distribution"
    fine = {"StudyDate": "20200101", "StudyTime": "123000.5", "PatientBirthDate": "19500101", "PatientSex": "F"}
    assert {k: pacs.header_only(source_dataset(**fine))[k].value for k in fine} == fine


def counting(score: serving.Scorer) -> tuple[serving.Scorer, list[int]]:
    """``score``, and the sizes of the requests it was sent (probes left out)."""
    sent: list[int] = []

    def counted(images: list[str], params: dict) -> list[dict]:
        if images != [serving.probe_image()]:
            sent.append(len(images))
        return score(images, params)

    return counted, sent


@pytest.mark.infra
def test_a_study_with_a_date_highdicom_refuses_gets_its_results_once(own_orthanc, pipeline, caplog):
    """A StudyDate of '2020-01-01' and a StudyTime of '12:30:00' (which serving accepts) failed the study after its
    images were scored: no result, ever, and a fresh set of prediction-log records on every pass. Nor do the values
    reach the worker's log."""
    caplog.set_level(logging.DEBUG)
    study, sops = upload_films(own_orthanc, 2, StudyDate="2020-01-01", StudyTime="12:30:00")
    caplog.clear()  # what the worker logs, from here
    client = dicomweb(own_orthanc)
    score, records = scorer(pipeline)
    for already_done in (0, 2):
        summary = pacs.run(client, score, "covidcxr")
        assert (summary.already_done, summary.stored_sr, summary.failed_studies) == (already_done, 2 - already_done, 0)
    assert len(records.records) == 2
    found = results_of(own_orthanc, study)
    assert {check_sr(sr, {})[0] for sr in found["SR"]} == set(sops)
    assert {(ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime) for ds in found["SR"] + found["OT"]} == {(study, "", "")}
    assert "2020-01-01" not in caplog.text and "12:30:00" not in caplog.text


@pytest.mark.infra
def test_a_header_no_result_can_be_made_from_fails_its_study_before_scoring(own_orthanc, pipeline):
    """A header highdicom cannot make results from (here a private SOP class, which an SR cannot describe) failed the
    study after its images were scored, so every pass scored them again and logged them again. The results are now
    tried on the header first: the study fails before the scorer sees its images."""
    upload_films(own_orthanc, 2, SOPClassUID="1.2.826.0.1.3680043.8.498.999")
    counted, sent = counting(scorer(pipeline)[0])
    summary = pacs.run(dicomweb(own_orthanc), counted, "covidcxr")
    assert (summary.images, summary.failed_studies, summary.stored_sr, sent) == (2, 1, 0, [])


def test_an_image_whose_header_no_result_can_be_made_from_is_left_out_and_the_others_scored(pipeline, caplog):
    """The first header no result could be made from (a vendor's private SOP class beside a normal CR) failed its
    whole study before scoring: none of its images was ever scored. It is now left out alone (counted, its hashed id
    logged), the study's other images are scored and stored, and the study fails once they are."""
    caplog.set_level(logging.DEBUG)
    counted, sent = counting(scorer(pipeline)[0])
    study = UIDS[0]
    with dicomweb_answering({study: [wado_film(study, 1, SOPClassUID="1.2.826.0.1.3680043.8.498.999"),
                                     wado_film(study, 2)]}) as url:
        summary = pacs.run(pacs.DicomWeb(url, retries=0), counted, "covidcxr")
    assert (summary.images, summary.unusable, summary.stored_sr, summary.failed_studies, sent) == (2, 1, 1, 1, [1])
    assert pacs.hashed(f"{study}.1.1") in caplog.text and study not in caplog.text


def test_an_image_that_fails_to_download_or_to_be_stored_costs_the_others_of_its_study_nothing(pipeline, caplog):
    """One image of a study that the PACS would not deliver (a 404), or whose SR it refused (a 409), failed the whole
    study: the results of its other images, scored beside it, were never stored, and every pass scored them all again.
    Each image's outcome is now its own: the others' results are stored, the failed ones are counted by step and cause
    (no identifier) and their hashed ids logged, and the next pass sends only those."""
    caplog.set_level(logging.DEBUG)
    study = UIDS[0]
    refused = {f"{study}.1.3"}  # the source whose SR the PACS refuses

    def sr_of_refused(ds: pydicom.Dataset) -> bool:
        return ds.Modality == "SR" and any(item.ReferencedSOPInstanceUID in refused
                                           for evidence in ds.CurrentRequestedProcedureEvidenceSequence
                                           for series in evidence.ReferencedSeriesSequence
                                           for item in series.ReferencedSOPSequence)

    wado = {study: [404, wado_film(study, 2), wado_film(study, 3)]}
    counted, sent = counting(scorer(pipeline)[0])
    with dicomweb_answering(wado, refuse=sr_of_refused) as url:
        client = pacs.DicomWeb(url, retries=0)
        summary = pacs.run(client, counted, "covidcxr")
        assert (summary.images, summary.scored, summary.stored_sc, summary.stored_sr) == (3, 2, 2, 1)
        assert (summary.failed_images, summary.failed_studies, sent) == (2, 1, [2])
        assert summary.failures == {"retrieval: HTTP 404": 1, "storage: HTTP 409": 1}
        assert all(pacs.hashed(f"{study}.1.{k}") in caplog.text for k in (1, 3)) and study not in caplog.text
        wado[study][0] = wado_film(study, 1)  # delivered, and its SR stored, on the next pass
        refused.clear()
        summary = pacs.run(client, counted, "covidcxr")
    assert (summary.already_done, summary.stored_sr, summary.failed_images, summary.failed_studies) == (1, 2, 0, 0)
    assert sent == [2, 2]


def test_an_image_whose_sr_was_refused_gets_only_its_sr_next_pass_numbered_as_its_sc(pipeline):
    """An image whose SC was stored and whose SR the PACS refused had its SC made again on the next pass, with the same
    SOP Instance UID, and stored again (counted twice in stored_sc): a PACS refusing an instance it holds failed that
    SC every pass and never got the SR; one keeping the first copy ended with the SC numbered N and the SR N+1, where
    an image's results share a number. The next pass now stores only the SR, numbered as the SC."""
    study = UIDS[0]
    refused: list[tuple[str, str]] = []  # (modality, source image) of the instances refused
    kept: dict[tuple[str, str], int] = {}  # (modality, source image): InstanceNumber of the instances stored

    def source_of(ds: pydicom.Dataset) -> str:
        if ds.Modality == "SR":
            evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
            return evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        return ds.SourceImageSequence[0].ReferencedSOPInstanceUID

    def refuse(ds: pydicom.Dataset) -> bool:  # an instance it holds already; the first image's first SR
        key = (ds.Modality, source_of(ds))
        if key in kept or key == ("SR", f"{study}.1.1") and not refused:
            refused.append(key)
            return True
        kept[key] = int(ds.InstanceNumber)
        return False

    counted, sent = counting(scorer(pipeline)[0])
    with dicomweb_answering({study: [wado_film(study, 1), wado_film(study, 2)]}, refuse=refuse) as url:
        client = pacs.DicomWeb(url, retries=0)
        first = pacs.run(client, counted, "covidcxr")
        second = pacs.run(client, counted, "covidcxr")
    assert (first.stored_sc, first.stored_sr, first.failed_images, first.failed_studies) == (2, 1, 1, 1)
    assert (second.already_done, second.scored, second.stored_sc, second.stored_sr, second.failed_studies) == (
        1, 1, 0, 1, 0)
    assert refused == [("SR", f"{study}.1.1")] and sent == [2, 1]
    assert kept == {(kind, f"{study}.1.{k}"): k for kind in ("OT", "SR") for k in (1, 2)}


@pytest.mark.parametrize("status", [503, 429, 408])
def test_a_scorer_answering_not_now_under_load_is_asked_again_and_never_counts_toward_giving_up(pipeline, status):
    """A proxy's 503 to one scoring request (the scorer overloaded), then a probe it answered, failed the study and
    counted toward GIVE_UP_AFTER: after three such passes an --interval worker gave up on the study until restarted,
    though none of its images had been scored. The request is now sent again (--retries, with the PACS's backoff); a
    study whose requests are still answered 503 fails the pass, counted by cause, but not toward giving up on it. A
    rate-limiting proxy's 429, or a 408, still answered after the retries counted toward giving up (the scorer's
    answer became a StudyFailed that carried no status): it now counts as a 503 does."""
    score, _ = scorer(pipeline)
    waits: list[float] = []
    for busy, failed in (([status], 0), ([status] * 4, 1)):
        failures: dict[str, int] = {}
        with dicomweb_answering({UIDS[0]: wado_film(UIDS[0])}) as pacs_url, served_over_http(score, busy=busy) as url:
            summary = pacs.run(pacs.DicomWeb(pacs_url, retries=2, backoff=0.5, sleep=waits.append),
                               serving.remote_scorer(url, timeout=60), "covidcxr", failures=failures)
        assert (summary.failed_studies, summary.stored_sr, failures) == (failed, 1 - failed, {})
    assert summary.failures == {f"scoring: the scorer answered HTTP {status}": 1} and waits == [0.5, 0.5, 1.0]


@pytest.mark.parametrize(("asked", "limited_s", "waited"),
                         [("30", 30.0, 30.0), ("3600", 90.0, serving.MAX_RETRY_AFTER)])
def test_a_scorer_rate_limited_is_asked_again_after_its_retry_after_and_the_pass_goes_on(pipeline, asked, limited_s,
                                                                                         waited):
    """A scoring request answered 429 was sent again 1, 2 and 4 s later whatever the answer's Retry-After asked (the
    PACS's requests honoured it): a rate limiter asking for 30 s answered them all 429, and the probe after them too,
    which stopped the pass. The request now waits what Retry-After asks (at most serving.MAX_RETRY_AFTER), as a PACS
    request does. The limiter: every request 429 for ``limited_s`` seconds of the recorded waits from the first
    scoring request on."""
    score, _ = scorer(pipeline)
    waits: list[float] = []
    clock, limited_until = [0.0], []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        clock[0] += seconds

    class Limiter(Quiet):
        def do_POST(self):  # noqa: N802 - the http.server API
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            images = [record[serving.INPUT_COLUMN] for record in request["dataframe_records"]]
            if not limited_until and images != [serving.probe_image()]:
                limited_until.append(clock[0] + limited_s)
            if limited_until and clock[0] < limited_until[0]:
                self.answer(429, "application/json", b'{"message": "too many requests"}', {"Retry-After": asked})
                return
            self.answer(200, "application/json", json.dumps({"predictions": score(images, request["params"])}).encode())

    with dicomweb_answering({UIDS[0]: wado_film(UIDS[0])}) as pacs_url, loopback(Limiter) as port:
        summary = pacs.run(pacs.DicomWeb(pacs_url, retries=3, backoff=1.0, sleep=sleep),
                           serving.remote_scorer(f"http://127.0.0.1:{port}", timeout=60), "covidcxr")
    assert (summary.scored, summary.stored_sr, summary.failed_studies, summary.failures) == (1, 1, 0, {})
    assert waits == [waited]


@pytest.mark.infra
def test_a_study_that_fails_pass_after_pass_is_given_up_by_the_worker_and_still_counted(own_orthanc, pipeline):
    """A study that failed after scoring was scored again on every pass, forever. A worker now gives up on a study
    after GIVE_UP_AFTER failed passes in a row (it keeps no state across processes: a new one tries again), and still
    counts it in failed_studies (skipped_studies says why) and logs it, every pass."""
    import base64

    bad, _ = upload_films(own_orthanc, 1)
    upload_films(own_orthanc, 1)
    score, _ = scorer(pipeline)

    def failing(images: list[str], params: dict) -> list[dict]:  # a bug of the server's, on one study's image
        entries = score(images, params)
        for image, entry in zip(images, entries):
            if image != serving.probe_image() and pydicom.dcmread(
                    io.BytesIO(base64.b64decode(image))).StudyInstanceUID == bad:
                serving.refuse(entry, "internal_error", "image[0]: internal error (KeyError)")
        return entries

    counted, sent = counting(failing)
    client, failures = dicomweb(own_orthanc), {}
    summaries = [pacs.run(client, counted, "covidcxr", failures=failures) for _ in range(pacs.GIVE_UP_AFTER + 2)]
    assert [s.failed_studies for s in summaries] == [1] * (pacs.GIVE_UP_AFTER + 2)
    assert [s.skipped_studies for s in summaries] == [0] * pacs.GIVE_UP_AFTER + [1, 1]
    assert [s.deferred for s in summaries] == [1] * pacs.GIVE_UP_AFTER + [0, 0]
    assert len(sent) == 1 + pacs.GIVE_UP_AFTER  # the good study once, the failing one until given up
    assert pacs.run(client, counted, "covidcxr").deferred == 1  # a new worker tries it again


def test_an_overlay_of_pixels_stored_as_baseline_jpeg_says_they_went_through_lossy_compression():
    """A source stored in a JPEG baseline transfer syntax without LossyImageCompression made an overlay that claimed
    nothing of it: the pixels it is drawn on went through lossy compression whatever the header says."""
    import numpy as np

    model = pacs.ModelId("covidcxr", "3")
    for syntax, expected in (("1.2.840.10008.1.2.4.50", "01"), ("1.2.840.10008.1.2.1", None)):
        ds = source_dataset()
        ds.file_meta.TransferSyntaxUID = syntax
        header = pacs.header_only(ds)
        sc = pacs.build_sc(header, serving.png_base64(np.zeros((8, 8, 3), np.uint8)), model,
                           pacs.series_uids(header.StudyInstanceUID, model)["sc"],
                           pacs.result_uids(header.SOPInstanceUID, model)["sc"], 1)
        assert sc.get("LossyImageCompression") == expected, syntax


@pytest.mark.parametrize(("syntax", "lossy"), [
    ("1.2.840.10008.1.2.4.50", True), ("1.2.840.10008.1.2.4.51", True), ("1.2.840.10008.1.2.4.91", True),
    ("1.2.840.10008.1.2.4.81", True), ("1.2.840.10008.1.2.4.90", False), ("1.2.840.10008.1.2.4.80", False),
    ("1.2.840.10008.1.2.4.57", False), ("1.2.840.10008.1.2.4.70", False), ("1.2.840.10008.1.2.1", False),
    ("1.2.840.10008.1.2.4.93", True), ("1.2.840.10008.1.2.4.92", False), ("1.2.840.10008.1.2.4.203", True),
    ("1.2.840.10008.1.2.4.201", False), ("1.2.840.10008.1.2.4.202", False), ("1.2.840.10008.1.2.4.112", True),
    ("1.2.840.10008.1.2.4.111", True), ("1.2.840.10008.1.2.4.110", False),
])
@pytest.mark.parametrize("stated", [None, "00", "01"])
def test_an_overlay_of_pixels_in_a_lossy_capable_syntax_never_says_they_are_lossless(syntax, lossy, stated):
    """A JPEG 2000 (.91) or JPEG-LS near-lossless (.81) source whose header was silent made an overlay that said
    nothing of lossy compression, and any lossy syntax whose header said 00 (copied from the original before it was
    compressed) one that said 00, not lossy. They now say 01; lossless syntaxes keep what the source says. So do the
    lossy-capable syntaxes left out until now: JPEG 2000 Part 2 (.93), High-Throughput JPEG 2000 (.203), JPEG XL
    (.112) and JPEG XL JPEG recompression (.111, a lossy JPEG repacked losslessly); their lossless-only siblings
    (.92, .201, .202, .110) keep what the source says."""
    import numpy as np

    model = pacs.ModelId("covidcxr", "3")
    ds = source_dataset() if stated is None else source_dataset(LossyImageCompression=stated)
    ds.file_meta.TransferSyntaxUID = syntax
    header = pacs.header_only(ds)
    sc = pacs.build_sc(header, serving.png_base64(np.zeros((8, 8, 3), np.uint8)), model,
                       pacs.series_uids(header.StudyInstanceUID, model)["sc"],
                       pacs.result_uids(header.SOPInstanceUID, model)["sc"], 1)
    assert sc.get("LossyImageCompression") == ("01" if lossy else stated)
    assert ds.get("LossyImageCompression") == stated  # the source's own header is left as it was


@pytest.mark.parametrize("orientation", [["X", "Y"], ["L"], ["", "F"]])
def test_an_orientation_highdicom_refuses_is_left_unknown_in_the_overlay(orientation):
    """A non-standard PatientOrientation ('X', 'Y') failed the study's results (caught before scoring since: the study
    still failed every pass); the overlay now leaves it unknown, as for a source that gives none."""
    import numpy as np

    model = pacs.ModelId("covidcxr", "3")
    header = source_header()
    header.PatientOrientation = orientation
    sc = pacs.build_sc(header, serving.png_base64(np.zeros((8, 8, 3), np.uint8)), model,
                       pacs.series_uids(header.StudyInstanceUID, model)["sc"],
                       pacs.result_uids(header.SOPInstanceUID, model)["sc"], 1)
    assert sc.PatientOrientation is None or list(sc.PatientOrientation) == []
