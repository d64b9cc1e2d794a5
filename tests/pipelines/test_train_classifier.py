"""The classifier stage's operating threshold: one serving can apply, or the stage stops naming the model folder."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines import _common
from pipelines import train_classifier as stage

FOLDER = _common.model_dir("c", "vgg16")


@pytest.mark.parametrize(("objective", "min_sensitivity"), [("youden", 0.95), ("sensitivity", 1e-13)])
def test_a_threshold_above_one_stops_training_naming_the_model_folder(objective, min_sensitivity):
    """Scores that rank the validation images worse than chance, the top one rounded to 1.0: the objective's point
    lies just above it, a threshold above 1 that serving refuses at load, once the folder was saved and registered."""
    y = np.array([0, 0, 1, 1])
    scores = np.array([0.9, 1.0, 0.1, 0.2])
    p = {"threshold_objective": objective, "min_sensitivity": min_sensitivity}
    message = (rf"^{FOLDER}: the operating threshold must be in \[0, 1\], got 1\.0000000000000002: the {objective} "
               r"objective calls none of the 4 validation images COVID-19")
    with pytest.raises(ValueError, match=message):
        stage.choose_threshold(y, scores, p, FOLDER)


def test_a_threshold_serving_can_apply_is_the_objective_s_choice():
    y = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.9, 1.0])
    choice = stage.choose_threshold(y, scores, {"threshold_objective": "youden", "min_sensitivity": 0.95}, FOLDER)
    assert choice.threshold == 0.9 and (choice.sensitivity, choice.specificity) == (1.0, 1.0)
