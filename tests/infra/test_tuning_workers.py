"""Two `covidcxr tune` workers on one PostgreSQL study, as on two GPU runners: every trial recorded once, one best."""

from __future__ import annotations

import json
import subprocess

import mlflow
import optuna
import pytest
import yaml

from covidcxr import cli, tuning
from tests.infra.conftest import base_env, stop_group
from tests.test_tuning import TINY_CONFIG, write_tiny_cache

pytestmark = [pytest.mark.infra, pytest.mark.slow]

TRIALS_PER_WORKER = 1  # each worker's trial overlaps the other's: the race is the same with more


def test_two_workers_tune_one_postgres_study(postgres, tmp_path, monkeypatch, capsys, caplog):
    storage = postgres.create_database("optuna")
    tracking_uri = postgres.create_database("mlflow")
    monkeypatch.setenv("PGPASSWORD", postgres.password)  # this process reads both databases too
    mlflow.MlflowClient(tracking_uri).search_experiments()  # create MLflow's schema once, before the workers race

    cache, split = write_tiny_cache(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"split": {"experiment": "infra"},
                                      "tune_unet": {"study": "shared", **TINY_CONFIG}}))
    env = base_env(**postgres.env())
    command = ["covidcxr", "tune", "--study", "shared", "--storage", storage, "--config", str(params),
               "--cache-dir", str(cache), "--split", str(split), "--tracking-uri", tracking_uri]
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    workers = []
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as out:
                workers.append(subprocess.Popen([*command, "--n-trials", str(TRIALS_PER_WORKER), "--seed", str(i)],
                                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                                start_new_session=True))
        codes = [w.wait(timeout=240) for w in workers]
    finally:
        for w in workers:
            stop_group(w)
    output = "\n".join(log.read_text() for log in logs)
    assert codes == [0, 0], output[-5000:]
    # the export, what `dvc repro tune_unet` does last: in this process (it trains nothing), as a user on PGPASSWORD
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    caplog.set_level("INFO")
    assert cli.main([*command[1:], "--n-trials", "0"]) == 0
    export = capsys.readouterr()
    summary = json.loads(export.out)
    output += export.err + caplog.text

    # Every trial once, from both workers, each finished; the summary is the study's own best.
    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(2 * TRIALS_PER_WORKER))
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    assert summary["best_trial"] == study.best_trial.number and summary["best_value"] == study.best_value
    assert summary["best_value"] == max(t.value for t in trials if t.state.name == "COMPLETE")
    assert sum(summary["trials"].values()) == 2 * TRIALS_PER_WORKER

    # One MLflow run per trial, all nested under the study's one run; exactly the best one tagged.
    client = mlflow.MlflowClient(tracking_uri)
    parent = client.get_run(study.user_attrs[tuning.RUN_ATTR])
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_trial = {int(r.data.tags["optuna_trial"]): r for r in runs}
    assert len(runs) == len(by_trial) == 2 * TRIALS_PER_WORKER
    assert {t.number: t.user_attrs[tuning.RUN_ATTR] for t in trials} == {n: r.info.run_id for n, r in by_trial.items()}
    assert len({r.data.tags["worker"] for r in runs}) == 2  # both workers did trials
    # each worker's sampler seed (--seed 0 and 1) on its trials: what replays its proposals
    assert {r.data.tags["sampler_seed"] for r in runs} == {"0", "1"}
    assert [n for n, r in by_trial.items() if r.data.tags.get(tuning.BEST_TAG) == "true"] == [summary["best_trial"]]
    assert parent.data.tags["optuna_study"] == "shared"
    assert client.get_run(parent.info.run_id).data.tags["best_trial_number"] == str(summary["best_trial"])
    for number, r in by_trial.items():
        assert r.data.params == {k: str(v) for k, v in study.trials[number].params.items()}

    # The password went through PGPASSWORD only: not in logs, params, tags or the study.
    recorded = [output, json.dumps(study.user_attrs),
                *[json.dumps([r.data.params, r.data.tags]) for r in [parent, *runs]]]
    assert not any(postgres.password in text for text in recorded)

