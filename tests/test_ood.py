"""The out-of-distribution detector: the fitted state, its quantile threshold, the model folder, and serving's use."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from mlflow.exceptions import MlflowException

from covidcxr import folders, models, ood, preprocess, serving, sites
from tests.helpers import SIZE, build_bundle, phantom, png_b64


def gaussian(n: int, seed: int, shift: float = 0.0, dims: int = 24) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(dims, dims)) / np.sqrt(dims)  # correlated features
    x = rng.normal(size=(n, dims)) @ mixing + shift
    x[:, :4] = 0.0  # dead ReLU units: a singular covariance the shrinkage must handle
    return x


def test_threshold_is_the_validation_quantile_and_unseen_in_distribution_data_is_refused_at_about_its_rate():
    detector = ood.MahalanobisDetector(n_components=8, quantile=0.9).fit(gaussian(400, 0))
    detector.calibrate(detector.score(gaussian(300, 1)))
    assert 0.0 < detector.shrinkage_ < 1.0 and np.isfinite(detector.precision_).all()
    assert np.isclose(np.mean(detector.score(gaussian(300, 1)) <= detector.threshold), 0.9, atol=0.01)
    refused = detector.is_out(detector.score(gaussian(3000, 2))).mean()
    assert 0.05 < refused < 0.16  # about 1 - quantile on unseen data of the same distribution
    assert detector.is_out(detector.score(gaussian(200, 3, shift=1.5))).mean() > 0.95
    compact = detector.project(gaussian(5, 4))
    assert compact.shape == (5, 8) and np.allclose(compact, np.round(compact, ood.COMPACT_DECIMALS))


def test_state_round_trips_exactly_and_errors_say_what_is_missing(tmp_path):
    with pytest.raises(RuntimeError, match="fit on training features"):
        ood.MahalanobisDetector().score(gaussian(3, 0))
    detector = ood.MahalanobisDetector(n_components=40).fit(gaussian(30, 0))
    assert detector.components_.shape == (24, 24)  # no more components than features
    with pytest.raises(RuntimeError, match="calibrate"):
        detector.save(tmp_path / "ood.npz")
    detector.calibrate(detector.score(gaussian(20, 1)))
    detector.save(tmp_path / "ood.npz")
    loaded = ood.MahalanobisDetector.load(tmp_path / "ood.npz")
    x = gaussian(50, 5, shift=0.3)
    assert np.array_equal(loaded.score(x), detector.score(x)) and np.array_equal(loaded.project(x), detector.project(x))
    assert loaded.threshold == detector.threshold
    with pytest.raises(ValueError, match=r"\[N, 24\]"):
        loaded.score(x[:, :5])
    (tmp_path / "bad.npz").write_text('{"method": "mahalanobis-ledoit-wolf"}')
    with pytest.raises(ValueError, match="bad.npz: not a valid OOD detector"):
        ood.MahalanobisDetector.load(tmp_path / "bad.npz")
    assert loaded.summary()["n_features"] == 24 and 0 < loaded.summary()["shrinkage"] < 1
    with pytest.raises(ValueError, match="at least 2"):
        ood.MahalanobisDetector().fit(gaussian(1, 0))


def _classifier_with_detector(folder, train: np.ndarray, masks: np.ndarray, quantile: float = 0.95):
    keras.utils.set_random_seed(0)
    net = models.build_vgg(16, (SIZE, SIZE, 1), width=1 / 32, head=(6,))
    component = models.Component(net, preprocess.Standardizer().fit(train), threshold={"threshold": 0.5},
                                 info={"run_id": "test"})
    features = models.ood_features(component, train, masks, "c")
    component.ood = ood.MahalanobisDetector(n_components=4, quantile=quantile).fit(features)
    component.ood.calibrate(component.ood.score(features))
    component.save(folder)
    return component


def test_features_pool_every_block_and_the_penultimate_layer_and_travel_with_the_model_folder(tmp_path):
    train = np.stack([preprocess.resize(phantom(seed=s), SIZE) for s in range(8)])
    masks = np.ones_like(train, dtype=bool)
    component = _classifier_with_detector(tmp_path / "classifier", train, masks)
    features = models.ood_features(component, train, masks, "c")
    net, x = component.model, component.inputs(train)
    blocks = [np.asarray(keras.Model(net.inputs[0], net.get_layer(f"block{b}_pool").input)(x)).mean(axis=(1, 2))
              for b in range(1, 6)]
    penultimate = np.asarray(keras.Model(net.inputs[0], net.get_layer("logits").input)(x, training=False))
    widths = [2, 4, 8, 16, 16, 6]  # the VGG16 blocks at width 1/32, then the head's last layer
    assert features.shape == (8, sum(widths)) and np.allclose(features, np.hstack([*blocks, penultimate]), atol=1e-5)

    assert folders.OOD_FILE in folders.FOLDER_FILES and (tmp_path / "classifier" / folders.OOD_FILE).is_file()
    loaded = models.Component.load(tmp_path / "classifier")
    scored = models.out_of_distribution(loaded, train, masks, "c")
    assert np.array_equal(scored.score, component.ood.score(features)) and scored.compact.shape == (8, 4)
    loaded.ood = None  # a folder without ood.npz: no score, no error
    assert models.out_of_distribution(loaded, train, masks, "c") is None
    assert models.ood_features(loaded, train[:0], masks[:0], "c").shape == (0, sum(widths))


@pytest.mark.parametrize("action", ["refuse", "flag"])
def test_serving_refuses_or_flags_images_above_the_threshold_and_scores_every_accepted_one(tmp_path, action):
    bundle = build_bundle(tmp_path, variant="c", ood_action=action)
    pipeline = serving.Pipeline.load(bundle)
    images = [png_b64(phantom(seed=s)) for s in range(4)]
    pipeline.classifier.ood = None
    assert all(e["accepted"] and e["ood_score"] is None for e in pipeline.score(images))

    work = np.stack([preprocess.resize(phantom(seed=s), SIZE) for s in range(6)])
    pipeline.classifier.ood = ood.MahalanobisDetector(n_components=2).fit(
        models.ood_features(pipeline.classifier, work, np.ones_like(work, bool), "c"))
    pipeline.classifier.ood.calibrate([1e9])  # nothing is out of distribution
    entries = pipeline.score(images)
    assert all(e["accepted"] and e["reason"] is None and e["ood_score"] >= 0 for e in entries)
    pipeline.classifier.ood.threshold_ = -1.0  # everything is
    entries = pipeline.score(images + ["not base64!"])
    assert entries[-1]["reason"] == "invalid_base64" and entries[-1]["ood_score"] is None
    for entry in entries[:-1]:
        assert entry["reason"] == "out_of_distribution" and entry["ood_score"] > -1.0
        assert "out of distribution" in entry["message"] and "image[" in entry["message"]
        if action == "refuse":
            assert not entry["accepted"] and entry["covid_probability"] is None and entry["label"] is None
        else:
            assert entry["accepted"] and entry["label"] in ("covid", "negative")
    assert "out_of_distribution" in serving.REASONS and "ood_score" in serving.FIELDS
    # the published output schema is the entry: the fields, and the overlay when asked
    assert serving.signature().outputs.input_names() == [*serving.FIELDS, serving.GRADCAM_FIELD]


def test_config_takes_the_ood_action_and_refuses_a_log_url_with_a_password():
    with pytest.raises(ValueError, match="ood_action"):
        serving.Config(size=32, variant="c", ood_action="ignore")
    with pytest.raises(ValueError, match="PGPASSWORD") as err:
        serving.Config(size=32, variant="c", prediction_log="postgresql://covidcxr:s3cret@db/log")
    assert "s3cret" not in str(err.value)
    old = {"size": 32, "variant": "c", "limits": {}}  # a config registered before these fields existed
    assert serving.Config.from_dict(old).ood_action == "refuse" and serving.Config.from_dict(old).prediction_log is None


def test_a_request_s_ood_threshold_replaces_the_detector_s_and_every_entry_says_which_decided(tmp_path):
    """A site that admits its own films (``covidcxr calibrate-site --admit``) sends its OOD threshold with each
    request: films between the model's and the site's threshold are answered, films above both still refused."""
    pipeline = serving.Pipeline.load(build_bundle(tmp_path, variant="c"))
    images = [png_b64(phantom(seed=s)) for s in range(4)]
    work = np.stack([preprocess.resize(phantom(seed=s), SIZE) for s in range(6)])
    pipeline.classifier.ood = ood.MahalanobisDetector(n_components=2).fit(
        models.ood_features(pipeline.classifier, work, np.ones_like(work, bool), "c"))
    pipeline.classifier.ood.threshold_ = -1.0  # the model refuses every image
    refused = pipeline.score(images)
    assert all(e["reason"] == "out_of_distribution" and e["ood_threshold"] == -1.0 for e in refused)
    scores = sorted(e["ood_score"] for e in refused)
    site = sites.local_ood_threshold(scores[:2], pipeline.classifier.ood.threshold)  # the site labelled two of them
    assert site == scores[1]
    entries = pipeline.score(images, ood_threshold=site)
    for entry, before in zip(entries, refused, strict=True):
        assert entry["ood_threshold"] == site and entry["ood_score"] == before["ood_score"]
        assert entry["thresholds_from"] == "request" and entry["threshold"] == before["threshold"]  # only one replaced
        assert entry["accepted"] == (entry["ood_score"] <= site)
        assert entry["reason"] == (None if entry["accepted"] else "out_of_distribution")
        assert (entry["covid_probability"] is None) != entry["accepted"]
    assert sum(e["accepted"] for e in entries) == 2  # the two the site labelled; the two further out still refused
    for bad in (-0.5, float("nan"), float("inf"), "x"):
        with pytest.raises(MlflowException, match="ood_threshold"):
            pipeline.score(images, ood_threshold=bad)
    assert "ood_threshold" in [p.name for p in serving.signature().params.params]
    pipeline.classifier.ood = None  # no detector: nothing to replace, and the entries say so
    assert all(e["accepted"] and e["ood_threshold"] is None and e["thresholds_from"] == "model"
               for e in pipeline.score(images, ood_threshold=3.0))


def test_a_score_that_cannot_be_compared_is_out_of_distribution_everywhere():
    """A NaN score (a feature that overflowed) is refused by serving, so the stages (the detector's ``is_out``) count it
    refused too: evaluate's figures are what serving does."""
    rng = np.random.default_rng(0)
    detector = ood.MahalanobisDetector(n_components=2).fit(rng.normal(size=(50, 4)))
    detector.calibrate(detector.score(rng.normal(size=(30, 4))))
    scores = np.array([0.0, np.nan, detector.threshold, detector.threshold + 1])
    assert ood.is_out(scores, detector.threshold).tolist() == [False, True, False, True]
    assert detector.is_out(scores).tolist() == [False, True, False, True]
