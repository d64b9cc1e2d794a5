"""Real servers on 127.0.0.1 for the scale-out tests: a private PostgreSQL and an S3-compatible server (moto).

Each server runs in a temporary directory on a free loopback port, is started once per test session and is always
stopped (its whole process group) at the end, whatever the tests did. Credentials are made up per session and reach
the clients only through the environment or an AWS credentials file, never through arguments or config files.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from covidcxr import runtime
from tests.conftest import BIN, LOOPBACK, without_shared_settings

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    """The project's environment for subprocesses: venv first, telemetry off, loopback never proxied, and none of the
    shared-service settings, not even those a test set in this process (the servers' own come as ``extra``)."""
    env = without_shared_settings(os.environ)
    return runtime.environment(env, **{
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        **extra,
    })


def run(cmd: list[str], cwd: Path | None = None, env: dict | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a command to completion (stdout and stderr captured), or raise an AssertionError that shows its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=env or base_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{(proc.stdout + proc.stderr)[-5000:]}")
    return proc


def stop_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it spawned."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT_S) -> None:
    """Wait until ``url`` answers 200, failing early (with the server's log) if the server exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}:\n{log.read_text()[-5000:]}")
        try:
            with LOOPBACK.open(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-5000:]}")


def missing(what: str) -> None:
    """A server the environment lacks: skip on a user's machine, fail where CI is set (.ci/run sets it and installs
    the servers; CI providers set it too), so that CI never passes by skipping."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must install it: see .ci/run)")
    pytest.skip(f"{what}: install it to run the infrastructure tests")


# --- PostgreSQL ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str

    def url(self, database: str) -> str:
        """SQLAlchemy URL without the password (libpq takes it from PGPASSWORD)."""
        return f"postgresql+psycopg2://{self.user}@{self.host}:{self.port}/{database}"

    def env(self) -> dict[str, str]:
        return {"PGPASSWORD": self.password}

    def create_database(self, name: str) -> str:
        import psycopg2

        conn = psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname="postgres", connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _server_user() -> tuple[list[str], int | None]:
    """PostgreSQL refuses to run as root: as root, run it as 'postgres' (or 'nobody') through runuser."""
    if os.geteuid() != 0:
        return [], None
    for name in ("postgres", "nobody"):
        try:
            uid = pwd.getpwnam(name).pw_uid
        except KeyError:
            continue
        return [shutil.which("runuser") or "/usr/sbin/runuser", "-u", name, "--"], uid
    pytest.fail("running as root and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL")


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    pg_bin = _postgres_bin()
    if pg_bin is None:
        missing("PostgreSQL (initdb) is not installed")
    prefix, uid = _server_user()
    workdir = Path(tempfile.mkdtemp(prefix="covidcxr-pg-"))
    server = Postgres("127.0.0.1", free_port(), "covidcxr", secrets.token_hex(16))
    data, log = workdir / "data", workdir / "server.log"
    started = False
    try:
        (workdir / "pw").write_text(server.password + "\n")
        if uid is not None:
            os.chown(workdir, uid, -1)
            os.chown(workdir / "pw", uid, -1)
        run([*prefix, str(pg_bin / "initdb"), "-D", str(data), "-U", server.user, "--auth=scram-sha-256",
             f"--pwfile={workdir / 'pw'}", "-E", "UTF8", "--no-locale"], timeout=120)
        (workdir / "pw").unlink()
        options = (f"-c listen_addresses={server.host} -p {server.port} -c unix_socket_directories={workdir} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=60")
        run([*prefix, str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w",
             "-t", str(START_TIMEOUT_S), "start"], timeout=START_TIMEOUT_S + 10)
        started = True
        yield server
    finally:
        if started:
            subprocess.run([*prefix, str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60)
            pid_file = data / "postmaster.pid"
            if pid_file.exists():  # pg_ctl failed to stop it: kill the postmaster we started
                try:
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        shutil.rmtree(workdir, ignore_errors=True)


# --- S3 (moto's standalone server: real HTTP, real S3 API) ---------------------------------------------------------


@dataclass(frozen=True)
class S3:
    endpoint: str
    credentials_file: Path
    secret: str

    def env(self) -> dict[str, str]:
        """Credentials through an AWS credentials file (as on a runner), the endpoint through the environment."""
        return {
            "AWS_SHARED_CREDENTIALS_FILE": str(self.credentials_file),
            "AWS_CONFIG_FILE": str(self.credentials_file.with_name("config")),
            "AWS_ENDPOINT_URL": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def client(self):
        """The test's own client, to look into buckets (the code under test gets credentials only from env/files)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="covidcxr-test", aws_secret_access_key=self.secret)

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


@pytest.fixture(scope="session")
def s3() -> Iterator[S3]:
    server = BIN / "moto_server"
    if not server.exists():
        missing("moto[server] is not installed (pip install -e '.[test]')")
    workdir = Path(tempfile.mkdtemp(prefix="covidcxr-s3-"))
    secret = secrets.token_hex(20)
    credentials = workdir / "credentials"
    credentials.write_text(f"[default]\naws_access_key_id = covidcxr-test\naws_secret_access_key = {secret}\n")
    (workdir / "config").write_text("[default]\nregion = us-east-1\n")
    port = free_port()
    log = workdir / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env=base_env(), start_new_session=True)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_http(f"{endpoint}/moto-api/", proc, log)
        yield S3(endpoint, credentials, secret)
    finally:
        stop_group(proc)
        shutil.rmtree(workdir, ignore_errors=True)
