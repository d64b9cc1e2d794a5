"""Serving: the whole pipeline as one MLflow pyfunc model, from an image file to a decision with its reasons.

Each image of a request (a PNG, JPEG or DICOM file, base64-encoded) goes: decode and working image
(:func:`covidcxr.preprocess.read_working_image`, the cache stage's path: :func:`covidcxr.io.read_image` with the pixel
limit, a JPEG far above the working size decoded at reduced scale, then :func:`covidcxr.preprocess.working_image`) ->
plausibility checks (aspect ratio, DICOM modality and body part) -> the projection rule
(:func:`covidcxr.projection.decide`: the DICOM view position, else the projection filter and its lateral check, which
read the image at its own working size when ``Config.projection_size`` sets one, as the `cache_projection` stage does)
-> U-Net lung mask and its quality rules (:mod:`covidcxr.lungs`) -> variant c/d/e -> classifier -> COVID-19
probability -> label at the operating threshold, the out-of-distribution score (from the same forward pass:
:func:`covidcxr.models.classifier_evidence`; above its threshold, or a request's ``ood_threshold`` (a site's own:
:func:`covidcxr.sites.local_ood_threshold`), the image is refused as ``out_of_distribution``, or only flagged when
``Config.ood_action`` is ``flag``), and optionally a Grad-CAM overlay (PNG, base64). A server given a site's thresholds
file (``$COVIDCXR_SITE``, :class:`covidcxr.sites.SiteThresholds`, chosen on this model version) applies them to every
request and refuses a request's own. These are the functions the pipeline's stages call, with the model folders they
wrote (:class:`covidcxr.models.Component`): the served model is the evaluated one.

An image that cannot be used gets an entry with ``accepted=False`` and a ``reason`` from :data:`REASONS`, never a
failed batch. A malformed request (no ``image`` column, too many images, a threshold outside [0, 1]) raises
``MlflowException(INVALID_PARAMETER_VALUE)``, which ``mlflow models serve`` answers with HTTP 400 and the message.
Entries hold exactly :data:`FIELDS`: no header field, file name or pixel leaves this module, and the log holds counts
and reason codes only. Every scored image also appends one record to the prediction log (:mod:`covidcxr.predlog`,
``Config.prediction_log`` or ``$COVIDCXR_PREDICTION_LOG``): the entry's figures, intensity statistics of the working
image and the compact feature vector; never pixels, header fields or file names. A dead log database never fails a
request. Under ``mlflow models serve``, whose request timeout answers HTTP 504 but does not stop the scoring thread, a
request scored for longer than that timeout leaves no records (the client got no answer, and will likely send the
images again): :func:`server_timeout`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import io as _bytes_io
import json
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

from covidcxr import dburl, io, lungs, metrics, ood, predlog, preprocess, projection, sites

if TYPE_CHECKING:
    from covidcxr import models

log = logging.getLogger(__name__)

#: The artifacts a registered model bundles (``mlflow.pyfunc.log_model(artifacts=...)`` keys).
COMPONENTS: tuple[str, ...] = ("projection", "unet", "classifier")
CONFIG_ARTIFACT = "config"
METADATA_ARTIFACT = "metadata"

INPUT_COLUMN = "image"
#: Every response entry has exactly these keys (``gradcam_png`` only when ``explain`` is asked).
FIELDS: tuple[str, ...] = (
    "accepted", "reason", "message", "projection", "projection_probability", "lung_area_fraction",
    "covid_probability", "label", "ood_score", "ood_threshold", "threshold", "thresholds_from", "model_name",
    "model_version", "max_images",
)
#: ``thresholds_from`` says whose thresholds decided an entry: ``model`` (both its own, chosen on its validation split),
#: ``site`` (a site's thresholds file the server applies to every request, ``$COVIDCXR_SITE``) or ``request`` (the
#: request's params, a client's ``--site`` file included, replaced at least one; each value is in the entry).
#: ``model_name`` and ``model_version`` say which model answered (``Config.model_name``: its registered name),
#: ``max_images`` how many images a request to it may hold (``Limits.max_images``), so a client can size its batches.
GRADCAM_FIELD = "gradcam_png"

REASONS: dict[str, str] = {
    "missing_image": "the image field is empty",
    "invalid_base64": "the image field is not a base64 string",
    "too_large": "the file or its pixel count exceeds the serving limits",
    "not_an_image": "the bytes are not a DICOM, PNG, JPEG, GIF, BMP or TIFF file",
    "unreadable": "the file is corrupt or cannot be decoded",
    "truncated": "the file ends before the data it declares",
    "zero_variance": "every pixel has the same value",
    "no_pixel_data": "a DICOM without pixel data",
    "unsupported_photometric": "a colour model that cannot be converted to grayscale faithfully",
    "not_chest_radiograph": "not a chest radiograph (aspect ratio, DICOM modality or body part)",
    "not_for_presentation": "a DICOM FOR PROCESSING: raw detector data, not an image meant for reading",
    "outside_intended_use": "a DICOM age below the model's intended population (min_age)",
    "lateral_view": "a lateral view: the classifier takes frontal (PA/AP) views only",
    **lungs.REASONS,
    "out_of_distribution": "the image's features lie far from the training images' (OOD score above the threshold)",
    "internal_error": "the server failed on this image; the server log has the error type",
    "out_of_memory": "the server ran out of memory reading this image; it may be sent again later",
}
#: Reasons that say the server failed, not the image: the same file may be answered on another try (the PACS worker
#: writes no result for them and sends the image again on its next pass).
RETRY_REASONS = frozenset({"internal_error", "out_of_memory"})

#: DICOM modalities of projection radiographs (OT: secondary capture, as exported by many PACS).
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "OT"})
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "TORAX", "THORAX CHEST"})
DISPLAY_SIZE = 512  # longest side of the served Grad-CAM overlay
OOD_ACTIONS = ("refuse", "flag")


@dataclass(frozen=True)
class Limits:
    """What one request may hold; checked before any pixel is decoded."""

    max_images: int = 16
    max_image_bytes: int = 32 << 20
    max_pixels: int = 36_000_000

    def __post_init__(self) -> None:
        for name in ("max_images", "max_image_bytes", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"serving limit {name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class Config:
    """Everything besides the networks that decides a served answer (saved as the ``config`` artifact)."""

    size: int
    variant: str
    # None: the projection filter's own saved threshold (threshold.json), which filter_frontal applies; a number
    # overrides it (tests, or an operator's deliberate choice)
    frontal_threshold: float | None = None
    min_area: float = 0.05
    max_area: float = 0.8
    max_aspect: float = 2.5
    model_version: str = "unregistered"
    limits: Limits = Limits()
    model_name: str = "covidcxr"
    ood_action: str = "refuse"  # refuse | flag: what an image above the OOD threshold gets
    prediction_log: str | None = None  # SQLAlchemy URL of the prediction log; None: no log (unless the env sets one)
    projection_size: int | None = None  # the projection filter's working size (its own cache's); None: ``size``
    # Patients younger than this (years, from a DICOM's PatientAge) are refused as outside_intended_use: the model's
    # sensitivity was measured on adults only. A file without an age is scored. None: no age limit.
    min_age: float | None = None

    def __post_init__(self) -> None:
        if self.variant not in preprocess.VARIANTS:
            raise ValueError(f"variant must be one of {sorted(preprocess.VARIANTS)}, got {self.variant!r}")
        if not isinstance(self.size, int) or self.size < 16 or self.size % 16:
            raise ValueError(f"size must be a multiple of 16 (the U-Net pools 4 times), got {self.size!r}")
        if self.projection_size is not None and (not isinstance(self.projection_size, int)
                                                 or self.projection_size < 16 or self.projection_size % 16):
            raise ValueError(f"projection_size must be a multiple of 16 or None, got {self.projection_size!r}")
        if self.frontal_threshold is not None and not 0.0 <= self.frontal_threshold <= 1.0:
            raise ValueError(f"frontal_threshold must be in [0, 1] or None, got {self.frontal_threshold}")
        if not 0.0 <= self.min_area <= self.max_area:
            raise ValueError(f"need 0 <= min_area <= max_area, got {self.min_area}, {self.max_area}")
        if self.max_aspect < 1.0:
            raise ValueError(f"max_aspect must be >= 1, got {self.max_aspect}")
        if self.min_age is not None and not 0.0 <= self.min_age <= 150.0:
            raise ValueError(f"min_age must be in [0, 150] years or None, got {self.min_age}")
        if self.ood_action not in OOD_ACTIONS:
            raise ValueError(f"ood_action must be one of {OOD_ACTIONS}, got {self.ood_action!r}")
        if self.prediction_log is not None and dburl.has_password(self.prediction_log):
            raise ValueError("prediction_log holds a password: give it in the environment (PGPASSWORD), not the URL")

    @property
    def filter_size(self) -> int:
        """The working size the projection filter reads."""
        return self.projection_size or self.size

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "limits"}
        out["limits"] = {k: getattr(self.limits, k) for k in self.limits.__dataclass_fields__}
        return out

    @classmethod
    def from_dict(cls, state: Mapping) -> Config:
        state = dict(state)
        limits = Limits(**state.pop("limits", {}))
        return cls(**state, limits=limits)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Config:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


class Refused(Exception):
    """One image that cannot be scored: ``reason`` is a key of :data:`REASONS`, the message says why (no PHI)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class ServingError(MlflowException):
    """An MlflowException whose message the scoring server cannot extend with the request's data.

    ``mlflow models serve`` rewrites ``exc.message`` of an exception raised by ``predict`` to
    ``"Failed to predict data '<the input DataFrame>'..."``, quoting the request (its base64 images and any extra
    column) back in the answer; this class keeps the message it was built with, so no request content is echoed.
    """

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):  # set once, by MlflowException.__init__
            self._message = value


def invalid_request(message: str) -> MlflowException:
    """A request-level error; the scoring server turns it into HTTP 400 with exactly this message."""
    return ServingError(message, error_code=INVALID_PARAMETER_VALUE)


# --- per-image steps ---------------------------------------------------------------------------------------------


def decode_field(value: object, index: int, max_bytes: int) -> bytes:
    """The file bytes of one ``image`` field: standard base64 (whitespace and a ``data:...;base64,`` prefix allowed).

    The encoded length is checked against ``max_bytes`` before anything is decoded.
    """
    blank = isinstance(value, str) and not value.strip()
    if value is None or (isinstance(value, float) and math.isnan(value)) or blank:
        raise Refused("missing_image", f"image[{index}] is empty")
    if not isinstance(value, str):
        raise Refused("invalid_base64", f"image[{index}] must be a base64 string, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    text = "".join(text.split())
    if len(text) > 4 * math.ceil(max_bytes / 3):
        raise Refused("too_large", f"image[{index}] holds about {len(text) * 3 // 4} bytes, more than the limit of "
                                   f"{max_bytes} bytes per image")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Refused("invalid_base64", f"image[{index}] is not valid base64 (standard alphabet, padded)") from None
    if len(data) > max_bytes:
        raise Refused("too_large", f"image[{index}] has {len(data)} bytes, more than the limit of {max_bytes}")
    return data


def check_plausible(pixels: np.ndarray, header: Mapping, index: int, max_aspect: float) -> None:
    """Refuse what is visibly not a chest radiograph, or not one meant for reading, from its shape and whitelisted
    DICOM header fields."""
    height, width = pixels.shape
    aspect = max(height, width) / min(height, width)
    if aspect > max_aspect:
        raise Refused("not_chest_radiograph", f"image[{index}] is {width}x{height} (aspect {aspect:.2f} > "
                                              f"{max_aspect:g}): not a chest radiograph")
    modality = (header.get("modality") or "").strip().upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        raise Refused("not_chest_radiograph",
                      f"image[{index}] is a DICOM of modality {modality}, not a radiograph "
                      f"({', '.join(sorted(RADIOGRAPH_MODALITIES))})")
    body_part = (header.get("body_part") or "").strip().upper()[:16]  # a DICOM code string: 16 characters
    if body_part and body_part not in CHEST_BODY_PARTS:
        raise Refused("not_chest_radiograph", f"image[{index}] is a DICOM of body part {body_part}, not the chest")
    # A DX archived twice, raw and processed for display: the raw one is no radiograph a reader (or the model) reads
    if (header.get("presentation_intent") or "").strip().upper() == "FOR PROCESSING":
        raise Refused("not_for_presentation", f"image[{index}] is a DICOM FOR PROCESSING (raw detector data): the "
                                              "model reads images FOR PRESENTATION, as radiologists do")


def check_intended_use(header: Mapping, index: int, min_age: float | None) -> None:
    """Refuse a patient younger than the model's intended population, by the DICOM header's age (the one source of an
    age a request has); the message gives the limit, never the patient's age."""
    age = header.get("age")
    if min_age is not None and age is not None and age < min_age:
        raise Refused("outside_intended_use", f"image[{index}]: the DICOM header gives an age under {min_age:g} years; "
                                              "the model's sensitivity was never measured on such patients")


def server_timeout() -> float | None:
    """The request timeout of the MLflow scoring server this process is (``mlflow models serve`` marks its process
    with ``_MLFLOW_IS_IN_SERVING_ENVIRONMENT`` and bounds each request by ``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``,
    default 60 s, answering HTTP 504 past it), else None: scored in this process, every answer is delivered."""
    from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT, MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

    if not _MLFLOW_IS_IN_SERVING_ENVIRONMENT.get():
        return None
    return float(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get())


def png_base64(rgb: np.ndarray) -> str:
    from PIL import Image

    buffer = _bytes_io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", optimize=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# --- the pipeline ------------------------------------------------------------------------------------------------


class Pipeline:
    """Projection filter, U-Net and classifier (model folders) with the :class:`Config`; scores images."""

    def __init__(self, projection: models.Component, unet: models.Component, classifier: models.Component,
                 config: Config, prediction_log: predlog.Sink | None = None,
                 site: sites.SiteThresholds | None = None) -> None:
        self.projection, self.unet, self.classifier = projection, unet, classifier
        self.prediction_log = prediction_log  # where every scored image's record goes (None: nowhere)
        self.undelivered = 0  # records not logged: scored past the scoring server's timeout, no client got them
        self._counting = threading.Lock()
        self.threshold = metrics.check_threshold(classifier.operating_threshold, "operating threshold")
        self.config = config
        # A site's own thresholds on every request, in place of the model's; chosen on this model's scores only
        self.site = site
        if site is not None:
            site.check_model(config.model_name, config.model_version)
        # The filter's threshold is the one its folder carries, as for the U-Net's and the classifier's, unless the
        # configuration overrides it
        self.frontal_threshold = (projection.operating_threshold if config.frontal_threshold is None
                                  else float(config.frontal_threshold))
        expected = tuple(projection.model.input_shape[1:3])
        if None not in expected and expected != (config.filter_size, config.filter_size):
            raise ValueError(f"the projection filter takes {expected[0]}x{expected[1]} px images, the configuration "
                             f"reads {config.filter_size} px for it (Config.projection_size)")
        self.mask_rules = lungs.MaskRules(threshold=unet.operating_threshold, min_area=config.min_area,
                                          max_area=config.max_area)

    @classmethod
    def load(cls, artifacts: Mapping[str, str]) -> Pipeline:
        """From the artifact paths of a logged model (or any mapping with the same keys); warms the models up. A site's
        thresholds file (``$COVIDCXR_SITE``) is read and checked against the configuration before any network loads."""
        missing = [k for k in (*COMPONENTS, CONFIG_ARTIFACT) if k not in artifacts]
        if missing:
            raise ValueError(f"serving artifacts lack {missing}")
        config = Config.load(artifacts[CONFIG_ARTIFACT])
        # A site file that is unreadable or another model's stops the start now, not after seconds of loading networks
        site = sites.from_env()
        if site is not None:
            site.check_model(config.model_name, config.model_version)
        from covidcxr import models  # here, not at import: a client of a server (pacs --url, monitor) needs no Keras

        parts = {name: models.Component.load(artifacts[name]) for name in COMPONENTS}
        pipeline = cls(parts["projection"], parts["unet"], parts["classifier"], config,
                       prediction_log=predlog.open_log(config.prediction_log), site=site)
        pipeline.warm_up()
        return pipeline

    def warm_up(self) -> None:
        """Build every predict function once, so the first request is not slow and threads never race to build."""
        for part, size in ((self.projection, self.config.filter_size), (self.unet, self.config.size),
                           (self.classifier, self.config.size)):
            blank = np.zeros((1, size, size), dtype=np.float32)
            blank[:, ::2] = 1.0
            part(blank)

    def score(self, images: Sequence[object], *, explain: bool = False, threshold: float | None = None,
              ood_threshold: float | None = None) -> list[dict]:
        """One entry per image (same order) for base64 ``images``; see the module docstring. ``threshold`` and
        ``ood_threshold`` replace the model's (a site's own, from ``covidcxr calibrate-site``), unless the pipeline
        applies a site's thresholds to every request (``site``), which then refuses them."""
        cfg = self.config
        if len(images) > cfg.limits.max_images:
            raise invalid_request(f"the request holds {len(images)} images; at most {cfg.limits.max_images} per "
                                  "request (send several requests)")
        if self.site is not None:
            if threshold is not None or ood_threshold is not None:
                raise invalid_request(f"this server applies the site's own thresholds (${sites.ENV}) to every "
                                      "request: params 'threshold' and 'ood_threshold' are refused")
            threshold, ood_threshold = self.site.threshold, self.site.ood_threshold
        used = self.threshold if threshold is None else check_threshold(threshold)
        ood_limit = None if ood_threshold is None else check_ood_threshold(ood_threshold)
        detector = self.classifier.ood
        ood_used = None if detector is None else detector.threshold if ood_limit is None else ood_limit
        # Whose values were applied: an ood_threshold for a model without a detector replaces nothing
        replaced = threshold is not None or (ood_limit is not None and detector is not None)
        source = "model" if not replaced else "site" if self.site is not None else "request"
        entries = [dict.fromkeys(FIELDS) | {"accepted": False, "threshold": used, "ood_threshold": ood_used,
                                            "thresholds_from": source, "model_name": cfg.model_name,
                                            "model_version": cfg.model_version,
                                            "max_images": cfg.limits.max_images}
                   for _ in images]
        if explain:
            for entry in entries:
                entry[GRADCAM_FIELD] = None
        when, started = predlog.now(), time.monotonic()
        work, for_filter, display, views = self._read_all(images, entries, keep_display=explain)
        frontal = self._project(for_filter, entries, views)
        masks = self._segment(work, frontal, entries)
        compact: dict[int, list[float]] = {}
        scored = self._classify(work, masks, entries, used, compact, ood_used)
        if explain and scored:
            self._explain(work, masks, display, scored, entries)
        reasons = Counter(e["reason"] for e in entries if not e["accepted"])
        log.info("scored %d image(s): %d accepted, refused %s", len(entries), len(scored),
                 dict(sorted(reasons.items())))
        if self.prediction_log is not None and not all(image == probe_image() for image in images):
            if self._past_timeout(len(entries), time.monotonic() - started):
                return entries
            try:
                self.prediction_log.append(predlog.records(
                    entries, {i: predlog.intensity_stats(w) for i, w in work.items()}, compact, when=when,
                    model_name=cfg.model_name, model_version=cfg.model_version))
            except Exception as exc:  # noqa: BLE001 - the log never fails a request
                log.error("prediction log: records not built (%s)", type(exc).__name__)
        return entries

    def _past_timeout(self, n: int, elapsed: float) -> bool:
        """Whether the scoring server has answered this request HTTP 504 by now (scored for ``elapsed`` seconds, past
        its timeout), so that its ``n`` records are not logged: the client never got these answers, and a retry would
        log the same images again. Counted and logged as a warning."""
        limit = server_timeout()
        if limit is None or elapsed < limit:
            return False
        with self._counting:
            self.undelivered += n
            total = self.undelivered
        log.warning("prediction log: %d record(s) not logged: scored in %.1f s, past the scoring server's timeout of "
                    "%g s (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT), which answered the client HTTP 504; %d so far",
                    n, elapsed, limit, total)
        return True

    def _read_all(self, images: Sequence[object], entries: list[dict], *, keep_display: bool):
        cfg = self.config
        work: dict[int, np.ndarray] = {}
        for_filter: dict[int, np.ndarray] = {}  # the projection filter's working images, when its size differs
        display: dict[int, np.ndarray] = {}
        views: dict[int, object] = {}
        for i, value in enumerate(images):
            try:
                data = decode_field(value, i, cfg.limits.max_image_bytes)
                read = dict(max_pixels=cfg.limits.max_pixels, name=f"image[{i}]")
                image, pixels, header = preprocess.read_working_image(data, cfg.size, **read)  # as the cache stage
                check_plausible(pixels, header, i, cfg.max_aspect)
                check_intended_use(header, i, cfg.min_age)
                filter_image = None
                if cfg.filter_size != cfg.size:  # as the cache_projection stage reads the file at its size
                    # A decode not reduced for the smaller size is not reduced for a larger one: the same pixels.
                    same = cfg.filter_size > cfg.size and not io.is_reduced(pixels, header)
                    filter_image = (preprocess.working_image(pixels, cfg.filter_size) if same
                                    else preprocess.read_working_image(data, cfg.filter_size, **read)[0])
                shown = None
                if keep_display:  # the overlay a person reads is drawn on the full-resolution image
                    full = io.read_image(data, **read)[0] if io.is_reduced(pixels, header) else pixels
                    from covidcxr import gradcam

                    shown = gradcam.display_image(full, DISPLAY_SIZE)
                # Only an image whose every step succeeded goes on: one refused below must not reach the networks
                work[i], views[i] = image, header.get("view_position")
                if filter_image is not None:
                    for_filter[i] = filter_image
                if shown is not None:
                    display[i] = shown
            except Refused as refusal:
                refuse(entries[i], refusal.reason, refusal.message)
            except io.ImageReadError as err:
                reason = err.reason if err.reason in REASONS else "unreadable"
                refuse(entries[i], reason, str(err))
            except MemoryError:  # the server's state, not the file's size (too_large: over the limits)
                refuse(entries[i], "out_of_memory", f"image[{i}] needs more memory than the server has now")
            except Exception as exc:  # noqa: BLE001 - one image's failure must not fail the batch
                log.error("image[%d]: unexpected %s while reading", i, type(exc).__name__)
                log.debug("image[%d] traceback", i, exc_info=True)
                refuse(entries[i], "internal_error", f"image[{i}]: internal error ({type(exc).__name__})")
        return work, (for_filter if cfg.filter_size != cfg.size else work), display, views

    def _project(self, work: dict[int, np.ndarray], entries: list[dict], views: dict[int, object]) -> list[int]:
        order = sorted(work)
        if not order:
            return []
        from covidcxr import models

        p_frontal, like_lateral = models.frontal_evidence(self.projection, np.stack([work[i] for i in order]))
        called, decided_by = projection.decide(p_frontal, [views[i] for i in order], self.frontal_threshold,
                                               like_lateral)
        frontal = []
        for i, p, view, by in zip(order, p_frontal.tolist(), called, decided_by):
            is_frontal = view == "frontal"
            entries[i]["projection"] = view
            entries[i]["projection_probability"] = round(p if is_frontal else 1.0 - p, 6)
            if is_frontal:
                frontal.append(i)
            elif by == projection.BY_HEADER:
                refuse(entries[i], "lateral_view", f"image[{i}]: the DICOM view position is lateral")
            else:
                refuse(entries[i], "lateral_view", f"image[{i}]: the projection filter calls it lateral "
                                                   f"(P(frontal) = {p:.3f} < {self.frontal_threshold:g})")
        return frontal

    def _segment(self, work: dict[int, np.ndarray], frontal: list[int], entries: list[dict]) -> dict[int, np.ndarray]:
        if not frontal:
            return {}
        masks, areas, reasons = lungs.masks(self.unet(np.stack([work[i] for i in frontal])), self.mask_rules)
        usable = {}
        for i, mask, area, reason in zip(frontal, masks, areas.tolist(), reasons):
            entries[i]["lung_area_fraction"] = round(area, 6)
            if reason is None:
                usable[i] = mask
            else:
                refuse(entries[i], reason, f"image[{i}]: {self.mask_rules.message(reason, area)}")
        return usable

    def _classify(self, work: dict[int, np.ndarray], masks: dict[int, np.ndarray], entries: list[dict],
                  threshold: float, compact: dict[int, list[float]], ood_threshold: float | None) -> list[int]:
        """Probability, label and OOD score of each masked image; returns those accepted (``compact``: their
        compact feature vectors, for the prediction log; ``ood_threshold``: the one in force, the detector's or the
        request's)."""
        order = sorted(masks)
        if not order:
            return []
        images, lung_masks = np.stack([work[i] for i in order]), np.stack([masks[i] for i in order])
        from covidcxr import models

        p_covid, scored = models.classifier_evidence(self.classifier, images, lung_masks, self.config.variant)
        for i, p in zip(order, p_covid.tolist()):  # rounded: the label follows from the probability shown
            entries[i].update(accepted=True, covid_probability=p, label=decide_label(p, threshold))
        if scored is None:  # a classifier folder without a detector
            return order
        accepted = []
        for i, score, vector in zip(order, scored.score.tolist(), scored.compact.tolist()):
            entries[i]["ood_score"], compact[i] = score, vector
            if not ood.is_out(score, ood_threshold):
                accepted.append(i)
                continue
            message = (f"image[{i}]: out of distribution (OOD score {score:g} > threshold {ood_threshold:g}): "
                       "unlike the images the model was trained on")
            if self.config.ood_action == "flag":  # answered, with the flag
                entries[i].update(reason="out_of_distribution", message=message + "; the answer may be unreliable")
                accepted.append(i)
            else:
                refuse(entries[i], "out_of_distribution", message)
        return accepted

    def _explain(self, work: dict[int, np.ndarray], masks: dict[int, np.ndarray], display: dict[int, np.ndarray],
                 order: list[int], entries: list[dict]) -> None:
        prepared = self.classifier.prepare(np.stack([work[i] for i in order]), np.stack([masks[i] for i in order]),
                                           self.config.variant)
        called = np.array([entries[i]["label"] == "covid" for i in order])  # each map explains the call made
        from covidcxr import gradcam

        heat = gradcam.heat_maps(self.classifier, prepared.images, called)
        heat = preprocess.place_in_box(heat, prepared.boxes, heat.shape[1:])  # a lung crop's map, on the whole image
        for i, h in zip(order, heat):
            entries[i][GRADCAM_FIELD] = png_base64(gradcam.overlay(display[i], h))


def decide_label(probability: float, threshold: float) -> str:
    """``covid`` when the probability reaches the threshold, else ``negative``."""
    return "covid" if probability >= threshold else "negative"


def refuse(entry: dict, reason: str, message: str) -> None:
    entry.update(accepted=False, reason=reason, message=message, covid_probability=None, label=None)


def check_threshold(value: object) -> float:
    """A request's ``threshold`` param (:func:`covidcxr.metrics.check_threshold`); HTTP 400 otherwise."""
    try:
        return metrics.check_threshold(value, "param 'threshold'")
    except ValueError as err:
        raise invalid_request(str(err)) from None


def check_ood_threshold(value: object) -> float:
    """A request's ``ood_threshold`` param (:func:`covidcxr.metrics.check_ood_threshold`); HTTP 400 otherwise."""
    try:
        return metrics.check_ood_threshold(value, "param 'ood_threshold'")
    except ValueError as err:
        raise invalid_request(str(err)) from None


def images_from_input(model_input: object) -> list:
    """The ``image`` values of what the pyfunc receives: a DataFrame, a ``{"image": [...]}`` dict, or a list."""
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN not in model_input.columns:
            columns = list(map(str, model_input.columns))
            raise invalid_request(f"the request needs an '{INPUT_COLUMN}' column; got {columns}")
        values = model_input[INPUT_COLUMN].tolist()
    elif isinstance(model_input, Mapping):
        if INPUT_COLUMN not in model_input:
            raise invalid_request(f"the request needs an '{INPUT_COLUMN}' field; got {sorted(map(str, model_input))}")
        values = model_input[INPUT_COLUMN]
        values = values.tolist() if isinstance(values, np.ndarray) else values
        values = list(values) if isinstance(values, (list, tuple)) else [values]
    elif isinstance(model_input, (list, tuple, np.ndarray)):
        values = [v.get(INPUT_COLUMN) if isinstance(v, Mapping) else v for v in list(model_input)]
    else:
        raise invalid_request(f"unsupported input of type {type(model_input).__name__}: send "
                              f'{{"dataframe_records": [{{"{INPUT_COLUMN}": "<base64>"}}]}}')
    return [v.item() if isinstance(v, np.generic) else v for v in values]


def signature():
    """The model signature: one string column ``image``; params ``explain``, ``threshold`` and ``ood_threshold``; the
    entry fields."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    outputs = Schema([
        ColSpec("boolean", "accepted"), ColSpec("string", "reason", required=False),
        ColSpec("string", "message", required=False), ColSpec("string", "projection", required=False),
        ColSpec("double", "projection_probability", required=False),
        ColSpec("double", "lung_area_fraction", required=False),
        ColSpec("double", "covid_probability", required=False), ColSpec("string", "label", required=False),
        ColSpec("double", "ood_score", required=False), ColSpec("double", "ood_threshold", required=False),
        ColSpec("double", "threshold"), ColSpec("string", "thresholds_from"),
        ColSpec("string", "model_name"), ColSpec("string", "model_version"), ColSpec("long", "max_images"),
        ColSpec("string", GRADCAM_FIELD, required=False),
    ])
    params = ParamSchema([ParamSpec("explain", "boolean", False), ParamSpec("threshold", "double", None),
                          ParamSpec("ood_threshold", "double", None)])
    return ModelSignature(inputs=Schema([ColSpec("string", INPUT_COLUMN)]), outputs=outputs, params=params)


class CovidCxrModel(mlflow.pyfunc.PythonModel):
    """The pyfunc: Keras models loaded once in ``load_context``; ``predict`` returns one dict per image."""

    def load_context(self, context) -> None:
        self.pipeline = Pipeline.load(context.artifacts)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[dict]:
        params = dict(params or {})
        unknown = sorted(set(params) - {"explain", "threshold", "ood_threshold"})
        if unknown:
            raise invalid_request(f"unknown params {unknown}: the model takes 'explain', 'threshold' and "
                                  "'ood_threshold'")
        explain = params.get("explain", False)
        if not isinstance(explain, (bool, np.bool_)):
            raise invalid_request(f"param 'explain' must be true or false, got {explain!r}")
        images = images_from_input(model_input)
        try:
            return self.pipeline.score(images, explain=bool(explain), threshold=params.get("threshold"),
                                       ood_threshold=params.get("ood_threshold"))
        except MlflowException:
            raise
        except Exception as exc:  # noqa: BLE001 - a server bug answers 500 without a stack trace or request data
            log.error("scoring failed: %s", type(exc).__name__)
            log.debug("scoring traceback", exc_info=True)
            raise ServingError(f"internal error while scoring ({type(exc).__name__}); see the server log",
                               error_code=INTERNAL_ERROR) from None


@functools.cache
def probe_image() -> str:
    """A blank 16 x 16 PNG, base64: every pipeline refuses it as ``zero_variance`` before any network runs, so a
    request with it asks a scorer what it would answer (its model version, whether it takes a param) at no cost. A
    request of probes only is not a served prediction: it leaves no record in the prediction log."""
    from PIL import Image

    buffer = _bytes_io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


#: What a model says of itself in every entry (a model from before an entry carried one of them answers None for it).
ABOUT_FIELDS: tuple[str, ...] = ("model_name", "model_version", "max_images")


def probe(score: Scorer) -> dict:
    """What the model behind ``score`` says of itself (:data:`ABOUT_FIELDS`): it stamps every entry, even of an image
    it refuses unread."""
    [entry] = score([probe_image()], {"explain": False})
    return {key: entry.get(key) for key in ABOUT_FIELDS}


def request_size(about: Mapping, batch_size: int) -> int:
    """Images per request for a client that wants ``batch_size``: no more than the model takes (``about``: its
    :func:`probe`; a model served before answers gave ``max_images`` is held to the default limit)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    limit = about.get("max_images")
    if limit is None:
        limit = Limits().max_images
        log.warning("the model does not say how many images a request may hold (one served before answers said "
                    "so): requests of at most %d, the default limit", limit)
    if batch_size > int(limit):
        log.info("requests of %d images: the model takes at most %d a request (batch size %d)", limit, limit,
                 batch_size)
    return min(int(batch_size), int(limit))


def encode_file(path: str | os.PathLike) -> str:
    """A file's bytes as the base64 string a request carries."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


# --- scoring through the pyfunc, in this process or on a server ------------------------------------------------

#: Base64 files and the pyfunc's params in, one entry per file out: ``CovidCxrModel.predict``, here or served.
Scorer = Callable[[list[str], dict], list[dict]]


#: The longest wait a Retry-After header is granted (seconds): a server asking for more is asked again sooner.
MAX_RETRY_AFTER = 120.0


class ScoringError(RuntimeError):
    """A served model answered an error: ``endpoint`` (no credentials), HTTP ``status``, the server's ``detail`` and
    the seconds its Retry-After asked to wait before sending the request again (:func:`retry_after`; None without
    one)."""

    def __init__(self, endpoint: str, status: int, detail: str, retry_after: float | None = None) -> None:
        super().__init__(f"{endpoint} answered {status}: {detail[:500]}")
        self.endpoint, self.status, self.detail, self.retry_after = endpoint, status, detail, retry_after


def retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """The seconds a Retry-After header asks to wait (delay seconds or an HTTP date), at most
    :data:`MAX_RETRY_AFTER`; None when it is absent or unreadable (the caller's backoff applies). The one reading of
    it, for the scorer's answers and the PACS's (:mod:`covidcxr.pacs`)."""
    import email.utils

    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        seconds = (when - (now or dt.datetime.now(dt.UTC))).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def local_scorer(model_uri: str) -> Scorer:
    """Score with the model loaded here (``models:/NAME@ALIAS``, a run or a path), as the server does."""
    model = mlflow.pyfunc.load_model(model_uri)

    def score(images: list[str], params: dict) -> list[dict]:
        return model.predict(pd.DataFrame({INPUT_COLUMN: images}), params=params)

    return score


def remote_scorer(url: str, timeout: float) -> Scorer:
    """Score by POSTing to a served model's ``/invocations`` (``mlflow models serve``); raises :class:`ScoringError`.
    The requests never go through the environment's proxy (``http_proxy`` applies even to 127.0.0.1 unless
    ``no_proxy`` lists it): they carry whole image files, patient identifiers in their headers."""
    import urllib.error
    import urllib.request

    from covidcxr.tracking import public_uri

    base = url.rstrip("/")
    endpoint = base if base.endswith("/invocations") else base + "/invocations"
    shown = public_uri(endpoint)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def score(images: list[str], params: dict) -> list[dict]:
        body = json.dumps({"dataframe_records": [{INPUT_COLUMN: b} for b in images], "params": params}).encode()
        request = urllib.request.Request(endpoint, data=body, headers={"Content-Type": "application/json"})
        try:
            with opener.open(request, timeout=timeout) as response:
                return json.loads(response.read())["predictions"]
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail).get("message", detail)
            except ValueError:
                pass
            wait = retry_after((err.headers or {}).get("Retry-After"))  # a 429's or 503's, from it or its proxy
            raise ScoringError(shown, err.code, detail, wait) from None

    return score
