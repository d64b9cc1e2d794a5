"""Test helpers shared by the serving and PACS tests: phantom images and a tiny untrained pipeline bundle."""

from __future__ import annotations

import base64
import io as stdio
from pathlib import Path

import keras
import numpy as np
from PIL import Image

from covidcxr import models, phantoms, preprocess, serving

SIZE = 32
# Accepts every readable image: lets a test decide which step refuses by changing one setting.
PERMISSIVE = dict(size=SIZE, variant="d", frontal_threshold=0.0, min_area=0.0, max_area=1.0)


def phantom(projection: str = "frontal", seed: int = 0, size: int = 64) -> np.ndarray:
    image, _ = phantoms.chest_phantom(np.random.default_rng(seed), size, projection=projection, covid=bool(seed % 2),
                                      site={})
    return image


def png_b64(image: np.ndarray) -> str:
    buffer = stdio.BytesIO()
    Image.fromarray(np.round(255 * np.clip(image, 0, 1)).astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def save_component(folder: Path, model: keras.Model, images: np.ndarray, threshold: float | None = None) -> str:
    """A model folder as the training stages write it (``models.Component.save``)."""
    models.Component(model, preprocess.Standardizer().fit(images), info={"run_id": "test"},
                     threshold=None if threshold is None else {"threshold": threshold}).save(folder)
    return str(folder)


def build_bundle(root: Path, **config) -> dict[str, str]:
    """Untrained tiny projection VGG, U-Net and classifier VGG with fitted standardizers, as register bundles them;
    ``config`` overrides :data:`PERMISSIVE` in the saved serving configuration (``projection_size``: the projection
    VGG's input size too)."""
    keras.utils.set_random_seed(0)
    train = np.stack([preprocess.resize(phantom(seed=s), SIZE) for s in range(4)])
    vgg = dict(width=1 / 32, head=(4,))
    filter_size = config.get("projection_size") or SIZE
    filter_train = np.stack([preprocess.resize(phantom(seed=s), filter_size) for s in range(4)])
    out = {
        "projection": save_component(root / "projection",
                                     models.build_vgg(16, (filter_size, filter_size, 1), **vgg), filter_train,
                                     threshold=0.5),
        "unet": save_component(root / "unet", models.build_unet(2, (SIZE, SIZE, 1)), train, threshold=0.5),
        "classifier": save_component(root / "classifier", models.build_vgg(16, (SIZE, SIZE, 1), **vgg), train,
                                     threshold=0.5),
    }
    path = root / "serving.json"
    serving.Config(**{**PERMISSIVE, **config}).save(path)
    return {**out, "config": str(path)}
