"""S3 on 127.0.0.1 as the DVC remote and as the artifact store of an MLflow tracking server on PostgreSQL."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tests.infra.conftest import base_env, free_port, run, stop_group, wait_http

pytestmark = [pytest.mark.infra, pytest.mark.slow]

GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
COUNT = "import json, pathlib; print(json.dumps(sorted(str(p) for p in pathlib.Path('data').rglob('*.*'))))"


def make_dvc_repo(repo: Path, env: dict) -> None:
    """A tiny DVC project: a data folder (tracked by data.dvc) and one stage reading it."""
    repo.mkdir()
    run(["git", "init", "-q", "-b", "main"], repo, env)
    run(["dvc", "init", "-q"], repo, env)
    (repo / "data" / "images").mkdir(parents=True)
    (repo / "data" / "labels.csv").write_text("image,label\na.npy,covid\nb.npy,negative\n")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        np.save(repo / "data" / "images" / f"{name}.npy", rng.random((16, 16), dtype=np.float32))
    (repo / "dvc.yaml").write_text(f'stages:\n  count:\n    cmd: python -c "{COUNT}" > files.json\n'
                                   "    deps: [data]\n    outs: [files.json]\n")
    run(["dvc", "add", "-q", "data"], repo, env)
    run(["dvc", "repro", "-q"], repo, env)


def test_dvc_remote_on_s3_push_then_pull_into_a_clean_clone(s3, tmp_path):
    s3.client().create_bucket(Bucket="covidcxr-dvc")
    env = base_env(**s3.env())
    repo, clone = tmp_path / "repo", tmp_path / "clone"
    make_dvc_repo(repo, env)
    # The remote holds only the bucket and the endpoint; credentials come from the AWS credentials file.
    run(["dvc", "remote", "add", "-d", "storage", "s3://covidcxr-dvc/cache"], repo, env)
    run(["dvc", "remote", "modify", "storage", "endpointurl", s3.endpoint], repo, env)
    run(["git", "add", "-A"], repo, env)
    run([*GIT, "commit", "-qm", "data, stage, remote"], repo, env)
    outputs = [run(["dvc", "push"], repo, env)]
    assert len(s3.keys("covidcxr-dvc")) >= 5  # 3 data files, the folder listing, files.json
    status = json.loads(run(["dvc", "status", "--json"], repo, env).stdout)

    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    assert not (clone / "data").exists() and not (clone / "files.json").exists()
    outputs.append(run(["dvc", "pull"], clone, env))
    assert json.loads(run(["dvc", "status", "--json"], clone, env).stdout) == status == {}
    assert json.loads(run(["dvc", "status", "--cloud", "--json"], clone, env).stdout) == {}
    for name in ("data/labels.csv", "data/images/a.npy", "data/images/b.npy", "files.json"):
        assert (clone / name).read_bytes() == (repo / name).read_bytes(), name
    listed = json.loads((clone / "files.json").read_text())
    assert listed == ["data/images/a.npy", "data/images/b.npy", "data/labels.csv"]

    texts = [(clone / ".dvc" / "config").read_text(), *(p.stdout + p.stderr for p in outputs)]
    assert not any(s3.secret in text for text in texts)


def test_mlflow_server_on_postgres_keeps_artifacts_in_s3(postgres, s3, tmp_path, monkeypatch):
    import keras

    from covidcxr import tracking

    s3.client().create_bucket(Bucket="covidcxr-mlflow")
    backend = postgres.create_database("mlflow_server")
    port, log = free_port(), tmp_path / "server.log"
    with open(log, "w") as out:  # only the server holds the database password and the S3 credentials
        server = subprocess.Popen(
            ["mlflow", "server", "--backend-store-uri", backend,
             "--artifacts-destination", "s3://covidcxr-mlflow/mlartifacts",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
            # no job runner (its seven huey consumers cost ~9 CPU-seconds): it runs GenAI jobs, none of this test's
            env=base_env(**postgres.env(), **s3.env(), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        )
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD"):
        monkeypatch.delenv(name, raising=False)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", server, log, timeout=120)
        mlflow.set_tracking_uri(uri)
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu"), keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse")
        x = np.random.default_rng(0).random((8, 4), dtype=np.float32)
        history = model.fit(x, x.sum(axis=1), epochs=2, verbose=0)
        with tracking.run("covidcxr-infra", "tiny-dense", params={"epochs": 2}) as active:
            tracking.log_epoch(1, {"loss": history.history["loss"][-1]})
            model_uri = tracking.log_keras_model(model, x)
        version = mlflow.register_model(model_uri, "covidcxr-infra")
        loaded = mlflow.keras.load_model(f"models:/covidcxr-infra/{version.version}")
        np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)

        stored = mlflow.get_run(active.info.run_id)
        assert stored.data.params == {"epochs": "2"} and stored.data.metrics["loss"] == history.history["loss"][-1]
        assert stored.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: clients never touch S3 themselves
        keys = s3.keys("covidcxr-mlflow")
        assert any(k.endswith("/MLmodel") for k in keys) and any(k.endswith(".keras") for k in keys), keys
        assert all(k.startswith("mlartifacts/") for k in keys)
    finally:
        mlflow.set_tracking_uri(None)
        stop_group(server)
    recorded = [log.read_text(), json.dumps([stored.data.params, stored.data.tags])]
    assert not any(secret in text for text in recorded for secret in (s3.secret, postgres.password))
