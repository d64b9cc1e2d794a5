"""Stage `explain`: Grad-CAM of every classifier on a fixed sample of correct and incorrect test cases of both classes,
drawn over the original images at display size (`explain.display_size`, as serving draws them), and the share of
heat-map mass inside the lung mask (per variant and class) over all test images, beside the lungs' share of the image
area (what a uniform heat map would score)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr import gradcam, io, manifest, preprocess, tracking
from pipelines import _common, _models, _tracking

OUT = Path("reports/explain")
GROUPS = [("covid", True, "TP"), ("covid", False, "FN"), ("negative", True, "TN"), ("negative", False, "FP")]


def sample(pred: pd.DataFrame, threshold: float, per_group: int) -> pd.DataFrame:
    """A fixed sample: up to ``per_group`` test images of each of TP, FN, TN, FP, first by image_id."""
    test = pred[pred["split"] == "test"].sort_values("image_id")
    called = np.where(test["score"] >= threshold, "covid", "negative")
    picks = []
    for label, correct, name in GROUPS:
        hit = (test["label"] == label) & ((called == label) == correct)
        picks.append(test[hit].head(per_group).assign(group=name))
    return pd.concat(picks)


def original(path: str, longest: int) -> np.ndarray:
    """The original file at display size, as serving draws its overlays (not the models' small working image)."""
    pixels, _ = io.read_image(path)
    return gradcam.display_image(pixels, longest)


def run(p: dict, classifiers: dict, experiment: str = "demo") -> dict:
    import mlflow

    log = _common.setup_logging()
    _tracking.setup_tracking()
    index, images, _ = _models.load_cache()
    masks = _models.load_masks()
    paths = dict(zip(*manifest.read_csv(_common.MANIFEST)[["image_id", "path"]].T.to_numpy()))
    summary: dict = {}
    for variant in classifiers["variants"]:
        for backbone in classifiers["backbones"]:
            name = f"{variant}_{backbone}"
            d = Path(_common.model_dir(variant, backbone))
            classifier = _models.load_component(d)
            pred = pd.read_csv(d / _common.PREDICTIONS)
            threshold = classifier.operating_threshold
            test = pred[pred["split"] == "test"].reset_index(drop=True)
            rows = preprocess.rows_for(index, test["image_id"])
            prepared = classifier.prepare(images[rows], masks[rows], variant)  # as the classifier scored them
            heat = gradcam.heat_maps(classifier, prepared.images)
            inside = gradcam.mass_inside(heat, prepared.masks)
            # The lungs' share of the image over the same images: what a uniform heat map would score (the audit).
            area = np.where(np.isnan(inside), np.nan, (prepared.masks >= 0.5).mean(axis=(1, 2)))
            heat = preprocess.place_in_box(heat, prepared.boxes, heat.shape[1:])  # a lung crop's maps, drawn whole
            groups = {"": np.ones(len(test), bool)}
            groups.update({f"_{lab}": (test["label"] == lab).to_numpy() for lab in ("covid", "negative")
                           if (test["label"] == lab).any()})
            summary[name] = {f"lung_{what}_share{suffix}": float(np.nanmean(values[hit]))
                             for suffix, hit in groups.items() for what, values in (("mass", inside), ("area", area))}
            chosen = sample(pred, threshold, int(p["per_group"]))
            where = {img: i for i, img in enumerate(test["image_id"])}
            tiles = [gradcam.overlay(original(paths[i], int(p["display_size"])), heat[where[i]])
                     for i in chosen["image_id"]]
            titles = [f"{g} p={s:.2f}" for g, s in zip(chosen["group"], chosen["score"])]
            png = OUT / "gradcam" / f"{name}.png"
            if tiles:
                grid = gradcam.grid(tiles, ncols=int(p["per_group"]), titles=titles)
                from PIL import Image

                picture = Image.fromarray(grid)
                _common.write_with(png, lambda tmp, picture=picture: picture.save(tmp, format="PNG"))
            with tracking.run(_common.mlflow_experiment(experiment), name, run_id=classifier.info["run_id"]):
                tracking.log_finite_metrics(summary[name], prefix="gradcam.")
                if tiles:
                    mlflow.log_artifact(str(png), "gradcam")
    _common.write_json(OUT / "metrics.json", summary)
    log.info("Grad-CAM mass inside the lungs: %s", {k: round(v["lung_mass_share"], 3) for k, v in summary.items()})
    return summary


if __name__ == "__main__":
    run(_common.params("explain"), {"variants": _common.params("train_classifier.variants"),
                                  "backbones": _common.params("train_classifier.backbones")},
        _common.params("split.experiment"))
    _common.finish()
