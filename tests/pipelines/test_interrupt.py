"""A real stage killed part way (SIGKILL) leaves no output DVC could take as valid, and `dvc repro` then completes with
the same outputs as an uninterrupted run. Uses `cache`, the cheapest stage with a directory output."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from covidcxr import runtime
from tests.conftest import copy_demo_data
from tests.pipelines.conftest import BIN, run

pytestmark = pytest.mark.slow


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def locked_md5(project: Path, stage: str, out: str) -> str:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == out)


def test_killed_stage_leaves_no_valid_output_and_repro_recovers(project: Path, tmp_path: Path, demo_data):
    copy_demo_data(demo_data, project / "data" / "demo")  # the run's shared `covidcxr demo-data` output

    # One repro runs ingest, then cache, killed once cache writes (one DVC start-up fewer than ingest on its own first)
    artifacts, out = project / "artifacts", project / "artifacts" / "cache"
    log = tmp_path / "killed.log"
    env = runtime.environment(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    with open(log, "w") as sink:
        proc = subprocess.Popen(["dvc", "repro", "cache"], cwd=project, env=env, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180  # ingest first, then cache
        while not (out.exists() or list(artifacts.glob(".cache.*.tmp"))):  # the stage has started writing
            assert proc.poll() is None, f"dvc repro cache exited {proc.returncode} early:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the cache stage never started writing:\n{log.read_text()}"
            time.sleep(0.05)
        time.sleep(0.2)  # part way through decoding the images
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the stage finished before it could be killed:\n{log.read_text()}"
    assert "cached 305 images" not in log.read_text()

    # Nothing DVC could take as the stage's output: no artifacts/cache at all, only a hidden temporary folder.
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    status = json.loads(run(["dvc", "status", "cache", "--json"], project).stdout or "{}")
    assert "cache" in status, status

    run(["dvc", "repro", "cache"], project)
    assert not list(artifacts.glob(".cache.*.tmp")), "the rerun must clear what the killed run left"
    recovered, recovered_md5 = digests(out), locked_md5(project, "cache", "artifacts/cache")
    assert set(recovered) == {"images.npy", "masks.npy", "index.csv"}
    assert json.loads(run(["dvc", "status", "cache", "--json"], project).stdout or "{}") == {}

    run(["dvc", "repro", "--force", "--single-item", "cache"], project)  # an uninterrupted run from the same inputs
    assert digests(out) == recovered
    assert locked_md5(project, "cache", "artifacts/cache") == recovered_md5
