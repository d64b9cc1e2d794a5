"""The default `dvc repro` on the demo data from an empty cache: wall time and peak memory, then a no-op repro.

Runs in a throwaway copy of the project (its git-visible files), so the working tree is untouched.
Baseline: the start-up time and peak memory of `dvc version` in the same environment.
Smoke: only the `ingest` stage, one no-op repro, one `dvc version`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from covidcxr import runtime

ROOT = Path(__file__).resolve().parent.parent
GOAL_FULL_S, GOAL_MEMORY_MB, GOAL_NOOP_S = 20 * 60, 6 * 1024, 5.0


# Runs the command and writes the peak RSS (KiB) of it and its descendants to argv[1]. A small launcher: a child
# forked straight from this (possibly large) process would count the parent's memory as its own peak.
LAUNCHER = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
            "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
            "sys.exit(code)")


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """(seconds, peak resident memory in MB of the command and everything it ran) for one command."""
    with tempfile.TemporaryDirectory() as tmp:
        log, rss = Path(tmp) / "log", Path(tmp) / "rss"
        with open(log, "w") as sink:  # a file, not a pipe: nobody reads while the command runs
            start = time.perf_counter()
            code = subprocess.call([sys.executable, "-c", LAUNCHER, str(rss), *cmd], cwd=cwd, env=env,
                                   stdout=sink, stderr=subprocess.STDOUT)
            elapsed = time.perf_counter() - start
        if code:
            raise RuntimeError(f"{' '.join(cmd)} exited {code}: {log.read_text(errors='replace')[-2000:]}")
        return elapsed, int(rss.read_text()) / 1024


def run(*, smoke: bool = False, demo: Path | None = None) -> dict:
    """``demo``: an existing demo data folder to copy instead of generating one (not timed either way)."""
    sys.path.insert(0, str(ROOT))
    from tests.pipelines.conftest import copy_project

    env = runtime.environment(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    target = ["ingest"] if smoke else []
    repeats = 1 if smoke else 3
    with tempfile.TemporaryDirectory() as tmp:
        project = copy_project(Path(tmp) / "project")
        for stale in ("reports",):  # committed outputs would let DVC skip stages: measure everything
            shutil.rmtree(project / stale, ignore_errors=True)
        if demo is not None and (demo / "labels.csv").is_file():
            shutil.copytree(demo, project / "data" / "demo")
        else:
            timed(["covidcxr", "demo-data", "data/demo"], project, env)
        full, peak_mb = timed(["dvc", "repro", *target], project, env)
        noop = min(timed(["dvc", "repro", *target], project, env)[0] for _ in range(repeats))
        startup = [timed(["dvc", "version"], project, env) for _ in range(repeats)]
    return {
        "target": " ".join(target) or "all stages",
        "full_repro_seconds": round(full, 1),
        "peak_process_memory_mb": round(peak_mb, 1),
        "noop_repro_seconds": round(noop, 2),
        "dvc_startup_seconds": round(min(s for s, _ in startup), 2),
        "dvc_startup_memory_mb": round(min(m for _, m in startup), 1),
        "cpus": os.cpu_count(),
    }


def rows(result: dict) -> list[dict]:
    """Full repro time and peak memory, and a no-op repro's time, each beside `dvc version` (goals: README)."""
    from bench import goal, row

    startup, memory = result["dvc_startup_seconds"], result.get("dvc_startup_memory_mb")
    return [
        row("pipeline.repro", result["full_repro_seconds"], startup, "dvc version start-up, same run", "s",
            goal("value", "<=", GOAL_FULL_S)),
        row("pipeline.repro_peak_memory", result["peak_process_memory_mb"], memory,
            "dvc version peak memory, same run", "MB", goal("value", "<", GOAL_MEMORY_MB)),
        row("pipeline.noop_repro", result["noop_repro_seconds"], startup, "dvc version start-up, same run", "s",
            goal("value", "<", GOAL_NOOP_S)),
    ]


if __name__ == "__main__":
    import json

    result = run()
    (ROOT / "bench" / "pipeline.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2, sort_keys=True))
