"""Stage `explain`: Grad-CAM of every classifier on a fixed sample of correct and incorrect test cases of both classes,
drawn over the original images at display size (`explain.display_size`, as serving draws them), and, per split
(validation and test), variant and class, the share of heat-map mass inside the lung mask beside the lungs' share of
the image area (what a uniform heat map would score), with how many maps were empty. Each map explains the call the
model made at its operating threshold, as the served map explains the call served (at the thresholds in force).

The grids are the films themselves (any text burned into them included), written under ``reports/explain/gradcam/``
(in git: the stage's outputs are not cached) and logged to each classifier's MLflow run. ``explain.images: false``
(data that is not public, a hospital's own) writes and logs no image: the folder then holds only :data:`IMAGES_OFF`,
saying why, and every figure is computed and written as before."""

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
#: What ``reports/explain/gradcam/`` holds instead of the grids with ``explain.images: false``.
IMAGES_OFF = "README.txt"
IMAGES_OFF_TEXT = ("No Grad-CAM grids: explain.images is false in params.yaml, so that no image of a film (the test "
                   "radiographs, with any text burned into them) is written here, into git, or logged to MLflow. The "
                   "figures (the heat maps' mass inside the lungs, per split, classifier and class) are in "
                   "../metrics.json.\n")


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


def measure(classifier, variant: str, pred: pd.DataFrame, index: pd.DataFrame, images: np.ndarray,
            masks: np.ndarray) -> tuple[dict, np.ndarray | None, dict]:
    """One classifier's :func:`lung_shares` figures per split (``{}`` for a split it has no prediction of), the test
    split's maps placed on the whole image, and each test image's position among them."""
    figures_by_split: dict = {}
    heat, where = None, {}
    for split in SPLITS:
        part = pred[pred["split"] == split].reset_index(drop=True)
        if not len(part):
            figures_by_split[split] = {}
            continue
        figures, maps = lung_shares(classifier, variant, images, masks,
                                    preprocess.rows_for(index, part["image_id"]), part)
        figures_by_split[split] = figures
        if split == "test":
            heat, where = maps, {img: i for i, img in enumerate(part["image_id"])}
    return figures_by_split, heat, where


def draw(png: Path, classifier, pred: pd.DataFrame, heat: np.ndarray | None, where: dict, files: dict,
         p: dict) -> bool:
    """The grid of :func:`sample`'s test images, each map over its original file at display size, written to ``png``;
    False (nothing written) when the sample is empty."""
    chosen = sample(pred, classifier.operating_threshold, int(p["per_group"]))
    tiles = [gradcam.overlay(original(files[i][0], int(p["display_size"]), **files[i][1]), heat[where[i]])
             for i in chosen["image_id"]]
    if not tiles:
        return False
    from PIL import Image

    titles = [f"{g} p={s:.2f}" for g, s in zip(chosen["group"], chosen["score"])]
    Image.fromarray(gradcam.grid(tiles, ncols=int(p["per_group"]), titles=titles)).save(png, format="PNG")
    return True


def run(p: dict, classifiers: dict, experiment: str = "demo") -> dict:
    """Measure every classifier's maps (``reports/explain/metrics.json``, the MLflow metrics ``gradcam.*``) and, with
    ``p["images"]``, draw and log its grid. The Grad-CAM folder is built whole and replaces the old one, so that no
    grid of an earlier run (of another classifier, or before images were turned off) stays behind, also outside DVC
    (which removes the stage's outputs before it runs it)."""
    import mlflow

    log = _common.setup_logging()
    _tracking.setup_tracking()
    index, images, _ = _models.load_cache()
    masks = _models.load_masks()
    files: dict = {}
    if p["images"]:  # the original files: read only to draw them
        m = manifest.read_csv(_common.MANIFEST)
        files = {image_id: (path, {"photometric": ph, "bits_stored": bits})
                 for image_id, path, ph, bits in zip(m["image_id"], m["path"], *manifest.decode_hints(m))}
    summary: dict = {}
    with _common.atomic_dir(OUT / "gradcam") as folder:
        if not p["images"]:
            (folder / IMAGES_OFF).write_text(IMAGES_OFF_TEXT, encoding="utf-8")
            log.info("explain.images is false: the figures only, no Grad-CAM grid written or logged")
        for variant in classifiers["variants"]:
            for backbone in classifiers["backbones"]:
                name = f"{variant}_{backbone}"
                d = Path(_common.model_dir(variant, backbone))
                classifier = _models.load_component(d)
                pred = pd.read_csv(d / _common.PREDICTIONS)
                summary[name], heat, where = measure(classifier, variant, pred, index, images, masks)
                png = folder / f"{name}.png"
                drawn = bool(p["images"]) and draw(png, classifier, pred, heat, where, files, p)
                with tracking.run(_common.mlflow_experiment(experiment), name, run_id=classifier.info["run_id"]):
                    tracking.log_finite_metrics({f"{split}.{k}": v for split, figures in summary[name].items()
                                                 for k, v in figures.items() if v is not None}, prefix="gradcam.")
                    if drawn:
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
