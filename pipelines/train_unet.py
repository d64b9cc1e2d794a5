"""Stage `train_unet`: the paper's lung U-Net (part b) on image/mask pairs; standard per-image Dice and IoU.

The authors' per-pixel Dice is reported beside it under its own name, only to compare with the paper's Table 2, and the
Dice of the cleaned masks `segment` and serving use (``dice_clean``). The mask threshold (params; with `use_tuned`,
chosen again on the validation Dice of this network's cleaned masks, as the tuned value was the best of a short trial's
network) is saved in the model folder, where `segment` and serving read it. ``augment`` (a level or its parts:
intensity, gamma, contrast, small affine) moves each mask with its image.
"""

from __future__ import annotations

import json
import os

import numpy as np

from covidcxr import lungs, metrics, models, preprocess, tracking, training
from pipelines import _common, _models, _tracking

METRICS = "reports/train_unet/metrics.json"


def effective_params(p: dict) -> dict:
    """params, with the tuned values when params ask for them (the tuner never writes params.yaml); asked for and
    absent, a ParamsError naming the file (params' values would be recorded as tuned)."""
    if not p["use_tuned"]:
        return p
    if not os.path.exists(_common.TUNED_UNET):
        raise _common.ParamsError(f"params.yaml: train_unet.use_tuned is true but {_common.TUNED_UNET} does not exist: "
                                  "run the tune_unet stage first (dvc repro tune_unet) or set train_unet.use_tuned to "
                                  "false")
    with open(_common.TUNED_UNET, encoding="utf-8") as fh:
        tuned = json.load(fh)
    if tuned["best_params"] is None:
        raise _common.ParamsError(f"params.yaml: train_unet.use_tuned is true but {_common.TUNED_UNET} holds no "
                                  f"tuned values ({tuned.get('reason', 'no completed trial')}): set "
                                  "tune_unet.n_trials above 0 or train_unet.use_tuned to false")
    return {**p, **tuned["best_params"]}


#: The mask thresholds :func:`choose_mask_threshold` tries.
MASK_THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.05), 2)


def choose_mask_threshold(truth: np.ndarray, prob: np.ndarray, prefer: float) -> float:
    """The mask threshold of the best mean per-image Dice of the cleaned masks (:func:`covidcxr.lungs.cleaned`: those
    `segment` and serving use) of these (validation) probabilities, among :data:`MASK_THRESHOLDS`; ties go to the one
    nearest ``prefer``. The raw thresholded output's Dice would prefer a threshold that keeps out specks the cleaning
    removes anyway, at the cost of lung edges."""
    dice = [float(np.mean(metrics.dice(truth, lungs.cleaned(prob, float(t)), threshold=0.5))) for t in MASK_THRESHOLDS]
    best = max(dice)
    return float(min((t for t, d in zip(MASK_THRESHOLDS, dice) if d == best), key=lambda t: abs(t - prefer)))


def mask_scores(truth: np.ndarray, prob: np.ndarray, threshold: float) -> dict:
    """Mean per-image Dice and IoU, the authors' per-pixel Dice, and the count; ``dice_clean``/``iou_clean``: of the
    masks `segment` and serving use (:func:`covidcxr.lungs.cleaned`)."""
    clean = lungs.cleaned(prob, threshold)
    return {
        "dice": float(np.mean(metrics.dice(truth, prob, threshold=threshold))),
        "iou": float(np.mean(metrics.iou(truth, prob, threshold=threshold))),
        "dice_clean": float(np.mean(metrics.dice(truth, clean, threshold=0.5))),
        "iou_clean": float(np.mean(metrics.iou(truth, clean, threshold=0.5))),
        "paper_pixel_dice": float(metrics.paper_pixel_dice(truth, prob, per_pixel=True)),
        "n": int(len(prob)),
    }


def run(p: dict, experiment: str = "demo") -> dict:
    log = _common.setup_logging()
    _tracking.setup_tracking()
    p = effective_params(p)
    training.seed_everything(p["seed"])
    index, images, masks = _models.load_cache()
    parts = _models.split_arrays("segmentation", index)
    std = preprocess.Standardizer().fit(images[parts["train"][0]])
    x = {s: std.transform(images[rows]) for s, (rows, _) in parts.items()}
    y = {s: masks[rows].astype(np.float32) for s, (rows, _) in parts.items()}
    threshold = float(p["mask_threshold"])

    import keras

    with training.build_scope(p["strategy"], p["precision"]):
        model = models.build_unet(int(p["f0"]), x["train"].shape[1:] + (1,), dropout_scale=float(p["dropout_scale"]))
        lr = training.learning_rate(float(p["lr"]), p["lr_schedule"], epochs=int(p["epochs"]),
                                    n_train=len(x["train"]), batch_size=int(p["batch_size"]))
        model.compile(optimizer=keras.optimizers.Adam(lr), loss=models.bce_dice_loss)
    with tracking.run(_common.mlflow_experiment(experiment), f"unet-f0{p['f0']}", params=p,
                      tags=_tracking.repro_tags("train_unet", experiment)) as active:
        training.fit(model, (x["train"], y["train"]), (x["val"], y["val"]), epochs=int(p["epochs"]),
                     batch_size=int(p["batch_size"]), seed=int(p["seed"]), augment=p["augment"],
                     on_epoch_end=tracking.log_epoch,
                     verbose=1 if _common.show_progress() else 0)
        component = models.Component(model, std, info={"run_id": active.info.run_id, "f0": int(p["f0"])})
        prob = {split: component(images[rows])[..., 0] for split, (rows, _) in parts.items()}
        chosen = {"threshold": threshold, "source": "params"}
        if p["use_tuned"]:  # the tuned value was the best of a short trial's network, not this one's: chosen again
            threshold = choose_mask_threshold(y["val"], prob["val"], prefer=threshold)
            chosen = {"threshold": threshold, "source": "validation", "tuned": float(p["mask_threshold"])}
        component.threshold = chosen
        result = {}
        for split, (_, table) in parts.items():  # `external`: sources held out of training
            result[split] = mask_scores(y[split], prob[split], threshold)
            sources = table["label"].to_numpy()  # the segmentation task's label is the source
            if len(set(sources)) > 1:
                result[split]["by_source"] = {str(src): mask_scores(y[split][sources == src],
                                                                    prob[split][sources == src], threshold)
                                              for src in sorted(set(sources))}
        tracking.log_finite_metrics(result)
        tracking.log_keras_model(model, x["val"][..., None])
        with _common.atomic_dir(_common.UNET_MODEL) as out:
            _models.save_component(out, component)
    _common.write_json(METRICS, result)
    log.info("U-Net Dice: %s", {s: round(v["dice"], 4) for s, v in result.items()})
    return result


if __name__ == "__main__":
    run(_common.params("train_unet"), _common.filed_under())
    _common.finish()
