"""Stage `train_projection`: the frontal-vs-lateral VGG filter (the paper's part a, Table 1)."""

from __future__ import annotations

import numpy as np

from covidcxr import metrics, models, preprocess, tracking, training
from pipelines import _common, _models, _tracking

METRICS = "reports/train_projection/metrics.json"


def run(p: dict, experiment: str = "demo") -> dict:
    log = _common.setup_logging()
    _tracking.setup_tracking()
    training.seed_everything(p["seed"])
    index, images, _ = _models.load_cache()
    parts = _models.split_arrays("projection", index)
    y = {s: (t["label"] == "frontal").to_numpy(np.float32) for s, (_, t) in parts.items()}  # 1 = frontal
    std = preprocess.Standardizer().fit(images[parts["train"][0]])
    x = {s: std.transform(images[rows]) for s, (rows, _) in parts.items()}

    with training.distribution_strategy(p["strategy"]).scope():
        model = models.build_vgg(p["depth"], x["train"].shape[1:] + (1,), weights=p["weights"], fold=p["fold"],
                                 width=p["width"], name=f"projection_vgg{p['depth']}")
        _models.compile_binary(model, p["lr"])
    with tracking.run(_common.mlflow_experiment(experiment), f"projection-vgg{p['depth']}", params=p,
                      tags=_tracking.repro_tags("train_projection", experiment)) as active:
        training.fit(model, (x["train"], y["train"]), (x["val"], y["val"]), epochs=p["epochs"],
                     batch_size=p["batch_size"], seed=p["seed"], augment=p["augment"],
                     class_weight=training.balanced_class_weight(y["train"]), on_epoch_end=tracking.log_epoch,
                     verbose=1 if _common.show_progress() else 0)
        component = models.Component(model, std, info={"run_id": active.info.run_id, "positive_class": "frontal"})
        result = {}
        for split, (rows, _) in parts.items():  # Table 1: accuracy per split, and per class (laterals are few)
            m = metrics.classification_metrics(y[split], component(images[rows])[:, 0])
            result[split] = {"accuracy": m["accuracy"], "frontal_accuracy": m["sensitivity"],
                             "lateral_accuracy": m["specificity"], "n": m["n"]}
        tracking.log_finite_metrics(result)
        tracking.log_keras_model(model, x["val"][..., None])
        with _common.atomic_dir(_common.PROJECTION_MODEL) as out:
            _models.save_component(out, component)
    _common.write_json(METRICS, result)
    log.info("projection filter accuracy: %s", {s: round(v["accuracy"], 4) for s, v in result.items()})
    return result


if __name__ == "__main__":
    run(_common.params("train_projection"), _common.params("split.experiment"))
