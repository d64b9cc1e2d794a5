"""The classifier stage's operating threshold: one serving can apply, or the stage stops naming the model folder; the
films it trains and scores, and those serving refuses before the classifier, with serving's reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidcxr import lungs, serving
from pipelines import _common, _models
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


def test_the_films_serving_refuses_before_the_classifier_are_kept_with_serving_s_reason(tmp_path, monkeypatch):
    """A film the projection rule does not call frontal is refused by serving as ``lateral_view`` (segment flags it
    ``not_frontal``), a failed lung mask by the mask rule's own code: ``usable`` returns those films with that reason
    (they were only counted), so that `evaluate` counts them in what serving answers."""
    monkeypatch.chdir(tmp_path)
    table = pd.DataFrame({"image_id": ["a", "b", "c", "d"], "patient_id": ["demo:1", "demo:2", "demo:3", "demo:4"],
                          "label": ["covid", "negative", "negative", "covid"],
                          "split": ["test", "test", "val", "train"]})
    Path(_common.split_table("covid")).parent.mkdir(parents=True)
    table.to_csv(_common.split_table("covid"), index=False)
    Path(_common.MASKS_INDEX).parent.mkdir(parents=True)
    flags = pd.DataFrame({"image_id": ["d", "c", "b", "a", "x"], "lung_area_fraction": [0.3, 0.9, 0.0, 0.0, 0.3],
                          "flag": ["", "lung_mask_too_large", "not_frontal", "empty_lung_mask", ""]})
    flags.to_csv(_common.MASKS_INDEX, index=False)
    kept, refused = _models.usable()
    assert kept.to_dict("list") == table[table["image_id"] == "d"].reset_index(drop=True).to_dict("list")
    assert refused.to_dict("list") == {**table.iloc[:3].to_dict("list"),
                                       "reason": ["empty_lung_mask", "lateral_view", "lung_mask_too_large"]}
    assert {_models.LATERAL_VIEW, *lungs.REASONS} <= set(serving.REASONS)  # every reason one serving answers with

    flags.iloc[1:].to_csv(_common.MASKS_INDEX, index=False)  # masks older than the split: d has none
    with pytest.raises(ValueError, match=r"artifacts/masks/index\.csv: no row for 1 of the 4 images of "
                                         r"artifacts/splits/covid\.csv; .* rerun the segment stage"):
        _models.usable()
