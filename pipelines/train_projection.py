"""Stage `train_projection`: the frontal-vs-lateral VGG filter (the paper's part a, Table 1)."""

from __future__ import annotations

import numpy as np

from covidcxr import metrics, models, preprocess, tracking, training
from pipelines import _common

OUT = "artifacts/models/projection"
METRICS = "reports/train_projection/metrics.json"


def run(p: dict) -> dict:
    log = _common.setup_logging()
    _common.setup_tracking()
    training.seed_everything(p["seed"])
    index, images, _ = _common.load_cache()
    parts = _common.split_arrays("projection", index)
    y = {s: (t["label"] == "frontal").to_numpy(np.float32) for s, (_, t) in parts.items()}  # 1 = frontal
    std = preprocess.Standardizer().fit(images[parts["train"][0]])
    x = {s: std.transform(images[rows]) for s, (rows, _) in parts.items()}

    with training.distribution_strategy(p.get("strategy", "default")).scope():
        model = models.build_vgg(p["depth"], x["train"].shape[1:] + (1,), weights=p["weights"], fold=p["fold"],
                                 width=p["width"], name=f"projection_vgg{p['depth']}")
        _common.compile_binary(model, p["lr"])
    with tracking.run(_common.mlflow_experiment(), f"projection-vgg{p['depth']}", params=p,
                      tags=_common.repro_tags("train_projection")) as active:
        training.fit(model, (x["train"], y["train"]), (x["val"], y["val"]), epochs=p["epochs"],
                     batch_size=p["batch_size"], seed=p["seed"], augment=p.get("augment", False),
                     class_weight=training.balanced_class_weight(y["train"]), on_epoch_end=tracking.log_epoch,
                     verbose=1 if _common.show_progress() else 0)
        result = {}
        for split in x:  # Table 1: accuracy per split, and per class (laterals are the minority)
            score = training.predict(model, x[split]).ravel()
            m = metrics.classification_metrics(y[split], score)
            result[split] = {"accuracy": m["accuracy"], "frontal_accuracy": m["sensitivity"],
                             "lateral_accuracy": m["specificity"], "n": m["n"]}
        tracking.log_finite_metrics(result)
        tracking.log_keras_model(model, x["val"][..., None])
        with _common.atomic_dir(OUT) as out:
            _common.save_model_dir(out, model, std, active.info.run_id, {"positive_class": "frontal"})
    _common.write_json(METRICS, result)
    log.info("projection filter accuracy: %s", {s: round(v["accuracy"], 4) for s, v in result.items()})
    return result


if __name__ == "__main__":
    run(_common.params("train_projection"))
