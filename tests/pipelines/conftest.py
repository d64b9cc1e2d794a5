"""A throwaway copy of the project (its git-visible files) in which the real `dvc` commands run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from covidcxr import runtime
from tests.conftest import BIN, LOOPBACK

ROOT = Path(__file__).resolve().parents[2]


def run(cmd: list[str], cwd: Path, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command with the project's environment (venv first on PATH, telemetry off)."""
    # the quiet defaults whatever the caller's shell sets: the end-to-end test checks the stages' output is clean
    env = runtime.environment(PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **runtime.QUIET)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n"
                             f"--- stderr\n{proc.stderr}")
    return proc


def copy_project(dest: Path) -> Path:
    """Copy what a fresh clone would hold (tracked and not-ignored files) and make it a git repository."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"]):
        run(cmd, dest)
    return dest


def wait_ready(url: str, server: subprocess.Popen, *, log: Path | None = None, timeout: float = 240.0) -> None:
    """Poll a model server's /ping until it answers; fail early if it exits, showing the end of its log."""
    def tail() -> str:
        return f":\n{log.read_text()[-3000:]}" if log is not None and log.exists() else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} before answering /ping{tail()}")
        try:
            with LOOPBACK.open(f"{url}/ping", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer /ping within {timeout:.0f} s{tail()}")


def stop_server(server: subprocess.Popen) -> None:
    """Stop a server started in its own session, and everything it started."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_project(tmp_path / "project")
