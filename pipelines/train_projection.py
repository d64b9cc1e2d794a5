"""Stage `train_projection`: the frontal-vs-lateral VGG filter (the paper's part a, Table 1).

``members`` above 1: a seed ensemble of that many filters (``covidcxr.training.member_seeds``), whose mean output
decides, in this stage, `filter_frontal` and serving alike (``models.frontal_probability``).

``sampling``: ``class`` weighs the loss by inverse class frequency (laterals are rare: about 22x); ``balanced`` draws
every batch class-balanced instead (the laterals repeated, seeded), ``source`` class- and source-balanced. Accuracy per
split and class, and per source the recall of each class (``frontal_recall``: frontals kept, ``lateral_recall``:
laterals refused), with the number of frontals the filter would refuse (the usable images lost).

``lateral_check`` (true): a Mahalanobis detector of the filter's features fitted on the training laterals, its
threshold the ``lateral_quantile`` of the validation laterals' scores, saved in the model folder (``ood.npz``): an
image the network calls lateral but that lies outside the laterals it learned is kept as frontal
(:func:`covidcxr.projection.decide`). ``threshold``: P(frontal) below which the network calls lateral, saved with the
filter (``threshold.json``) so that every consumer applies the one value trained here. Every figure of a split is the
rule's, as `filter_frontal` and serving apply it (a file's own DICOM View Position first: ``by_header`` counts the
images it decided, then the filter); ``kept_by_check`` counts the images the check kept that the network alone would
have refused. ``filter_only`` holds the same figures of the filter alone (its network and lateral check, as if no file
carried a view position): what the experiments compare filters by.
"""

from __future__ import annotations

import numpy as np

from covidcxr import metrics, models, ood, preprocess, projection, tracking, training
from pipelines import _common, _models, _tracking

METRICS = "reports/train_projection/metrics.json"


def recalls(y: np.ndarray, called_frontal: np.ndarray) -> dict:
    """Frontal and lateral recall (null without that class), their counts, the frontals refused (usable images lost)
    and the laterals refused (so that recalls pool over sources by counts, not by rebuilding them from ratios)."""
    frontal, called = np.asarray(y) == 1, np.asarray(called_frontal, dtype=bool)
    n_frontal, n_lateral = int(frontal.sum()), int((~frontal).sum())
    return {"frontal_recall": float(called[frontal].mean()) if n_frontal else None,
            "lateral_recall": float((~called[~frontal]).mean()) if n_lateral else None,
            "n_frontal": n_frontal, "n_lateral": n_lateral, "frontal_refused": int((frontal & ~called).sum()),
            "lateral_refused": int((~frontal & ~called).sum())}


def split_figures(component: models.Component, images: np.ndarray, y: np.ndarray, source: np.ndarray,
                  views: np.ndarray) -> dict:
    """One split's accuracy (overall, per class), per-source recalls and ``kept_by_check`` under the rule
    `filter_frontal` and serving apply (``views``: each file's DICOM View Position, None where it has none), with
    ``by_header``, the images the view position decided; ``filter_only``: the same of the filter alone."""
    p_frontal, like_lateral = models.frontal_evidence(component, images)

    def figures(header_views) -> dict:
        called, decided_by = projection.decide(p_frontal, header_views, component.operating_threshold, like_lateral)
        called = called == "frontal"
        m = metrics.classification_metrics(y, called.astype(np.float64))
        return {"accuracy": m["accuracy"], "frontal_accuracy": m["sensitivity"], "lateral_accuracy": m["specificity"],
                "n": m["n"], "kept_by_check": int((decided_by == projection.BY_CHECK).sum()),
                "by_header": int((decided_by == projection.BY_HEADER).sum()),
                "by_source": {str(src): recalls(y[source == src], called[source == src])
                              for src in sorted(set(source))}}

    alone = figures(None)
    del alone["by_header"]  # none, by construction
    return {**figures(views), "filter_only": alone}


def fit_lateral_check(component: models.Component, images: np.ndarray, parts: dict, y: dict, p: dict) -> dict:
    """Fit the filter's lateral check on the training laterals' features and set its threshold on the validation
    laterals' scores (``component.ood``); with fewer than 2 training laterals or no validation lateral there is nothing
    to fit or calibrate on, and the network decides alone (the returned status says so)."""
    laterals = {s: parts[s][0][y[s] == 0] for s in ("train", "val")}
    if len(laterals["train"]) < 2 or not len(laterals["val"]):
        return {"status": "skipped", "reason": f"{len(laterals['train'])} training and {len(laterals['val'])} "
                                               "validation laterals (needs 2 and 1)"}
    detector = ood.MahalanobisDetector(quantile=float(p["lateral_quantile"]))
    detector.fit(models.ood_features(component, images[laterals["train"]], None, "c"))
    component.ood = detector
    detector.calibrate(models.out_of_distribution(component, images[laterals["val"]], None, "c").score)
    return {"status": "fitted", **detector.summary()}


def run(p: dict, experiment: str = "demo") -> dict:
    log = _common.setup_logging()
    _tracking.setup_tracking()
    training.seed_everything(p["seed"])
    index, images, _ = _models.load_cache(_common.PROJECTION_CACHE_DIR)  # at train_projection.size
    parts = _models.split_arrays("projection", index)
    y = {s: (t["label"] == "frontal").to_numpy(np.float32) for s, (_, t) in parts.items()}  # 1 = frontal
    source = {s: index["source"].to_numpy()[rows].astype(str) for s, (rows, _) in parts.items()}
    std = preprocess.Standardizer().fit(images[parts["train"][0]])
    x = {s: std.transform(images[rows]) for s, (rows, _) in parts.items()}

    lr = training.learning_rate(float(p["lr"]), p["lr_schedule"], epochs=int(p["epochs"]), n_train=len(x["train"]),
                                batch_size=int(p["batch_size"]))

    def build():
        with training.build_scope(p["strategy"], p["precision"]):
            network = models.build_vgg(p["depth"], x["train"].shape[1:] + (1,),
                                       weights=_models.vgg_weights(p["weights"], p["depth"]), fold=p["fold"],
                                       width=p["width"], name=f"projection_vgg{p['depth']}")
            _models.compile_binary(network, lr)
        return network

    seeds = training.member_seeds(int(p["seed"]), int(p["members"]))
    network = build()
    with tracking.run(_common.mlflow_experiment(experiment), f"projection-vgg{p['depth']}", params=p,
                      tags=_tracking.repro_tags("train_projection", experiment)) as active:
        weighting = training.sampling(p["sampling"], y["train"], source["train"])
        networks, _, ensemble = training.fit_members(
            seeds, network, lambda seed, i: build(),
            lambda member, seed, i: training.fit(member, (x["train"], y["train"]), (x["val"], y["val"]),
                                                 epochs=p["epochs"], batch_size=p["batch_size"], seed=seed,
                                                 augment=p["augment"], **weighting,
                                                 on_epoch_end=tracking.member_epoch_log(i),
                                                 verbose=1 if _common.show_progress() else 0))
        component = models.Component(networks[0], std, members=networks[1:],
                                     info={"run_id": active.info.run_id, "positive_class": "frontal", **ensemble},
                                     threshold={"threshold": float(p["threshold"]), "source": "params"})
        check = fit_lateral_check(component, images, parts, y, p) if p["lateral_check"] else {"status": "off"}
        log.info("lateral check: %s", check)
        views = index["header_view_position"].where(index["header_view_position"].notna(), None).to_numpy()
        # Table 1: accuracy per split, and per class (laterals are few)
        result = {split: split_figures(component, images[rows], y[split], source[split], views[rows])
                  for split, (rows, _) in parts.items()}
        result["lateral_check"] = check
        tracking.log_finite_metrics(result)  # nulls (a recall without that class) are not numbers: left out
        tracking.log_keras_model(component.model, x["val"][..., None])  # an ensemble's first network
        with _common.atomic_dir(_common.PROJECTION_MODEL) as out:
            _models.save_component(out, component)
    _common.write_json(METRICS, result)
    log.info("projection rule accuracy: %s (the filter alone: %s)", {s: round(result[s]["accuracy"], 4) for s in parts},
             {s: round(result[s]["filter_only"]["accuracy"], 4) for s in parts})
    return result


if __name__ == "__main__":
    run(_common.params("train_projection"), _common.filed_under())
    _common.finish()
