"""The paper's networks as small Keras 3 factory functions: the lung U-Net and the one-channel VGG16/VGG19 classifiers.

``build_unet(f0)`` is the classic Keras U-Net the authors used (dropout inside each block). ``build_vgg(depth)`` is the
VGG conv base with a one-channel first convolution (ImageNet or file weights folded from BGR to gray) and the authors'
dense head, ending in a separate ``"prediction"`` activation so that Grad-CAM can take gradients on the pre-activation
logit (``logits_model``), not after the softmax as the authors' code did.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

from covidcxr.folders import (
    CALIBRATION_FILE,
    INPUT_FILE,
    MEMBER_FILE,
    MODEL_FILE,
    OOD_FILE,
    RUN_FILE,
    SAVED_FILES_KEY,
    STANDARDIZER_FILE,
    THRESHOLD_FILE,
    folder_info,
    folder_threshold,
    member_files,
    ood_detector,
)

log = logging.getLogger(__name__)

UNET_DROPOUT_DOWN: tuple[float, ...] = (0.1, 0.1, 0.2, 0.2, 0.3)
UNET_DROPOUT_UP: tuple[float, ...] = (0.2, 0.2, 0.1, 0.1)

VGG_BLOCKS: dict[int, tuple[int, ...]] = {16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
VGG_FILTERS: tuple[int, ...] = (64, 128, 256, 512, 512)
LAST_CONV_LAYER: dict[int, str] = {16: "block5_conv3", 19: "block5_conv4"}
LOGITS_LAYER = "logits"
PREDICTION_LAYER = "prediction"

# Keras' VGG ImageNet weights expect caffe-style BGR input: channel 0 is blue. Coefficients in that channel order.
FOLDS: dict[str, tuple[float, float, float]] = {
    "luminance": (0.1140, 0.5870, 0.2989),  # the paper's 0.2989 R + 0.5870 G + 0.1140 B
    "sum": (1.0, 1.0, 1.0),  # exactly the gray image replicated into three channels
}

# What keras.applications downloads for include_top=False (URLs and md5 as in keras/src/applications/vgg*.py).
IMAGENET_NOTOP: dict[int, tuple[str, str, str]] = {
    depth: (
        f"vgg{depth}_weights_tf_dim_ordering_tf_kernels_notop.h5",
        f"https://storage.googleapis.com/tensorflow/keras-applications/vgg{depth}/"
        f"vgg{depth}_weights_tf_dim_ordering_tf_kernels_notop.h5",
        md5,
    )
    for depth, md5 in ((16, "6d6bbae143d832006294945121d1f1fc"), (19, "253f8cb515780f3b799900260a226db6"))
}
CONNECT_TIMEOUT_S = 3.0


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights were asked for but are neither in the Keras cache nor downloadable (offline)."""


class WeightsFileError(ValueError):
    """A weights file that does not hold the 3-channel VGG conv base asked for."""


class EncoderMismatchError(WeightsFileError):
    """A pretrained encoder (``pretrain`` stage) made for another VGG than the one built: depth, width or working
    size differ. The message names the file and both values."""


# --------------------------------------------------------------------------------------------------------------------
# U-Net


def _unet_conv_pair(x, filters: int, rate: float, prefix: str):
    """Two 3x3 he_normal ReLU convolutions with dropout between them (the authors' block)."""
    conv = dict(kernel_size=3, activation="relu", kernel_initializer="he_normal", padding="same")
    x = layers.Conv2D(filters, **conv, name=f"{prefix}_conv1")(x)
    x = layers.Dropout(rate, name=f"{prefix}_drop")(x)
    return layers.Conv2D(filters, **conv, name=f"{prefix}_conv2")(x)


def build_unet(
    f0: int = 64, input_shape: Sequence[int | None] = (224, 224, 1), *, dropout_scale: float = 1.0, name: str = "unet"
) -> keras.Model:
    """The paper's lung U-Net: sigmoid mask of the input's height and width.

    Five contraction blocks with ``f0 * 2**(i-1)`` filters (2x2 max pooling after the first four), four expansion
    blocks (2x2 stride-2 transposed convolution with the level's filters, skip concatenation, two convolutions), and a
    1x1 sigmoid convolution. Dropout rates are the paper's (0.1, 0.1, 0.2, 0.2, 0.3 down; 0.2, 0.2, 0.1, 0.1 up) times
    ``dropout_scale``. Height and width must be multiples of 16. Layers are named ``down{i}_*``, ``up{i}_*``, ``mask``.
    """
    if f0 < 1:
        raise ValueError(f"f0 must be a positive number of filters, got {f0}")
    rates = [r * dropout_scale for r in UNET_DROPOUT_DOWN + UNET_DROPOUT_UP]
    if not all(0.0 <= r < 1.0 for r in rates):
        raise ValueError(f"dropout_scale={dropout_scale} gives dropout rates outside [0, 1): {rates}")
    height, width = input_shape[0], input_shape[1]
    if any(s is not None and s % 16 for s in (height, width)):
        raise ValueError(f"U-Net input height and width must be multiples of 16 (4 poolings), got {input_shape}")

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x, skips = inputs, []
    for i in range(5):
        x = _unet_conv_pair(x, f0 * 2**i, UNET_DROPOUT_DOWN[i] * dropout_scale, f"down{i + 1}")
        if i < 4:
            skips.append(x)
            x = layers.MaxPooling2D(2, name=f"down{i + 1}_pool")(x)
    for j, skip in enumerate(reversed(skips)):
        filters = f0 * 2 ** (3 - j)
        x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"up{j + 1}_transpose")(x)
        x = layers.Concatenate(name=f"up{j + 1}_concat")([x, skip])
        x = _unet_conv_pair(x, filters, UNET_DROPOUT_UP[j] * dropout_scale, f"up{j + 1}")
    outputs = layers.Conv2D(1, 1, activation="sigmoid", name="mask", dtype="float32")(x)  # float32 in mixed precision
    return keras.Model(inputs, outputs, name=name)


def dice_loss(y_true, y_pred, smooth: float = 1.0):
    """Per-image soft Dice loss, ``1 - (2|A∩B| + s) / (|A| + |B| + s)``, one value per image (an empty mask predicted
    empty scores 0)."""
    y_true = ops.cast(y_true, y_pred.dtype)
    axes = tuple(range(1, len(y_pred.shape)))
    intersection = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


def bce_dice_loss(y_true, y_pred):
    """Binary cross-entropy (mean over pixels) plus per-image soft Dice loss; one value per image."""
    y_true = ops.cast(y_true, y_pred.dtype)
    axes = tuple(range(1, len(y_pred.shape)))
    bce = ops.mean(ops.binary_crossentropy(y_true, y_pred), axis=axes)
    return bce + dice_loss(y_true, y_pred)


# --------------------------------------------------------------------------------------------------------------------
# VGG


def build_vgg(
    depth: int = 19,
    input_shape: Sequence[int | None] = (224, 224, 1),
    *,
    weights: str | os.PathLike | None = None,
    fold: str = "luminance",
    width: float = 1.0,
    head: Sequence[int] = (1024, 512, 64),
    head_dropout: float = 0.2,
    outputs: int = 1,
    name: str | None = None,
) -> keras.Model:
    """VGG16/VGG19 classifier on one-channel images, with the authors' dense head.

    The conv base has keras.applications' layer names (``block1_conv1`` ... ``block5_pool``) and ``width`` times its
    filters. ``weights``: ``None``/``"none"`` (random), ``"imagenet"`` (Keras cache, else Keras' download; fails fast
    with ``WeightsUnavailableError`` when offline), the path of a 3-channel VGG base weights file (a Keras
    ``.weights.h5`` or Keras' ``vgg{depth}_weights_tf_dim_ordering_tf_kernels_notop.h5``; width 1 only), or of a
    pretrained one-channel encoder (``save_encoder``, the ``pretrain`` stage; any width, refused with
    ``EncoderMismatchError`` when made for another depth, width or working size). The first kernel is folded
    to one channel with ``FOLDS[fold]`` in BGR order. Head: global average pooling, dropout, the ``head`` ReLU Dense
    layers (a second dropout after the first), a ``"logits"`` Dense and a separate ``"prediction"`` activation
    (sigmoid for one output, softmax otherwise). ReLU layers start he_normal: a 16-19 layer plain net trained from
    scratch (the CPU profile) stays dead with Keras' default Glorot start; pretrained weights replace the conv kernels.
    """
    if depth not in VGG_BLOCKS:
        raise ValueError(f"VGG depth must be one of {sorted(VGG_BLOCKS)}, got {depth}")
    if fold not in FOLDS:
        raise ValueError(f"fold must be one of {sorted(FOLDS)}, got {fold!r}")
    if len(input_shape) != 3 or input_shape[-1] != 1:
        raise ValueError(f"build_vgg takes one-channel images (height, width, 1), got input_shape={tuple(input_shape)}")
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    if outputs < 1:
        raise ValueError(f"outputs must be at least 1, got {outputs}")
    if not 0.0 <= head_dropout < 1.0:
        raise ValueError(f"head_dropout must be in [0, 1), got {head_dropout}")
    if isinstance(weights, str) and weights.lower() == "none":
        weights = None
    imagenet = isinstance(weights, str) and weights.lower() == "imagenet"
    encoder = None if weights is None or imagenet else encoder_spec(weights)
    if weights is not None and encoder is None and width != 1.0:
        raise ValueError(f"pretrained weights ({weights!s}) need the real VGG (width=1.0), got width={width}")

    weights_path = None
    if weights is not None:  # resolved before building, so a missing file or offline ImageNet fails at once
        weights_path = imagenet_weights_path(depth) if imagenet else Path(weights)
        if not weights_path.is_file():
            raise FileNotFoundError(f"VGG{depth} weights file not found: {weights_path}")
    if encoder is not None:
        check_encoder(encoder, weights_path, depth=depth, width=width, size=input_shape[0])

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = vgg_conv_base(inputs, depth, width)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dropout(head_dropout, name="head_dropout1")(x)
    for i, units in enumerate(head, start=1):
        x = layers.Dense(units, activation="relu", kernel_initializer="he_normal", name=f"head_dense{i}")(x)
        if i == 1:
            x = layers.Dropout(head_dropout, name="head_dropout2")(x)
    # float32 logits and output under mixed precision (training.precision): bfloat16 would round the scores to 3
    # significant digits, tying images the ROC curve and the operating threshold must tell apart
    x = layers.Dense(outputs, name=LOGITS_LAYER, dtype="float32")(x)
    prediction = layers.Activation("sigmoid" if outputs == 1 else "softmax", name=PREDICTION_LAYER, dtype="float32")(x)
    model = keras.Model(inputs, prediction, name=name or f"vgg{depth}")

    if encoder is not None:
        load_encoder_weights(model, weights_path, depth=depth, width=width)
    elif weights_path is not None:
        load_vgg_base_weights(model, depth, weights_path, fold=fold)
    return model


def vgg_filters(depth: int, width: float) -> list[int]:
    """The number of filters of every convolution of a VGG ``depth`` conv base ``width`` times as wide."""
    return [max(1, round(filters * width)) for n_convs, filters in zip(VGG_BLOCKS[depth], VGG_FILTERS)
            for _ in range(n_convs)]


def vgg_conv_base(x, depth: int, width: float):
    """The VGG conv base on tensor ``x``: keras.applications' layer names (``block1_conv1`` ... ``block5_pool``),
    3x3 ReLU convolutions started he_normal, ``width`` times the filters."""
    for block, (n_convs, filters) in enumerate(zip(VGG_BLOCKS[depth], VGG_FILTERS), start=1):
        filters = max(1, round(filters * width))
        for conv in range(1, n_convs + 1):
            x = layers.Conv2D(filters, 3, activation="relu", padding="same", kernel_initializer="he_normal",
                              name=f"block{block}_conv{conv}")(x)
        x = layers.MaxPooling2D(2, strides=2, name=f"block{block}_pool")(x)
    return x


# A pretrained encoder (the `pretrain` stage): the one-channel VGG conv base as ``<name>.weights.h5`` and, beside it,
# ``<name>.json`` saying what it fits (format, depth, width, filters, working size) and how it was made.
ENCODER_FORMAT = "covidcxr-vgg-encoder/1"
WEIGHTS_SUFFIX = ".weights.h5"


def build_vgg_encoder(depth: int, input_shape: Sequence[int | None], *, width: float = 1.0,
                      name: str | None = None) -> keras.Model:
    """The one-channel VGG conv base alone, then global average pooling (``"avg_pool"``): what self-supervised
    pretraining learns and ``build_vgg(..., weights=<its file>)`` starts from (same layer names)."""
    if depth not in VGG_BLOCKS:
        raise ValueError(f"VGG depth must be one of {sorted(VGG_BLOCKS)}, got {depth}")
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(vgg_conv_base(inputs, depth, width))
    return keras.Model(inputs, x, name=name or f"vgg{depth}_encoder")


def encoder_sidecar(path: str | os.PathLike) -> Path:
    """The JSON beside an encoder weights file (``x.weights.h5`` -> ``x.json``)."""
    path = Path(path)
    stem = path.name[: -len(WEIGHTS_SUFFIX)] if path.name.endswith(WEIGHTS_SUFFIX) else path.stem
    return path.with_name(stem + ".json")


def save_encoder(encoder: keras.Model, path: str | os.PathLike, *, depth: int, width: float, size: int,
                 info: dict | None = None) -> Path:
    """Write a pretrained encoder: its weights at ``path`` (``*.weights.h5``) and the JSON of what it fits."""
    import json

    path = Path(path)
    if not path.name.endswith(WEIGHTS_SUFFIX):
        raise ValueError(f"an encoder weights file must end in {WEIGHTS_SUFFIX}, got {path.name}")
    encoder.save_weights(path)
    spec = {"format": ENCODER_FORMAT, "depth": int(depth), "width": float(width), "size": int(size),
            "filters": vgg_filters(depth, width), **(info or {})}
    encoder_sidecar(path).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def encoder_spec(path: str | os.PathLike) -> dict | None:
    """What a pretrained encoder file fits (its JSON), or None when ``path`` is not one (e.g. Keras' ImageNet file)."""
    import json

    sidecar = encoder_sidecar(path)
    if not sidecar.is_file():
        return None
    try:
        spec = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return spec if isinstance(spec, dict) and spec.get("format") == ENCODER_FORMAT else None


def check_encoder(spec: dict, path: str | os.PathLike, *, depth: int, width: float, size: int | None) -> None:
    """Refuse (``EncoderMismatchError``, naming the file) an encoder made for another depth, width or working size."""
    problems = []
    if int(spec.get("depth", -1)) != depth:
        problems.append(f"depth {spec.get('depth')} (the model: {depth})")
    elif list(spec.get("filters", [])) != vgg_filters(depth, width):
        problems.append(f"width {spec.get('width')} (the model: {width})")
    if size is not None and int(spec.get("size", -1)) != int(size):
        problems.append(f"working size {spec.get('size')} px (the model: {size} px)")
    if problems:
        raise EncoderMismatchError(f"{path}: a pretrained encoder of another VGG: {'; '.join(problems)}; pretrain "
                                   "with the classifier's depth, width and working size")


def load_encoder_weights(model: keras.Model, path: str | os.PathLike, *, depth: int, width: float) -> None:
    """Copy a pretrained encoder's conv layers (one channel, no folding) into ``model``'s, by name."""
    source = build_vgg_encoder(depth, (None, None, 1), width=width)
    try:
        source.load_weights(str(path))
    except Exception as exc:  # noqa: BLE001 - h5py, Keras and OS errors all mean "not this encoder"
        raise WeightsFileError(f"{path} is not a VGG{depth} encoder of width {width}: {exc}") from exc
    for layer in source.layers:
        if isinstance(layer, layers.Conv2D):
            model.get_layer(layer.name).set_weights(layer.get_weights())
    log.info("loaded a pretrained VGG%d encoder from %s", depth, Path(path).name)


def fold_kernel(kernel: np.ndarray, fold: str = "luminance") -> np.ndarray:
    """Fold a (kh, kw, 3, filters) BGR kernel into (kh, kw, 1, filters) with the ``FOLDS[fold]`` coefficients."""
    if fold not in FOLDS:
        raise ValueError(f"fold must be one of {sorted(FOLDS)}, got {fold!r}")
    kernel = np.asarray(kernel)
    if kernel.ndim != 4 or kernel.shape[2] != 3:
        raise ValueError(f"expected a (kh, kw, 3, filters) kernel, got shape {kernel.shape}")
    coefficients = np.asarray(FOLDS[fold], dtype=kernel.dtype)
    return np.tensordot(kernel, coefficients, axes=([2], [0]))[:, :, None, :]


def load_vgg_base_weights(model: keras.Model, depth: int, path: str | os.PathLike, *, fold: str = "luminance") -> None:
    """Copy a 3-channel VGG conv base from ``path`` into ``model``'s conv layers, folding the first kernel.

    The file is read into a keras.applications VGG base (the layout Keras writes and downloads), then checked: every
    kernel must have been loaded, so a file of another network fails with ``WeightsFileError`` instead of leaving
    random weights behind.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VGG{depth} weights file not found: {path}")
    application = keras.applications.VGG16 if depth == 16 else keras.applications.VGG19
    source = application(include_top=False, weights=None, input_shape=(None, None, 3))
    convs = [layer for layer in source.layers if isinstance(layer, layers.Conv2D)]
    before = [ops.convert_to_numpy(layer.kernel).copy() for layer in convs]
    with warnings.catch_warnings(record=True) as caught:  # Keras warns of skipped layers; the check below decides
        warnings.simplefilter("always")
        try:
            source.load_weights(str(path))
        except Exception as exc:  # noqa: BLE001 - h5py, Keras and OS errors all mean "not a VGG base file"
            raise WeightsFileError(f"{path} is not a 3-channel VGG{depth} conv base weights file: {exc}") from exc
    for warning in caught:
        log.debug("loading %s: %s", path.name, warning.message)
    unloaded = [
        layer.name for layer, old in zip(convs, before) if np.array_equal(ops.convert_to_numpy(layer.kernel), old)
    ]
    if unloaded:
        raise WeightsFileError(f"{path} left VGG{depth} layers {unloaded} unloaded: not a VGG{depth} conv base file")

    for layer in convs:
        kernel, bias = layer.get_weights()
        if layer.name == "block1_conv1":
            kernel = fold_kernel(kernel, fold)
        try:
            model.get_layer(layer.name).set_weights([kernel, bias])
        except ValueError as exc:
            raise WeightsFileError(f"{path}: layer {layer.name} does not fit the model: {exc}") from exc
    log.info("loaded VGG%d base weights from %s (first kernel folded with %r)", depth, path.name, fold)


def keras_cache_dir() -> Path:
    """Where Keras caches downloaded models: ``$KERAS_HOME/models``, else ``~/.keras/models``."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras").expanduser() / "models"


def imagenet_weights_path(depth: int) -> Path:
    """Local path of Keras' ImageNet VGG notop weights: the cached file, else a fresh Keras download.

    Offline, raises ``WeightsUnavailableError`` within a few seconds saying which file to fetch and where to put it.
    """
    if depth not in IMAGENET_NOTOP:
        raise ValueError(f"VGG depth must be one of {sorted(IMAGENET_NOTOP)}, got {depth}")
    fname, url, md5 = IMAGENET_NOTOP[depth]
    cache = keras_cache_dir()
    candidates = [cache / fname]
    if not os.access(cache.parent, os.W_OK):  # where keras.utils.get_file falls back to
        candidates.append(Path("/tmp/.keras/models") / fname)
    for candidate in candidates:
        if candidate.is_file():
            log.info("using cached ImageNet VGG%d weights %s", depth, candidate)
            return candidate

    help_text = (
        f"ImageNet VGG{depth} weights are not in the Keras cache and cannot be downloaded. Download\n  {url}\n"
        f"on a machine with internet access and put it at\n  {cache / fname}\n"
        f"(Keras' cache; $KERAS_HOME/models when KERAS_HOME is set), or pass its path: "
        f"build_vgg({depth}, weights='/path/to/{fname}')."
    )
    if not _reachable(url):
        raise WeightsUnavailableError(f"offline: {help_text}")
    try:
        downloaded = keras.utils.get_file(
            fname, url, file_hash=md5, cache_subdir="models", cache_dir=str(cache.parent)
        )
    except Exception as exc:  # noqa: BLE001 - any download failure gets the same instructions
        raise WeightsUnavailableError(f"download failed ({exc}): {help_text}") from exc
    return Path(downloaded)


def _reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the URL's host (or HTTPS proxy) opens within ``timeout`` seconds, DNS included."""
    target = urllib.parse.urlsplit(urllib.request.getproxies().get("https") or url)
    host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
    result: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=connect, daemon=True)  # a thread, because DNS lookups ignore socket timeouts
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


# --------------------------------------------------------------------------------------------------------------------
# Grad-CAM support


def last_conv_layer_name(model: keras.Model) -> str:
    """Name of the model's last Conv2D layer (``block5_conv4`` for VGG19, ``block5_conv3`` for VGG16)."""
    convs = [layer.name for layer in model.layers if isinstance(layer, layers.Conv2D)]
    if not convs:
        raise ValueError(f"model {model.name!r} has no Conv2D layer")
    return convs[-1]


def logits_model(model: keras.Model, layer: str | None = None) -> keras.Model:
    """A model from ``model``'s inputs to [conv feature map, pre-activation logits] for Grad-CAM.

    ``layer`` defaults to the last convolution; the logits are the output of the ``"logits"`` layer, before the
    ``"prediction"`` sigmoid/softmax.
    """
    layer = layer or last_conv_layer_name(model)
    try:
        features, logits = model.get_layer(layer).output, model.get_layer(LOGITS_LAYER).output
    except ValueError as exc:
        names = [lyr.name for lyr in model.layers]
        raise ValueError(f"model {model.name!r} lacks layer {layer!r} or {LOGITS_LAYER!r}; it has {names}") from exc
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, [features, logits], name=f"{model.name}_logits")


# --------------------------------------------------------------------------------------------------------------------
# Model folders (the layout: covidcxr.folders): a trained network with its fitted state, written by the training
# stages and read by every stage that scores and by serving (register bundles the same files).


class Component:
    """A trained network with its fitted state: the standardizer (training images), and optionally the operating
    threshold and the probability calibration (validation split).

    The one way images are scored: ``component(images)`` standardizes working-size images ``[N, H, W]`` in [0, 1] and
    runs the network through one traced function (every batch size, no retracing), in batches of ``batch_size``.
    ``members``: further networks of the same architecture trained with other seeds on the same inputs (a seed
    ensemble); the component's output is then the mean of every network's, and its calibration, threshold and heat
    maps are those of that mean. ``save``/``load`` write and read a model folder (``folders.FOLDER_FILES``, and
    :data:`MEMBER_FILE` per member).
    """

    def __init__(self, model: keras.Model, standardizer, *, threshold: dict | None = None,
                 calibrator=None, info: dict | None = None, ood=None, input_transform=None,
                 members: Sequence[keras.Model] = ()) -> None:
        self.model = model
        self.members = list(members)
        self.standardizer = standardizer
        self.threshold = dict(threshold) if threshold else None  # {"threshold": t, ...how it was chosen}
        self.calibrator = calibrator  # calibration.PlattCalibrator or None
        self.info = dict(info or {})
        self.ood = ood  # ood.MahalanobisDetector (a projection filter's: its lateral check) or None
        self.input_transform = input_transform  # preprocess.InputTransform (a classifier's) or None: the identity
        self._forward = None
        self._evidence = None

    @property
    def networks(self) -> list[keras.Model]:
        """Every network the output averages: ``model``, then the members."""
        return [self.model, *self.members]

    @property
    def operating_threshold(self) -> float:
        if not self.threshold:
            raise ValueError(f"model {self.model.name!r} has no operating threshold ({THRESHOLD_FILE})")
        return float(self.threshold["threshold"])

    def inputs(self, images: np.ndarray) -> np.ndarray:
        """Standardized network inputs ``[N, H, W, 1]`` for working-size images."""
        return self.standardizer.transform(images)[..., None]

    def prepare(self, images: np.ndarray, masks: np.ndarray | None, variant: str):
        """A classifier's input from working images ``[N, H, W]`` and their lung masks under ``variant``: the folder's
        input transform (lung crop, intensity normalisation; none: the identity), then the variant
        (``preprocess.ClassifierInput``: images for ``self(...)``/``self.inputs(...)``, the masks and crop boxes in
        that frame). The one place this happens: training, ``covid_probability``, Grad-CAM and serving call it."""
        from covidcxr.preprocess import InputTransform

        return (self.input_transform or InputTransform()).apply(images, masks, variant)

    def __call__(self, images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
        """Network outputs (float32) for working-size images ``[N, H, W]`` in [0, 1]."""
        x = self.inputs(np.asarray(images, dtype=np.float32))
        if not len(x):
            return np.zeros((0, *self.model.output_shape[1:]), dtype=np.float32)
        forward = self._traced()
        return np.concatenate([np.asarray(forward(x[i:i + batch_size]), dtype=np.float32)
                               for i in range(0, len(x), batch_size)])

    def _traced(self):
        if self._forward is None:
            import tensorflow as tf

            spec = tf.TensorSpec((None, *self.model.input_shape[1:]), tf.float32)
            model, networks = self.model, self.networks
            if len(networks) == 1:
                self._forward = tf.function(lambda x: model(x, training=False), input_signature=[spec])
            else:  # one graph for the ensemble: the mean of the members' outputs
                self._forward = tf.function(lambda x: tf.add_n([n(x, training=False) for n in networks])
                                            / float(len(networks)), input_signature=[spec])
        return self._forward

    def feature_layers(self) -> list:
        """The tensors :meth:`features` pools: each convolutional block's last output (the input of its max pooling)
        and the penultimate features (the input of the ``logits`` layer)."""
        try:
            penultimate = self.model.get_layer(LOGITS_LAYER).input
        except ValueError:
            raise ValueError(f"model {self.model.name!r} has no {LOGITS_LAYER!r} layer: no features") from None
        blocks = [layer.input for layer in self.model.layers if isinstance(layer, layers.MaxPooling2D)]
        return [*blocks, penultimate]

    def evidence(self, images: np.ndarray, *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """``(outputs, features)`` of working-size images ``[N, H, W]`` in [0, 1] from one forward pass.

        ``outputs`` are :meth:`__call__`'s, bit for bit (the same layers in one traced graph; an ensemble's the mean of
        its networks'); ``features`` (float32) are what the out-of-distribution score reads: the global average of each
        convolutional block's output, then the penultimate features, concatenated (averaged inside the graph, never
        returned whole). An ensemble's features are its first network's: what is out of distribution for one member
        is for the others, trained on the same images. Where a model scores and checks the same images (the stages,
        serving), one pass instead of two.
        """
        x = self.inputs(np.asarray(images, dtype=np.float32))
        tensors = self.feature_layers()
        if self._evidence is None:
            import tensorflow as tf

            inputs = self.model.inputs[0] if len(self.model.inputs) == 1 else self.model.inputs
            extractor = keras.Model(inputs, [*tensors, self.model.outputs[0]])
            members = self.members

            def both(t):
                outs = extractor(t, training=False)
                output = outs[-1]
                if members:  # as __call__: the mean of every network's output
                    output = tf.add_n([output, *[n(t, training=False) for n in members]]) / float(len(members) + 1)
                pooled = [tf.cast(o, tf.float32) for o in outs[:-1]]  # mixed precision: average in float32
                return output, tf.concat([tf.reduce_mean(o, axis=[1, 2]) if len(o.shape) == 4 else o
                                          for o in pooled], axis=1)

            spec = tf.TensorSpec((None, *self.model.input_shape[1:]), tf.float32)
            self._evidence = tf.function(both, input_signature=[spec])
        if not len(x):
            return (np.zeros((0, *self.model.output_shape[1:]), dtype=np.float32),
                    np.zeros((0, sum(int(t.shape[-1]) for t in tensors)), dtype=np.float32))
        passes = [self._evidence(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        return (np.concatenate([np.asarray(out, dtype=np.float32) for out, _ in passes]),
                np.concatenate([np.asarray(feat, dtype=np.float32) for _, feat in passes]))

    def features(self, images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
        """The out-of-distribution features of :meth:`evidence`, alone."""
        return self.evidence(images, batch_size=batch_size)[1]

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the model folder (model, standardizer, threshold, calibration, detector and input transform when
        there are), then its run info, which lists every file written (``folders.SAVED_FILES_KEY``): :meth:`load`
        refuses the folder when one of them is gone."""
        import json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / ".partial.keras"  # Keras insists on the suffix; renamed into place once complete
        written = []
        for i, network in enumerate(self.networks):
            network.save(partial)
            written.append(MEMBER_FILE.format(i) if i else MODEL_FILE)
            os.replace(partial, folder / written[-1])
        for stale in member_files(folder)[len(self.members):]:  # a smaller ensemble written over a larger one
            (folder / stale).unlink()
        self.standardizer.save(folder / STANDARDIZER_FILE)
        written.append(STANDARDIZER_FILE)
        if self.threshold:
            (folder / THRESHOLD_FILE).write_text(json.dumps(self.threshold, indent=2, sort_keys=True) + "\n",
                                                 encoding="utf-8")
            written.append(THRESHOLD_FILE)
        for fitted, name in ((self.calibrator, CALIBRATION_FILE), (self.ood, OOD_FILE),
                             (self.input_transform, INPUT_FILE)):
            if fitted is not None:
                fitted.save(folder / name)
                written.append(name)
        info = {**self.info, SAVED_FILES_KEY: sorted(written)}
        (folder / RUN_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Component:
        """A component from its model folder; a missing file is an error naming it (``folders.folder_info``: every
        file the folder was saved with; a folder saved before that record loads without the optional files it lacks,
        as a model trained before they existed)."""
        from covidcxr.calibration import PlattCalibrator
        from covidcxr.preprocess import InputTransform, Standardizer

        folder = Path(folder)
        info = folder_info(folder)  # checks the folder first
        model = keras.saving.load_model(folder / MODEL_FILE, compile=False)
        members = [keras.saving.load_model(folder / name, compile=False) for name in member_files(folder)]
        calibrator = PlattCalibrator.load(folder / CALIBRATION_FILE) if (folder / CALIBRATION_FILE).is_file() else None
        detector = ood_detector(folder)
        transform = InputTransform.load(folder / INPUT_FILE) if (folder / INPUT_FILE).is_file() else None
        return cls(model, Standardizer.load(folder / STANDARDIZER_FILE), threshold=folder_threshold(folder),
                   calibrator=calibrator, info=info, ood=detector, input_transform=transform, members=members)


#: COVID-19 probabilities are reported, stored and compared with thresholds at this many decimals, everywhere: the
#: label a served answer shows then always follows from the probability it shows.
PROBABILITY_DECIMALS = 6


def covid_probability(classifier: Component, images: np.ndarray, masks: np.ndarray, variant: str, *,
                      calibrated: bool = True) -> np.ndarray:
    """The COVID-19 probability of working-size images with their lung masks under ``variant`` (c, d or e).

    The network's score on the folder's input (``Component.prepare``: its input transform, then the variant), made a
    probability by :func:`probability`. Where the same images are also checked for being out of distribution (the
    classifier stage, serving), :func:`classifier_evidence` gives both from one forward pass, the same numbers.
    """
    return probability(classifier, classifier(classifier.prepare(images, masks, variant).images), calibrated=calibrated)


def probability(classifier: Component, outputs: np.ndarray, *, calibrated: bool = True) -> np.ndarray:
    """COVID-19 probabilities from the network's outputs ``[N, 1]``: through the folder's calibration when it has one
    (``calibrated`` False: the raw score), rounded to :data:`PROBABILITY_DECIMALS` (Python's correctly rounded
    ``round``). The one rule behind the classifier stage's predictions (and so evaluate, explain and the audit) and
    every served answer."""
    raw = np.asarray(outputs)[:, 0]
    if calibrated and classifier.calibrator is not None:
        raw = classifier.calibrator.transform(raw)
    return np.array([round(float(p), PROBABILITY_DECIMALS) for p in raw], dtype=np.float64)


def classifier_evidence(classifier: Component, images: np.ndarray, masks: np.ndarray, variant: str):
    """``(probability, scored)``: :func:`covid_probability` and :func:`out_of_distribution` of the same images from
    one forward pass (:meth:`Component.evidence`); ``scored`` is None for a folder without a detector."""
    prepared = classifier.prepare(images, masks, variant).images
    if classifier.ood is None:
        return probability(classifier, classifier(prepared)), None
    outputs, features = classifier.evidence(prepared)
    return probability(classifier, outputs), ood_scored(classifier, features)


def frontal_probability(projection_filter: Component, images: np.ndarray) -> np.ndarray:
    """The projection filter's probability of frontal for working images ``[N, H, W]`` at the filter's own size.

    Through :meth:`Component.prepare`, so that a filter saved with an input transform (intensity normalisation; never
    a lung crop: the filter comes before the lungs) reads every image the way it was trained. The stages and serving
    take it from :func:`frontal_evidence`, with the filter's lateral check, in the same pass.
    """
    images = np.asarray(images, dtype=np.float32)
    return projection_filter(projection_filter.prepare(images, None, "c").images)[:, 0]


def frontal_evidence(projection_filter: Component, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``(p_frontal, like_lateral)``: what :func:`covidcxr.projection.decide` needs of the filter, for the
    `train_projection` and `filter_frontal` stages and serving alike, from one forward pass.

    ``p_frontal`` is :func:`frontal_probability`'s; ``like_lateral``: whether each image lies within the filter's
    training laterals (its folder's detector, fitted on their features: ``ood.npz``); None for a filter saved without
    one, whose network then decides alone.
    """
    if projection_filter.ood is None:
        return frontal_probability(projection_filter, images), None
    prepared = projection_filter.prepare(np.asarray(images, dtype=np.float32), None, "c").images
    outputs, features = projection_filter.evidence(prepared)
    return outputs[:, 0], ~projection_filter.ood.is_out(projection_filter.ood.score(features))


def ood_features(classifier: Component, images: np.ndarray, masks: np.ndarray, variant: str) -> np.ndarray:
    """The classifier's features (:meth:`Component.features`: pooled block outputs and penultimate features) for
    working-size images with their lung masks under ``variant`` (through :meth:`Component.prepare`, as the network
    scores them): what its out-of-distribution detector is fitted on and applied to."""
    return classifier.features(classifier.prepare(images, masks, variant).images)


def out_of_distribution(classifier: Component, images: np.ndarray, masks: np.ndarray, variant: str):
    """The out-of-distribution twin of :func:`covid_probability`: :func:`ood_scored` of the images' features (the
    classifier stage's ``ood_score`` column and every served ``ood_score`` come from the same features); None when
    the folder has no detector (a model trained before it existed)."""
    if classifier.ood is None:
        return None
    return ood_scored(classifier, ood_features(classifier, images, masks, variant))


def ood_scored(classifier: Component, features: np.ndarray):
    """Each image's OOD score (rounded to ``ood.SCORE_DECIMALS``) and compact feature vector, from the folder's
    detector (``ood.npz``) and the images' features (:meth:`Component.evidence`)."""
    from covidcxr.ood import Scored

    return Scored(score=classifier.ood.score(features), compact=classifier.ood.project(features))
