"""Stage `explain`: Grad-CAM of every classifier on a fixed sample of correct and incorrect test cases of both classes,
drawn over the original images at display size (`explain.display_size`, as serving draws them), and, per split
(validation and test), variant and class, the share of heat-map mass inside the lung mask beside the lungs' share of
the image area (what a uniform heat map would score), with how many maps were empty. Each map explains the call the
model made at its operating threshold, as the served map explains the call served (at the thresholds in force)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr import gradcam, io, manifest, preprocess, tracking
from pipelines import _common, _models, _tracking

OUT = Path("reports/explain")
#: The splits whose maps are measured: validation, which the audit grades and so may gate the registered model's
#: choice, and test, reported only.
SPLITS = ("val", "test")
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


def original(path: str, longest: int, **hints) -> np.ndarray:
    """The original file at display size, as serving draws its overlays (not the models' small working image);
    ``hints``: the manifest row's ``photometric`` and ``bits_stored`` (:func:`covidcxr.manifest.decode_hints`)."""
    pixels, _ = io.read_image(path, **hints)
    return gradcam.display_image(pixels, longest)


def lung_shares(classifier, variant: str, images: np.ndarray, masks: np.ndarray, rows: np.ndarray,
                pred: pd.DataFrame) -> tuple[dict, np.ndarray]:
    """Grad-CAM of one split's images (``pred``: their predictions, ``rows``: their cache rows), each map of the class
    the model called at its operating threshold; per class and overall, the mean share of heat-map mass inside the
    lungs, the lungs' share of the image over the same images (what a uniform map would score: the audit's
    baseline), how many maps there were and how many were empty (no location argued for the call: no share to take).
    Returns (figures, the maps placed on the whole image)."""
    called = (pred["score"] >= classifier.operating_threshold).to_numpy()
    prepared = classifier.prepare(images[rows], masks[rows], variant)  # as the classifier scored them
    heat = gradcam.heat_maps(classifier, prepared.images, called)
    inside = gradcam.mass_inside(heat, prepared.masks)
    area = np.where(np.isnan(inside), np.nan, (prepared.masks >= 0.5).mean(axis=(1, 2)))
    groups = {"": np.ones(len(pred), bool)}
    groups.update({f"_{lab}": (pred["label"] == lab).to_numpy() for lab in ("covid", "negative")
                   if (pred["label"] == lab).any()})
    figures: dict = {}
    for suffix, hit in groups.items():
        measured = hit & ~np.isnan(inside)
        figures.update({f"lung_mass_share{suffix}": float(inside[measured].mean()) if measured.any() else None,
                        f"lung_area_share{suffix}": float(area[measured].mean()) if measured.any() else None,
                        f"n_maps{suffix}": int(hit.sum()), f"n_empty{suffix}": int((hit & np.isnan(inside)).sum())})
    return figures, preprocess.place_in_box(heat, prepared.boxes, heat.shape[1:])


def run(p: dict, classifiers: dict, experiment: str = "demo") -> dict:
    import mlflow

    log = _common.setup_logging()
    _tracking.setup_tracking()
    index, images, _ = _models.load_cache()
    masks = _models.load_masks()
    m = manifest.read_csv(_common.MANIFEST)
    files = {image_id: (path, {"photometric": ph, "bits_stored": bits})
             for image_id, path, ph, bits in zip(m["image_id"], m["path"], *manifest.decode_hints(m))}
    summary: dict = {}
    for variant in classifiers["variants"]:
        for backbone in classifiers["backbones"]:
            name = f"{variant}_{backbone}"
            d = Path(_common.model_dir(variant, backbone))
            classifier = _models.load_component(d)
            pred = pd.read_csv(d / _common.PREDICTIONS)
            summary[name], heat = {}, None
            for split in SPLITS:
                part = pred[pred["split"] == split].reset_index(drop=True)
                if not len(part):
                    summary[name][split] = {}
                    continue
                figures, maps = lung_shares(classifier, variant, images, masks,
                                               preprocess.rows_for(index, part["image_id"]), part)
                summary[name][split] = figures
                if split == "test":
                    heat, where = maps, {img: i for i, img in enumerate(part["image_id"])}
            chosen = sample(pred, classifier.operating_threshold, int(p["per_group"]))
            tiles = [gradcam.overlay(original(files[i][0], int(p["display_size"]), **files[i][1]), heat[where[i]])
                     for i in chosen["image_id"]]
            titles = [f"{g} p={s:.2f}" for g, s in zip(chosen["group"], chosen["score"])]
            png = OUT / "gradcam" / f"{name}.png"
            if tiles:
                grid = gradcam.grid(tiles, ncols=int(p["per_group"]), titles=titles)
                from PIL import Image

                picture = Image.fromarray(grid)
                _common.write_with(png, lambda tmp, picture=picture: picture.save(tmp, format="PNG"))
            with tracking.run(_common.mlflow_experiment(experiment), name, run_id=classifier.info["run_id"]):
                tracking.log_finite_metrics({f"{split}.{k}": v for split, figures in summary[name].items()
                                             for k, v in figures.items() if v is not None}, prefix="gradcam.")
                if tiles:
                    mlflow.log_artifact(str(png), "gradcam")
    _common.write_json(OUT / "metrics.json", summary)
    log.info("Grad-CAM mass inside the lungs (test): %s",
             {k: v["test"].get("lung_mass_share") for k, v in summary.items()})
    return summary


if __name__ == "__main__":
    run(_common.params("explain"), {"variants": _common.params("train_classifier.variants"),
                                  "backbones": _common.params("train_classifier.backbones")},
        _common.params("split.experiment"))
    _common.finish()
