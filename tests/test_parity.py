"""What is served is what was evaluated: for real DICOM, PNG and JPEG files (a MONOCHROME1 PNG export among them,
told by its manifest row), the served pyfunc's projection and its probability, lung mask (its area and its rules'
refusals) and COVID-19 probability and label equal what the stages computed with the same model folders.

The stages' path is the stages' own code where a stage trains nothing: `cache` and `cache_projection` (the manifest's
decode hints; the filter's own working size), `filter_frontal` (the filter folder's threshold and lateral check) and
`segment` (params.yaml's mask rules) run in a project folder of their own, on a manifest that
``manifest.describe_images`` filled as `ingest` does. The classifier's predictions are `train_classifier`'s calls on
the images ``_models.usable`` keeps: the input transform, one ``Component.evidence`` pass of the component as trained
(in memory, before its folder is written) and ``models.probability``; the label is evaluate's (the folder's operating
threshold). Serving reads the folders those stages read, with the configuration `register` writes: the filter's own
threshold (``frontal_threshold`` None), the filter's working size (``projection_size``) and the segment params' rules.

The folders are built so that each decision goes both ways on these files, none by float noise: the filter's
threshold (0.5) lies mid-way between the probabilities of the files it decides, its lateral check mid-way between two
files it calls lateral, and the U-Net leaves one file's lungs below ``segment.min_area``. The tests assert that every
outcome occurs, so that a path that decided otherwise shows.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import NamedTuple

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidcxr import folders as model_folders
from covidcxr import io, lungs, manifest, models, preprocess, projection, serving
from covidcxr.calibration import PlattCalibrator
from covidcxr.ood import MahalanobisDetector
from pipelines import _common, _models, cache, cache_projection, filter_frontal, segment

PARAMS = Path(__file__).resolve().parents[1] / _common.PARAMS_FILE
SIZE = 32
VARIANT, BACKBONE = "d", "vgg19"
SEGMENT = _common.params("segment", PARAMS)  # the mask rules segment and serving apply, at their real values
CLASSIFIER_INPUT = _common.params("train_classifier.input", PARAMS)
FRONTAL_THRESHOLD = 0.5  # the filter folder's (threshold.json), mid-way between the files' probabilities

#: Per case: the classifier's input transform (over train_classifier.input's defaults: the paper's input, and the
#: robustness levers' lung crop with CLAHE) and the projection filter's working size (train_projection.size; None:
#: the cache's, else the filter reads its own cache and serving each request at that size, as in the real profile).
CASES = {"paper": ({}, None), "crop-clahe-filter64": ({"crop": True, "intensity": "clahe"}, 2 * SIZE)}


def real_files(root: Path) -> dict[str, Path]:
    return {
        "dicom-j2k": root / "dicom/RG1_J2KI.dcm",
        "dicom": root / "dicom/txv_chest_pa.dcm",
        "png": sorted((root / "montgomery_shenzhen/images").glob("*.png"))[3],
        "jpeg": sorted((root / "cohen/images").glob("*.jp*g"))[5],
    }


class ParityFile(NamedTuple):
    path: Path  # the file the manifest lists
    photometric: str | None  # what the manifest row states of it (its source's metadata), else None
    served: Path  # the file a client sends


@pytest.fixture(scope="module")
def parity_files(real_data, tmp_path_factory) -> dict[str, ParityFile]:
    """:func:`real_files`, two more JPEGs (Kermany's, and a Cohen film whose lungs the U-Net finds too small) and a
    MONOCHROME1 PNG export (air bright, as BIMCV's and PadChest's: its manifest row says MONOCHROME1), which a client
    sends inverted to air dark, as README says (serving has no manifest)."""
    files = {kind: ParityFile(path, None, path) for kind, path in real_files(real_data).items()}
    for kind, path in (("jpeg-kermany", sorted((real_data / "kermany").rglob("*.jpeg"))[3]),
                       ("jpeg-small-lungs", sorted((real_data / "cohen/images").glob("*.jp*g"))[3])):
        files[kind] = ParityFile(path, None, path)
    air_dark = sorted((real_data / "montgomery_shenzhen/images").glob("*.png"))[5]
    stored = tmp_path_factory.mktemp("monochrome1") / "export.png"
    with Image.open(air_dark) as image:
        assert image.mode == "L"
        Image.fromarray(255 - np.asarray(image)).save(stored)
    files["png-monochrome1"] = ParityFile(stored, "MONOCHROME1", air_dark)
    return files


def crisp_unet(x: np.ndarray, quantile: float = 70.0) -> keras.Model:
    """An untrained U-Net whose probabilities sit far from the threshold (its last kernel scaled up, its bias at the
    ``quantile`` percentile logit of ``x``), so that no mask pixel is decided by float noise: a parity failure then
    means a different computation, not rounding. At the 70th, a Cohen film's lungs fall below segment.min_area."""
    keras.utils.set_random_seed(3)
    unet = models.build_unet(2, (SIZE, SIZE, 1), dropout_scale=0.0)
    last = unet.get_layer("mask")
    kernel, _ = last.get_weights()
    features = np.asarray(keras.Model(unet.input, last.input)(x[..., None], training=False))
    logits = features @ (kernel[0, 0] * 40.0)
    last.set_weights([kernel * 40.0, -np.percentile(logits, quantile).reshape(1)])
    return unet


def parity_filter(train: np.ndarray, images: np.ndarray, by_network: np.ndarray) -> models.Component:
    """A projection filter at the size of ``train`` (its lateral check fitted as train_projection fits one) that
    decides ``images`` every way: its threshold (:data:`FRONTAL_THRESHOLD`) lies two logits from each of the two
    nearest probabilities of the files ``by_network`` decides (no View Position), two of them below it, and its lateral
    check's threshold mid-way between those two's scores: one a lateral, the other kept as frontal."""
    keras.utils.set_random_seed(1)
    size = train.shape[1]
    network = models.build_vgg(16, (size, size, 1), width=1 / 32, head=(4,))
    std = preprocess.Standardizer().fit(train)
    last = network.get_layer(models.LOGITS_LAYER)
    kernel, _ = last.get_weights()
    features = np.asarray(keras.Model(network.input, last.input)(std.transform(images)[..., None], training=False))
    z = np.sort((features @ kernel)[by_network, 0])
    assert z[2] - z[1] > 1e-3 * np.ptp(z), "the filter's network gives the files no spread to put its threshold in"
    scale = 4.0 / (z[2] - z[1])
    last.set_weights([kernel * scale, np.array([-scale * (z[1] + z[2]) / 2], dtype=kernel.dtype)])
    component = models.Component(network, std, threshold={"threshold": FRONTAL_THRESHOLD}, info={"run_id": "p"})
    component.ood = MahalanobisDetector(n_components=2).fit(component.evidence(train[:4])[1])
    outputs, features = component.evidence(images)
    p_frontal, scores = outputs[:, 0], component.ood.score(features)
    a, b = np.sort(scores[by_network & (p_frontal < FRONTAL_THRESHOLD)])
    assert b - a > 1e-2, "the two files the network calls lateral have the same lateral-check score"
    component.ood.calibrate(np.array([(a + b) / 2]))
    return component


class Built(NamedTuple):
    project: Path  # the stages' project folder, the model folders where the stages read them
    artifacts: dict[str, str]  # the served model's artifacts: those folders and the configuration
    classifier: models.Component  # as train_classifier scores its predictions: in memory, before its folder is written
    projection_size: int | None


def cached(files: dict[str, ParityFile], size: int) -> np.ndarray:
    """The files' working images at ``size`` as the cache stages decode them (the manifest's photometric)."""
    images, _, _ = preprocess.build_cache([str(f.path) for f in files.values()], [None] * len(files), size,
                                          photometric=[f.photometric for f in files.values()])
    return images.astype(np.float32)


@pytest.fixture(scope="module", params=sorted(CASES))
def built(request, tmp_path_factory, real_data, parity_files) -> Built:
    """Model folders as the training stages write them (standardizers fitted on real working images, the classifier's
    on its own inputs), in a project folder, and the configuration register writes for them (:data:`CASES`). The
    classifier's operating threshold lies mid-way between the files' probabilities: both labels occur."""
    overrides, projection_size = CASES[request.param]
    project = tmp_path_factory.mktemp("project")
    keras.utils.set_random_seed(0)
    train_paths = sorted((real_data / "montgomery_shenzhen/images").glob("*.png"))[:8]
    train = np.stack([preprocess.load_working_image(str(p), SIZE)[0] for p in train_paths])
    std = preprocess.Standardizer().fit(train)
    unet = models.Component(crisp_unet(std.transform(train)), std, info={"run_id": "u"}, threshold={"threshold": 0.5})
    rules = lungs.MaskRules(threshold=unet.operating_threshold, min_area=SEGMENT["min_area"],
                            max_area=SEGMENT["max_area"])
    transform = preprocess.InputTransform(**{**CLASSIFIER_INPUT, **overrides})
    inputs = transform.apply(train, lungs.masks(unet(train), rules)[0], VARIANT).images
    vgg = dict(width=1 / 32, head=(4,))
    classifier = models.Component(models.build_vgg(19, (SIZE, SIZE, 1), **vgg),
                                  preprocess.Standardizer().fit(inputs), info={"run_id": "c"},
                                  calibrator=PlattCalibrator().fit([0, 1, 0, 1], [0.3, 0.9, 0.5, 0.6]),
                                  input_transform=transform)
    images = cached(parity_files, SIZE)
    masks, _, reasons = lungs.masks(unet(images), rules)
    usable = np.array([reason is None for reason in reasons])
    scores = np.sort(train_classifier_scores(classifier, images[usable], masks[usable])[0])
    classifier.threshold = {"threshold": round(float(scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2, 6)}

    filter_size = projection_size or SIZE
    train_filter = np.stack([preprocess.load_working_image(str(p), filter_size)[0] for p in train_paths])
    by_network = np.array([f.path.suffix != ".dcm" for f in parity_files.values()])  # a DICOM's View Position decides
    projection_filter = parity_filter(train_filter, cached(parity_files, filter_size), by_network)

    parts = {"projection": (projection_filter, _common.PROJECTION_MODEL), "unet": (unet, _common.UNET_MODEL),
             "classifier": (classifier, _common.model_dir(VARIANT, BACKBONE))}
    artifacts = {name: str(part.save(project / where)) for name, (part, where) in parts.items()}
    serving.Config(size=SIZE, variant=VARIANT, projection_size=projection_size, min_area=float(SEGMENT["min_area"]),
                   max_area=float(SEGMENT["max_area"])).save(project / "serving.json")
    return Built(project, {**artifacts, "config": str(project / "serving.json")}, classifier, projection_size)


def train_classifier_scores(classifier: models.Component, images: np.ndarray, masks: np.ndarray):
    """What train_classifier records for working images and their segment masks: ``(score, raw_score, ood_score)``
    from the input transform, one ``Component.evidence`` pass and ``models.probability`` / ``models.ood_scored``
    (``ood_score`` None for a component without a detector)."""
    outputs, features = classifier.evidence(classifier.input_transform.apply(images, masks, VARIANT).images)
    ood_score = None if classifier.ood is None else models.ood_scored(classifier, features).score
    return models.probability(classifier, outputs), models.probability(classifier, outputs, calibrated=False), ood_score


class Stages(NamedTuple):
    expected: pd.DataFrame  # per file (index: its kind): what the stages decided and computed
    images: np.ndarray  # the cached working images of the files the classifier scored (read-only)
    masks: np.ndarray  # ... and their segment masks


def stages_path(built: Built, files: dict[str, ParityFile]) -> Stages:
    """Run cache, cache_projection, filter_frontal and segment in ``built.project`` on a manifest of ``files``, and
    score the images they leave usable as train_classifier does; the answers serving should give."""
    kinds = list(files)
    ids = [f"parity/{kind}" for kind in kinds]
    rows = pd.DataFrame({"image_id": ids, "path": [str(f.path) for f in files.values()], "source": "parity",
                         "patient_id": [f"parity:{i}" for i in range(len(ids))], "projection": "unknown",
                         "label": "negative", "site": "parity", "sex": "unknown",
                         "photometric": [f.photometric for f in files.values()]})
    described, rejects = manifest.describe_images(manifest.conform(rows))  # as ingest: header_view_position, bits
    assert rejects.empty, rejects
    split = described[["image_id", "patient_id", "label"]].assign(split="test")
    with contextlib.chdir(built.project):
        _common.write_csv(_common.MANIFEST, described)
        _common.write_csv(_common.split_table("covid"), split)
        _common.write_csv(_common.split_table("segmentation"), split[["image_id", "split"]].iloc[:0])
        cache.run({"size": SIZE, "workers": 1})
        cache_projection.run(built.projection_size, {"size": SIZE, "workers": 1})
        filter_frontal.run()
        segment.run(SEGMENT)
        index, images, _ = _models.load_cache()
        masks = _models.load_masks()
        usable, _ = _models.usable()
        frontal = pd.read_csv(_common.FRONTAL, keep_default_na=False).set_index("image_id").loc[ids]
        flags = pd.read_csv(_common.MASKS_INDEX, keep_default_na=False).set_index("image_id").loc[ids]
    scored = preprocess.rows_for(index, usable["image_id"])
    score, _, _ = train_classifier_scores(built.classifier, images[scored], masks[scored])
    threshold = model_folders.operating_threshold(built.artifacts["classifier"])  # evaluate's
    is_frontal = frontal["predicted"].to_numpy() == "frontal"
    p_frontal = frontal["p_frontal"].to_numpy(float)
    expected = pd.DataFrame({
        "projection": frontal["predicted"].to_numpy(),
        "decided_by": frontal["decided_by"].to_numpy(),
        "projection_probability": np.where(is_frontal, p_frontal, 1.0 - p_frontal),
        "reason": [None if flag == "" else "lateral_view" if flag == "not_frontal" else flag
                   for flag in flags["flag"]],
        "lung_area_fraction": np.where(is_frontal, flags["lung_area_fraction"].to_numpy(float), np.nan),
        "covid_probability": pd.Series(score, index=usable["image_id"]).reindex(ids).to_numpy(),
    }, index=kinds)
    expected["label"] = [None if np.isnan(p) else "covid" if p >= threshold else "negative"
                         for p in expected["covid_probability"]]
    images, masks = images[scored].astype(np.float32), masks[scored]
    images.flags.writeable = masks.flags.writeable = False  # no test can change what the next one reads
    return Stages(expected, images, masks)


@pytest.fixture(scope="module")
def stages(built, parity_files) -> Stages:
    """:func:`stages_path` once per model folders (each Component load and first call costs a second)."""
    return stages_path(built, parity_files)


def scored_files(stages: Stages, files: dict[str, ParityFile]) -> list[Path]:
    """The files (as a client sends them) the stages scored, in the order of ``stages.images``."""
    return [files[kind].served for kind in stages.expected.index[stages.expected["covid_probability"].notna()]]


def values(column: pd.Series) -> list:
    """A column's values, None where missing (pandas may hold None as NaN)."""
    return [None if pd.isna(v) else v for v in column]


def test_served_answers_equal_the_evaluated_ones(built, stages, parity_files, tmp_path):
    expected = stages.expected
    # every way each path can decide occurs, so that a path deciding otherwise shows
    assert set(expected["decided_by"]) == {projection.BY_HEADER, projection.BY_MODEL, projection.BY_CHECK}
    assert set(expected["projection"]) == {"frontal", "lateral"}
    assert set(values(expected["reason"])) == {None, "lateral_view", "empty_lung_mask"}
    assert set(values(expected["label"])) == {None, "covid", "negative"}
    assert (stages.masks.reshape(len(stages.masks), -1).sum(axis=1) > 0).all()

    mlflow.pyfunc.save_model(tmp_path / "model", python_model=serving.CovidCxrModel(), artifacts=built.artifacts,
                             signature=serving.signature(), pip_requirements=["mlflow"])
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    request = pd.DataFrame({"image": [serving.encode_file(f.served) for f in parity_files.values()]})
    served = pd.DataFrame(model.predict(request)).set_index(expected.index)

    assert list(served["projection"]) == list(expected["projection"])
    np.testing.assert_allclose(served["projection_probability"].astype(float), expected["projection_probability"],
                               atol=1.5e-6)
    assert values(served["reason"]) == values(expected["reason"]), served[["reason", "message"]]
    assert list(served["accepted"]) == list(expected["reason"].isna())
    np.testing.assert_allclose(served["lung_area_fraction"].astype(float), expected["lung_area_fraction"],
                               atol=1e-6)
    np.testing.assert_allclose(served["covid_probability"].astype(float), expected["covid_probability"], atol=2e-6)
    assert values(served["label"]) == values(expected["label"])
    scored = expected["covid_probability"].notna().to_numpy()
    classifier = models.Component.load(built.artifacts["classifier"])
    _, raw, _ = train_classifier_scores(classifier, stages.images, stages.masks)
    assert np.abs(raw - served.loc[scored, "covid_probability"]).max() > 1e-3  # the served one is calibrated
    if not classifier.input_transform.identity:  # the input transform changed what the network saw: not the paper's
        plain = classifier  # the same folder without its input transform
        plain.input_transform = preprocess.InputTransform()
        assert np.abs(train_classifier_scores(plain, stages.images, stages.masks)[0]
                      - served.loc[scored, "covid_probability"]).max() > 1e-4


def test_served_refusals_are_the_evaluated_ones(built, stages, parity_files, tmp_path):
    """`evaluate` counts as refused what the classifier folder's detector puts out of distribution, on the OOD scores
    train_classifier records (``models.ood_scored`` of its evidence pass); serving refuses by the same detector and
    scores: with a threshold between the files' scores, the same files are refused in both."""
    from covidcxr import metrics

    files = scored_files(stages, parity_files)
    classifier = models.Component.load(built.artifacts["classifier"])
    features = models.ood_features(classifier, stages.images, stages.masks, VARIANT)
    classifier.ood = MahalanobisDetector(n_components=2).fit(features)
    classifier.ood.quantile = 0.3  # an observed score: the files above it are out of distribution
    classifier.ood.calibrate(classifier.ood.score(features))
    with_detector = {**built.artifacts, "classifier": str(classifier.save(tmp_path / "classifier"))}

    probability, _, ood_score = train_classifier_scores(classifier, stages.images, stages.masks)
    refused = model_folders.ood_detector(with_detector["classifier"]).is_out(ood_score)  # as evaluate
    assert 0 < refused.sum() < len(files)  # both outcomes occur: the comparison can fail
    threshold = model_folders.operating_threshold(with_detector["classifier"])
    evaluated = metrics.served_outcomes(np.zeros(len(files)), probability, refused, threshold=threshold)

    entries = serving.Pipeline.load(with_detector).score([serving.encode_file(f) for f in files])
    served_refused = np.array([not e["accepted"] and e["reason"] == "out_of_distribution" for e in entries])
    assert all(e["accepted"] or e["reason"] == "out_of_distribution" for e in entries)
    np.testing.assert_array_equal(served_refused, refused)
    called = sum(e["accepted"] and e["label"] == "covid" for e in entries)
    assert evaluated["refused"] == served_refused.sum() and evaluated["negatives_called_covid"] * len(files) == called


def test_served_gradcam_sees_the_evaluated_input(built, stages, parity_files, monkeypatch):
    """Grad-CAM in serving runs on exactly the network input the probability came from (the input transform
    included), as the explain stage does; a lung crop's map is drawn back where the crop lies."""
    from covidcxr import gradcam

    seen = []
    original = gradcam.gradcam

    def spy(model, x, **kwargs):
        seen.append(np.array(x))
        return original(model, x, **kwargs)

    monkeypatch.setattr(gradcam, "gradcam", spy)
    pipeline = serving.Pipeline.load(built.artifacts)
    entries = pipeline.score([serving.encode_file(f) for f in scored_files(stages, parity_files)], explain=True)
    assert all(e["accepted"] and e[serving.GRADCAM_FIELD] for e in entries)
    classifier = models.Component.load(built.artifacts["classifier"])
    expected = classifier.inputs(classifier.prepare(stages.images, stages.masks, VARIANT).images)
    np.testing.assert_allclose(seen[-1], expected, atol=1e-5)


def test_the_served_working_image_is_the_cached_one(parity_files):
    """Serving decodes the request's bytes the cache stage's way (``preprocess.read_working_image``), a JPEG far above
    the working size included (a JPEG file or a baseline-JPEG DICOM): both decode it at the same reduced scale, so
    the working images are identical; a MONOCHROME1 PNG export, cached with its manifest row's photometric, is the
    image a client sends inverted to air dark (read as stored, another image)."""
    reduced = {}
    for kind, file in parity_files.items():
        served, pixels, header = preprocess.read_working_image(file.served.read_bytes(), SIZE, name=kind)
        np.testing.assert_array_equal(served, cached({kind: file}, SIZE)[0])
        reduced[kind] = io.is_reduced(pixels, header)
    assert reduced == {"dicom-j2k": False, "dicom": True, "png": False, "jpeg": True, "jpeg-kermany": True,
                       "jpeg-small-lungs": True, "png-monochrome1": False}
    export = parity_files["png-monochrome1"]
    as_stored = cached({"png-monochrome1": export._replace(photometric=None)}, SIZE)
    assert np.abs(as_stored - cached({"png-monochrome1": export}, SIZE)).max() > 0.5
