"""The register stage's decisions, the pyfunc on real files, and `mlflow models serve` answering HTTP requests.

`check_register_and_serve` runs at the end of the end-to-end test (tests/pipelines/test_repro.py), on the project that
test has just trained, so that no model is trained twice.
"""

from __future__ import annotations

import base64
import csv
import io as stdio
import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import psutil
import pydicom
import pytest
from PIL import Image

from covidcxr import folders, models, runtime, serving
from tests.conftest import LOOPBACK
from tests.pipelines.conftest import BIN, run, stop_server, wait_ready
from tests.test_io import _huge_png, codestream_dicom, make_dicom

NAME = "covidcxr"


# --- the pyfunc on real files, with a projection filter and a U-Net trained on real radiographs ---------------------

SIZE = 32


def _fit(model, x: np.ndarray, y: np.ndarray, loss, epochs: int) -> None:
    import keras

    model.compile(keras.optimizers.Adam(3e-3), loss)
    model.fit(x[..., None], y, epochs=epochs, batch_size=8, verbose=0, shuffle=True)


def _save(folder: Path, model, std, threshold: float | None = None) -> str:
    models.Component(model, std, info={"run_id": "test"},
                     threshold=None if threshold is None else {"threshold": threshold}).save(folder)
    return str(folder)


@pytest.mark.slow
def test_real_files_through_the_pyfunc(real_data, tmp_path):
    """A DICOM and a JPEG accepted, a held-out lateral refused by the projection filter, non-X-rays refused."""
    import mlflow

    from covidcxr import preprocess, training

    training.seed_everything(0)
    rows = list(csv.DictReader(open(real_data / "cohen/metadata.csv", encoding="latin-1")))
    lateral = sorted({r["filename"] for r in rows if r["view"] == "L"})
    frontal = sorted({r["filename"] for r in rows if r["view"] == "PA"})
    held_lateral, held_frontal = lateral[0], frontal[0]
    names = lateral[1:] + frontal[1:70]
    x = np.stack([preprocess.load_working_image(str(real_data / "cohen/images" / n), SIZE)[0] for n in names])
    y = np.array([0.0] * (len(lateral) - 1) + [1.0] * (len(names) - len(lateral) + 1), np.float32)
    std = preprocess.Standardizer().fit(x)
    projection = models.build_vgg(16, (SIZE, SIZE, 1), width=0.125, head=(32,))
    # 10 epochs (20 before): the held-out frontal's p_frontal is 1.0, the lateral's under 1e-20, as at 20
    _fit(projection, std.transform(x), y, "binary_crossentropy", epochs=10)

    ms = real_data / "montgomery_shenzhen"
    pairs = [preprocess.load_working_image(str(p), SIZE, str(ms / "masks" / p.name))
             for p in sorted((ms / "images").glob("*.png"))[::6][:90]]
    lungs = np.stack([p[0] for p in pairs])
    lung_std = preprocess.Standardizer().fit(lungs)
    unet = models.build_unet(8, (SIZE, SIZE, 1))
    _fit(unet, lung_std.transform(lungs), np.stack([p[1] for p in pairs]).astype(np.float32)[..., None],
         models.bce_dice_loss, epochs=6)  # 6 (12 before): the two frontals' lung areas 0.25-0.29, as at 12

    classifier = models.build_vgg(16, (SIZE, SIZE, 1), width=1 / 32, head=(4,))  # untrained: the contract, not skill
    artifacts = {"projection": _save(tmp_path / "projection", projection, std, threshold=0.5),  # as train_projection
                 "unet": _save(tmp_path / "unet", unet, lung_std, threshold=0.5),
                 "classifier": _save(tmp_path / "classifier", classifier, lung_std, threshold=0.5)}
    serving.Config(size=SIZE, variant="d").save(tmp_path / "serving.json")  # the pipeline's own area limits
    artifacts["config"] = str(tmp_path / "serving.json")
    mlflow.pyfunc.save_model(tmp_path / "model", python_model=serving.CovidCxrModel(), artifacts=artifacts,
                             signature=serving.signature(), pip_requirements=["mlflow"])
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))

    photo = np.random.default_rng(0).integers(0, 255, (120, 400, 3), dtype=np.uint8)  # a colour panorama
    buffer = stdio.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG")
    files = {
        "dicom": serving.encode_file(real_data / "dicom/txv_chest_pa.dcm"),
        "jpeg": serving.encode_file(real_data / "cohen/images" / held_frontal),
        "lateral": serving.encode_file(real_data / "cohen/images" / held_lateral),
        "photo": base64.b64encode(buffer.getvalue()).decode(),
        "text": base64.b64encode(b"Patient: Jane Doe, DOB 1949-12-31\n").decode(),
    }
    entries = dict(zip(files, model.predict(pd.DataFrame({"image": list(files.values())}))))
    for name in ("dicom", "jpeg"):
        assert entries[name]["accepted"], (name, entries[name])
        assert entries[name]["projection"] == "frontal" and 0.05 <= entries[name]["lung_area_fraction"] <= 0.8
    assert entries["lateral"]["reason"] == "lateral_view" and entries["lateral"]["projection"] == "lateral"
    assert entries["photo"]["reason"] == "not_chest_radiograph"
    assert entries["text"]["reason"] == "not_an_image" and "Jane" not in json.dumps(entries)


# --- `mlflow models serve` on the end-to-end test's project -------------------------------------------------------


def cli(args: list[str], project: Path, check: bool = True) -> subprocess.CompletedProcess:
    """`covidcxr ARGS` run in this process (``covidcxr.cli.main``) on ``project``'s registry and prediction log, by
    absolute URL (no change of directory): the same code path as the command, without a new interpreter's imports of
    TensorFlow and MLflow (about 5 CPU-seconds a command), which this test process holds already. What it printed and
    its exit status come back as :func:`run`'s do."""
    import contextlib

    from mlflow.tracking._tracking_service import utils as tracking_utils

    from covidcxr import cli as covidcxr_cli
    from covidcxr import predlog

    env = {**runtime.QUIET, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
           predlog.ENV: f"sqlite:///{project / 'predictions.db'}"}  # where the model's relative URL points from there
    out, err = stdio.StringIO(), stdio.StringIO()
    saved_uri = tracking_utils._tracking_uri  # the commands set MLflow's URI for the process: restored after
    try:
        with mock.patch.dict(os.environ, env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = covidcxr_cli.main(args)
            except SystemExit as exc:  # argparse's refusals
                status = exc.code if isinstance(exc.code, int) else 2
    finally:
        tracking_utils._tracking_uri = saved_uri
    proc = subprocess.CompletedProcess(["covidcxr", *args], status, out.getvalue(), err.getvalue())
    if check and status != 0:
        raise AssertionError(f"covidcxr {' '.join(args)} exited {status}\n--- stdout\n{proc.stdout}\n--- stderr\n"
                             f"{proc.stderr}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, payload: object, timeout: float = 60) -> tuple[int, object]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with LOOPBACK.open(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace")


def serve(project: Path, port: int, log: Path) -> subprocess.Popen:
    env = runtime.environment(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                              MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}")
    return subprocess.Popen(["mlflow", "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port)], cwd=project, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def server_rss(server: subprocess.Popen) -> int:
    """Resident memory of the server and every process it started (mlflow starts uvicorn, which holds the model)."""
    root = psutil.Process(server.pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def hostile_images(frontal: Path, lateral: Path) -> dict[str, tuple[str, str]]:
    """Bad images, each as (base64 field, the reason the server must give)."""
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    def edited(**elements) -> str:
        ds = pydicom.dcmread(frontal)
        if ds.file_meta.TransferSyntaxUID.is_encapsulated:
            ds.decompress()
        for keyword, value in elements.items():
            setattr(ds, keyword, value)
        buffer = stdio.BytesIO()
        ds.save_as(buffer)
        return b64(buffer.getvalue())

    photo = stdio.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 200, 3), dtype=np.uint8)).save(photo, "JPEG")
    data = frontal.read_bytes()
    return {
        "text": (b64(b"Patient: Jane Doe, DOB 1949-12-31\n"), "not_an_image"),
        "zero bytes": ("", "missing_image"),
        "bad base64": ("@@@ not base64 @@@", "invalid_base64"),
        "truncated DICOM": (b64(data[: len(data) // 2]), "truncated"),
        "PNG bomb": (b64(_huge_png(100_000, 100_000)), "too_large"),
        "JPEG-in-DICOM bomb": (b64(codestream_dicom("jpeg", 30_000, 30_000)), "too_large"),
        "frames beyond the data": (edited(NumberOfFrames=100), "truncated"),  # 100 x 256 x 256: under the limit
        "CT slice": (edited(Modality="CT"), "not_chest_radiograph"),
        "colour panorama": (b64(photo.getvalue()), "not_chest_radiograph"),
        "lateral": (serving.encode_file(lateral), "lateral_view"),
    }


CLIENTS, REQUESTS = 8, 6


def load_round(url: str, good: dict[str, str], reference: dict[str, dict], bad: dict[str, tuple[str, str]],
               transcript: list[str]) -> list[str]:
    """8 clients at once, 6 requests each: a good image and two bad ones per request, every 6th request malformed.

    Returns the failures: a 5xx, a good image answered differently than alone, a bad one without its reason.
    """
    good_names, bad_names = sorted(good), sorted(bad)
    failures: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(REQUESTS):
            k = c * REQUESTS + r
            names = [good_names[k % len(good_names)], bad_names[k % len(bad_names)],
                     bad_names[(3 * k + 1) % len(bad_names)]]
            fields = [good[names[0]], bad[names[1]][0], bad[names[2]][0]]
            malformed = r == REQUESTS - 1
            payload = {"dataframe_records": [{"image": f} for f in fields],
                       "params": {"threshold": 2} if malformed else {"explain": False}}
            try:
                status, answer = post(url, payload, timeout=60)
            except OSError as exc:
                status, answer = 0, f"{type(exc).__name__}: {exc}"
            problems = []
            if malformed:
                if status != 400:
                    problems.append(f"a malformed request got {status}: {str(answer)[:200]}")
            elif status != 200:
                problems.append(f"status {status}: {str(answer)[:300]}")
            else:
                entries = answer["predictions"]
                got, want = entries[0], reference[names[0]]
                if (got["accepted"], got["reason"]) != (want["accepted"], want["reason"]) or abs(
                        (got["covid_probability"] or 0) - (want["covid_probability"] or 0)) > 1e-4:
                    problems.append(f"{names[0]} answered {got} under load, {want} alone")
                for name, entry in zip(names[1:], entries[1:]):
                    if entry["accepted"] or entry["reason"] != bad[name][1] or not entry["message"]:
                        problems.append(f"{name}: expected {bad[name][1]}, got {entry}")
            with lock:
                transcript.append(json.dumps(answer) if isinstance(answer, dict) else str(answer))
                failures.extend(f"client {c} request {r}: {p}" for p in problems)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a client did not finish within 120 s"
    return failures


def check_under_load(url: str, server: subprocess.Popen, good: dict[str, str], bad: dict[str, tuple[str, str]],
                     transcript: list[str]) -> dict[str, float]:
    """Two rounds of concurrent clients: no failure, no client left waiting (load_round's hang guard), server memory
    bounded and not growing. How fast is bench/'s to measure (serving), not a test's to assert."""
    reference = {}
    for name, field in good.items():  # each good image alone, sequentially: what every loaded answer must equal
        status, answer = post(url, {"dataframe_records": [{"image": field}]})
        assert status == 200, answer
        reference[name] = answer["predictions"][0]
    rss = [server_rss(server)]
    seconds = []
    for _ in range(2):
        start = time.monotonic()
        failures = load_round(url, good, reference, bad, transcript)
        seconds.append(time.monotonic() - start)
        rss.append(server_rss(server))
        assert not failures, "\n".join(failures[:10])
    assert server.poll() is None, "the server died under load"
    figures = {"round_s": max(seconds), "rss_before_mb": rss[0] / 2**20, "growth_mb": (rss[2] - rss[0]) / 2**20,
               "second_round_growth_mb": (rss[2] - rss[1]) / 2**20}
    print(f"serving under load ({CLIENTS} clients x {REQUESTS} requests x 3 images): {figures}")
    assert figures["growth_mb"] < 256 and figures["second_round_growth_mb"] < 64, figures  # measured: 40 and 1 MB
    return figures


def phi_of(path: Path) -> list[str]:
    ds = pydicom.dcmread(path)
    return [str(ds.get(k)) for k in ("PatientName", "PatientID", "PatientBirthDate") if ds.get(k)]


def send_all(url: str, files: list[str]) -> list[dict]:
    entries = []
    for start in range(0, len(files), 16):
        status, answer = post(url, {"dataframe_records": [{"image": f} for f in files[start:start + 16]]})
        assert status == 200, answer
        entries += answer["predictions"]
    return entries


def wait_logged(db: str, since, n: int, timeout: float = 30.0) -> pd.DataFrame:
    """The prediction log's records from ``since`` on, once it holds ``n`` (the server writes in the background)."""
    from covidcxr import predlog

    deadline = time.monotonic() + timeout
    while True:
        try:
            frame = predlog.read(db, since=since)
        except predlog.PredictionLogError:  # the server has not made its log yet (reading never creates it)
            if time.monotonic() > deadline:
                raise
            frame = None
        if frame is not None and (len(frame) >= n or time.monotonic() > deadline):
            return frame
        time.sleep(0.2)


def pa_dicom(path: Path, side: int = 512) -> str:
    """A JPEG's pixels as a PACS would send them, base64: a DICOM whose view position says PA, so the projection rule
    lets it through whatever the tiny test filter makes of an unseen source (it calls Kermany's children lateral), and
    what refuses it is the out-of-distribution detector. Its long side cut to ``side`` to keep the requests small."""
    with Image.open(path) as im:
        im = im.convert("L")
        im.thumbnail((side, side))
        pixels = np.asarray(im, dtype=np.uint16) * 16  # 8 bits into the 12 stored
    return base64.b64encode(make_dicom(pixels, ViewPosition="PA")).decode("ascii")


def site_labels(project: Path, scored: pd.DataFrame, manifest: pd.DataFrame, lateral: Path) -> Path:
    """A new site's labelled films for `covidcxr calibrate-site`: 10 COVID-19 and 10 negative frontals that serving
    answers (paths relative to the table's folder) and one lateral, which it refuses and the threshold must not use."""
    chosen = [i for label in ("covid", "negative") for i in scored.index[scored["label"] == label][:10]]
    assert len(chosen) == 20, "the demo has at least 10 usable films of each class"
    rows = [(manifest.loc[i, "path"], scored.loc[i, "label"]) for i in chosen]
    rows.append((str(lateral.relative_to(project)), "negative"))
    table = project / "site" / "labels.csv"
    table.parent.mkdir(exist_ok=True)
    table.write_text("file,label\n" + "".join(f"../{f},{label}\n" for f, label in rows))
    return table


def check_site_threshold(remote: dict, local: dict, scored: pd.DataFrame, version: str) -> None:
    """The site's threshold is the model's rule (sensitivity 0.9, promised on the site's next films, then the highest
    specificity) applied to the 20 films it answered, served or in process alike; the lateral is counted as refused,
    not used."""
    assert remote == local and remote["model_version"] == version
    assert (remote["admitted"], remote["ood_threshold"], remote["model_answered"]) == (0, None, 20)
    assert remote["model_ood_threshold"] > 0
    assert (remote["n_covid"], remote["n_negative"], remote["refused"]) == (10, 10, {"lateral_view": 1})
    assert (remote["objective"], remote["min_sensitivity"]) == ("sensitivity", 0.9)
    assert remote["promised_sensitivity"] == pytest.approx(10 / 11)
    assert remote["sensitivity"] == 1.0 and 0.0 <= remote["specificity"] <= 1.0
    films = scored[scored["label"] == "covid"].iloc[:10]
    negatives = scored[scored["label"] == "negative"].iloc[:10]
    # 10 films promise 0.9 only with none below: the threshold is the lowest COVID-19 film's served probability (the
    # served probabilities match the stage's scores to 1e-4)
    assert abs(films["score"].min() - remote["threshold"]) < 1e-3
    assert remote["model_specificity"] == pytest.approx(float((negatives["score"] < remote["model_threshold"]).mean()))


def check_monitoring(project: Path, url: str, version: str, manifest: pd.DataFrame) -> list[str]:
    """The served model's own test split, then a real source it never saw (Kermany's children as PA DICOMs, when
    $COVIDCXR_REAL_DATA is set), through the prediction log the server writes and `covidcxr monitor` against the
    reference logged at register: no drift and an out-of-distribution share near the quantile, then drift with most
    images refused. Returns what the monitor printed, for the PHI scan."""
    import mlflow

    from covidcxr import predlog

    db = f"sqlite:///{project / 'predictions.db'}"
    quantile = json.loads((project / "reports/register/registered.json").read_text())["drift_reference"][
        "ood_quantile"]
    split = pd.read_csv(project / "artifacts/splits/covid.csv")
    test_ids = split.loc[split["split"] == "test", "image_id"]
    windows, entries = [predlog.now()], {}
    entries["test split"] = send_all(url, [serving.encode_file(project / manifest.loc[i, "path"]) for i in test_ids])
    windows.append(predlog.now())
    real = os.environ.get("COVIDCXR_REAL_DATA")
    if real:
        kermany = sorted((Path(real) / "kermany").rglob("*.jpeg"))[::12][:40]
        entries["kermany"] = send_all(url, [pa_dicom(p) for p in kermany])
        windows.append(predlog.now())
    logged = wait_logged(db, windows[0], sum(map(len, entries.values())))
    assert len(logged) == sum(map(len, entries.values())) and (logged["model_version"] == version).all()
    assert set(logged.columns) == set(predlog.COLUMNS)

    printed, summaries = [], {}
    for (name, answered), since, until in zip(entries.items(), windows, windows[1:]):
        scored = [e for e in answered if e["ood_score"] is not None]
        out = f"reports/monitor/{name.replace(' ', '-')}.html"
        proc = run(["covidcxr", "monitor", "--model", NAME, "--version", version, "--since", since.isoformat(),
                    "--until", until.isoformat(), "--out", out], project, check=False)
        printed += [proc.stdout, proc.stderr]
        assert proc.returncode in (0, 1), proc.stderr
        summaries[name] = summary = json.loads((project / out).with_suffix(".json").read_text())
        drifted = [t["name"] for t in summary["tests"] if t["drift"]]
        ood = {"ood": sum(e["reason"] == "out_of_distribution" for e in scored) / max(len(scored), 1),
               "unanswered": sum(not e["accepted"] or e["reason"] == "out_of_distribution" for e in answered)
               / len(answered)}
        print(f"monitor, {name}: {summary['status']} ({drifted}), {len(scored)} of {len(answered)} scored, {ood}")
        if name == "test split":  # in distribution: no drift; refused at about the rate the quantile sets
            assert proc.returncode == 0 and summary["status"] == "no_drift", (drifted, summary["tests"])
            assert len(scored) >= 0.6 * len(answered) and ood["ood"] <= (1 - quantile) + 0.15, ood
            in_distribution = ood["ood"]
        else:  # an unseen source: drift, its refusal rate among the drifted tests (the monitor's own test of it), and
            # refused at least twice as often as the test split and as the rate the quantile sets. The tiny 2-epoch
            # detector refuses a quarter to a half of Kermany's children (0.475, then 0.275 under other CPU kernels)
            assert proc.returncode == 1 and summary["status"] == "drift", summary["tests"]
            floor = 2 * max(in_distribution, 1 - quantile)
            assert "ood_rate" in drifted and ood["ood"] >= floor, (ood, in_distribution, quantile)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    tags = client.get_model_version(NAME, version).tags
    assert tags["monitor.status"] == summaries[list(entries)[-1]]["status"]
    run_ = client.get_run(tags["monitor.run_id"])
    assert run_.data.metrics["drift"] == float(tags["monitor.status"] == "drift")
    assert {a.path for a in client.list_artifacts(run_.info.run_id, "monitoring")} >= {
        f"monitoring/{list(entries)[-1].replace(' ', '-')}.html"}
    return printed


def check_register_and_serve(project: Path) -> list[str]:
    """After `dvc repro` with the register stage: the registry, the champion rule, then the served model over HTTP.

    Returns what the server and the CLI answered and logged, for the caller's scan for protected health information.
    """
    import mlflow

    from tests.pipelines.test_repro import set_params

    first = json.loads((project / "reports/register/registered.json").read_text())
    classifiers = [p.parent.name for p in sorted((project / "reports/evaluate").glob("*/metrics.json"))]
    def val_auc(name: str) -> float | None:
        return json.loads((project / f"reports/evaluate/{name}/metrics.json").read_text())["val"]["at_operating"][
            "roc_auc"]

    values = {n: val_auc(n) for n in classifiers}
    assert first["version"] == 1 and first["alias"] == "champion" and first["champion_version"] is None
    # The served filter threshold is the one saved with the filter that train_projection evaluated: the bundled
    # filter folder's own, not a copy in the configuration.
    assert first["serving"]["frontal_threshold"] is None
    assert first["frontal_threshold"] == folders.operating_threshold(project / "artifacts/models/projection")
    from pipelines.register import CONTROL_VARIANTS

    candidates = [n for n in classifiers if n.split("_")[0] not in CONTROL_VARIANTS]  # best never takes e
    assert {row["classifier"] for row in first["candidates"]} == set(candidates) and len(candidates) < len(classifiers)
    eligible = [r["classifier"] for r in first["candidates"] if r["audit_status"] != "fail"] or candidates
    assert first["candidate_value"] == max(values[n] for n in eligible if values[n] is not None)
    assert [r["classifier"] for r in first["candidates"] if r["chosen"]] == [first["classifier"]]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == "1" and champion.tags["classifier"] == first["classifier"]

    # A second registration, of the worst classifier: challenger unless it ties the champion.
    worst = min((n for n in values if values[n] is not None), key=values.get)
    set_params(project, {"register": {"variant": worst[0], "backbone": worst[2:]}})
    # a site's thresholds for another version, left in the shell: the drift reference is still the model's own answers
    stale = project / "stale-site.json"
    stale.write_text(json.dumps({"threshold": 0.5, "ood_threshold": None, "model_version": "999"}))
    with mock.patch.dict(os.environ, {"COVIDCXR_SITE": str(stale)}):
        out = run(["dvc", "repro", "register"], project)
    second = json.loads((project / "reports/register/registered.json").read_text())
    alias = "champion" if values[worst] >= first["candidate_value"] else "challenger"
    assert (second["version"], second["alias"], second["classifier"]) == (2, alias, worst)
    assert second["champion_value"] == first["candidate_value"] and f"-> alias {alias}" in out.stdout
    served_version = "2" if alias == "champion" else "1"
    served_name = worst if alias == "champion" else first["classifier"]

    manifest = pd.read_csv(project / "artifacts/manifest.csv").set_index("image_id")
    masks = pd.read_csv(project / "artifacts/masks/index.csv", keep_default_na=False).set_index("image_id")
    scores = pd.read_csv(project / f"artifacts/models/classifier_{served_name}/predictions.csv").set_index("image_id")
    usable = sorted(set(masks.index[masks["flag"] == ""]) & set(scores.index))
    frontal = project / manifest.loc[usable[0], "path"]
    lateral = project / manifest.loc[manifest["view_position"] == "LL", "path"].sort_values().iloc[0]
    images = {"frontal": serving.encode_file(frontal), "lateral": serving.encode_file(lateral),
              "not an image": base64.b64encode(b"just some text").decode()}
    real = os.environ.get("COVIDCXR_REAL_DATA")
    if real:
        images["real jpeg"] = serving.encode_file(sorted((Path(real) / "cohen/images").glob("*.jpeg"))[0])

    port, log = free_port(), project / "serve.log"
    url = f"http://127.0.0.1:{port}"
    transcript: list[str] = []
    server = serve(project, port, log)
    try:
        wait_ready(url, server, log=log)
        status, answer = post(url, {"dataframe_records": [{"image": b} for b in images.values()],
                                    "params": {"explain": True}})
        assert status == 200, answer
        transcript.append(json.dumps(answer))
        entries = dict(zip(images, answer["predictions"]))
        for entry in entries.values():
            assert set(entry) == {*serving.FIELDS, serving.GRADCAM_FIELD} and entry["model_version"] == served_version
            assert entry["accepted"] or entry["reason"] in serving.REASONS
        hit = entries["frontal"]
        assert hit["accepted"] and hit["projection"] == "frontal", hit
        # The served pipeline reproduces the stages' own numbers for this image: the same functions on the same
        # working image; only the batch the networks ran in differs (float rounding).
        assert hit["covid_probability"] == pytest.approx(scores.loc[usable[0], "score"], abs=1e-4)
        assert hit["lung_area_fraction"] == pytest.approx(masks.loc[usable[0], "lung_area_fraction"], abs=2e-3)
        assert base64.b64decode(hit["gradcam_png"])[:8] == b"\x89PNG\r\n\x1a\n"
        assert entries["lateral"]["reason"] == "lateral_view" and entries["lateral"]["gradcam_png"] is None
        assert entries["not an image"]["reason"] == "not_an_image"

        status, answer = post(url, {"inputs": {"image": [images["frontal"]]}, "params": {"threshold": 0.0}})
        assert status == 200 and answer["predictions"][0]["label"] == "covid", answer
        # a site's OOD threshold (calibrate-site --admit) below this film's score: refused, and the entry says at what
        site_ood = hit["ood_score"] / 2
        status, answer = post(url, {"inputs": {"image": [images["frontal"]]}, "params": {"ood_threshold": site_ood}})
        [far] = answer["predictions"]
        assert status == 200 and far["reason"] == "out_of_distribution" and far["ood_threshold"] == site_ood, answer
        assert hit["ood_threshold"] > 0 and hit["ood_score"] <= hit["ood_threshold"]  # the model's own, by default
        for payload, needle in [
            (b'{"dataframe_records": [', "valid JSON"),
            ({"dataframe_records": [{"img": images["frontal"]}]}, "missing inputs ['image']"),
            ({"dataframe_records": [{"image": images["not an image"]}] * 17}, "at most 16 per request"),
            ({"dataframe_records": [{"image": images["frontal"]}], "params": {"threshold": 2}}, "must be in [0, 1]"),
            ({"dataframe_records": [{"image": images["frontal"]}], "params": {"ood_threshold": -1}},
             "'ood_threshold' must be a finite non-negative number"),
        ]:
            status, answer = post(url, payload)
            assert status == 400 and needle in answer and "Traceback" not in answer, (status, answer[:500])
            transcript.append(answer)

        # A request error raised by the model quotes nothing of the request (mlflow would quote the whole input).
        status, answer = post(url, {"dataframe_records": [{"image": "Doe^Janet"}], "params": {"threshold": 2}})
        assert status == 400 and "Doe^Janet" not in answer and "Failed to predict data" not in answer, answer
        # mlflow's own answer to invalid JSON quotes the body back to its sender; the server log must not hold it.
        post(url, b'{"dataframe_records": [{"image": "x", "name": "Doe^Janet"')

        usable_frontal = {f"frontal {i}": serving.encode_file(project / manifest.loc[i, "path"]) for i in usable[:4]}
        check_under_load(url, server, usable_frontal, hostile_images(frontal, lateral), transcript)

        table = cli(["predict", str(frontal), str(lateral), "--url", url], project).stdout.splitlines()
        assert table[0].split("\t")[:2] == ["file", "accepted"]
        assert table[1].split("\t")[1] == "True" and table[2].split("\t")[-1] == "lateral_view"
        detector = folders.ood_detector(project / f"artifacts/models/classifier_{served_name}")
        answered = scores.loc[usable][~detector.is_out(scores.loc[usable, "ood_score"].to_numpy())]
        site = site_labels(project, answered, manifest, lateral)
        # --admit on the server: none of these films is refused as out of distribution, so it admits none (no second
        # pass) and must answer what the in-process run without it answers
        remote_site = json.loads(cli(["calibrate-site", str(site), "--url", url, "--min-sensitivity", "0.9",
                                       "--admit"], project).stdout)
        monitored = check_monitoring(project, url, served_version, manifest)
    finally:
        stop_server(server)
    local = cli(["predict", str(frontal), str(lateral)], project).stdout.splitlines()
    assert local == table  # the same model through the same code path, in process
    site_file = project / "site-thresholds.json"
    logged = cli(["calibrate-site", str(site), "--min-sensitivity", "0.9", "--output", str(site_file), "--log",
                  "ward-7"], project)
    local_site = json.loads(logged.stdout)
    check_site_threshold(remote_site, local_site, answered, served_version)
    # --log: the registry says which thresholds this site uses with this version
    import mlflow

    tags = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}").get_model_version(
        NAME, served_version).tags
    assert tags["site.ward-7.threshold"] == str(local_site["threshold"]) and tags["site.ward-7.ood_threshold"] == "none"
    assert tags["site.ward-7.run_id"] in logged.stderr
    # the file it wrote names the registered version, so predict --site applies it to that model
    at_site = cli(["predict", str(frontal), "--site", str(site_file)], project).stdout.splitlines()
    assert float(at_site[1].split("\t")[at_site[0].split("\t").index("threshold")]) == \
        pytest.approx(local_site["threshold"], abs=5e-5)
    assert remote_site["rule_from"] == local_site["rule_from"] == "flags"
    # without the flags, the model's own rule, read from the registry: the pipeline's 0.95, which takes 19 films
    # refused before the model is loaded: the labels alone show it (the rule is the registry's)
    with mock.patch("covidcxr.cli._scorer", side_effect=AssertionError("scored films the rule cannot use")):
        short = cli(["calibrate-site", str(site)], project, check=False)
    assert short.returncode == 1 and "10 COVID-19 films cannot promise sensitivity 0.95" in short.stderr, short.stderr
    assert "nothing was scored" in short.stderr

    server_log = log.read_text()
    assert "Doe^Janet" not in server_log
    text = json.dumps(entries) + server_log
    for value in phi_of(frontal) + phi_of(lateral):
        assert value not in text, value
    return [*transcript, server_log, "\n".join(table), "\n".join(local), out.stdout, out.stderr, *monitored]
