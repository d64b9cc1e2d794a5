"""The default `dvc repro` on the demo data from an empty cache: wall time and peak memory, then a no-op repro.

Runs in a throwaway copy of the project (its git-visible files), so the working tree is untouched.
Baseline: the start-up time of `dvc version` in the same environment.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def run() -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.pipelines.conftest import copy_project

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    with tempfile.TemporaryDirectory() as tmp:
        project = copy_project(Path(tmp) / "project")
        for stale in ("reports",):  # committed outputs would let DVC skip stages: measure everything
            shutil.rmtree(project / stale, ignore_errors=True)
        timed(["covidcxr", "demo-data", "data/demo"], project, env)
        full = timed(["dvc", "repro"], project, env)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        noop = min(timed(["dvc", "repro"], project, env) for _ in range(3))
        baseline = min(timed(["dvc", "version"], project, env) for _ in range(3))
    return {
        "full_repro_seconds": round(full, 1),
        "peak_process_memory_mb": round(peak_mb, 1),
        "noop_repro_seconds": round(noop, 2),
        "dvc_startup_seconds": round(baseline, 2),
        "noop_over_startup": round(noop / baseline, 2),
        "cpus": os.cpu_count(),
    }


if __name__ == "__main__":
    import json

    result = run()
    (ROOT / "bench" / "pipeline.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2, sort_keys=True))
