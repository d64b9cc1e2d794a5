"""The projection rule: the DICOM view position first, then the filter's network, then its lateral check."""

from __future__ import annotations

import numpy as np
import pytest

from covidcxr import projection


def test_the_header_decides_first_then_the_network():
    called, by = projection.decide(np.array([0.9, 0.1, 0.1, 0.9]), ["LL", "PA", None, None], 0.5)
    assert list(called) == ["lateral", "frontal", "lateral", "frontal"]
    assert list(by) == ["view_position", "view_position", "model", "model"]


def test_a_lateral_needs_the_check_to_find_it_among_the_training_laterals():
    p = np.array([0.1, 0.1, 0.9, 0.9, 0.2])
    like = np.array([True, False, True, False, False])
    called, by = projection.decide(p, [None, None, None, None, "LATERAL"], 0.5, like)
    # network lateral and like a lateral: refused; unlike every lateral it learned: kept, and the check says so
    assert list(called) == ["lateral", "frontal", "frontal", "frontal", "lateral"]
    assert list(by) == ["model", "lateral_check", "model", "model", "view_position"]
    # without a check (a filter saved before it existed) the network alone decides, as before
    alone, by_alone = projection.decide(p, None, 0.5)
    assert list(alone) == ["lateral", "lateral", "frontal", "frontal", "lateral"] and set(by_alone) == {"model"}


def test_mismatched_lengths_are_errors():
    with pytest.raises(ValueError, match="2 lateral checks for 3 probabilities"):
        projection.decide(np.array([0.1, 0.2, 0.3]), None, 0.5, np.array([True, False]))
    with pytest.raises(ValueError, match="1 view positions for 2"):
        projection.decide(np.array([0.1, 0.2]), ["PA"], 0.5)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        projection.decide(np.array([0.1]), None, 1.5)
