"""The projection rule: which images count as frontal, for the `filter_frontal` stage and for serving alike.

A DICOM file's own View Position (0018,5101) decides when it names a projection; otherwise the projection filter's
probability of frontal against the threshold. Each decision says which of the two made it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from covidcxr.manifest import projection_from_view

BY_HEADER, BY_MODEL = "view_position", "model"


def decide(p_frontal: np.ndarray, header_views: Sequence[object] | None, threshold: float
           ) -> tuple[np.ndarray, np.ndarray]:
    """``(projection, decided_by)`` per image: ``frontal``/``lateral``, and ``view_position`` or ``model``.

    ``header_views`` holds each file's DICOM View Position (None or empty where the file has none); None for all.
    """
    p_frontal = np.asarray(p_frontal, dtype=np.float64).ravel()
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"frontal threshold must be in [0, 1], got {threshold}")
    views = [None] * len(p_frontal) if header_views is None else list(header_views)
    if len(views) != len(p_frontal):
        raise ValueError(f"{len(views)} view positions for {len(p_frontal)} probabilities")
    from_header = np.array([projection_from_view(v) for v in views], dtype=object)
    known = from_header != "unknown"
    by_model = np.where(p_frontal >= threshold, "frontal", "lateral")
    projection = np.where(known, from_header, by_model).astype(object)
    return projection, np.where(known, BY_HEADER, BY_MODEL).astype(object)
