"""Serving latency: one 512-px image through `mlflow models serve` (p50/p95 sequentially, and throughput with 4
concurrent clients) beside the same image through the in-process pyfunc in the same run; the ratio of the p50s is
what the HTTP server adds (goal: under 1.5x). Both run without the prediction log, whatever the caller's environment
sets; its cost is measured apart: the in-process pyfunc with the log (sqlite under bench/.work) against without it,
alternating which goes first (goal: p50 at most 1.1x, and every record written: else a ``failed:`` row).

Needs a registered model (`dvc repro register`) and runs from the project directory (sqlite:///mlflow.db).
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np

from covidcxr import predlog, runtime
from tests.pipelines.conftest import stop_server, wait_ready

REGISTERED = Path("reports/register/registered.json")


def registered_uri(registered: Path = REGISTERED) -> str:
    """The model the last `register` stage registered, by its alias (champion, or challenger when refused)."""
    info = json.loads(registered.read_text())
    return f"models:/{info['model_name']}@{info['alias']}"
GOAL_RATIO = 1.5
GOAL_LOG_RATIO = 1.1


def image_512(demo: Path = Path("data/demo")) -> str:
    """The first demo DICOM read as the pipeline reads it, resized to 512x512, as a base64 8-bit PNG."""
    from PIL import Image

    from covidcxr import io as cxr_io
    from covidcxr import preprocess

    first = sorted(demo.glob("images/**/*.dcm"))[0]
    pixels, _ = cxr_io.read_image(first)
    image = preprocess.resize(preprocess.minmax(pixels), 512)
    buffer = io.BytesIO()
    Image.fromarray(np.round(255 * np.clip(image, 0, 1)).astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_uri: str, port: int, log_path: Path, prediction_log: str = "none") -> subprocess.Popen:
    """`mlflow models serve` from this environment (its bin first on PATH: the server runs `uvicorn`), writing its
    prediction log to ``prediction_log`` (``$COVIDCXR_PREDICTION_LOG``; default none), never to the caller's: a
    production log would get the benchmark's requests."""
    bin_dir = str(Path(sys.executable).parent)
    env = runtime.environment(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                              **{predlog.ENV: prediction_log})
    env.setdefault("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([f"{bin_dir}/mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def post(url: str, body: bytes) -> float:
    """Seconds for one request; fails unless the image was scored."""
    start = time.perf_counter()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    elapsed = time.perf_counter() - start
    if "predictions" not in answer or len(answer["predictions"]) != 1:
        raise RuntimeError(f"unexpected answer: {str(answer)[:200]}")
    return elapsed


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "n": len(ms)}


def load_local(model_uri: str):
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")
    return mlflow.pyfunc.load_model(model_uri)


def log_overhead(model, frame, n: int, warmup: int, db: Path = Path("bench/.work/predictions-bench.db")) -> dict:
    """p50 of the in-process pyfunc with the prediction log (a fresh sqlite file) beside the same calls without it,
    alternating which goes first: the log's background writer inserts a call's records while the next call runs, and
    always second, the no-log side paid for them. Meets the goal only if every record was written, none lost."""
    pipeline = model.unwrap_python_model().pipeline
    db.parent.mkdir(parents=True, exist_ok=True)
    db.unlink(missing_ok=True)
    sink = predlog.PredictionLog(f"sqlite:///{db}")
    without, with_log = [], []
    try:
        for k in range(warmup + n):
            for sink_now, out in ((None, without), (sink, with_log))[:: 1 if k % 2 else -1]:
                pipeline.prediction_log = sink_now
                start = time.perf_counter()
                model.predict(frame)
                if k >= warmup:
                    out.append(time.perf_counter() - start)
    finally:
        pipeline.prediction_log = None
    sink.flush(30)
    expected = (warmup + n) * len(frame)  # one record per image scored with the log on
    ratio = float(np.median(with_log) / np.median(without))
    complete = sink.lost == 0 and sink.written == expected
    return {"without_log": percentiles(without), "with_log": percentiles(with_log), "records_expected": expected,
            "records_written": sink.written, "records_lost": sink.lost, "overhead_ratio_p50": round(ratio, 3),
            "goal_ratio_p50": GOAL_LOG_RATIO, "meets_goal": bool(ratio <= GOAL_LOG_RATIO and complete)}


def run(model_uri: str | None = None, n: int = 40, clients: int = 4, warmup: int = 3, *, smoke: bool = False,
        demo: Path = Path("data/demo")) -> dict:
    """Server and in-process calls alternate, so that load from anything else on the machine hits both alike; the
    image is the first DICOM of ``demo``. Skipped (with why) when no model is registered or the registry lacks it.

    Smoke: 4 requests, 2 clients, 1 warm-up.
    """
    import pandas as pd
    from mlflow.exceptions import MlflowException

    if smoke:
        n, clients, warmup = 4, 2, 1
    if model_uri is None:
        if not REGISTERED.exists():
            return {"skipped": f"{REGISTERED} is missing: run `dvc repro register` first"}
        model_uri = registered_uri()

    try:
        with mock.patch.dict(os.environ, {predlog.ENV: "none"}):  # the baseline: no log; measured apart below
            model = load_local(model_uri)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":  # anything else is a failure, not a missing model
            raise
        return {"skipped": f"{model_uri} is not in the registry ({err.message[:200]}): run `dvc repro register` first"}
    image = image_512(demo)
    frame = pd.DataFrame({"image": [image]})
    body = json.dumps({"dataframe_records": [{"image": image}]}).encode()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path("bench/.work/serving-server.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    server = start_server(model_uri, port, log_path)
    try:
        start = time.perf_counter()
        wait_ready(url, server, timeout=300.0)
        startup = time.perf_counter() - start
        for _ in range(warmup):
            model.predict(frame)
            post(url, body)
        local, remote = [], []
        for _ in range(n):
            start = time.perf_counter()
            model.predict(frame)
            local.append(time.perf_counter() - start)
            remote.append(post(url, body))
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            concurrent = list(pool.map(lambda _: post(url, body), range(n)))
        wall = time.perf_counter() - start
    finally:
        stop_server(server)
    logging_cost = log_overhead(model, frame, n, warmup)
    ratio = float(np.median(remote) / np.median(local))
    return {
        "image": "512x512 8-bit PNG (first demo DICOM, resized)",
        "request_bytes": len(body),
        "in_process_pyfunc": {**percentiles(local), "images_per_second": round(n / sum(local), 2)},
        "server": {
            "startup_s": round(startup, 1),
            "sequential": {**percentiles(remote), "images_per_second": round(n / sum(remote), 2)},
            f"concurrent_{clients}_clients": {**percentiles(concurrent), "images_per_second": round(n / wall, 2)},
        },
        "overhead_ratio_p50": round(ratio, 3),
        "goal_ratio_p50": GOAL_RATIO,
        "meets_goal": bool(ratio < GOAL_RATIO),
        "prediction_log": logging_cost,
    }


def rows(result: dict) -> list[dict]:
    """Latency through the server beside the in-process pyfunc (goal: p50 ratio < 1.5), and concurrent throughput
    beside the in-process rate."""
    from bench import goal, row, skipped

    if "skipped" in result:
        return [skipped("serving", result["skipped"])]
    local, server, log = result["in_process_pyfunc"], result["server"], result["prediction_log"]
    concurrent = next(v for k, v in server.items() if k.startswith("concurrent_"))
    if log["records_lost"] or log["records_written"] != log.get("records_expected"):  # did less than a log must
        log_row = skipped("serving.p50_with_prediction_log", "failed: the prediction log wrote "
                          f"{log['records_written']} of {log.get('records_expected')} records "
                          f"({log['records_lost']} lost)")
    else:
        log_row = row("serving.p50_with_prediction_log", log["with_log"]["p50_ms"], log["without_log"]["p50_ms"],
                      "in-process pyfunc p50 without the log, same run", "ms", goal("ratio", "<=", GOAL_LOG_RATIO))
    return [
        row("serving.p50_latency", server["sequential"]["p50_ms"], local["p50_ms"], "in-process pyfunc p50, same run",
            "ms", goal("ratio", "<", GOAL_RATIO)),
        row("serving.p95_latency", server["sequential"]["p95_ms"], local["p95_ms"], "in-process pyfunc p95, same run",
            "ms"),
        row("serving.concurrent_throughput", concurrent["images_per_second"], local["images_per_second"],
            "in-process pyfunc images/s, same run", "images/s"),
        log_row,
    ]


if __name__ == "__main__":
    json.dump(run(), sys.stdout, indent=2, sort_keys=True)
    print()
