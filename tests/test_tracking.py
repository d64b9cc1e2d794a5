import subprocess

import mlflow

from covidcxr import tracking


def test_flatten_nested_params():
    assert tracking.flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"}) == {"a.b": "1", "a.c": "[1, 2]", "d": "x"}


def test_dvc_file_hash(tmp_path):
    (tmp_path / "data.dvc").write_text("outs:\n- md5: abc123.dir\n  path: data\n")
    assert tracking.dvc_file_hash(tmp_path / "data.dvc") == "abc123.dir"
    assert tracking.dvc_file_hash(tmp_path / "missing.dvc") == "unknown"


def test_git_commit_marks_dirty_trees(tmp_path):
    assert tracking.git_commit(tmp_path) == "unknown"
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "f").write_text("1")
    subprocess.run(["git", "add", "f"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=tmp_path, check=True)
    clean = tracking.git_commit(tmp_path)
    assert len(clean) == 40
    (tmp_path / "f").write_text("2")
    assert tracking.git_commit(tmp_path) == clean + "-dirty"


def test_run_logs_flat_params_tags_and_finite_metrics(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        with tracking.run("exp", "model-a", params={"lr": 0.1, "head": {"units": 8}}, tags={"stage": "t"}) as active:
            tracking.log_finite_metrics({"val": {"auc": 0.9, "f1": float("nan")}, "note": "text"}, prefix="m.")
            tracking.log_epoch(0, {"loss": 1.5})
            tracking.member_epoch_log(0)(1, {"loss": 1.25})  # a seed ensemble's first network: a single one's names
            tracking.member_epoch_log(2)(0, {"loss": 2.5})
        run = mlflow.get_run(active.info.run_id)
        assert run.data.params == {"lr": "0.1", "head.units": "8"}
        assert run.data.tags["stage"] == "t"
        assert run.data.metrics == {"m.val.auc": 0.9, "loss": 1.25, "member2.loss": 2.5}
        history = mlflow.MlflowClient().get_metric_history(active.info.run_id, "loss")
        assert [(m.step, m.value) for m in history] == [(0, 1.5), (1, 1.25)]
        with tracking.run("exp", "ignored", run_id=active.info.run_id):  # evaluation resumes the model's run
            tracking.log_finite_metrics({"later": 1})
        assert mlflow.get_run(active.info.run_id).data.metrics["later"] == 1
        # A model whose run is not in this store (restored from DVC's cache) gets one stand-in run, reused.
        with tracking.run("exp", "model-b", run_id="0" * 32) as first:
            tracking.log_finite_metrics({"eval": 1})
        with tracking.run("exp", "model-b", run_id="0" * 32) as second:
            tracking.log_finite_metrics({"gradcam": 2})
        assert first.info.run_id == second.info.run_id != "0" * 32
        stand_in = mlflow.get_run(first.info.run_id)
        assert stand_in.data.metrics == {"eval": 1, "gradcam": 2}
        assert stand_in.data.tags[tracking.ORIGINAL_RUN_TAG] == "0" * 32
    finally:
        mlflow.set_tracking_uri(None)


def test_public_uri_drops_credentials_and_query():
    assert tracking.public_uri("https://bob:pw@mlflow.example.org:8443/base/?token=x#f") == \
        "https://mlflow.example.org:8443/base/"
    assert tracking.public_uri("http://[::1]:5000") == "http://[::1]:5000"
    assert tracking.public_uri("s3://bucket/mlartifacts") == "s3://bucket/mlartifacts"
    assert tracking.public_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


def test_a_files_sha256_has_one_helper(tmp_path):
    """tracking.file_sha256 duplicated io.sha256_file and nothing called it: one way to hash a file."""
    import hashlib

    from covidcxr import io

    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 3_000_000)
    assert io.sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not hasattr(tracking, "file_sha256")
