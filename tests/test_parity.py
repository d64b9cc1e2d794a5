"""What is served is what was evaluated: for real DICOM, PNG and JPEG files, the served pyfunc's projection, lung
mask (its area) and COVID-19 probability equal what the stages' path computes with the same model
folders.

The stages' path, function by function: the cache (``preprocess.build_cache``), the projection rule
(``projection.decide`` on the file's own view position and the filter), the segment stage (``lungs.masks`` with the
U-Net folder's threshold) and the classifier's predictions (``models.covid_probability``).
"""

from __future__ import annotations

from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest

from covidcxr import io, lungs, models, preprocess, projection, serving
from covidcxr.calibration import PlattCalibrator
from covidcxr.ood import MahalanobisDetector

SIZE = 32
CONFIG = dict(size=SIZE, variant="d", frontal_threshold=0.0, min_area=0.0, max_area=1.0)  # every file scored


def real_files(root: Path) -> dict[str, Path]:
    return {
        "dicom-j2k": root / "dicom/RG1_J2KI.dcm",
        "dicom": root / "dicom/txv_chest_pa.dcm",
        "png": sorted((root / "montgomery_shenzhen/images").glob("*.png"))[3],
        "jpeg": sorted((root / "cohen/images").glob("*.jp*g"))[5],
    }


def crisp_unet(x: np.ndarray) -> keras.Model:
    """An untrained U-Net whose probabilities sit far from the threshold (its last kernel scaled up, its bias at the
    median logit of ``x``), so that no mask pixel is decided by float noise: a parity failure then means a different
    computation, not rounding."""
    keras.utils.set_random_seed(3)
    unet = models.build_unet(2, (SIZE, SIZE, 1), dropout_scale=0.0)
    last = unet.get_layer("mask")
    kernel, _ = last.get_weights()
    features = keras.Model(unet.inputs, last.input).predict(x[..., None], verbose=0)
    logits = features @ (kernel[0, 0] * 40.0)
    last.set_weights([kernel * 40.0, -np.median(logits, keepdims=False).reshape(1)])
    return unet


#: The classifier's input transform: the paper's input, and the robustness levers' lung crop with CLAHE.
INPUTS = {"paper": None, "crop-clahe": preprocess.InputTransform(crop=True, margin=0.1, intensity="clahe")}


@pytest.fixture(scope="module", params=sorted(INPUTS))
def folders(request, tmp_path_factory, real_data) -> dict[str, str]:
    """Model folders as the training stages write them (standardizers fitted on real working images), the classifier
    with each input transform of :data:`INPUTS`."""
    root = tmp_path_factory.mktemp("folders")
    keras.utils.set_random_seed(0)
    train = np.stack([preprocess.load_working_image(str(p), SIZE)[0]
                      for p in sorted((real_data / "montgomery_shenzhen/images").glob("*.png"))[:8]])
    std = preprocess.Standardizer().fit(train)
    vgg = dict(width=1 / 32, head=(4,))
    transform = INPUTS[request.param]
    unet = crisp_unet(std.transform(train))
    classifier_std = std
    if transform is not None:  # fitted on the classifier's own inputs, as train_classifier does
        masks = lungs.masks(unet.predict(std.transform(train)[..., None], verbose=0),
                            lungs.MaskRules(min_area=0.0, max_area=1.0))[0]
        classifier_std = preprocess.Standardizer().fit(transform.apply(train, masks, CONFIG["variant"]).images)
    projection_filter = models.Component(models.build_vgg(16, (SIZE, SIZE, 1), **vgg), std, info={"run_id": "p"})
    projection_filter.ood = MahalanobisDetector(n_components=2).fit(  # a lateral check, as train_projection fits one
        models.ood_features(projection_filter, train[:4], None, "c"))
    projection_filter.ood.calibrate(models.out_of_distribution(projection_filter, train[4:6], None, "c").score)
    parts = {
        "projection": projection_filter,
        "unet": models.Component(unet, std, info={"run_id": "u"}, threshold={"threshold": 0.5}),
        "classifier": models.Component(models.build_vgg(19, (SIZE, SIZE, 1), **vgg), classifier_std,
                                       info={"run_id": "c"}, threshold={"threshold": 0.42},
                                       calibrator=PlattCalibrator().fit([0, 1, 0, 1], [0.3, 0.9, 0.5, 0.6]),
                                       input_transform=transform),
    }
    out = {name: str(part.save(root / name)) for name, part in parts.items()}
    serving.Config(**CONFIG).save(root / "serving.json")
    return {**out, "config": str(root / "serving.json")}


def stages_path(files: list[Path], folders: dict[str, str]) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """What the cache, filter_frontal, segment and train_classifier stages compute for ``files``, with the cached
    images and the segment stage's masks (every area kept: ``CONFIG``'s limits) that the classifier read."""
    images, _, _ = preprocess.build_cache([str(f) for f in files], [None] * len(files), SIZE)
    images = images.astype(np.float32)  # as the stages load the cache
    views = [io.read_image(f)[1].get("view_position") for f in files]  # the manifest's header_view_position
    proj = models.Component.load(folders["projection"])
    p_frontal, like_lateral = models.frontal_evidence(proj, images)  # as filter_frontal does
    called, _ = projection.decide(p_frontal, views, CONFIG["frontal_threshold"], like_lateral)
    unet = models.Component.load(folders["unet"])
    rules = lungs.MaskRules(threshold=unet.operating_threshold, min_area=CONFIG["min_area"],
                            max_area=CONFIG["max_area"])
    masks, area, reasons = lungs.masks(unet(images), rules)
    p_covid = models.covid_probability(models.Component.load(folders["classifier"]), images, masks, CONFIG["variant"])
    answers = pd.DataFrame({"projection": called, "lung_area_fraction": area, "reason": reasons,
                            "covid_probability": p_covid, "mask_pixels": masks.reshape(len(files), -1).sum(axis=1)})
    return answers, images, masks


@pytest.fixture(scope="module")
def stages(folders, real_data) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """:func:`stages_path` on :func:`real_files`, once per model folders (each Component load and first call costs a
    second): the stages' answers, and the raw cached images and lung masks (every area kept) the tests feed the
    classifier directly. The arrays are read-only, so that no test can change what the next one reads."""
    expected, images, masks = stages_path(list(real_files(real_data).values()), folders)
    images.flags.writeable = masks.flags.writeable = False
    return expected, images, masks


def raw_inputs(stages: tuple[pd.DataFrame, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The cached images of :func:`real_files` and their U-Net masks (threshold of the folder, every area kept)."""
    return stages[1], stages[2]


def test_served_answers_equal_the_evaluated_ones(folders, stages, real_data, tmp_path):
    files = real_files(real_data)
    expected = stages[0]
    assert expected["mask_pixels"].between(1, SIZE * SIZE - 1).all()  # real masks, neither empty nor full

    mlflow.pyfunc.save_model(tmp_path / "model", python_model=serving.CovidCxrModel(), artifacts=folders,
                             signature=serving.signature(), pip_requirements=["mlflow"])
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    served = pd.DataFrame(model.predict(pd.DataFrame({"image": [serving.encode_file(f) for f in files.values()]})))

    assert served["accepted"].all(), served[["reason", "message"]]
    assert list(served["projection"]) == list(expected["projection"])
    np.testing.assert_allclose(served["lung_area_fraction"], expected["lung_area_fraction"], atol=1e-6)
    np.testing.assert_allclose(served["covid_probability"], expected["covid_probability"], atol=2e-6)
    classifier = models.Component.load(folders["classifier"])
    raw = models.covid_probability(classifier, *raw_inputs(stages), CONFIG["variant"], calibrated=False)
    assert np.abs(raw - served["covid_probability"]).max() > 1e-3  # the served probability is the calibrated one
    assert (served["label"] == np.where(served["covid_probability"] >= 0.42, "covid", "negative")).all()
    if classifier.input_transform is not None:  # the input transform changed what the network saw: not the paper's
        plain = classifier  # the same folder without its input transform
        plain.input_transform = None
        images, masks = raw_inputs(stages)
        assert np.abs(models.covid_probability(plain, images, masks, CONFIG["variant"])
                      - served["covid_probability"]).max() > 1e-4


def test_served_refusals_are_the_evaluated_ones(folders, stages, real_data, tmp_path):
    """`evaluate` counts as refused what the classifier folder's detector puts out of distribution, on the OOD scores
    the stages record (``models.classifier_evidence``); serving refuses by the same detector and scores: with a
    threshold between the files' scores, the same files are refused in both."""
    from covidcxr import folders as model_folders
    from covidcxr import metrics

    files = real_files(real_data)
    images, masks = raw_inputs(stages)
    classifier = models.Component.load(folders["classifier"])
    features = models.ood_features(classifier, images, masks, CONFIG["variant"])
    classifier.ood = MahalanobisDetector(n_components=2).fit(features)
    classifier.ood.quantile = 0.3  # an observed score: the two files above it are out of distribution
    classifier.ood.calibrate(classifier.ood.score(features))
    with_detector = {**folders, "classifier": str(classifier.save(tmp_path / "classifier"))}

    probability, scored = models.classifier_evidence(models.Component.load(with_detector["classifier"]), images,
                                                     masks, CONFIG["variant"])
    refused = model_folders.ood_detector(with_detector["classifier"]).is_out(scored.score)
    assert 0 < refused.sum() < len(files)  # both outcomes occur: the comparison can fail
    evaluated = metrics.served_outcomes(np.zeros(len(files)), probability, refused, threshold=0.42)

    entries = serving.Pipeline.load(with_detector).score([serving.encode_file(f) for f in files.values()])
    served_refused = np.array([not e["accepted"] and e["reason"] == "out_of_distribution" for e in entries])
    assert all(e["accepted"] or e["reason"] == "out_of_distribution" for e in entries)
    np.testing.assert_array_equal(served_refused, refused)
    called = sum(e["accepted"] and e["label"] == "covid" for e in entries)
    assert evaluated["refused"] == served_refused.sum() and evaluated["negatives_called_covid"] * len(files) == called


def test_served_gradcam_sees_the_evaluated_input(folders, stages, real_data, monkeypatch):
    """Grad-CAM in serving runs on exactly the network input the probability came from (the input transform
    included), as the explain stage does; a lung crop's map is drawn back where the crop lies."""
    from covidcxr import gradcam

    files = real_files(real_data)
    seen = []
    original = gradcam.gradcam

    def spy(model, x, **kwargs):
        seen.append(np.array(x))
        return original(model, x, **kwargs)

    monkeypatch.setattr(gradcam, "gradcam", spy)
    pipeline = serving.Pipeline.load(folders)
    entries = pipeline.score([serving.encode_file(f) for f in files.values()], explain=True)
    assert all(e["accepted"] and e[serving.GRADCAM_FIELD] for e in entries)
    classifier = models.Component.load(folders["classifier"])
    images, masks = raw_inputs(stages)
    expected = classifier.inputs(classifier.prepare(images, masks, CONFIG["variant"]).images)
    np.testing.assert_allclose(seen[-1], expected, atol=1e-5)


def test_the_served_working_image_is_the_cached_one(real_data):
    """Serving decodes the request's bytes the cache stage's way (``preprocess.read_working_image``), a JPEG far above
    the working size included (a JPEG file or a baseline-JPEG DICOM): both decode it at the same reduced scale, so
    the working images are identical."""
    reduced = {}
    for kind, path in real_files(real_data).items():
        served, pixels, header = preprocess.read_working_image(path.read_bytes(), SIZE, name=kind)
        cached, _, _ = preprocess.build_cache([str(path)], [None], SIZE)
        np.testing.assert_array_equal(served, cached[0].astype(np.float32))
        reduced[kind] = io.is_reduced(pixels, header)
    assert reduced == {"dicom-j2k": False, "dicom": True, "png": False, "jpeg": True}
