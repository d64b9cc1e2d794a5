"""Lung masks from U-Net probabilities, and the quality rules that decide whether a mask may be used.

One set of rules and reason codes for the `segment` stage (which flags images) and for serving (which refuses them):
a mask is cleaned (threshold, the two largest components, holes filled), then its area share of the image must lie in
``[min_area, max_area]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Why a lung mask cannot be used (the `segment` stage's flags and the served ``reason`` alike).
REASONS: dict[str, str] = {
    "empty_lung_mask": "the U-Net finds (almost) no lung",
    "lung_mask_too_large": "the lung mask covers more of the image than a chest radiograph's lungs can",
}


@dataclass(frozen=True)
class MaskRules:
    """How a U-Net probability map becomes a usable lung mask: its threshold, components kept and area bounds."""

    threshold: float = 0.5
    min_area: float = 0.05
    max_area: float = 0.8
    keep: int = 2

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"mask threshold must be in (0, 1), got {self.threshold}")
        if not 0.0 <= self.min_area <= self.max_area <= 1.0:
            raise ValueError(f"need 0 <= min_area <= max_area <= 1, got {self.min_area}, {self.max_area}")
        if self.keep < 1:
            raise ValueError(f"keep must be at least 1 component, got {self.keep}")

    def reason(self, area: float) -> str | None:
        """The reason code of :data:`REASONS` for a mask covering ``area`` of the image, or None when it is usable."""
        if area < self.min_area:
            return "empty_lung_mask"
        if area > self.max_area:
            return "lung_mask_too_large"
        return None

    def message(self, reason: str, area: float) -> str:
        """A sentence for a refused mask (no PHI: numbers only)."""
        bound = f"minimum {self.min_area:.0%}" if reason == "empty_lung_mask" else f"maximum {self.max_area:.0%}"
        return f"the lung mask covers {area:.1%} of the image ({bound})"


def clean_mask(probabilities: np.ndarray, *, threshold: float = 0.5, keep: int = 2) -> np.ndarray:
    """Binary lung mask from U-Net output: threshold, keep the ``keep`` largest components, fill holes."""
    from scipy import ndimage

    binary = np.asarray(probabilities).squeeze() >= threshold
    labels, n = ndimage.label(binary)
    if n > keep:
        sizes = ndimage.sum(binary, labels, index=np.arange(1, n + 1))
        largest = np.argsort(sizes)[::-1][:keep] + 1
        binary = np.isin(labels, largest)
    return ndimage.binary_fill_holes(binary)


def masks(probabilities: np.ndarray, rules: MaskRules) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Cleaned masks ``[N, H, W]`` (bool), their area shares and each one's reason code (None: usable)."""
    probabilities = np.asarray(probabilities)
    if probabilities.ndim == 4:
        probabilities = probabilities[..., 0]
    out = np.zeros(probabilities.shape, dtype=bool)
    for i, p in enumerate(probabilities):
        out[i] = clean_mask(p, threshold=rules.threshold, keep=rules.keep)
    area = out.reshape(len(out), -1).mean(axis=1) if len(out) else np.zeros(0)
    return out, area, [rules.reason(float(a)) for a in area]


def cleaned(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """The masks `segment` and serving make of U-Net probabilities at ``threshold`` (:func:`masks`: the largest
    components, holes filled), as float32: what a mask threshold is chosen on, in training and in tuning alike."""
    return masks(probabilities, MaskRules(threshold=threshold))[0].astype(np.float32)
