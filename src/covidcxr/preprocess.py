"""Image preprocessing of the paper: resize to the working size, then min-max to [0, 1] per image; the classifiers'
optional input transform (lung crop, histogram equalisation or CLAHE) before the variant."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import NamedTuple

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


class JsonState:
    """``save``/``load`` of a fitted object's ``to_dict``/``from_dict`` as a small, stable JSON file beside a model."""

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
            fh.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike):
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))


class Standardizer(JsonState):
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


# --- the classifier's input: lung crop and intensity normalisation, before the variant --------------------------------

INTENSITIES: tuple[str, ...] = ("none", "equalize", "equalize-lungs", "clahe")


def lung_box(mask: np.ndarray, margin: float = 0.1) -> tuple[int, int, int, int]:
    """The square box ``(row0, row1, col0, col1)`` (half-open) around a lung mask, for the lung crop.

    The mask's bounding box, its longer side widened by ``margin`` of itself on each side, made square around the
    box's centre (no aspect distortion when it is resized back) and moved, not shrunk, to lie inside the image (a side
    longer than the image is cut to it). An empty mask gives the whole image.
    """
    mask = np.asarray(mask) >= 0.5
    height, width = mask.shape
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return 0, height, 0, width
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    side = int(np.ceil(max(r1 - r0, c1 - c0) * (1.0 + 2.0 * margin)))

    def place(lo: int, hi: int, n: int) -> tuple[int, int]:
        length = min(side, n)
        start = int(np.floor((lo + hi - length) / 2.0))
        start = min(max(start, 0), n - length)
        return start, start + length

    return (*place(r0, r1, height), *place(c0, c1, width))


def crop_to_box(image: np.ndarray, box: tuple[int, int, int, int], *, mask: bool = False) -> np.ndarray:
    """``image[box]`` resized back to the image's own size (bilinear; a mask: area-averaged, then >= 0.5)."""
    r0, r1, c0, c1 = box
    part = np.asarray(image)[r0:r1, c0:c1]
    return resize_mask(part, image.shape) if mask else resize(part, image.shape)


def place_in_box(maps: np.ndarray, boxes: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Maps ``[N, H', W']`` computed on cropped inputs, put back where their boxes lie in a ``size`` image (zero
    outside): how a Grad-CAM of a lung-cropped input is drawn over the whole radiograph."""
    height, width = (size, size) if isinstance(size, int) else size
    out = np.zeros((len(maps), height, width), dtype=np.float32)
    for i, (heat, (r0, r1, c0, c1)) in enumerate(zip(np.asarray(maps, dtype=np.float32), np.asarray(boxes))):
        out[i, r0:r1, c0:c1] = resize(heat, (int(r1 - r0), int(c1 - c0)))
    return out


def equalize(image: np.ndarray, *, nbins: int = 256, mask: np.ndarray | None = None) -> np.ndarray:
    """Global histogram equalisation of an image in [0, 1] (scikit-image); a constant image maps to zeros.

    With ``mask``, the histogram is that of the masked pixels only (the lungs), applied to the whole image: what is
    outside the lungs (arms, soft tissue, a child's small chest in a large field) no longer sets the lungs' contrast.
    An empty mask, or one whose pixels are all alike, equalises over the whole image.
    """
    from skimage import exposure

    image = np.asarray(image, dtype=np.float32)
    if float(image.max()) <= float(image.min()):
        return np.zeros_like(image)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        inside = image[mask]
        if inside.size and float(inside.max()) > float(inside.min()):
            return np.clip(exposure.equalize_hist(image, nbins=nbins, mask=mask), 0.0, 1.0).astype(np.float32)
    return exposure.equalize_hist(image, nbins=nbins).astype(np.float32)


def clahe(image: np.ndarray, *, clip_limit: float = 0.01, nbins: int = 256) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (scikit-image, tiles of 1/8 of the image) of an image in
    [0, 1]; a constant image maps to zeros."""
    from skimage import exposure

    image = np.asarray(image, dtype=np.float32)
    if float(image.max()) <= float(image.min()):
        return np.zeros_like(image)
    return exposure.equalize_adapthist(minmax(image), clip_limit=clip_limit, nbins=nbins).astype(np.float32)


class ClassifierInput(NamedTuple):
    """What a classifier's standardizer and network see: the variant images ``[N, H, W]``, the lung masks in the
    same frame (cropped with the images) and each image's crop box in working-image pixels ``[N, 4]``."""

    images: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray


@dataclass(frozen=True)
class InputTransform(JsonState):
    """How a classifier's working images become its input: lung crop, intensity normalisation, then the variant.

    ``crop``: the square box around the (predicted) lungs with ``margin`` (:func:`lung_box`), resized back to the
    working size and min-max scaled again: the text, markers and borders that tell hospitals apart mostly fall away.
    ``intensity``: ``none``, ``equalize`` (global histogram equalisation), ``equalize-lungs`` (the same, its histogram
    that of the lung mask's pixels) or ``clahe`` (``clip_limit``), on the (cropped) image before the lungs are kept
    (d) or removed (e). The default is the identity (the paper's input).
    Saved in the classifier's model folder (``input.json``) and applied by ``models.Component.prepare``, in training,
    evaluation, Grad-CAM and serving alike.
    """

    crop: bool = False
    margin: float = 0.1
    intensity: str = "none"
    clip_limit: float = 0.01

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITIES:
            raise ValueError(f"intensity must be one of {INTENSITIES}, got {self.intensity!r}")
        if not 0.0 <= self.margin <= 1.0:
            raise ValueError(f"margin must be in [0, 1], got {self.margin}")
        if not 0.0 < self.clip_limit <= 1.0:
            raise ValueError(f"clip_limit must be in (0, 1], got {self.clip_limit}")

    @property
    def identity(self) -> bool:
        return not self.crop and self.intensity == "none"

    def apply(self, images: np.ndarray, masks: np.ndarray | None, variant: str) -> ClassifierInput:
        """The classifier input of working images ``[N, H, W]`` in [0, 1] and their lung masks under ``variant``."""
        images = np.asarray(images, dtype=np.float32)
        n, height, width = images.shape if images.ndim == 3 else (0, 0, 0)
        if images.ndim != 3:
            raise ValueError(f"images must be [N, H, W], got shape {images.shape}")
        boxes = np.tile(np.array([0, height, 0, width]), (n, 1))
        needs_masks = self.crop or self.intensity == "equalize-lungs" or variant != "c"
        if masks is None and needs_masks:
            by = " with a lung crop" if self.crop else f" with {self.intensity}" if variant == "c" else ""
            raise ValueError(f"variant {variant!r}{by} needs lung masks")
        masks = np.zeros(images.shape, dtype=bool) if masks is None else np.asarray(masks)
        if masks.shape != images.shape:
            if needs_masks:
                raise ValueError(f"masks {masks.shape} and images {images.shape} differ in shape")
            masks = np.zeros(images.shape, dtype=bool)  # variant c, no crop: the masks are not used
        if self.identity:
            return ClassifierInput(apply_variant(images, masks, variant), masks, boxes)
        out, out_masks = images.copy(), masks.astype(bool, copy=True)
        for i in range(n):
            if self.crop:
                boxes[i] = lung_box(masks[i], self.margin)
                out[i] = minmax(crop_to_box(images[i], tuple(boxes[i])))
                out_masks[i] = crop_to_box(masks[i], tuple(boxes[i]), mask=True)
            if self.intensity == "equalize":
                out[i] = equalize(out[i])
            elif self.intensity == "equalize-lungs":
                out[i] = equalize(out[i], mask=out_masks[i])
            elif self.intensity == "clahe":
                out[i] = clahe(out[i], clip_limit=self.clip_limit)
        return ClassifierInput(apply_variant(out, out_masks, variant), out_masks, boxes)

    def to_dict(self) -> dict:
        return {"crop": self.crop, "margin": self.margin, "intensity": self.intensity, "clip_limit": self.clip_limit}

    @classmethod
    def from_dict(cls, state: dict) -> InputTransform:
        return cls(crop=bool(state.get("crop", False)), margin=float(state.get("margin", 0.1)),
                   intensity=str(state.get("intensity", "none")), clip_limit=float(state.get("clip_limit", 0.01)))


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

    The decode is asked for ``size`` (``io.read_image(..., target=size)``): a JPEG (file or baseline-JPEG DICOM) at
    least twice the working size is decoded at a reduced scale (1/2 to 1/8: Pillow's draft mode, a scaled inverse DCT,
    itself a low-pass filter) before the resize; every other format is decoded in full. So the working image of a JPEG
    is not the one a full decode gives: on the real corpus's JPEGs it differs by a few thousandths on average and by up
    to about 0.3 (of the [0, 1] range) at sharp edges, at 224 px and at 64 px alike. Only JPEG sources get this extra
    low-pass step, a difference tied to the file format; the cache stage and serving both decode through here, so
    each file gets the same step at training and at serving. The pixels returned are then not the file's full
    resolution (``io.is_reduced``); whoever shows the image to a person decodes it again in full.
    ``read_options``: ``max_pixels``, ``name``, and ``photometric`` and ``bits_stored`` (what a raster file's source
    states of it: a MONOCHROME1 PNG is inverted for air dark) of :func:`covidcxr.io.read_image`.
    """
    from covidcxr import io

    pixels, header = io.read_image(src, target=size, **read_options)
    return working_image(pixels, size), pixels, header


def load_working_image(
    path: str, size: int, mask_path: str | None = None, *, photometric: str | None = None,
    bits_stored: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One file as the models see it (:func:`read_working_image`, with what its source states of a raster file's
    ``photometric`` and ``bits_stored``), and its lung mask at the same size when it has one."""
    from covidcxr import io

    image, _, _ = read_working_image(path, size, photometric=photometric, bits_stored=bits_stored)
    mask = None
    if mask_path:
        mask = resize_mask(io.read_mask(mask_path.split(";")), size)
    return image, mask


def _cache_one(args: tuple[str, str | None, int, str | None, int | None]) -> tuple[np.ndarray, np.ndarray | None]:
    path, mask_path, size, photometric, bits_stored = args
    return load_working_image(path, size, mask_path, photometric=photometric, bits_stored=bits_stored)


def build_cache(
    paths: list[str],
    mask_paths: list[str | None],
    size: int,
    *,
    workers: int = 1,
    progress: bool = False,
    photometric: list[str | None] | None = None,
    bits_stored: list[int | None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode every image once at the working size: ``(images float16 [N,H,W], masks bool [N,H,W], has_mask [N])``.

    ``photometric`` and ``bits_stored``, one per path (the manifest's columns), are what each raster file's source
    states of it (:func:`covidcxr.io.read_image`): a MONOCHROME1 PNG export is inverted for air dark. Training then
    reads these arrays through tf.data, so it is compute-bound, not decode-bound.
    """
    from covidcxr.parallel import parallel_map

    photometric = [None] * len(paths) if photometric is None else photometric
    bits_stored = [None] * len(paths) if bits_stored is None else bits_stored
    jobs = [(p, m, size, ph, b) for p, m, ph, b in zip(paths, mask_paths, photometric, bits_stored, strict=True)]
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
