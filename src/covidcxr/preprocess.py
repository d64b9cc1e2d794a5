"""Image preprocessing of the paper: resize to the working size, then min-max to [0, 1] per image."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image


def resize(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear (antialiased) resize of a 2-D float image to ``size`` (int: square; tuple: height, width)."""
    height, width = (size, size) if isinstance(size, int) else size
    if image.shape == (height, width):
        return image.astype(np.float32, copy=False)
    resized = Image.fromarray(np.asarray(image, dtype=np.float32), mode="F").resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)


def minmax(image: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] per image (the paper's Eq. 1); a constant image maps to zeros."""
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros_like(image, dtype=np.float32)
    out = np.subtract(image, lo)  # one new array, scaled in place: the same numbers as (image - lo) / (hi - lo)
    out /= hi - lo
    return out.astype(np.float32, copy=False)


class Standardizer:
    """Z-score with the mean and std of the TRAINING images only (the paper's Eq. 2), fitted once, used everywhere.

    scikit-learn style: ``fit`` learns ``mean_``, ``std_`` and ``n_images_``; ``transform`` applies them to validation,
    test and served images alike, so train/test statistics cannot diverge (a defect of the authors' code). Saved as a
    small JSON beside each model.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = eps

    def fit(self, images: np.ndarray) -> Standardizer:
        """Learn the pixel mean and std over all training images (any shape; streamed in float64)."""
        images = np.asarray(images)
        if images.size == 0:
            raise ValueError("cannot fit a standardizer on no images")
        total, total_sq, count = 0.0, 0.0, 0
        for chunk in np.array_split(images.reshape(len(images), -1), max(1, len(images) // 256)):
            chunk = chunk.astype(np.float64)
            total += float(chunk.sum())
            total_sq += float(np.square(chunk).sum())
            count += chunk.size
        self.mean_ = total / count
        self.std_ = float(np.sqrt(max(total_sq / count - self.mean_**2, 0.0)))
        self.n_images_ = int(len(images))
        return self

    def transform(self, images: np.ndarray) -> np.ndarray:
        if not hasattr(self, "mean_"):
            raise RuntimeError("Standardizer is not fitted: call fit on the training images first")
        return ((np.asarray(images, dtype=np.float32) - self.mean_) / max(self.std_, self.eps)).astype(np.float32)

    def fit_transform(self, images: np.ndarray) -> np.ndarray:
        return self.fit(images).transform(images)

    def to_dict(self) -> dict:
        return {"mean": self.mean_, "std": self.std_, "n_images": self.n_images_, "eps": self.eps}

    @classmethod
    def from_dict(cls, state: dict) -> Standardizer:
        obj = cls(eps=float(state.get("eps", 1e-6)))
        obj.mean_, obj.std_, obj.n_images_ = float(state["mean"]), float(state["std"]), int(state["n_images"])
        return obj

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
            fh.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Standardizer:
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))


VARIANTS: dict[str, str] = {
    "c": "full image",
    "d": "lungs only (image x mask)",
    "e": "lungs removed (image x (1 - mask))",
}


def apply_variant(images: np.ndarray, masks: np.ndarray, variant: str) -> np.ndarray:
    """The paper's input variants: c the full image, d the lungs only, e the lungs removed."""
    if variant == "c":
        return np.asarray(images, dtype=np.float32)
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: expected one of {sorted(VARIANTS)}")
    masks = np.asarray(masks, dtype=np.float32)
    if masks.shape != np.shape(images):
        raise ValueError(f"masks {masks.shape} and images {np.shape(images)} differ in shape")
    keep = masks if variant == "d" else 1.0 - masks
    return (np.asarray(images, dtype=np.float32) * keep).astype(np.float32)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a binary mask (area-averaged, then >= 0.5) so thin structures do not vanish or grow."""
    return resize(np.asarray(mask, dtype=np.float32), size) >= 0.5


#: The working-size cache stores images at this precision; :func:`working_image` rounds to it, so that the stages
#: (reading the cache) and serving (computing the image on the fly) give the models exactly the same numbers.
WORKING_DTYPE = np.float16


def working_image(pixels: np.ndarray, size: int) -> np.ndarray:
    """The image as every model sees it before standardisation, in training, evaluation and serving alike.

    Resized to ``size`` x ``size`` (bilinear, antialiased), then min-max to [0, 1] per image (the paper's order), at
    the cache's precision (:data:`WORKING_DTYPE`), returned as float32.
    """
    return to_working_precision(minmax(resize(np.asarray(pixels, dtype=np.float32), size)))


def to_working_precision(image: np.ndarray) -> np.ndarray:
    """``image`` rounded to :data:`WORKING_DTYPE` (float16, to nearest, ties to even) and back, as float32.

    Bit for bit ``image.astype(np.float16).astype(np.float32)``, computed on the float32 bit patterns: numpy converts
    to and from float16 one element at a time on most CPUs, about 4x slower than these few integer passes. Values a
    float16 cannot hold (|x| >= 65504, infinities, NaN) go through numpy.
    """
    x = np.ascontiguousarray(image, dtype=np.float32)
    if x.size and not -_F16_MAX < x.min() <= x.max() < _F16_MAX:  # NaN fails both comparisons
        return x.astype(WORKING_DTYPE).astype(np.float32)
    bits = x.view(np.uint32)
    # Round the 23-bit mantissa to float16's 10 bits, ties to even: add just under half of the dropped 13 bits' unit,
    # plus one when the kept last bit is odd, then clear the dropped bits (a carry correctly bumps the exponent).
    out = bits >> np.uint32(13)
    out &= np.uint32(1)
    out += np.uint32(0x0FFF)
    out += bits
    out &= np.uint32(0xFFFFE000)
    out = out.view(np.float32)
    # Below 2**-14, float16 is subnormal, with a fixed step of 2**-24 (zero itself is already right): few pixels.
    magnitude = bits & np.uint32(0x7FFFFFFF)
    magnitude -= np.uint32(1)
    small = np.flatnonzero(magnitude < _F16_SUBNORMAL_BITS - np.uint32(1))
    if small.size:
        out.reshape(-1)[small] = np.rint(x.reshape(-1)[small] * np.float32(2**24)) * np.float32(2**-24)
    return out


_F16_MAX = np.float32(65504)  # float16's largest finite value
_F16_SUBNORMAL_BITS = np.float32(2**-14).view(np.uint32)  # float16's smallest normal value


def read_working_image(src, size: int, **read_options) -> tuple[np.ndarray, np.ndarray, dict]:
    """Decode one file for the models: ``(working image, decoded pixels, header)``; the one path of the cache stage and
    serving alike, so that they decode every file the same way.

    The decode is asked for ``size`` (``io.read_image(..., target=size)``): a JPEG at least twice the working size is
    decoded at a reduced scale (1/2 to 1/8), which the working image never needs. The pixels are then not the file's
    full resolution (``io.is_reduced``); whoever shows the image to a person decodes it again in full.
    ``read_options``: ``max_pixels``, ``name`` of :func:`covidcxr.io.read_image`.
    """
    from covidcxr import io

    pixels, header = io.read_image(src, target=size, **read_options)
    return working_image(pixels, size), pixels, header


def load_working_image(path: str, size: int, mask_path: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """One file as the models see it (:func:`read_working_image`), and its lung mask at the same size when it has
    one."""
    from covidcxr import io

    image, _, _ = read_working_image(path, size)
    mask = None
    if mask_path:
        mask = resize_mask(io.read_mask(mask_path.split(";")), size)
    return image, mask


def _cache_one(args: tuple[str, str | None, int]) -> tuple[np.ndarray, np.ndarray | None]:
    path, mask_path, size = args
    return load_working_image(path, size, mask_path)


def build_cache(
    paths: list[str], mask_paths: list[str | None], size: int, *, workers: int = 1, progress: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode every image once at the working size: ``(images float16 [N,H,W], masks bool [N,H,W], has_mask [N])``.

    Training then reads these arrays through tf.data, so it is compute-bound, not decode-bound.
    """
    from covidcxr.parallel import parallel_map

    jobs = [(p, m, size) for p, m in zip(paths, mask_paths, strict=True)]
    results = parallel_map(_cache_one, jobs, workers=workers, progress=progress, desc="caching")
    images = np.zeros((len(jobs), size, size), dtype=WORKING_DTYPE)
    masks = np.zeros((len(jobs), size, size), dtype=bool)
    has_mask = np.zeros(len(jobs), dtype=bool)
    for i, (image, mask) in enumerate(results):
        images[i] = image
        if mask is not None:
            masks[i], has_mask[i] = mask, True
    return images, masks, has_mask


# --- the working-size cache on disk: one layout, written by the `cache` stage, read by every model stage and tuner ---

CACHE_INDEX, CACHE_IMAGES, CACHE_MASKS = "index.csv", "images.npy", "masks.npy"


def save_cache(folder: str | os.PathLike, index, images: np.ndarray, masks: np.ndarray) -> None:
    """Write a cache folder: ``index.csv`` (one row per image, ``image_id`` first), ``images.npy``, ``masks.npy``."""
    from pathlib import Path

    folder = Path(folder)
    if "image_id" not in index.columns or not len(index) == len(images) == len(masks):
        raise ValueError(f"a cache needs an image_id column and as many rows as images and masks, got "
                         f"{len(index)} rows, {len(images)} images, {len(masks)} masks")
    index.to_csv(folder / CACHE_INDEX, index=False, lineterminator="\n")
    np.save(folder / CACHE_IMAGES, np.asarray(images, dtype=WORKING_DTYPE))
    np.save(folder / CACHE_MASKS, np.asarray(masks, dtype=bool))


def load_cache(folder: str | os.PathLike, *, mmap: bool = False):
    """``(index, images, masks)`` of a cache folder; images as float32 in [0, 1] (``mmap``: float16, memory-mapped)."""
    from pathlib import Path

    import pandas as pd

    folder = Path(folder)
    missing = [name for name in (CACHE_INDEX, CACHE_IMAGES, CACHE_MASKS) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: not a working-size cache (missing {missing}); run the cache stage")
    index = pd.read_csv(folder / CACHE_INDEX, keep_default_na=False, na_values=[""])
    images = np.load(folder / CACHE_IMAGES, mmap_mode="r" if mmap else None)
    masks = np.load(folder / CACHE_MASKS, mmap_mode="r" if mmap else None)
    return index, (images if mmap else images.astype(np.float32)), masks


def rows_for(index, image_ids) -> np.ndarray:
    """Positions in a cache index of ``image_ids`` (in their order); unknown ids raise, naming a few."""
    position = dict(zip(index["image_id"], range(len(index))))
    missing = [i for i in image_ids if i not in position]
    if missing:
        raise KeyError(f"{len(missing)} images are not in the cache, e.g. {missing[:3]}")
    return np.array([position[i] for i in image_ids], dtype=int)
