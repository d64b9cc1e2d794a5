"""The projection rule: which images count as frontal, for the `filter_frontal` stage and for serving alike.

A DICOM file's own View Position (0018,5101) decides when it names a projection; otherwise the projection filter: its
probability of frontal against the threshold, and, for a filter saved with one, its lateral check. The check is a
Mahalanobis detector (:class:`covidcxr.ood.MahalanobisDetector`) of the filter's features fitted on its training
laterals, its threshold a quantile of the validation laterals' scores: an image the network calls lateral but whose
features lie outside every lateral the filter learned (a child's frontal film, a hospital it never saw) is kept as
frontal. A lateral needs positive evidence, since every refusal is a usable image lost, and the corpus's laterals are
few (tens) and come from one collection. Each decision says which of the three made it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from covidcxr.manifest import projection_from_view

BY_HEADER, BY_MODEL, BY_CHECK = "view_position", "model", "lateral_check"


def decide(p_frontal: np.ndarray, header_views: Sequence[object] | None, threshold: float,
           like_lateral: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(projection, decided_by)`` per image: ``frontal``/``lateral``, and ``view_position``, ``model`` or
    ``lateral_check`` (the network said lateral, the check kept it as frontal).

    ``header_views`` holds each file's DICOM View Position (None or empty where the file has none); None for all.
    ``like_lateral``: per image, whether the filter's lateral check finds it within its training laterals
    (:func:`covidcxr.models.frontal_evidence`); None (a filter without a check): the network alone decides.
    """
    p_frontal = np.asarray(p_frontal, dtype=np.float64).ravel()
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"frontal threshold must be in [0, 1], got {threshold}")
    views = [None] * len(p_frontal) if header_views is None else list(header_views)
    if len(views) != len(p_frontal):
        raise ValueError(f"{len(views)} view positions for {len(p_frontal)} probabilities")
    like = np.ones(len(p_frontal), dtype=bool) if like_lateral is None else np.asarray(like_lateral, dtype=bool).ravel()
    if len(like) != len(p_frontal):
        raise ValueError(f"{len(like)} lateral checks for {len(p_frontal)} probabilities")
    from_header = np.array([projection_from_view(v) for v in views], dtype=object)
    known = from_header != "unknown"
    network_lateral = p_frontal < threshold
    by_model = np.where(network_lateral & like, "lateral", "frontal")
    projection = np.where(known, from_header, by_model).astype(object)
    decided_by = np.where(known, BY_HEADER, np.where(network_lateral & ~like, BY_CHECK, BY_MODEL)).astype(object)
    return projection, decided_by
