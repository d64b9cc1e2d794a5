"""The default `dvc repro` on the demo data from an empty cache: wall time and peak memory, then a no-op repro.

Runs in a throwaway copy of the project (its git-visible files: :func:`scratch_project`), so the working tree is
untouched. Peak memory is that of the whole process tree (DVC and every stage and worker it starts), summed.
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

import psutil

from covidcxr import runtime

ROOT = Path(__file__).resolve().parent.parent
GOAL_FULL_S, GOAL_MEMORY_MB, GOAL_NOOP_S = 20 * 60, 6 * 1024, 5.0
SAMPLE_S = 0.1  # how often the process tree's memory is read


# Runs the command and writes the peak RSS (KiB) of its largest single process (it or a descendant) to argv[1]. A
# small launcher: a child forked straight from this (possibly large) process would count the parent's memory as its
# own peak.
LAUNCHER = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
            "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
            "sys.exit(code)")


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float, float]:
    """(seconds, peak resident memory in MB of the command's whole process tree, that of its largest single process)
    for one command.

    The tree's figure is the sum of every descendant's resident memory, read every ``SAMPLE_S`` seconds (pages
    shared between processes count in each; a peak shorter than a sample can be missed, so it is never below the
    largest single process's exact peak, which the kernel keeps)."""
    with tempfile.TemporaryDirectory() as tmp:
        log, rss = Path(tmp) / "log", Path(tmp) / "rss"
        with open(log, "w") as sink:  # a file, not a pipe: nobody reads while the command runs
            start = time.perf_counter()
            launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(rss), *cmd], cwd=cwd, env=env,
                                        stdout=sink, stderr=subprocess.STDOUT)
            tree = 0
            while launcher.poll() is None:
                tree = max(tree, tree_rss(launcher.pid))
                time.sleep(SAMPLE_S)
            elapsed = time.perf_counter() - start
        if launcher.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {launcher.returncode}: "
                               f"{log.read_text(errors='replace')[-2000:]}")
        single = int(rss.read_text()) / 1024
        return elapsed, max(tree / 2**20, single), single


def tree_rss(pid: int) -> int:
    """Bytes resident in the descendants of ``pid`` now (not ``pid`` itself: the launcher); 0 once it has exited."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for child in children:
        try:
            total += child.memory_info().rss
        except psutil.Error:  # exited between the listing and the read
            pass
    return total


def scratch_project(dest: Path, demo: Path | None = None) -> Path:
    """A throwaway copy of the project at ``dest`` (what a fresh clone holds, as a git repository) without the
    committed reports, which would let DVC skip stages, and with ``demo`` copied in as data/demo when it holds a
    dataset."""
    sys.path.insert(0, str(ROOT))
    from tests.pipelines.conftest import copy_project

    project = copy_project(dest)
    shutil.rmtree(project / "reports", ignore_errors=True)
    if demo is not None and (demo / "labels.csv").is_file():
        shutil.copytree(demo, project / "data" / "demo")
    return project


def run(*, smoke: bool = False, demo: Path | None = None) -> dict:
    """``demo``: an existing demo data folder to copy instead of generating one (not timed either way)."""
    env = runtime.environment(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    target = ["ingest"] if smoke else []
    repeats = 1 if smoke else 3
    with tempfile.TemporaryDirectory() as tmp:
        project = scratch_project(Path(tmp) / "project", demo)
        if not (project / "data" / "demo" / "labels.csv").is_file():
            timed(["covidcxr", "demo-data", "data/demo"], project, env)
        full, peak_mb, single_mb = timed(["dvc", "repro", *target], project, env)
        noop = min(timed(["dvc", "repro", *target], project, env)[0] for _ in range(repeats))
        startup = [timed(["dvc", "version"], project, env) for _ in range(repeats)]
    return {
        "target": " ".join(target) or "all stages",
        "full_repro_seconds": round(full, 1),
        "peak_tree_memory_mb": round(peak_mb, 1),
        "peak_process_memory_mb": round(single_mb, 1),
        "noop_repro_seconds": round(noop, 2),
        "dvc_startup_seconds": round(min(s for s, _, _ in startup), 2),
        "dvc_startup_memory_mb": round(min(m for _, m, _ in startup), 1),
        "cpus": os.cpu_count(),
    }


def rows(result: dict) -> list[dict]:
    """Full repro time and peak memory, and a no-op repro's time, each beside `dvc version` (goals: README)."""
    from bench import goal, row

    startup, memory = result["dvc_startup_seconds"], result.get("dvc_startup_memory_mb")
    return [
        row("pipeline.repro", result["full_repro_seconds"], startup, "dvc version start-up, same run", "s",
            goal("value", "<=", GOAL_FULL_S)),
        row("pipeline.repro_peak_memory", result["peak_tree_memory_mb"], memory,
            "dvc version peak memory (its process tree), same run", "MB", goal("value", "<", GOAL_MEMORY_MB)),
        row("pipeline.noop_repro", result["noop_repro_seconds"], startup, "dvc version start-up, same run", "s",
            goal("value", "<", GOAL_NOOP_S)),
    ]


if __name__ == "__main__":
    import json

    result = run()
    (ROOT / "bench" / "pipeline.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps(result, indent=2, sort_keys=True))
