"""The project's own tooling: the Makefile, CI's script and DVC's configuration, run or read as a user's shell would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from covidcxr import runtime
from tests.infra.conftest import missing
from tests.pipelines.conftest import ROOT

#: What covidcxr sets when imported; everything that never imports it must set the same.
TELEMETRY = {f"{key}={value}" for key, value in runtime.TELEMETRY_OFF.items()}
CLEAN_ENV = {"PATH": "/usr/bin:/bin"}  # none of the telemetry variables this test process has


def make(target: str, cwd: Path, *variables: str) -> subprocess.CompletedProcess:
    """The project's Makefile run in ``cwd`` (make's own environment: nothing of this process's telemetry settings)."""
    return subprocess.run(["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), *variables, target], cwd=cwd,
                          env={**CLEAN_ENV, "HOME": str(cwd)}, capture_output=True, text=True,
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


def exported_by(script: str, cwd: Path) -> set[str]:
    """The environment a bash script leaves, from a clean one."""
    out = subprocess.run(["bash", "-c", f"{script}\nenv"], cwd=cwd, env=CLEAN_ENV, capture_output=True, text=True,
                         check=True).stdout
    return set(out.splitlines())


def test_telemetry_is_off_where_covidcxr_is_never_imported(tmp_path):
    """Only importing covidcxr turned telemetry off: `mlflow run .`, `mlflow ui`, `mlflow models serve` and dvc itself,
    started from the project's environment, never import it. The Makefile exports the settings to its recipes, `make
    setup` writes them into .venv/bin/activate (once, however often it runs), CI exports them."""
    probe = subprocess.run(["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), "--eval", "probe: ; @env",
                            "probe"], cwd=tmp_path, env=CLEAN_ENV, capture_output=True, text=True, check=True)
    assert TELEMETRY - set(probe.stdout.splitlines()) == set()

    activate = tmp_path / "venv/bin/activate"
    activate.parent.mkdir(parents=True)
    activate.write_text("# what python -m venv writes\n")
    for _ in range(2):
        make("telemetry-off", tmp_path, f"VENV={tmp_path / 'venv'}")
    assert len(activate.read_text().splitlines()) == 2
    assert TELEMETRY - exported_by(f"source {activate}", tmp_path) == set()

    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.startswith("export MLFLOW_")]
    assert len(ci) == 1 and TELEMETRY - exported_by(ci[0], tmp_path) == set()


def test_ci_fails_where_a_server_the_tests_need_is_missing(tmp_path, monkeypatch):
    """tests/infra's `missing` failed only where CI was set, and .ci/run never set it: on a runner without Orthanc,
    PostgreSQL or moto_server the infra and PACS tests skipped and the run passed. .ci/run now exports CI."""
    assert "CI=1" in exported_by(next(line for line in (ROOT / ".ci/run").read_text().splitlines()
                                      if line.startswith("export CI=")), tmp_path)
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="Orthanc is not installed .*CI must install it"):
        missing("Orthanc is not installed")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="install it to run the infrastructure tests"):
        missing("Orthanc is not installed")


def test_dvc_sends_no_analytics_and_never_checks_for_updates():
    """.dvc/config turned DVC's analytics off but not its update check (a request to updater.dvc.org a day from
    every dvc command): DVC itself, in the project and without the environment variables, now reads both as off."""
    check = ("from dvc import analytics, updater\n"
             "print(analytics.is_enabled(), updater.Updater('/nonexistent').is_enabled())")
    out = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=CLEAN_ENV, capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.split() == ["False", "False"]


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_the_project_is_built_by_the_locked_setuptools(tmp_path):
    """`pip install --no-deps -e .` built the project in an isolated environment with the newest setuptools>=68 from
    the index, which requirements.lock (pip freeze: no setuptools, no wheel) never pinned. Now the lock pins both and
    `make setup` builds without isolation, with them; the pin satisfies pyproject's build requirement."""
    import tomllib
    from importlib import metadata

    from tests.test_packaging import lock

    pins = lock()
    assert {"setuptools", "wheel"} <= set(pins)
    assert metadata.version("setuptools") == pins["setuptools"]
    for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]:
        name, _, minimum = requirement.partition(">=")
        assert name in pins and version(pins[name]) >= version(minimum), requirement
    for name in ("requirements.lock", "pyproject.toml"):  # the prerequisites of the environment
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    recipe = make("setup", tmp_path, "-n", "-B").stdout  # what `make setup` runs (printed, not run)
    editable = [line for line in recipe.splitlines() if " -e ." in line]
    assert len(editable) == 1 and "--no-build-isolation" in editable[0].split(), recipe
