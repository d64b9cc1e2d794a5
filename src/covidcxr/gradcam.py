"""Grad-CAM heat maps (Selvaraju et al. 2017) and the pictures made from them.

Gradients are taken on the pre-activation logit, not after the sigmoid/softmax as in the authors' code: a saturated
output (probability 0.9999) has a vanishing gradient, which makes post-activation maps empty or noise. Only arrays
and a Keras model go in; nothing here logs to MLflow or writes files.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import keras
import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

#: Name our model factories give the final activation layer.
PREDICTION_LAYER = "prediction"
_OUTPUT_ACTIVATIONS = ("sigmoid", "softmax")


def _activation_name(layer: keras.layers.Layer) -> str:
    return getattr(getattr(layer, "activation", None), "__name__", "")


def _find_conv_layer(model: keras.Model, layer: str | None) -> keras.layers.Layer:
    """The target layer, searched among the model's top-level layers only."""
    names = [lyr.name for lyr in model.layers]
    nested = [lyr.name for lyr in model.layers if isinstance(lyr, keras.Model)]
    hint = f"; nested models {nested} are not searched: build the classifier on base.output" if nested else ""
    if layer is not None:
        if layer not in names:
            raise ValueError(f"model {model.name!r} has no layer {layer!r}{hint}; layers: {names}")
        return model.get_layer(layer)
    convs = [lyr for lyr in model.layers if isinstance(lyr, keras.layers.Conv2D)]
    if not convs:
        raise ValueError(f"model {model.name!r} has no top-level Conv2D layer{hint}; layers: {names}")
    return convs[-1]


def _find_output_layer(model: keras.Model) -> keras.layers.Layer:
    """The layer that applies the final activation: ``"prediction"`` if present, else the model's last layer."""
    names = [lyr.name for lyr in model.layers]
    return model.get_layer(PREDICTION_LAYER) if PREDICTION_LAYER in names else model.layers[-1]


@contextmanager
def _logit_output(model: keras.Model) -> Iterator[keras.KerasTensor]:
    """Yield the model's pre-activation logit tensor.

    An ``Activation``/``Softmax`` output layer: its input. A layer with a built-in sigmoid/softmax (``Dense(1,
    activation="sigmoid")``): its output, with the activation swapped for linear while the context is open (restored
    afterwards). Anything else is taken to output logits already.
    """
    out_layer = _find_output_layer(model)
    if isinstance(out_layer, (keras.layers.Activation, keras.layers.Softmax)):
        yield out_layer.input
        return
    if _activation_name(out_layer) in _OUTPUT_ACTIVATIONS:
        original = out_layer.activation
        out_layer.activation = keras.activations.linear
        try:
            yield out_layer.output
        finally:
            out_layer.activation = original
        return
    log.debug("layer %r has no sigmoid/softmax: taking its output as the logit", out_layer.name)
    yield out_layer.output


def heat_maps(classifier, images: np.ndarray, covid: np.ndarray) -> np.ndarray:
    """Grad-CAM heat maps ``(N, H, W)`` of a classifier (a ``models.Component``) for its prepared input images
    (``classifier.prepare(...).images``), each explaining the class the model called for that image (``covid``: one
    bool per image, the call at the operating threshold): the COVID-19 logit where it called COVID-19, the negated
    logit (the negative class's log-odds) where it called negative. A negative call's map of the COVID-19 logit shows
    where COVID-19 evidence is, usually nowhere, not what the model read to call the film negative. The one place
    explain and serving compute them. An ensemble's are the mean of its networks' maps (``classifier.networks``), as
    its score is the mean of theirs."""
    x = classifier.inputs(images)
    covid = np.asarray(covid, dtype=bool).reshape(-1)
    if len(covid) != len(x):
        raise ValueError(f"one call per image: {len(covid)} calls for {len(x)} images")
    maps = [gradcam(network, x, against=~covid) for network in classifier.networks]
    return maps[0] if len(maps) == 1 else np.mean(maps, axis=0)


def gradcam(
    model: keras.Model,
    images: np.ndarray,
    *,
    layer: str | None = None,
    class_index: int = 0,
    against: np.ndarray | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """Grad-CAM heat maps ``(N, H, W)`` in [0, 1] at the input size, one per image.

    ``layer`` is the name of the target convolutional layer (default: the last top-level ``Conv2D``); list the
    candidates with ``[l.name for l in model.layers]``. Only top-level layers are searched: a backbone nested as one
    layer (``x = vgg(inputs)``) must instead be built into the model (``VGG19(input_tensor=...)``, ``base.output``).
    The gradient is that of the pre-activation logit of ``class_index`` (the input of the layer named
    ``"prediction"``, or of the model's last layer if it applies a sigmoid/softmax) with respect to the layer's feature
    maps; ``against`` (one bool per image) takes the negated logit for the images where it is true, the evidence
    against the class (for a one-logit sigmoid model, the other class's log-odds). Channel weights are the spatial mean
    of the gradient;
    the map is ``ReLU(sum_k w_k A_k)``, resized bilinearly to the input and divided by its maximum (an all-zero map,
    where no location argues for the class, stays zero). ``images`` are what the model takes, ``(N, H, W, C)``, or
    ``(N, H, W)`` for one channel.
    """
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or len(x) == 0:
        raise ValueError(f"images must be a non-empty (N, H, W[, C]) batch, got shape {np.asarray(images).shape}")
    sign = np.ones(len(x), np.float32) if against is None else np.where(np.asarray(against, bool), -1.0, 1.0)
    if sign.shape != (len(x),):
        raise ValueError(f"against must hold one bool per image ({len(x)}), got shape {np.shape(against)}")
    conv = _find_conv_layer(model, layer)
    height, width = x.shape[1:3]
    maps = []
    with _logit_output(model) as logit:
        n_classes = logit.shape[-1]
        if not 0 <= class_index < n_classes:
            raise ValueError(f"class_index {class_index} out of range: the logit has {n_classes} classes")
        grad_model = keras.Model(model.inputs, [conv.output, logit])
        for start in range(0, len(x), batch_size):
            maps.append(_batch_cam(grad_model, x[start:start + batch_size], class_index,
                                   sign[start:start + batch_size].astype(np.float32), (height, width)))
    return np.concatenate(maps)


def _batch_cam(grad_model: keras.Model, x: np.ndarray, class_index: int, sign: np.ndarray,
               size: tuple[int, int]) -> np.ndarray:
    inputs = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        features, logits = grad_model(inputs, training=False)
        target = tf.cast(logits[:, class_index], tf.float32) * sign
    # images are independent (inference mode), so the gradient of the sum is each image's own gradient
    grads = tf.cast(tape.gradient(target, features), tf.float32)  # a mixed-precision model's maps are bfloat16
    features = tf.cast(features, tf.float32)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1, keepdims=True))
    cam = tf.image.resize(cam, size, method="bilinear")[..., 0].numpy()
    peak = cam.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, cam / np.where(peak > 0, peak, 1.0), 0.0).astype(np.float32)


def mass_inside(heatmaps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image, the share of heat-map mass inside the lung mask (``mask >= 0.5``); all-zero maps give NaN.

    Heat maps ``(N, H, W)``; masks ``(N, H, W)`` or ``(N, H, W, 1)`` at the same size. A model that reads the lungs
    puts most of its mass inside them; mass outside (borders, labels, devices) is the shortcut DeGrave et al. describe.
    """
    h = np.asarray(heatmaps, dtype=np.float64)
    m = np.asarray(masks)
    if m.ndim == 4 and m.shape[-1] == 1:
        m = m[..., 0]
    if h.ndim != 3 or h.shape != m.shape:
        raise ValueError(f"heatmaps {h.shape} and masks {np.asarray(masks).shape} must both be (N, H, W) and match")
    if not np.isfinite(h).all() or (h < 0).any():
        raise ValueError("heat maps must be finite and non-negative")
    total = h.sum(axis=(1, 2))
    inside = (h * (m >= 0.5)).sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, inside / np.where(total > 0, total, 1.0), np.nan)


def jet(values: np.ndarray) -> np.ndarray:
    """A jet-like colormap (blue - cyan - yellow - red) of values in [0, 1]: float RGB in [0, 1], shape ``(..., 3)``."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)[..., None]
    centers = np.array([3.0, 2.0, 1.0])  # red, green, blue peak at 0.75, 0.5, 0.25
    return np.clip(1.5 - np.abs(4.0 * v - centers), 0.0, 1.0)


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """A grayscale ``(H, W)``/``(H, W, 1)`` or RGB ``(H, W, 3)`` image as uint8 RGB; floats are min-max scaled."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)):
        raise ValueError(f"image must be (H, W), (H, W, 1) or (H, W, 3), got shape {np.asarray(image).shape}")
    if a.dtype != np.uint8:
        f = a.astype(np.float64)
        if not np.isfinite(f).all():
            raise ValueError("image has non-finite values")
        lo, hi = f.min(), f.max()
        a = np.round(255.0 * (f - lo) / (hi - lo)).astype(np.uint8) if hi > lo else np.zeros(f.shape, np.uint8)
    return np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a


def display_image(pixels: np.ndarray, longest: int) -> np.ndarray:
    """The original image at most ``longest`` pixels on its long side, aspect kept, for an overlay a person reads
    (serving's answers and the `explain` stage's grids draw on it, not on the models' small working image)."""
    from covidcxr import preprocess

    height, width = pixels.shape
    scale = min(1.0, longest / max(height, width))
    shape = (max(1, round(height * scale)), max(1, round(width * scale)))
    return preprocess.resize(preprocess.minmax(pixels), shape)


def overlay(image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.4) -> np.ndarray:
    """The heat map in jet colours blended over the image: uint8 RGB ``(H, W, 3)``.

    ``image`` may be standardised floats (min-max scaled for display) or uint8; ``heatmap`` is ``(H', W')`` in
    [0, 1], resized bilinearly to the image when the sizes differ. ``alpha`` is the weight of the heat map.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = _to_rgb_uint8(image).astype(np.float64) / 255.0
    h = np.asarray(heatmap, dtype=np.float32)
    if h.ndim != 2 or not np.isfinite(h).all():
        raise ValueError(f"heatmap must be a finite (H, W) array, got shape {h.shape}")
    if h.shape != base.shape[:2]:
        h = np.asarray(Image.fromarray(h).resize(base.shape[1::-1], Image.Resampling.BILINEAR))
    blended = (1.0 - alpha) * base + alpha * jet(h)
    return np.round(255.0 * np.clip(blended, 0.0, 1.0)).astype(np.uint8)


def grid(
    tiles: Sequence[np.ndarray],
    *,
    ncols: int,
    titles: Sequence[str] | None = None,
    pad: int = 2,
) -> np.ndarray:
    """A montage of tiles, row-major, as uint8 RGB; tiles of different sizes are padded to the largest.

    ``titles`` (one per tile) are drawn above each tile with Pillow's default font. Titles end up in logged images:
    use labels and probabilities, never patient identifiers.
    """
    if not tiles:
        raise ValueError("grid needs at least one tile")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    if titles is not None and len(titles) != len(tiles):
        raise ValueError(f"{len(titles)} titles for {len(tiles)} tiles")
    rgb = [_to_rgb_uint8(t) for t in tiles]
    tile_h = max(t.shape[0] for t in rgb)
    tile_w = max(t.shape[1] for t in rgb)
    font = ImageFont.load_default()
    band = 0
    if titles is not None:
        left, top, right, bottom = font.getbbox("Ag")
        band = int(bottom - top) + 2 * pad
    cell_h, cell_w = tile_h + band + pad, tile_w + pad
    nrows = -(-len(rgb) // ncols)
    canvas = Image.new("RGB", (ncols * cell_w + pad, nrows * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, tile in enumerate(rgb):
        r, c = divmod(i, ncols)
        x0, y0 = pad + c * cell_w, pad + r * cell_h
        if titles is not None:
            draw.text((x0, y0 + pad), str(titles[i]), fill=(0, 0, 0), font=font)
        canvas.paste(Image.fromarray(tile), (x0, y0 + band))
    return np.asarray(canvas, dtype=np.uint8)
