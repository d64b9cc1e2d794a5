"""`python -m bench --smoke`: every benchmark runs and lands in one results file with one schema."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import ROW_KEYS, goal, machine, row
from bench.__main__ import BENCHMARKS
from covidcxr import runtime

ROOT = Path(__file__).resolve().parents[1]


def test_row_ratio_and_verdict():
    fast = row("x", 90.0, 100.0, "base", "images/s", goal("ratio", ">=", 0.8))
    assert tuple(fast) == ROW_KEYS and fast["ratio"] == 0.9 and fast["pass"] is True
    assert row("x", 70.0, 100.0, "base", "images/s", goal("ratio", ">=", 0.8))["pass"] is False
    assert row("x", 6.0, 1.0, "base", "s", goal("value", "<", 5.0))["pass"] is False
    assert row("x", 1.0, 2.0, "base", "s")["pass"] is None  # no goal, no verdict
    with pytest.raises(ValueError):
        goal("speed", ">=", 1)


@pytest.mark.slow
def test_smoke_summary_covers_every_benchmark_with_one_schema(tmp_path: Path, demo_data):
    env = runtime.environment(PYTHONPATH=str(ROOT),
                              PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("MLFLOW_TRACKING_URI", None)  # the scratch directory has no registry: serving reports itself skipped
    out = tmp_path / "results.json"  # the benchmarks read the run's shared demo data, or copy it
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--data", str(demo_data.root), "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["mode"] == "smoke" and set(results["details"]) == set(BENCHMARKS)

    rows = results["results"]
    for name in BENCHMARKS:
        assert any(r["name"] == name or r["name"].startswith(f"{name}.") for r in rows), name
    for r in rows:
        assert set(r) == set(ROW_KEYS), r
        if r["skipped"] is not None:
            assert not r["skipped"].startswith("failed"), r
            assert r["value"] is r["pass"] is None
            continue
        assert isinstance(r["value"], (int, float)) and isinstance(r["baseline"], (int, float)) and r["unit"], r
        assert r["baseline_name"] and math.isclose(r["ratio"], r["value"] / r["baseline"], rel_tol=0.01, abs_tol=1e-3)
        if r["goal"] is None:
            assert r["pass"] is None
        else:
            assert set(r["goal"]) == {"on", "op", "target"} and isinstance(r["pass"], bool), r
    measured = {r["name"].split(".")[0] for r in rows if r["skipped"] is None}
    assert {"ingest", "training", "pipeline"} <= measured
    assert any(r["name"].startswith("training.mixed_bfloat16.") for r in rows)  # the same network, bfloat16 maths
    serving = [r for r in rows if r["name"].startswith("serving")]
    assert all(r["skipped"] is None for r in serving) or "dvc repro register" in serving[0]["skipped"]

    # --only reruns one benchmark into the same file: the others keep their rows and details
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--only", "ingest", "--data", str(demo_data.root),
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    again = json.loads(out.read_text())
    assert set(again["details"]) == set(BENCHMARKS) and again["details"]["ingest"]["date"]
    assert [r for r in again["results"] if not r["name"].startswith("ingest")] == [
        r for r in rows if not r["name"].startswith("ingest")]
    assert sorted(r["name"] for r in again["results"]) == sorted(r["name"] for r in rows)


def test_machine_names_the_cpu_and_the_kernels_the_figures_were_measured_with(monkeypatch):
    monkeypatch.delenv(runtime.PORTABLE_CPU_ENV, raising=False)
    native = machine()
    assert native["cpus"] == os.cpu_count() and native["cpu_kernels"] == "native" and native["python"].count(".") == 2
    with open("/proc/cpuinfo", encoding="utf-8") as f:  # Linux: the CPU's own name, as lscpu shows it
        assert native["cpu"] and native["cpu"] in f.read()
    monkeypatch.setenv(runtime.PORTABLE_CPU_ENV, "1")
    assert machine()["cpu_kernels"] == "portable"


def test_gpu_benchmark_says_why_it_skips_without_a_gpu():
    from bench import gpu

    result = gpu.run(smoke=True)
    assert result["gpu"] is None and "no GPU visible" in result["skipped"]
    [only] = gpu.rows(result)
    assert only["skipped"] == result["skipped"] and only["value"] is None and only["pass"] is None
    recorded = json.loads((ROOT / "bench" / "results-gpu.json").read_text())  # the lent H200's run, in one schema
    assert recorded["machine"]["gpu"] and all(set(r) == set(ROW_KEYS) for r in recorded["results"])


def test_gpu_run_without_a_gpu_leaves_the_recorded_file_as_it_is(tmp_path: Path, capsys):
    from bench.__main__ import main

    out = tmp_path / "results-gpu.json"  # a copy of the lent H200's record, hand-written command and machine.gpu
    shutil.copy(ROOT / "bench" / "results-gpu.json", out)
    before = out.read_bytes()
    assert main(["--gpu", "--out", str(out)]) == 0
    assert out.read_bytes() == before
    said = capsys.readouterr().out
    assert "kept as it is" in said and "tensorflow-cpu" in said  # the locked TensorFlow, named


def gpu_result(**extra) -> dict:
    """What bench.gpu.run returns on a GPU, reduced to one configuration."""
    return {"backend": "tensorflow", "gpu": "NVIDIA H200", "float32_matmul": "TF32",
            "matmul_tflops": {"bfloat16": 800.0, "float32": 400.0},
            "vgg.fp32.xla": {"achieved_tflops": 200.0}, "vgg.bf16.xla": {"error": "ResourceExhaustedError: OOM"},
            **extra}


def test_gpu_end_to_end_runs_in_a_throwaway_copy_and_a_failure_is_a_failed_row(demo_data):
    from bench import gpu

    assert gpu.END_TO_END[:3] == ["dvc", "exp", "run"] and "cache.size=224" in gpu.END_TO_END
    where = "import os, sys; print(os.getcwd(), os.path.isfile('data/demo/labels.csv'), os.path.isdir('reports'))"
    result = gpu.end_to_end(demo_data.root, command=[sys.executable, "-c", f"{where}; sys.exit(3)"])
    cwd, demo, reports = result["tail"].split()
    assert Path(cwd) != ROOT and not Path(cwd).exists() and (demo, reports) == ("True", "False")
    assert result["returncode"] == 3 and result["failed"].startswith("exited 3")
    rows = {r["name"]: r for r in gpu.rows(gpu_result(end_to_end=result))}
    assert rows["gpu.end_to_end"]["skipped"].startswith("failed: exited 3") and rows["gpu.end_to_end"]["value"] is None

    slow = gpu.end_to_end(demo_data.root, command=[sys.executable, "-c", "import time; time.sleep(30)"], timeout=1)
    assert slow["failed"].startswith("timed out after 1 s")  # returned, not raised: the network rows are kept


def test_gpu_rows_name_a_broken_configuration_failed_and_a_tf32_peak_tf32():
    from bench import gpu

    rows = {r["name"]: r for r in gpu.rows(gpu_result(end_to_end={"seconds": 60.0}))}
    assert rows["gpu.vgg.bf16.xla"]["skipped"] == "failed: ResourceExhaustedError: OOM"
    assert rows["gpu.vgg.fp32.xla"]["ratio"] == 0.5 and "TF32" in rows["gpu.vgg.fp32.xla"]["baseline_name"]
    assert gpu.float32_matmul(None) == "float32"
    assert gpu.matmul_tflops("float32", n=64, repeats=2) > 0  # TensorFlow's path, waiting on a scalar (here a CPU)


def test_prediction_log_row_fails_unless_every_record_was_written():
    from bench import serving

    timing = {"p50_ms": 10.0, "p95_ms": 12.0, "n": 4, "images_per_second": 100.0}
    log = {"with_log": {"p50_ms": 10.2}, "without_log": {"p50_ms": 10.0}, "records_expected": 5,
           "records_written": 5, "records_lost": 0}
    result = {"in_process_pyfunc": timing, "server": {"sequential": timing, "concurrent_4_clients": timing},
              "prediction_log": log}
    assert serving.rows(result)[-1]["pass"] is True
    for short in ({"records_written": 4, "records_lost": 1}, {"records_written": 4}):  # lost, or never flushed
        [*_, last] = serving.rows({**result, "prediction_log": {**log, **short}})
        assert last["name"] == "serving.p50_with_prediction_log" and last["pass"] is None
        assert last["skipped"].startswith("failed: the prediction log wrote 4 of 5 records")


def test_log_overhead_writes_every_record_of_a_real_pyfunc(tmp_path: Path):
    import mlflow
    import pandas as pd

    from bench import serving
    from covidcxr import serving as cxr_serving
    from tests.helpers import build_bundle, phantom, png_b64

    mlflow.pyfunc.save_model(tmp_path / "model", python_model=cxr_serving.CovidCxrModel(),
                             artifacts=build_bundle(tmp_path / "bundle"), pip_requirements=["mlflow"])
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    cost = serving.log_overhead(model, pd.DataFrame({"image": [png_b64(phantom())]}), n=3, warmup=1,
                                db=tmp_path / "log.db")
    assert cost["records_expected"] == cost["records_written"] == 4 and cost["records_lost"] == 0
    assert cost["with_log"]["n"] == cost["without_log"]["n"] == 3


def test_the_serving_benchmarks_server_never_writes_the_callers_prediction_log(tmp_path: Path, monkeypatch):
    import psutil

    from bench import serving
    from covidcxr import predlog
    from tests.pipelines.conftest import stop_server

    monkeypatch.setenv(predlog.ENV, f"sqlite:///{tmp_path}/production.db")
    server = serving.start_server("models:/absent@champion", serving.free_port(), tmp_path / "server.log")
    try:
        env = psutil.Process(server.pid).environ()
    finally:
        stop_server(server)
    assert env[predlog.ENV] == "none"


def test_serving_is_skipped_only_for_a_model_the_registry_lacks(mlflow_db: Path, monkeypatch):
    from mlflow.exceptions import MlflowException

    from bench import serving

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{mlflow_db}")  # empty, already migrated
    result = serving.run("models:/absent@champion", smoke=True)
    assert "not in the registry" in result["skipped"] and "dvc repro register" in result["skipped"]
    with pytest.raises(MlflowException, match="Not a proper models"):  # a failure: `python -m bench` says failed:
        serving.run("models:/absent@", smoke=True)


def training_result(**extra) -> dict:
    """What bench.training.run records, reduced to one network (achieved and peak GFLOP/s, images/s)."""
    return {"matmul_gflops": 100.0,
            "vgg19_128px": {"achieved_gflops": 60.0, "matmul_gflops": 100.0, "train_images_per_second": 3.0},
            **extra}


def test_training_above_the_matmul_peak_is_inconclusive_not_a_pass():
    from bench import training

    [fine] = training.rows(training_result())
    assert fine["ratio"] == 0.6 and fine["pass"] is False
    [high] = training.rows(training_result(vgg19_128px={"achieved_gflops": 123.1, "matmul_gflops": 100.0}))
    assert high["pass"] is None and high["skipped"].startswith("inconclusive: training read 1.231")


def test_mixed_bfloat16_sets_each_pass_against_its_own_peak():
    from bench import training

    # bfloat16 read 2x the images/s, but beside a peak twice as high (the machine ran faster then): no speed-up
    mixed = {"vgg19_128px": {"achieved_gflops": 120.0, "matmul_gflops": 200.0, "train_images_per_second": 6.0}}
    [_, row] = training.rows(training_result(mixed_bfloat16={"note": "", **mixed}))
    assert row["name"] == "training.mixed_bfloat16.vgg19_128px" and row["ratio"] == 1.0


def test_a_failed_cpu_kernels_process_is_a_failed_row_and_keeps_the_other_figures(tmp_path: Path, monkeypatch):
    from bench import training

    # Both processes fail (an interpreter that exits 1 at once: a real one fails the same way on this input size, after
    # importing TensorFlow, 4 CPU-seconds each); what it wrote last on stderr, with the kernels it was given, is kept.
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\necho "kernels: ${{{runtime.PORTABLE_CPU_ENV}:-native}}" >&2\nexit 1\n')
    python.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(python))
    broken = training.cpu_kernels(-1, width=0.125, steps=1, rounds=1)
    assert broken["native"]["error"].startswith("exited 1") and "portable" in broken
    assert broken["native"]["error"].endswith("kernels: native") and broken["portable"]["error"].endswith("kernels: 1")
    names = [r["name"] for r in training.rows(training_result(cpu_kernels=broken))]
    assert names == ["training.vgg19_128px", "training.portable_cpu_kernels.vgg19_-1px"]
    [*_, row] = training.rows(training_result(cpu_kernels=broken))
    assert row["skipped"].startswith("failed: native exited 1")


def test_pipeline_peak_memory_sums_the_whole_process_tree(tmp_path: Path):
    from bench import pipeline

    hold = "import time; b = b'x' * (150 << 20); time.sleep(2)"  # 150 MB resident, each child
    two = f"import subprocess, sys; ps = [subprocess.Popen([sys.executable, '-c', {hold!r}]) for _ in range(2)]; " \
          "[p.wait() for p in ps]"
    _, tree, single = pipeline.timed([sys.executable, "-c", two], tmp_path, dict(os.environ))
    assert 150 < single < 250 and tree > 300


def test_ingest_compares_the_two_sides_within_each_round(demo_data):
    from bench import ingest

    paths = ingest.find_files(demo_data.root, None, n=4)["dicom"]
    measured = ingest.paired_rounds(paths, workers=1, repeats=1, rounds=3)
    assert len(measured["ratios"]) == 3 and measured["ratios"] == sorted(measured["ratios"])
    assert round(measured["ours"] / measured["decode_only"], 3) == measured["ratios"][1]  # the median round
