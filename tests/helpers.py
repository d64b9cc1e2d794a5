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


#: Per test process, the three components of :func:`build_bundle` at each projection filter size, built once: each
#: build (three Keras models saved) costs about a CPU-second, and a dozen tests ask for the same bytes.
_BUILT: dict[int, Path] = {}


def _components(filter_size: int) -> Path:
    """A folder of this process holding projection/, unet/ and classifier/ as :func:`build_bundle` makes them (seed 0,
    ``filter_size`` the projection VGG's input size); read only, copied by each caller."""
    if filter_size not in _BUILT:
        import atexit
        import shutil
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="covidcxr-test-bundle-"))
        atexit.register(shutil.rmtree, root, True)
        keras.utils.set_random_seed(0)
        train = np.stack([preprocess.resize(phantom(seed=s), SIZE) for s in range(4)])
        vgg = dict(width=1 / 32, head=(4,))
        filter_train = np.stack([preprocess.resize(phantom(seed=s), filter_size) for s in range(4)])
        save_component(root / "projection", models.build_vgg(16, (filter_size, filter_size, 1), **vgg), filter_train,
                       threshold=0.5)
        save_component(root / "unet", models.build_unet(2, (SIZE, SIZE, 1)), train, threshold=0.5)
        save_component(root / "classifier", models.build_vgg(16, (SIZE, SIZE, 1), **vgg), train, threshold=0.5)
        _BUILT[filter_size] = root
    return _BUILT[filter_size]


def build_bundle(root: Path, **config) -> dict[str, str]:
    """Untrained tiny projection VGG, U-Net and classifier VGG with fitted standardizers, as register bundles them;
    ``config`` overrides :data:`PERMISSIVE` in the saved serving configuration (``projection_size``: the projection
    VGG's input size too). The components are built once per process and filter size (:func:`_components`) and copied
    into ``root``: a fresh, writable copy for each call."""
    import shutil

    built = _components(config.get("projection_size") or SIZE)
    out = {}
    for name in ("projection", "unet", "classifier"):
        shutil.copytree(built / name, root / name, dirs_exist_ok=True)
        out[name] = str(root / name)
    keras.utils.set_random_seed(0)  # the global seeds set, as each build used to set them
    path = root / "serving.json"
    serving.Config(**{**PERMISSIVE, **config}).save(path)
    return {**out, "config": str(path)}
