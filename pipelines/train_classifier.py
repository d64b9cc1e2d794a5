"""Stage `train_classifier` (a DVC matrix over variant c/d/e and backbone vgg16/vgg19): the COVID-vs-negative VGG.

Every variant trains on the same images: the experiment's split, predicted frontal, with a usable lung mask; the
split's other films, which serving refuses before the classifier, are written beside the predictions with serving's
reason (``refused.csv``: :func:`pipelines._models.usable`), so that `evaluate` counts them in what serving answers. The
probability calibration (Platt) and then the operating threshold (params: objective) are fitted on the validation split
and saved in the model folder; the predictions of every split come from one forward pass
(:meth:`covidcxr.models.Component.evidence`) made probabilities by :func:`covidcxr.models.probability`, as serving's
:func:`covidcxr.models.classifier_evidence` makes them (``score``: calibrated, as served; ``raw_score``: the network's
own). The out-of-distribution detector (:mod:`covidcxr.ood`) is fitted on the training split's features (pooled blocks
and penultimate layer) from the same pass, its threshold set at the params quantile of the validation scores, and
``ood_score`` of every split comes from :func:`covidcxr.models.ood_scored`, as every served one.

Robustness levers (params): ``input`` (lung crop with margin, histogram equalisation or CLAHE: an input transform saved
in the model folder and applied by ``Component.prepare`` everywhere the model scores), ``augment`` (none, basic,
strong), ``sampling`` (class weights, class-balanced or class- and source-balanced batches), ``weights: pretrained``
(the pretrain stage's self-supervised encoder) and ``source_adversary`` (above 0: the weight of a head that learns the
negatives' source through a reversed gradient, :mod:`covidcxr.adversary`; trained beside the classifier, never served).
``members`` above 1 trains that many networks with seeds ``seed``, ``seed + 1000``, ... on the same inputs: a seed
ensemble whose mean output is calibrated, thresholded, scored and served as one model (``models.Component``).
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from covidcxr import adversary, calibration, metrics, models, ood, preprocess, tracking, training
from pipelines import _common, _models, _tracking


def choose_threshold(y_val: np.ndarray, scores_val: np.ndarray, p: dict, folder: str) -> metrics.ThresholdChoice:
    """The operating threshold of params ``p`` (``threshold_objective``, ``min_sensitivity``) on the validation
    scores, checked as serving checks it at load (:func:`covidcxr.metrics.check_threshold`): a threshold above 1 is a
    ValueError naming the model ``folder``, raised before the folder is saved. It happens where the objective calls
    nothing positive (its point lies just above the top score) and a probability, rounded, reached 1.0."""
    choice = metrics.operating_threshold(y_val, scores_val, p["threshold_objective"],
                                         min_sensitivity=float(p["min_sensitivity"]))
    try:
        metrics.check_threshold(choice.threshold, f"{folder}: the operating threshold")
    except ValueError as err:
        raise ValueError(f"{err}: the {choice.objective} objective calls none of the {len(y_val)} validation images "
                         f"COVID-19, its point lying above their top score {float(np.max(scores_val))}; serving would "
                         "refuse the folder") from None
    return choice


def run(p: dict, variant: str, backbone: str, experiment: str = "demo") -> dict:
    log = _common.setup_logging()
    _tracking.setup_tracking()
    training.seed_everything(p["seed"])
    index, images, _ = _models.load_cache()
    masks = _models.load_masks()
    table, refused = _models.usable()
    excluded = {str(k): int(v) for k, v in refused["reason"].value_counts().sort_index().items()}
    rows = preprocess.rows_for(index, table["image_id"])
    y_all = (table["label"] == "covid").to_numpy(np.float32)
    split = table["split"].to_numpy()
    parts = {s: rows[split == s] for s in ("train", "val", "test")}
    transform = preprocess.InputTransform(**p["input"])  # saved with the model: Component.prepare applies it
    inputs = {s: transform.apply(images[r], masks[r], variant).images for s, r in parts.items()}
    std = preprocess.Standardizer().fit(inputs["train"])
    x = {s: std.transform(v) for s, v in inputs.items()}
    y = {s: y_all[split == s] for s in x}

    sources = {s: index["source"].to_numpy()[r] for s, r in parts.items()}
    weighing = training.sampling(p["sampling"], y["train"], sources["train"])
    targets = {s: y[s] for s in ("train", "val")}
    adversary_weight = float(p["source_adversary"])
    source_names = adversary.source_names(y["train"], sources["train"]) if adversary_weight > 0 else []
    if adversary_weight > 0 and len(source_names) < 2:  # the demo, cohen-pneumonia: nothing to forget
        log.info("source adversary off: the training negatives come from one source (%s)", source_names)
        source_names = []
    depth = int(backbone.removeprefix("vgg"))
    if source_names:  # the classifier shares every layer with the trainer; it alone is saved and served
        class_weight = weighing.pop("class_weight")  # the targets carry it (Keras' cannot weigh a wide row)
        targets = {s: adversary.pack_targets(y[s], sources[s], source_names, class_weight) for s in targets}
        log.info("source adversary (weight %g) on the training negatives' sources %s", adversary_weight,
                 source_names)

    lr = training.learning_rate(float(p["lr"]), p["lr_schedule"], epochs=int(p["epochs"]), n_train=len(x["train"]),
                                batch_size=int(p["batch_size"]))

    def build(seed: int, i: int):
        """Network ``i`` of the ensemble, the model that trains it (with the source adversary, when there is one) and
        its epoch hook."""
        with training.build_scope(p["strategy"], p["precision"]):
            network = models.build_vgg(depth, x["train"].shape[1:] + (1,),
                                       weights=_models.vgg_weights(p["weights"], depth), fold=p["fold"],
                                       width=float(p["width"]), head=tuple(p["head"]),
                                       name=f"covid_{variant}_{backbone}")
            _models.compile_binary(network, lr)
            trainer = network
            if source_names:
                trainer = adversary.build_trainer(network, len(source_names), weight=adversary_weight, seed=seed)
                adversary.compile_trainer(trainer, lr)
        hook = tracking.member_epoch_log(i)
        if source_names and p["source_adversary_ramp"]:  # 0 in the first epoch, then up towards the weight
            hook = adversary.ramp_hook(trainer, adversary_weight, int(p["epochs"]), then=hook)
        return network, trainer, hook

    def fit(member, seed: int, i: int) -> dict:
        _, trainer, hook = member
        return training.fit(trainer, (x["train"], targets["train"]), (x["val"], targets["val"]),
                            epochs=int(p["epochs"]), batch_size=int(p["batch_size"]), seed=seed, augment=p["augment"],
                            **weighing, on_epoch_end=hook, verbose=1 if _common.show_progress() else 0)

    seeds = training.member_seeds(int(p["seed"]), int(p["members"]))
    first = build(seeds[0], 0)
    run_params = {**p, "variant": variant, "backbone": backbone, "excluded": excluded}
    with tracking.run(_common.mlflow_experiment(experiment), f"classifier-{variant}-{backbone}", params=run_params,
                      tags=_tracking.repro_tags("train_classifier", experiment)) as active:
        members, history, ensemble = training.fit_members(seeds, first, build, fit)
        networks = [network for network, _, _ in members]
        component = models.Component(networks[0], std, info={"run_id": active.info.run_id, "variant": variant,
                                                             "backbone": backbone,
                                                             "epochs_run": len(history.get("loss", [])), **ensemble,
                                                             **({"source_adversary": source_names}
                                                                if source_names else {})},
                                     input_transform=transform, members=networks[1:])
        # One forward pass of each split gives the outputs and the features; the probabilities and OOD scores below
        # are serving's (models.classifier_evidence) for the same images. ``inputs`` are what component.prepare
        # gives (the same transform, saved with the component), computed once above.
        passes = {s: component.evidence(v) for s, v in inputs.items()}
        raw = {s: models.probability(component, out, calibrated=False) for s, (out, _) in passes.items()}
        if p["calibration"] == "platt":  # fitted on validation, applied wherever a probability is computed
            component.calibrator = calibration.PlattCalibrator().fit(y["val"], raw["val"])
        scores = {s: models.probability(component, out) for s, (out, _) in passes.items()}
        choice = choose_threshold(y["val"], scores["val"], p, _common.model_dir(variant, backbone))
        component.threshold = choice.to_dict()
        # the detector learns the training features; its threshold is a validation quantile
        component.ood = ood.MahalanobisDetector(n_components=int(p["ood_components"]),
                                                quantile=float(p["ood_quantile"]))
        component.ood.fit(passes["train"][1])
        ood_scores = {s: models.ood_scored(component, features).score for s, (_, features) in passes.items()}
        component.ood.calibrate(ood_scores["val"])
        ood_refused = {s: float(component.ood.is_out(v).mean()) if len(v) else None for s, v in ood_scores.items()}
        result = {s: metrics.classification_metrics(y[s], scores[s]) for s in x}
        result["operating_threshold"] = choice.threshold
        result["ood"] = {"threshold": component.ood.threshold, "quantile": component.ood.quantile,
                         "refused": ood_refused}
        result["excluded"] = excluded
        tracking.log_finite_metrics({**{s: result[s] for s in x}, "operating_threshold": choice.threshold,
                                     "threshold.val_sensitivity": choice.sensitivity,
                                     "threshold.val_specificity": choice.specificity,
                                     "ood.threshold": component.ood.threshold,
                                     **{f"ood.{s}.refused": v for s, v in ood_refused.items() if v is not None}})
        tracking.log_keras_model(component.model, x["val"][..., None])  # an ensemble's first network
        with _common.atomic_dir(_common.model_dir(variant, backbone)) as out:  # the folder appears whole, or not
            _models.save_component(out, component)
            predictions = pd.concat([
                table[split == s][["image_id", "patient_id", "split", "label"]].assign(score=scores[s],
                                                                                      raw_score=raw[s],
                                                                                      ood_score=ood_scores[s])
                for s in x
            ])
            _common.write_csv(out / _common.PREDICTIONS, predictions)
            # the films serving refuses before the classifier: evaluate counts them in what serving answers
            _common.write_csv(out / _common.REFUSED, refused[["image_id", "patient_id", "split", "label", "reason"]])
    _common.write_json(f"reports/train_classifier/{variant}_{backbone}.json",
                       {**{s: {k: result[s][k] for k in ("accuracy", "roc_auc", "n")} for s in x},
                        "ood": result["ood"]})
    log.info("classifier %s/%s: val AUC %.3f, test AUC %.3f", variant, backbone,
             result["val"]["roc_auc"], result["test"]["roc_auc"])
    return result


if __name__ == "__main__":
    args = argparse.ArgumentParser()
    args.add_argument("--variant", required=True, choices=sorted(preprocess.VARIANTS))
    args.add_argument("--backbone", required=True, choices=["vgg16", "vgg19"])
    args.add_argument("-v", "--verbose", action="store_true", help="third-party and TensorFlow logs too")
    a = args.parse_args()
    run(_common.params("train_classifier"), a.variant, a.backbone, _common.params("split.experiment"))
    _common.finish()
