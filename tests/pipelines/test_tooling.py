"""The project's own tooling: the Makefile, CI's script and DVC's configuration, run or read as a user's shell would."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.pipelines.conftest import ROOT


def make(target: str, cwd: Path, *variables: str) -> subprocess.CompletedProcess:
    """The project's Makefile run in ``cwd`` (make's own environment: nothing of this process's telemetry settings)."""
    return subprocess.run(["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), *variables, target], cwd=cwd,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)}, capture_output=True, text=True,
                          check=True, timeout=60)


def test_make_clean_removes_the_reports_that_name_versions_of_the_removed_store(tmp_path):
    """`make clean && make run` left reports/register behind, so DVC kept (or restored) the old registered.json and the
    fresh mlflow.db never got a model. Now clean removes the registry stages' reports with the store; the data, the
    environment and the other reports stay."""
    removed = ["artifacts/manifest.csv", "mlruns/0/meta.yaml", "mlflow.db", "reports/register/registered.json",
               "reports/model_card/index.html"]
    kept = ["data/demo/labels.csv", ".venv/.installed", "reports/evaluate/summary.json", "params.yaml"]
    for name in removed + kept:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    make("clean", tmp_path)
    gone = ["artifacts", "mlruns", "mlflow.db", "reports/register", "reports/model_card"]
    assert [n for n in gone if (tmp_path / n).exists()] == []
    assert [n for n in kept if not (tmp_path / n).is_file()] == []
