import json
import socket
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from covidcxr import cli, preprocess, tuning

TINY_SPACE = {
    "f0": {"choices": [2, 4]},
    "lr": {"low": 0.001, "high": 0.01, "log": True},
    "dropout_scale": 0.0,
    "batch_size": {"choices": [8]},
    "mask_threshold": {"low": 0.4, "high": 0.6},
}
TINY_CONFIG = {"space": TINY_SPACE, "epochs": 2, "seed": 1, "sampler": {"n_startup_trials": 1},
               "pruner": {"n_startup_trials": 1, "n_warmup_steps": 0}}


def write_tiny_cache(root: Path, n: int = 30, size: int = 32, seed: int = 0) -> tuple[Path, Path]:
    """A working-size cache (index.csv, images.npy, masks.npy) of bright 'lungs' on noise, and its split table."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    masks, images = [], []
    for _ in range(n):
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2).astype(np.uint8)
        masks.append(mask)
        images.append(np.clip(0.2 + 0.6 * mask + rng.normal(0, 0.1, mask.shape), 0, 1))
    cache = root / "cache"
    cache.mkdir(parents=True)
    ids = [f"img{i:03d}" for i in range(n)]
    preprocess.save_cache(cache, pd.DataFrame({"image_id": ids, "has_mask": True}), np.asarray(images),
                          np.asarray(masks))
    split = ["train"] * (n * 6 // 10) + ["val"] * (n * 2 // 10)
    split += ["test"] * (n - len(split))
    table = root / "segmentation.csv"
    pd.DataFrame({"image_id": ids[::-1], "split": split}).to_csv(table, index=False)  # order differs from the cache
    return cache, table


@pytest.fixture
def mlflow_uri(mlflow_db: Path) -> str:
    """The URI of an MLflow store of this test's own (tests/conftest.py's ``mlflow_db``)."""
    return f"sqlite:///{mlflow_db}"


def spy_learning_rate(monkeypatch) -> list:
    """The calls of ``training.learning_rate`` (rate, schedule, steps), which still computes the rate."""
    from covidcxr import training

    calls, original = [], training.learning_rate

    def spy(lr, schedule="constant", **steps):
        calls.append((lr, schedule, steps))
        return original(lr, schedule, **steps)

    monkeypatch.setattr(training, "learning_rate", spy)
    return calls


# --- search space and configuration ---------------------------------------------------------------------------------


def test_suggest_covers_choices_ranges_and_fixed_values():
    trial = optuna.trial.FixedTrial({"f0": 4, "lr": 0.005, "batch_size": 8, "mask_threshold": 0.5})
    point = tuning.suggest(trial, TINY_SPACE)
    assert point == {"f0": 4, "lr": 0.005, "dropout_scale": 0.0, "batch_size": 8, "mask_threshold": 0.5}
    with pytest.raises(ValueError, match="'lr'"):
        tuning.suggest(trial, {"lr": {"low": 0.1}})


@pytest.mark.parametrize("change, match", [
    ({"space": {k: v for k, v in TINY_SPACE.items() if k != "f0"}}, r"missing \['f0'\]"),
    ({"space": {**TINY_SPACE, "width": 1}}, r"unknown \['width'\]"),
    ({"space": {**TINY_SPACE, "f0": {"choices": []}}}, "no choices"),
    ({"space": {**TINY_SPACE, "lr": {"low": 1, "high": 0.1}}}, "low > high"),
    ({"epochs": 0}, "at least one epoch"),
    ({"strategy": "tpu"}, "strategy must be one of"),
    ({"lr_schedule": "step"}, "lr_schedule must be one of"),
    ({"sampler": {"n_startup": 2}}, "sampler options .* unexpected keyword argument 'n_startup'"),
    ({"pruner": {"n_warmup_steps": -1}}, "pruner options .* cannot be negative"),
])
def test_unet_config_rejects_bad_configurations(change, match):
    with pytest.raises(ValueError, match=match):
        tuning.unet_config({**TINY_CONFIG, **change})


def test_storage_urls_are_resolved_and_redacted(monkeypatch):
    from pipelines import tune_unet

    url = "postgresql+psycopg2://optuna:s3cret@db.example:5432/optuna"
    assert tuning.resolve_storage(None, "", "sqlite:///a.db", "sqlite:///b.db") == "sqlite:///a.db"
    monkeypatch.delenv(tuning.STORAGE_ENV, raising=False)
    assert tune_unet.storage_url({"storage": None}) == tune_unet.DEFAULT_STORAGE
    assert tune_unet.storage_url({"storage": "postgresql://optuna@db/optuna"}) == "postgresql://optuna@db/optuna"
    with pytest.raises(ValueError, match="PGPASSWORD"):  # credentials never in params
        tune_unet.storage_url({"storage": url})
    with pytest.raises(ValueError, match="PGPASSWORD"):  # nor in the URL's query, where libpq also reads one
        tune_unet.storage_url({"storage": "postgresql+psycopg2://optuna@db.example/optuna?password=s3cret"})
    monkeypatch.setenv(tuning.STORAGE_ENV, url)  # ... but the environment may carry them
    assert tune_unet.storage_url({"storage": None}) == url


def test_the_stage_says_which_storage_it_used_and_warns_when_the_environment_overrides_params(monkeypatch, caplog):
    """DVC records params, not $COVIDCXR_OPTUNA_STORAGE: the environment's database replaced params' silently."""
    from pipelines import tune_unet

    caplog.set_level("INFO", logger="covidcxr.pipelines")
    params = {"study": "unet-paper", "storage": "postgresql+psycopg2://optuna@db-a/optuna"}
    monkeypatch.setenv(tuning.STORAGE_ENV, "postgresql+psycopg2://optuna:s3cret@db-a/optuna")  # params' + password
    assert tune_unet.storage_url(params).endswith("@db-a/optuna")
    assert "postgresql+psycopg2://optuna:***@db-a/optuna (from $COVIDCXR_OPTUNA_STORAGE)" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    caplog.clear()
    monkeypatch.setenv(tuning.STORAGE_ENV, "postgresql+psycopg2://optuna:s3cret@db-b/optuna")
    assert tune_unet.storage_url(params).endswith("@db-b/optuna")
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "db-b" in warning and "db-a" in warning and "'unet-paper'" in warning and "s3cret" not in caplog.text
    monkeypatch.delenv(tuning.STORAGE_ENV)
    caplog.clear()
    assert tune_unet.storage_url({"study": "unet-demo", "storage": None}) == tune_unet.DEFAULT_STORAGE
    assert "(from the stage's own sqlite file)" in caplog.text


# --- studies ------------------------------------------------------------------------------------------------------


def test_open_study_stores_the_configuration_and_checks_the_data(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study, created = tuning.open_study("s", url, TINY_CONFIG, data_sha256="aa")
    assert created and tuning.study_config(study)["space"] == TINY_SPACE
    joined, created = tuning.open_study("s", url, {**TINY_CONFIG, "epochs": 9}, data_sha256="aa")
    assert not created and tuning.study_config(joined)["epochs"] == 2  # the study's configuration wins
    assert tuning.open_study("s", url)[0].study_name == "s"  # joining needs no configuration
    with pytest.raises(ValueError, match="other data"):
        tuning.open_study("s", url, data_sha256="bb")
    with pytest.raises(KeyError, match="does not exist"):
        tuning.open_study("nope", url)


@pytest.mark.slow
def test_pruned_and_completed_trials_become_nested_mlflow_runs(tmp_path, mlflow_uri):
    study, created = tuning.open_study("pure", f"sqlite:///{tmp_path / 'optuna.db'}", TINY_CONFIG)
    tracker = tuning.attach_tracker(study, created, experiment="tune-test", tracking_uri=mlflow_uri, sampler_seed=17)

    def objective(trial, report):  # trial 0 climbs to 0.9; later trials with x < 0.5 stall at 0.1 and get pruned
        x = trial.suggest_float("x", 0.0, 1.0)
        for step in range(3):
            value = 0.3 * (step + 1) if trial.number == 0 else (0.1 if x < 0.5 else 0.3 * (step + 1) * x)
            report(step, {"val_dice": value})
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    tuning.optimize(study, objective, 6, tracker=tracker)
    runs = tracker.client.search_runs([tracker.experiment_id])
    trial_runs = {int(r.data.tags["optuna_trial"]): r for r in runs if "optuna_trial" in r.data.tags}
    assert sorted(trial_runs) == list(range(6))
    assert all(r.data.tags["mlflow.parentRunId"] == tracker.parent_run_id for r in trial_runs.values())
    assert {r.data.tags["sampler_seed"] for r in trial_runs.values()} == {"17"}  # the worker's seed, recorded
    for t in study.trials:
        run = trial_runs[t.number]
        assert run.data.tags["optuna_state"] == t.state.name and run.data.params["x"] == str(t.params["x"])
        assert t.user_attrs[tuning.RUN_ATTR] == run.info.run_id
        history = tracker.client.get_metric_history(run.info.run_id, "val_dice")
        assert [m.step for m in history] == sorted(t.intermediate_values)
    assert {t.state.name for t in study.trials} == {"COMPLETE", "PRUNED"}
    best = [n for n, r in trial_runs.items() if r.data.tags.get(tuning.BEST_TAG) == "true"]
    assert best == [study.best_trial.number]
    assert trial_runs[best[0]].data.metrics["value"] == study.best_value
    parent = tracker.client.get_run(tracker.parent_run_id)
    assert parent.data.tags["best_trial_number"] == str(study.best_trial.number)
    assert parent.data.params["space.f0.choices"] == "[2, 4]"


@pytest.mark.slow
def test_a_trial_trains_under_the_configured_schedule(tmp_path, monkeypatch):
    """The trial's rate is ``training.learning_rate`` of the study's schedule over the trial's own steps: under
    ``cosine`` the tuned rate is a cosine's peak, as train_unet would use it with the same schedule. (The default,
    ``constant``, is checked on the real trial of ``test_tune_command_runs_a_real_unet_trial_and_exports_the_best``.)"""
    cache, split = write_tiny_cache(tmp_path)
    data = tuning.load_unet_data(cache, split)
    calls = spy_learning_rate(monkeypatch)
    point = {"f0": 2, "lr": 0.004, "batch_size": 8, "mask_threshold": 0.5}
    objective = tuning.unet_objective(data, {**TINY_CONFIG, "lr_schedule": "cosine"})
    value = objective(optuna.trial.FixedTrial(point), lambda step, logs: None)
    assert 0.0 <= value <= 1.0
    assert calls == [(0.004, "cosine", {"epochs": 2, "n_train": 18, "batch_size": 8})]
    assert tuning.unet_config(TINY_CONFIG)["lr_schedule"] == "constant"  # a study stored before the key: constant


@pytest.mark.slow
def test_tune_command_runs_a_real_unet_trial_and_exports_the_best(tmp_path, capsys, monkeypatch):
    cache, split = write_tiny_cache(tmp_path)
    calls = spy_learning_rate(monkeypatch)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tune_unet": {"study": "tiny", **TINY_CONFIG}}))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = ["tune", "--study", "tiny", "--storage", storage, "--cache-dir", str(cache), "--split", str(split),
              "--no-tracking"]
    assert cli.main([*common, "--n-trials", "1"]) == 1  # no such study, and no --config to create it
    assert "does not exist" in capsys.readouterr().err
    assert cli.main([*common, "--config", str(params), "--n-trials", "1", "--seed", "0"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert cli.main([*common, "--n-trials", "0", "--out", str(tmp_path / "unet.json")]) == 0  # joins: no --config
    exported = json.loads((tmp_path / "unet.json").read_text())

    study = optuna.load_study(study_name="tiny", storage=storage)
    assert exported == first and exported["trials"]["complete"] == 1 and len(study.trials) == 1
    assert exported["best_trial"] == 0 and exported["best_value"] == study.best_value
    assert set(exported["best_params"]) == {"f0", "lr", "dropout_scale", "batch_size", "mask_threshold"}
    assert exported["best_params"]["dropout_scale"] == 0.0  # fixed by the space, exported all the same
    # the trial's rate: the study's schedule (TINY_CONFIG has none: constant) over the trial's own steps
    assert calls == [(exported["best_params"]["lr"], "constant", {"epochs": 2, "n_train": 18, "batch_size": 8})]
    dice = list(study.trials[0].intermediate_values.values())
    assert len(dice) == 2 and dice[-1] == study.best_value and 0.0 <= dice[-1] <= 1.0  # validation Dice per epoch
    table = tuning.trials_table(study)
    assert list(table["number"]) == [0] and "param_f0" in table and "datetime_start" not in table


def test_a_study_created_without_tracking_is_joined_and_exported_by_workers_that_track(tmp_path, capsys, monkeypatch,
                                                                                      mlflow_uri):
    """Only a creator that tracked stored the study's MLflow run id: a joiner that tracks (the default), and the export
    (which always tracks), waited 60 s for it and died telling the user to delete the study and its trials. Now the
    first joiner that tracks starts the study's run, and later workers log under it. (Trials score a stand-in for the
    U-Net here: what is checked is who logs where; a real trial: test_tune_command_runs_a_real_unet_trial_...)"""
    from mlflow.tracking import MlflowClient

    def stand_in(data, config):
        space = tuning.unet_config(config)["space"]

        def objective(trial, report):
            point = tuning.suggest(trial, space)
            report(0, {"val_dice": point["mask_threshold"]})
            return point["mask_threshold"]

        return objective

    monkeypatch.setattr(tuning, "unet_objective", stand_in)
    cache, split = write_tiny_cache(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tune_unet": {"study": "tiny", **TINY_CONFIG}}))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = ["tune", "--study", "tiny", "--storage", storage, "--cache-dir", str(cache), "--split", str(split)]
    assert cli.main([*common, "--no-tracking", "--config", str(params), "--n-trials", "1", "--seed", "0"]) == 0
    assert cli.main([*common, "--tracking-uri", mlflow_uri, "--n-trials", "1", "--seed", "1"]) == 0
    assert cli.main([*common, "--tracking-uri", mlflow_uri, "--n-trials", "0"]) == 0  # the export of the best
    capsys.readouterr()

    study = optuna.load_study(study_name="tiny", storage=storage)
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("covidcxr-tuning").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and study.user_attrs[tuning.RUN_ATTR] == parents[0].info.run_id  # the export found it
    assert [r.data.tags["optuna_trial"] for r in trials] == ["1"]  # the untracked creator's trial 0 has no run
    assert trials[0].data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert parents[0].data.tags["best_trial_number"] == str(study.best_trial.number)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]


def test_joining_a_study_of_other_data_is_one_line_and_exit_2_not_a_traceback(tmp_path, capsys):
    """open_study's ValueError (a study created on other data) escaped `covidcxr tune` as a traceback."""
    cache, split = write_tiny_cache(tmp_path, n=10)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    tuning.open_study("tiny", storage, TINY_CONFIG, data_sha256="aa" * 32)  # another worker's data
    code = cli.main(["tune", "--study", "tiny", "--storage", storage, "--cache-dir", str(cache), "--split",
                     str(split), "--no-tracking", "--n-trials", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("tune: study 'tiny' was created on other data (sha256 aaaaaaaaaaaa...")
    assert "Traceback" not in "\n".join(err)
    assert len(optuna.load_study(study_name="tiny", storage=storage).trials) == 0


def test_a_storage_url_it_cannot_use_is_one_line_without_the_password_not_a_traceback(tmp_path, capsys,
                                                                                        monkeypatch, caplog):
    """A URL SQLAlchemy cannot parse, a dialect or driver not installed, and a server that cannot be reached escaped
    `covidcxr tune` as SQLAlchemy tracebacks (a parse error after four retries). Now: exit 2 at once for the URL,
    exit 1 after the retries for the server, one line each, the password hidden."""
    cache, split = write_tiny_cache(tmp_path, n=10)
    monkeypatch.setattr(tuning.time, "sleep", lambda s: None)  # the retries' waits: the count is what is checked
    caplog.set_level("INFO", logger="covidcxr.tuning")

    def tune(storage: str) -> tuple[int, str]:
        code = cli.main(["tune", "--study", "s", "--storage", storage, "--cache-dir", str(cache), "--split",
                         str(split), "--no-tracking", "--n-trials", "0"])
        return code, capsys.readouterr().err

    for storage, shown in (("bogus://u:s3cret@h/db", "bogus://u:***@h/db"), ("not a url s3cret", "<unparsable URL>"),
                           ("mysql://u:s3cret@h/db", "mysql://u:***@h/db")):
        code, err = tune(storage)
        assert code == 2 and "Traceback" not in err and "s3cret" not in err, err
        assert err.strip().splitlines()[-1].startswith(f"tune: study 's': Optuna storage {shown}: ")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, err = tune(f"postgresql+psycopg2://u:s3cret@127.0.0.1:{port}/db")
    last = err.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in err and "s3cret" not in err, err
    assert last.startswith(f"tune: Optuna storage postgresql+psycopg2://u:***@127.0.0.1:{port}/db cannot be reached "
                           "after 4 tries: OperationalError: ")
    assert caplog.text.count("not ready (OperationalError); retrying") == 3 and "s3cret" not in caplog.text


@pytest.mark.parametrize("error", [ValueError("Input 0 of layer is incompatible"), KeyError("lr"),
                                   RuntimeError("CUDA_ERROR_OUT_OF_MEMORY")], ids=lambda e: type(e).__name__)
def test_an_error_while_a_trial_trains_is_not_reported_as_a_study_this_worker_cannot_use(tmp_path, capsys,
                                                                                        monkeypatch, error):
    """`covidcxr tune` caught every ValueError as bad input (exit 2, 'study ...:'), and every KeyError or RuntimeError
    as a missing study (exit 1, one line), errors of a trial's training too: those are tracebacks now."""
    cache, split = write_tiny_cache(tmp_path, n=10)

    def broken(data, config):
        def objective(trial, report):
            raise error
        return objective

    monkeypatch.setattr(tuning, "unet_objective", broken)
    config = tmp_path / "tune.yaml"
    config.write_text(yaml.safe_dump(TINY_CONFIG))
    with pytest.raises(type(error)) as raised:
        cli.main(["tune", "--study", "s", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--config",
                  str(config), "--cache-dir", str(cache), "--split", str(split), "--no-tracking"])
    assert raised.value is error and "tune: " not in capsys.readouterr().err.replace("tune: sampler seed", "")


def test_an_export_of_a_mistyped_study_creates_no_study(tmp_path, capsys):
    """`--n-trials 0` only exports a study's best: with a --config it created the mistyped study, left empty in the
    shared storage, and then exited 1 on 'no completed trial'. It now joins only, as the stage does."""
    cache, split = write_tiny_cache(tmp_path, n=10)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tune_unet": {"study": "tiny", **TINY_CONFIG}}))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    tuning.open_study("tiny", storage, TINY_CONFIG)  # the study the workers fill
    code = cli.main(["tune", "--study", "tinny", "--storage", storage, "--config", str(params), "--cache-dir",
                     str(cache), "--split", str(split), "--no-tracking", "--n-trials", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("tune: study 'tinny' does not exist in sqlite:///")
    assert "only a study that exists is exported" in err[-1]
    assert optuna.study.get_all_study_names(storage) == ["tiny"]  # nothing created
    with pytest.raises(SystemExit):  # a negative count is no export either: refused by the parser
        cli.main(["tune", "--study", "tiny", "--cache-dir", str(cache), "--split", str(split), "--n-trials", "-1"])
    assert "at least 0 trials, got -1" in capsys.readouterr().err


def test_the_mlflow_run_of_a_trial_whose_worker_died_is_ended_failed(tmp_path, mlflow_uri):
    """A worker killed outright never ends its trial's run: Optuna fails the trial (another worker's loop, or the
    summary, on the stopped heartbeat) and the run stayed RUNNING, without its optuna_state, forever."""
    storage = tuning.make_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_s=None)  # trials by hand below
    study, created = tuning.open_study("s", storage, TINY_CONFIG)
    tracker = tuning.attach_tracker(study, created, experiment="e", tracking_uri=mlflow_uri)
    tuning.optimize(study, lambda trial, report: trial.suggest_float("x", 0, 1), 1, tracker=tracker)
    dead = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    run_id = tracker.start(dead)  # the dead worker's run, which it never ended
    study.tell(dead, state=optuna.trial.TrialState.FAIL)  # as fail_stale_trials does, leaving MLflow alone
    assert tracker.client.get_run(run_id).info.status == "RUNNING"
    assert tuning.summary(study, tracker)["trials"]["fail"] == 1
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["optuna_state"] == "FAIL"
    assert run.data.params == {"x": str(dead.params["x"])}
    assert tracker.end_failed(study) == 0  # ended once: the next summary leaves it be


@pytest.mark.slow
def test_a_worker_killed_mid_trial_has_its_trial_failed_and_its_run_ended(tmp_path, mlflow_uri):
    """The same, end to end: a real worker process on a heartbeat storage, killed with SIGKILL mid-trial."""
    import signal
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study, created = tuning.open_study("s", tuning.make_storage(url, heartbeat_s=1), TINY_CONFIG)
    tracker = tuning.attach_tracker(study, created, experiment="e", tracking_uri=mlflow_uri)
    worker = (
        "import sys, time\n"
        "from covidcxr import tuning\n"
        f"study, _ = tuning.open_study('s', tuning.make_storage({url!r}, heartbeat_s=1))\n"
        f"tracker = tuning.attach_tracker(study, False, experiment='e', tracking_uri={mlflow_uri!r})\n"
        "def objective(trial, report):\n"
        "    trial.suggest_float('x', 0, 1)\n"
        "    print('started', flush=True)\n"
        "    time.sleep(60)\n"
        "tuning.optimize(study, objective, 1, tracker=tracker)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", worker], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        time.sleep(1.5)  # a heartbeat or two
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    [trial] = study.get_trials()
    run_id = trial.user_attrs[tuning.RUN_ATTR]
    assert trial.state.name == "RUNNING" and tracker.client.get_run(run_id).info.status == "RUNNING"
    time.sleep(4.5)  # the grace period, 3 heartbeats, and a second more: sqlite keeps whole-second timestamps
    with pytest.raises(RuntimeError, match="no completed trial"):
        tuning.summary(study, tracker)
    run = tracker.client.get_run(run_id)
    assert study.get_trials()[0].state.name == "FAIL"
    assert run.info.status == "FAILED" and run.data.tags["optuna_state"] == "FAIL"


def test_a_tracking_creator_that_died_mid_setup_is_a_typed_error_that_keeps_the_study(tmp_path, mlflow_uri):
    """A creator that meant to track and died before it logged the study's run: joiners that track stop with an
    error the tune command catches (a RuntimeError), and are not told to delete a study that may hold trials."""
    study, created = tuning.open_study("s", f"sqlite:///{tmp_path / 'optuna.db'}", TINY_CONFIG)  # no run logged
    assert created and tuning.RUN_ATTR not in study.user_attrs
    with pytest.raises(tuning.StudyNotReady, match="has no \\['mlflow_run_id'\\] after 0 s") as err:
        tuning.attach_tracker(study, False, experiment="e", tracking_uri=mlflow_uri, wait_s=0.2)
    assert isinstance(err.value, RuntimeError) and "do not delete it" in str(err.value)


def test_the_best_tag_follows_a_better_trial_another_worker_tags_meanwhile(tmp_path, mlflow_uri):
    """Worker A reads the best (trial 0); worker B completes a better trial 1 and tags it; A then untagged B's run as
    stale and tagged trial 0, leaving best_trial=true on a run that is not the best. A now reads the best again after
    tagging and follows it."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study_a, created = tuning.open_study("race", url, TINY_CONFIG)
    tracker_a = tuning.attach_tracker(study_a, created, experiment="race", tracking_uri=mlflow_uri)
    study_b, _ = tuning.open_study("race", url)
    tracker_b = tuning.attach_tracker(study_b, False, experiment="race", tracking_uri=mlflow_uri)
    tuning.optimize(study_a, lambda trial, report: 0.5, 1, tracker=tracker_a)  # trial 0, tagged the best

    class ReadBeforeB:
        """Study A, whose first read of the best comes just before worker B's better trial completes."""

        def __init__(self, study):
            self.study, self.reads = study, 0

        def __getattr__(self, name):
            return getattr(self.study, name)

        @property
        def best_trial(self):
            best = self.study.best_trial
            self.reads += 1
            if self.reads == 1:
                tuning.optimize(study_b, lambda trial, report: 0.9, 1, tracker=tracker_b)  # trial 1, tagged
            return best

    assert tracker_a.tag_best(ReadBeforeB(study_a)) == 1
    runs = tracker_a.client.search_runs([tracker_a.experiment_id], filter_string=f"tags.{tuning.BEST_TAG} = 'true'")
    assert [r.data.tags["optuna_trial"] for r in runs] == ["1"]
    parent = tracker_a.client.get_run(tracker_a.parent_run_id).data
    assert parent.tags["best_trial_number"] == "1" and parent.metrics["best_value"] == 0.9


def test_a_tag_race_between_workers_is_retried_and_other_errors_are_not():
    """Two workers finishing together tag the same best run: MLflow's read-then-insert loses the race on PostgreSQL's
    unique key (seen in CI); the retry updates the row. Anything else is raised at once."""
    from mlflow.exceptions import MlflowException

    calls = []

    def flaky(run_id, key, value, fail_with):
        calls.append((run_id, key, value))
        if len(calls) == 1:
            raise MlflowException(fail_with)
        return "set"

    race = 'duplicate key value violates unique constraint "tag_pk"'
    assert tuning._racing(flaky, "r1", "best_trial", "true", fail_with=race) == "set" and len(calls) == 2
    calls.clear()
    with pytest.raises(MlflowException, match="no such run"):
        tuning._racing(flaky, "r1", "best_trial", "true", fail_with="no such run")
    assert len(calls) == 1

    def always(*_):
        calls.append(1)
        raise MlflowException(race)

    calls.clear()
    with pytest.raises(MlflowException, match="duplicate key"):
        tuning._racing(always, "r1", attempts=3)
    assert len(calls) == 3


@pytest.mark.slow
def test_a_dead_workers_trial_is_failed_before_the_summary(tmp_path):
    """A worker killed mid-trial leaves it RUNNING; Optuna fails such a trial only when some worker starts its next
    one, so after the study's last trial (or in an export that runs none) the summary reported it running forever."""
    storage = tuning.make_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_s=1)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    with pytest.warns(UserWarning, match="Heartbeat of storage is supposed to be used with Study.optimize"):
        done = study.ask()  # trials by hand, as a worker's optimize loop makes them
        study.tell(done, 0.8)
        dead = study.ask()
    storage.record_heartbeat(dead._trial_id)  # its worker beat once, then died
    time.sleep(4.5)  # the grace period, 3 heartbeats, and a second more: sqlite keeps whole-second timestamps
    result = tuning.summary(study)
    assert result["trials"]["running"] == 0 and result["trials"]["fail"] == 1 and result["best_value"] == 0.8
    assert study.trials[dead.number].state == optuna.trial.TrialState.FAIL


def test_a_trial_is_scored_on_the_cleaned_masks_segment_and_serving_make(tmp_path, monkeypatch):
    """Trials were scored on the raw thresholded output's Dice, while segment and serving keep the two largest
    components and fill holes: the tuned mask threshold was the best one for masks nobody uses."""
    from covidcxr import lungs, metrics, training

    cache, split = write_tiny_cache(tmp_path, n=12)
    data = tuning.load_unet_data(cache, split)
    rng = np.random.default_rng(0)
    prob = np.clip(data.y_val[..., None] * 0.9 + rng.random(data.y_val.shape + (1,)) * 0.6, 0, 1)  # specks outside
    monkeypatch.setattr(training, "predict", lambda model, x: prob)

    def fit(model, train, val, *, epochs, on_epoch_end, **options):  # the score reads predict only: no training
        for epoch in range(epochs):
            on_epoch_end(epoch, {})

    monkeypatch.setattr(training, "fit", fit)
    point = {"f0": 2, "lr": 0.004, "batch_size": 8, "mask_threshold": 0.5}
    value = tuning.unet_objective(data, {**TINY_CONFIG, "epochs": 1})(optuna.trial.FixedTrial(point),
                                                                     lambda step, logs: None)
    clean = float(np.mean(metrics.dice(data.y_val, lungs.cleaned(prob[..., 0], 0.5), threshold=0.5)))
    raw = float(np.mean(metrics.dice(data.y_val, prob[..., 0], threshold=0.5)))
    assert value == pytest.approx(clean) and abs(clean - raw) > 0.01
