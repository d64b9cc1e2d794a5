"""Shared fixtures: the real-data corpus (from ../shared, located by COVIDCXR_REAL_DATA), the demo dataset written once
per test run, and the grouping that keeps expensive shared set-ups in one pytest-xdist worker. The developer's
shared-service settings are removed from the environment before anything else runs (:data:`SHARED_SETTINGS`)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REAL_DATA_ENV = "COVIDCXR_REAL_DATA"
BIN = Path(sys.executable).parent

#: Prefixes of the variables that point a process at shared services or carry their credentials: the team's MLflow
#: server, prediction log, Optuna study, site thresholds and pseudonym salt (README's team set-up), S3 and PostgreSQL.
#: Exported in a developer's shell, they would send the suite's demo models to the team's registry (the end-to-end
#: `dvc repro` registers covidcxr@champion), its trials to the team's study and its phantom predictions to the
#: hospital's log, through the tests and every subprocess they start (runtime.environment copies os.environ).
SHARED_SETTINGS = ("MLFLOW_", "COVIDCXR_", "AWS_", "PG")
#: ... except these: telemetry stays off, and the real-data corpus is what the tests read (CI sets it).
KEPT_SETTINGS = frozenset({"MLFLOW_DISABLE_TELEMETRY", REAL_DATA_ENV})


def without_shared_settings(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` less the :data:`SHARED_SETTINGS` (but :data:`KEPT_SETTINGS`)."""
    return {k: v for k, v in env.items() if not k.startswith(SHARED_SETTINGS) or k in KEPT_SETTINGS}


#: urllib for the tests' own servers on 127.0.0.1: never through the shell's http_proxy, which (without no_proxy)
#: would receive the requests, planted identifiers and all. ``LOOPBACK.open(url_or_request, timeout=...)``.
LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# Once per test process, when pytest loads this file: before anything imports covidcxr (which applies
# COVIDCXR_PORTABLE_CPU and the tracking defaults to os.environ) and before any test or subprocess reads them.
for _name in set(os.environ) - set(without_shared_settings(os.environ)):
    del os.environ[_name]
# ... and requests to 127.0.0.1 made by the library itself (tracking.ensure_reachable, the PACS worker) or by the
# servers the tests start go straight to it, whatever http_proxy the shell exports.
for _name in ("no_proxy", "NO_PROXY"):
    os.environ[_name] = ",".join(filter(None, [os.environ.get(_name), "127.0.0.1", "localhost"]))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Root of the real chest X-ray corpus (:func:`real_data_root`)."""
    return real_data_root()


def real_data_root() -> Path:
    """Root of the real chest X-ray corpus, absolute: a relative ``COVIDCXR_REAL_DATA`` (``../shared/real-data``) is
    taken from where the tests started, and tests hand the path to processes in other folders (a project copy's
    params.yaml).

    Unset variable: skip with a visible reason (a user's fresh clone). Set but missing: fail, since CI
    sets it and must never pass by skipping.
    """
    value = os.environ.get(REAL_DATA_ENV)
    if not value:
        pytest.skip(f"{REAL_DATA_ENV} is not set: real chest X-ray tests need ../shared/real-data")
    root = Path(value).resolve()
    if not (root / "cohen" / "metadata.csv").is_file():
        pytest.fail(f"{REAL_DATA_ENV}={value} does not hold the real-data corpus (no cohen/metadata.csv)")
    return root


# --- set-ups shared by the whole test run ---------------------------------------------------------------------------


def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of this test run shared by all its processes: pytest's base temp, or with pytest-xdist its parent
    (each worker has its own base temp below the run's)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def run_lock(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """Exclusive use of ``<run folder>/<name>`` across the run's processes: the first builds it, the others wait."""
    folder = run_folder(tmp_path_factory) / name
    with open(f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass(frozen=True)
class DemoData:
    root: Path  # the dataset folder (labels.csv, images/, masks/, README.md): read only, copy it to change it
    counts: dict[str, int]  # what `covidcxr demo-data` printed


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> DemoData:
    """The demo dataset as `make run` writes it (`covidcxr demo-data`, seed 0), written once per test run and shared
    by every test that needs it (the end-to-end pipeline, the interrupted stage, the benchmarks' smoke run, the
    dataset's own tests): they copy it, or only read it. The generator is byte-deterministic, so one copy serves all.
    """
    with run_lock(tmp_path_factory, "demo-data") as folder:
        counts = folder / "counts.json"
        if not counts.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            from covidcxr import runtime  # not at the top: importing covidcxr applies COVIDCXR_PORTABLE_CPU

            env = runtime.environment(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
            proc = subprocess.run(["covidcxr", "demo-data", str(folder / "demo")], env=env, capture_output=True,
                                  text=True, timeout=600)
            assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
            json.loads(proc.stdout)  # the counts, as JSON
            counts.write_text(proc.stdout)
        return DemoData(folder / "demo", json.loads(counts.read_text()))


def copy_demo_data(demo: DemoData, dest: Path) -> Path:
    """A writable copy of the shared demo dataset at ``dest``."""
    shutil.copytree(demo.root, dest)
    return dest


# --- pytest-xdist: what must run in one worker ------------------------------------------------------------------------

#: Test files whose tests share an expensive set-up beyond their own file, by group: a worker runs a group whole.
SHARED_SETUPS = {
    "tests/infra/": "infra servers",  # one private PostgreSQL, S3 and MLflow server for the run (tests/infra/conftest)
}

#: Files that run for minutes, handed out first so that the other worker works through the rest meanwhile instead
#: of one long file finishing the run alone.
LONGEST_FIRST = ("tests/pipelines/test_repro.py", "tests/test_pacs.py", "tests/pipelines/test_serve.py")


def scope_of(nodeid: str) -> str:
    """The work unit of a test under pytest-xdist: its group of :data:`SHARED_SETUPS`, else its file."""
    path = nodeid.split("::", 1)[0]
    return next((group for prefix, group in SHARED_SETUPS.items() if path.startswith(prefix)), path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, the files of :data:`LONGEST_FIRST` go first (a stable sort: the order inside a file is
    kept); the workers collect, and must agree on the order. Without xdist nothing changes."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    root = Path(__file__).resolve().parent.parent

    def path(item: pytest.Item) -> str:
        return Path(str(item.path)).resolve().relative_to(root).as_posix()

    items.sort(key=lambda item: LONGEST_FIRST.index(path(item)) if path(item) in LONGEST_FIRST else len(LONGEST_FIRST))


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under ``--dist loadgroup`` (the Makefile's), a worker runs a whole :func:`scope_of` unit: every test of a file
    (module fixtures: a trained bundle, a private Orthanc, the end-to-end project are built once) and the files of
    :data:`SHARED_SETUPS` together, handed out in collection order (:data:`LONGEST_FIRST` first). xdist's own
    loadgroup reads ``xdist_group`` marks through a node id suffix that pytest 9 no longer takes (``item._nodeid``),
    so it scheduled test by test and built such set-ups once per worker."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByScope(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

    config.option.loadscopereorder = False  # collection order, not the units' sizes: the long files start first
    return ByScope(config, log)


@pytest.fixture(scope="session")
def _empty_mlflow_store(tmp_path_factory) -> Path:
    """An empty sqlite MLflow store (tracking and registry tables), its schema migrated once per test process."""
    import mlflow

    path = tmp_path_factory.mktemp("empty-mlflow") / "mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}", registry_uri=f"sqlite:///{path}")
    client.search_experiments()
    client.search_registered_models()
    return path


@pytest.fixture
def mlflow_db(tmp_path: Path, _empty_mlflow_store: Path) -> Path:
    """``tmp_path / "mlflow.db"``: an MLflow store of this test's own holding nothing, a copy of the migrated empty one
    (migrating a new sqlite store costs over a CPU-second)."""
    target = tmp_path / "mlflow.db"
    shutil.copyfile(_empty_mlflow_store, target)
    return target


@pytest.fixture(autouse=True)
def _tracking_uri_restored():
    """``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into ``os.environ``: without this, a test
    that calls it in-process (the CLI, a stage's ``main``) would send every later test's subprocesses, such as the
    end-to-end ``dvc repro`` in a copy of the project, to its own store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
