"""Stage `train_classifier` (a DVC matrix over variant c/d/e and backbone vgg16/vgg19): the COVID-vs-negative VGG.

Every variant trains on the same images: the experiment's split, predicted frontal, with a usable lung mask. The
operating threshold is fitted on the validation split (params: objective) and saved beside the model.
"""

from __future__ import annotations

import argparse

import mlflow
import numpy as np
import pandas as pd

from covidcxr import metrics, models, preprocess, tracking, training, tuning
from pipelines import _common


def model_dir(variant: str, backbone: str) -> str:
    return f"artifacts/models/classifier_{variant}_{backbone}"


def usable(index: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """The covid split restricted to predicted-frontal images with a usable mask, and what was excluded and why."""
    table = pd.read_csv("artifacts/splits/covid.csv", keep_default_na=False, na_values=[""])
    flags = pd.read_csv("artifacts/masks/index.csv", keep_default_na=False).set_index("image_id")["flag"]
    reason = flags.reindex(table["image_id"]).fillna("not_in_cache").to_numpy()
    excluded = {str(k): int(v) for k, v in pd.Series(reason[reason != ""]).value_counts().sort_index().items()}
    return table[reason == ""].reset_index(drop=True), excluded


def fit_threshold(y: np.ndarray, score: np.ndarray, p: dict) -> float:
    """The operating threshold Optuna chooses on validation for params' objective; its trials go to the active run."""
    choice = tuning.tune_threshold(y, score, p.get("threshold_objective", "youden"),
                                   min_sensitivity=float(p.get("min_sensitivity", 0.95)), seed=int(p["seed"]))
    if mlflow.active_run():
        mlflow.log_text(choice.trials.to_csv(index=False, lineterminator="\n"), "threshold/trials.csv")
        mlflow.log_metrics({"threshold.objective_value": choice.value, "threshold.trials": choice.n_trials})
    return choice.threshold


def run(p: dict, variant: str, backbone: str) -> dict:
    log = _common.setup_logging()
    _common.setup_tracking()
    training.seed_everything(p["seed"])
    index, images, _ = _common.load_cache()
    masks = np.load("artifacts/masks/masks.npy")
    table, excluded = usable(index)
    rows = _common.rows_for(index, table["image_id"])
    inputs = preprocess.apply_variant(images[rows], masks[rows], variant)
    y_all = (table["label"] == "covid").to_numpy(np.float32)
    split = table["split"].to_numpy()
    std = preprocess.Standardizer().fit(inputs[split == "train"])
    x = {s: std.transform(inputs[split == s]) for s in ("train", "val", "test")}
    y = {s: y_all[split == s] for s in x}

    depth = int(backbone.removeprefix("vgg"))
    with training.distribution_strategy(p.get("strategy", "default")).scope():
        model = models.build_vgg(depth, x["train"].shape[1:] + (1,), weights=p["weights"], fold=p["fold"],
                                 width=float(p["width"]), head=tuple(p["head"]), name=f"covid_{variant}_{backbone}")
        _common.compile_binary(model, float(p["lr"]))
    run_params = {**p, "variant": variant, "backbone": backbone, "excluded": excluded}
    with tracking.run(_common.mlflow_experiment(), f"classifier-{variant}-{backbone}", params=run_params,
                      tags=_common.repro_tags("train_classifier")) as active:
        history = training.fit(
            model, (x["train"], y["train"]), (x["val"], y["val"]), epochs=int(p["epochs"]),
            batch_size=int(p["batch_size"]), seed=int(p["seed"]), augment=bool(p.get("augment", False)),
            class_weight=training.balanced_class_weight(y["train"]), on_epoch_end=tracking.log_epoch,
            verbose=1 if _common.show_progress() else 0,
        )
        scores = {s: training.predict(model, x[s]).ravel() for s in x}
        threshold = fit_threshold(y["val"], scores["val"], p)
        result = {s: metrics.classification_metrics(y[s], scores[s]) for s in x}
        result["operating_threshold"] = threshold
        result["excluded"] = excluded
        tracking.log_finite_metrics({**{s: result[s] for s in x}, "operating_threshold": threshold})
        tracking.log_keras_model(model, x["val"][..., None])
        with _common.atomic_dir(model_dir(variant, backbone)) as out:  # the model folder appears whole, or not at all
            _common.save_model_dir(out, model, std, active.info.run_id, {"variant": variant, "backbone": backbone,
                                                                         "epochs_run": len(history.get("loss", []))})
            _common.write_json(out / "threshold.json",
                               {"threshold": threshold, "objective": p.get("threshold_objective")})
            mlflow.log_artifact(str(out / "threshold.json"), "preprocessing")
            predictions = pd.concat([
                table[split == s][["image_id", "patient_id", "split", "label"]].assign(score=scores[s])
                for s in x
            ])
            _common.write_csv(out / "predictions.csv", predictions)
    _common.write_json(f"reports/train_classifier/{variant}_{backbone}.json",
                       {s: {k: result[s][k] for k in ("accuracy", "roc_auc", "n")} for s in x})
    log.info("classifier %s/%s: val AUC %.3f, test AUC %.3f", variant, backbone,
             result["val"]["roc_auc"], result["test"]["roc_auc"])
    return result


if __name__ == "__main__":
    args = argparse.ArgumentParser()
    args.add_argument("--variant", required=True, choices=sorted(preprocess.VARIANTS))
    args.add_argument("--backbone", required=True, choices=["vgg16", "vgg19"])
    a = args.parse_args()
    run(_common.params("train_classifier"), a.variant, a.backbone)
