"""Stage `tune_unet`: an Optuna study of the U-Net's F0, learning rate, dropout scale, batch size and mask threshold,
maximising the standard per-image validation Dice of the cleaned masks `segment` and serving make, pruned per epoch.

This stage runs `tune_unet.n_trials` trials itself and writes the study's best parameters to artifacts/tune/unet.json
(train_unet uses them when `train_unet.use_tuned` is true; params.yaml is never written). The study lives in
$COVIDCXR_OPTUNA_STORAGE (which overrides params: logged, with a warning when params name another database), or
`tune_unet.storage`, or sqlite under artifacts/tune/ (then fresh on every run, since DVC clears the stage's outputs
first). With a shared PostgreSQL storage, `covidcxr tune` workers on other machines add their trials to the same study,
and this stage (with `n_trials: 0` if they did all the work) exports the best. DVC sees neither the environment nor
the study's trials: dvc.yaml keeps the stage out of DVC's run cache, and an export is forced (README, "Tuning on N GPU
runners"). With `n_trials: 0` and the local sqlite file there is no study at all: the stage only records that nothing
was tuned (``best_params`` null), in seconds, for profiles that train the U-Net from params
(`train_unet.use_tuned: false`).
"""

from __future__ import annotations

import logging
import os

import pandas as pd

from covidcxr import dburl, tuning
from pipelines import _common, _tracking

log = logging.getLogger("covidcxr.pipelines")

OUT_DIR = "artifacts/tune"
DEFAULT_STORAGE = f"sqlite:///{OUT_DIR}/optuna.db"
REPORTS = "reports/tune_unet"


def storage_url(p: dict) -> str:
    """$COVIDCXR_OPTUNA_STORAGE, else params' storage, else the local sqlite file; params must hold no password.

    Which one, and from where, is logged (without a password): DVC records params, not the environment, so a study
    the environment names instead of params' is said, with a warning when params name another database.
    """
    configured, env = p.get("storage"), os.environ.get(tuning.STORAGE_ENV)
    if configured and dburl.has_password(str(configured)):
        raise _common.ParamsError("tune_unet.storage holds a password, or is no URL SQLAlchemy parses safely (then it "
                                  "may hide one): put the password in PGPASSWORD or ~/.pgpass (or the whole URL in "
                                  f"${tuning.STORAGE_ENV}), never in params.yaml")
    url = tuning.resolve_storage(env, configured, DEFAULT_STORAGE)
    source = f"${tuning.STORAGE_ENV}" if env else "tune_unet.storage" if configured else "the stage's own sqlite file"
    log.info("Optuna storage %s (from %s), study %r", dburl.shown_url(url), source, p.get("study"))
    if env and configured and not dburl.same_database(env, str(configured)):
        log.warning("$%s (%s) overrides tune_unet.storage (%s): study %r is read from the environment's database, "
                    "which DVC does not record", tuning.STORAGE_ENV, dburl.shown_url(env),
                    dburl.shown_url(str(configured)), p.get("study"))
    return url


def run(p: dict, experiment: str = "demo") -> dict:
    _common.setup_logging()
    try:
        tuning.unet_config(p)  # the search space is checked before any work
    except ValueError as err:
        raise _common.ParamsError(f"params.yaml: tune_unet: {err}") from None
    url = storage_url(p)
    if int(p["n_trials"]) == 0 and url == DEFAULT_STORAGE:
        result, trials = _untuned(p["study"])
        log.info("%s", result["reason"])
    else:
        export_only = int(p["n_trials"]) == 0  # the best of a shared study that `covidcxr tune` workers fill
        if export_only:  # joined, never created: a mistyped name would leave an empty study in the shared storage
            try:
                tuning.open_study(p["study"], url)
            except tuning.StudyMissing:
                raise _common.ParamsError(f"tune_unet.study {p['study']!r} is no study of {dburl.shown_url(url)}: with "
                                          "n_trials 0 the stage only exports a study that `covidcxr tune` workers "
                                          "filled; check the name and the storage") from None
        _tracking.setup_tracking()
        data = tuning.load_unet_data(_common.CACHE_DIR, _common.split_table("segmentation"))
        result, trials = tuning.tune_unet(
            p["study"], url, data, config=None if export_only else p, n_trials=int(p["n_trials"]), seed=int(p["seed"]),
            tracking=tuning.Tracking(experiment=_common.mlflow_experiment(experiment),
                                     run_name=f"tune-unet-{p['study']}",
                                     tags=_tracking.repro_tags("tune_unet", experiment)),
        )
        log.info("best trial %d: val Dice %.4f with %s", result["best_trial"], result["best_value"],
                 result["best_params"])
    _common.write_json(_common.TUNED_UNET, result)
    _common.write_csv(f"{REPORTS}/trials.csv", trials)
    _common.write_json(f"{REPORTS}/metrics.json", {"best_value": result["best_value"], "trials": result["trials"]})
    return result


def _untuned(study: str) -> tuple[dict, pd.DataFrame]:
    """A stage asked for no trial in a study of its own: nothing tuned, the reason, and an empty trials table."""
    result = {"study": study, "objective": "val_dice", "best_trial": None, "best_value": None, "best_params": None,
              "trials": dict.fromkeys(tuning.TRIAL_STATES, 0),
              "reason": "tune_unet.n_trials is 0 and no shared storage holds a study: nothing was tuned"}
    return result, pd.DataFrame(columns=["number", "state", "value", "epochs_reported"])


if __name__ == "__main__":
    run(_common.params("tune_unet"), _common.filed_under())
    _common.finish()
