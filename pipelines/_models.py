"""What the model stages share: the working-size cache, split tables, lung masks and model folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from covidcxr import folders, models, preprocess
from pipelines import _common


def load_cache(folder: str = _common.CACHE_DIR):
    """A working-size cache (the `cache` stage's, else ``folder``: ``_common.PROJECTION_CACHE_DIR``):
    ``(index, images [N,H,W] float32 in [0, 1], true masks)``."""
    return preprocess.load_cache(folder)


def split_arrays(task: str, index):
    """{split: (positions in the cache, split table rows)} for a task's split table."""
    table = pd.read_csv(_common.split_table(task), keep_default_na=False, na_values=[""])
    return {name: (preprocess.rows_for(index, part["image_id"]), part.reset_index(drop=True))
            for name, part in table.groupby("split", sort=True)}


#: The `segment` stage's flag for a film the projection rule does not call frontal, and serving's reason for refusing
#: it (:data:`covidcxr.serving.REASONS`); a lung-mask flag is serving's reason already (:data:`covidcxr.lungs.REASONS`).
NOT_FRONTAL, LATERAL_VIEW = "not_frontal", "lateral_view"


def usable() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The covid split restricted to predicted-frontal images with a usable lung mask (the films serving scores), and
    the others, which serving refuses before the classifier: their split-table rows with ``reason``, serving's code
    (``lateral_view`` or the lung mask's; from the `segment` stage's flags). A split image the masks index lacks is a
    ValueError: what serving answers for it is unknown, so it can be neither scored nor counted as refused."""
    table = pd.read_csv(_common.split_table("covid"), keep_default_na=False, na_values=[""])
    flags = pd.read_csv(_common.MASKS_INDEX, keep_default_na=False).set_index("image_id")["flag"]
    flag = flags.reindex(table["image_id"])
    if flag.isna().any():
        raise ValueError(f"{_common.MASKS_INDEX}: no row for {int(flag.isna().sum())} of the {len(table)} images of "
                         f"{_common.split_table('covid')}; the masks are older than the split: rerun the segment stage")
    reason = flag.replace({NOT_FRONTAL: LATERAL_VIEW}).to_numpy(dtype=str)
    kept = reason == ""
    return table[kept].reset_index(drop=True), table[~kept].assign(reason=reason[~kept]).reset_index(drop=True)


def load_masks():
    """The `segment` stage's lung masks, aligned with the cache index."""
    return np.load(_common.MASKS)


def save_component(out_dir: str | os.PathLike, component) -> None:
    """Write a model folder (``covidcxr.models.Component.save``) and log its fitted preprocessing to the active run."""
    import mlflow

    component.save(out_dir)
    if mlflow.active_run() is not None:  # the fitted preprocessing travels with the model's run
        for name in (folders.STANDARDIZER_FILE, folders.THRESHOLD_FILE):
            if (Path(out_dir) / name).is_file():
                mlflow.log_artifact(str(Path(out_dir) / name), "preprocessing")


def load_component(folder: str | os.PathLike) -> models.Component:
    """A model folder written by a training stage."""
    return models.Component.load(folder)


PRETRAINED = "pretrained"


def vgg_weights(weights: str, depth: int) -> str:
    """A VGG's ``weights`` param as ``build_vgg`` takes it: ``pretrained`` is the pretrain stage's encoder of that
    depth (it must exist), anything else (none, imagenet, a path) passes through."""
    if weights != PRETRAINED:
        return weights
    path = Path(_common.pretrained_encoder(f"vgg{depth}"))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no pretrained VGG{depth} encoder; add vgg{depth} to pretrain.backbones and "
                                "run the pretrain stage (dvc repro pretrain)")
    return str(path)


def compile_binary(model, lr) -> None:
    """Adam + binary cross-entropy, with accuracy and ROC AUC reported every epoch; ``lr`` a rate or a schedule
    (``covidcxr.training.learning_rate``)."""
    import keras

    model.compile(optimizer=keras.optimizers.Adam(lr), loss="binary_crossentropy",
                  metrics=["accuracy", keras.metrics.AUC(name="auc")])
