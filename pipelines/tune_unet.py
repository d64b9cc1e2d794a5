"""Stage `tune_unet`: an Optuna study of the U-Net's F0, learning rate, dropout scale, batch size and mask threshold,
maximising the standard per-image validation Dice, pruned per epoch.

This stage runs `tune_unet.n_trials` trials itself and writes the study's best parameters to artifacts/tune/unet.json
(train_unet uses them when `train_unet.use_tuned` is true; params.yaml is never written). The study lives in
`tune_unet.storage`, or $COVIDCXR_OPTUNA_STORAGE, or sqlite under artifacts/tune/ (then fresh on every run, since DVC
clears the stage's outputs first). With a shared PostgreSQL storage, `covidcxr tune` workers on other machines add
their trials to the same study, and this stage (with `n_trials: 0` if they did all the work) exports the best.
"""

from __future__ import annotations

import os

from covidcxr import tuning
from pipelines import _common

OUT_DIR = "artifacts/tune"
TUNED = f"{OUT_DIR}/unet.json"
DEFAULT_STORAGE = f"sqlite:///{OUT_DIR}/optuna.db"
SPLIT = "artifacts/splits/segmentation.csv"
REPORTS = "reports/tune_unet"


def storage_url(p: dict) -> str:
    """$COVIDCXR_OPTUNA_STORAGE, else params' storage, else the local sqlite file; params must hold no password."""
    if p.get("storage") and tuning.has_password(str(p["storage"])):
        raise ValueError("tune_unet.storage holds a password: put it in PGPASSWORD or ~/.pgpass (or the whole URL in "
                         f"${tuning.STORAGE_ENV}), never in params.yaml")
    return tuning.resolve_storage(os.environ.get(tuning.STORAGE_ENV), p.get("storage"), DEFAULT_STORAGE)


def run(p: dict) -> dict:
    log = _common.setup_logging()
    _common.setup_tracking()
    url = storage_url(p)
    log.info("Optuna study %r in %s", p["study"], tuning.redact(url))
    data = tuning.load_unet_data(_common.CACHE_DIR, SPLIT)
    study, created = tuning.open_study(p["study"], url, p, data_sha256=data.sha256, seed=int(p["seed"]))
    tracker = tuning.attach_tracker(
        study, created, experiment=_common.mlflow_experiment(), run_name=f"tune-unet-{p['study']}",
        tags={**_common.repro_tags("tune_unet"), "optuna_storage": tuning.redact(url)},
    )
    objective = tuning.unet_objective(data, tuning.study_config(study))
    tuning.optimize(study, objective, int(p["n_trials"]), tracker=tracker)

    result = tuning.summary(study)
    _common.write_json(TUNED, result)
    _common.write_csv(f"{REPORTS}/trials.csv", tuning.trials_table(study))
    _common.write_json(f"{REPORTS}/metrics.json", {"best_value": result["best_value"], "trials": result["trials"]})
    log.info("best trial %d: val Dice %.4f with %s", result["best_trial"], result["best_value"], result["best_params"])
    return result


if __name__ == "__main__":
    run(_common.params("tune_unet"))
