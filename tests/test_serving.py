"""The served pipeline: request/response logic on tiny real Keras models saved in tmp, and the pyfunc in-process."""

from __future__ import annotations

import base64
import io as stdio
import json
import logging
import re

import numpy as np
import pandas as pd
import pydicom
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image
from pydicom.sequence import Sequence as DicomSequence

from covidcxr import io, models, preprocess, serving, sites
from tests.helpers import PERMISSIVE, build_bundle, phantom, png_b64
from tests.test_io import _deflated, _huge_png, _voi_lut_item, codestream_dicom, make_dicom

PHI = {"PatientName": "Zyxwvut^Qponmlk", "PatientID": "PID-88412", "PatientBirthDate": "19491231",
       "InstitutionName": "St Elsewhere General", "AccessionNumber": "ACC-55123", "ReferringPhysicianName": "Dr^Who"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def dicom_b64(image: np.ndarray, **elements) -> str:
    return b64(make_dicom(np.round(image * 4000).astype(np.uint16), **elements))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> dict[str, str]:
    """Untrained tiny projection VGG, U-Net and classifier VGG with fitted standardizers, as register bundles them."""
    return build_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def loaded(bundle) -> serving.Pipeline:
    return serving.Pipeline.load(bundle)


def with_config(pipeline: serving.Pipeline, **changes) -> serving.Pipeline:
    """The same loaded networks under another configuration (``mask_threshold``: the U-Net folder's threshold)."""
    limits = changes.pop("limits", serving.Limits())
    unet = pipeline.unet
    if "mask_threshold" in changes:
        unet = models.Component(unet.model, unet.standardizer, threshold={"threshold": changes.pop("mask_threshold")})
    config = serving.Config(**{**PERMISSIVE, **changes}, limits=limits)
    return serving.Pipeline(pipeline.projection, unet, pipeline.classifier, config)


def test_entry_has_exactly_the_fields_and_a_consistent_decision(loaded):
    [entry] = loaded.score([png_b64(phantom())])
    assert tuple(entry) == serving.FIELDS
    assert entry["accepted"] is True and entry["reason"] is None and entry["projection"] == "frontal"
    assert 0.0 <= entry["covid_probability"] <= 1.0 and 0.0 <= entry["lung_area_fraction"] <= 1.0
    assert entry["threshold"] == 0.5 and (entry["model_name"], entry["model_version"]) == ("covidcxr", "unregistered")
    assert entry["label"] == ("covid" if entry["covid_probability"] >= 0.5 else "negative")
    json.dumps(entry, allow_nan=False)  # strict JSON: no NaN, no numpy types


def test_a_probe_learns_the_models_name_and_request_limit_as_its_version(loaded):
    """Entries said the model's version but not its name, nor how many images a request may hold: a client (the PACS
    worker) named the results after its own guess and sized its batches by the default limit. All three come from the
    model's configuration, in every entry and so in a probe."""
    named = with_config(loaded, model_name="covidcxr-ward", model_version="4", limits=serving.Limits(max_images=4))
    assert serving.probe(lambda images, params: named.score(images)) == {"model_name": "covidcxr-ward",
                                                                        "model_version": "4", "max_images": 4}


def test_no_phi_in_the_response_or_the_log(loaded, caplog):
    caplog.set_level(logging.DEBUG)
    request = [dicom_b64(phantom(), ViewPosition="PA", **PHI), dicom_b64(phantom(), ViewPosition="LL", **PHI),
               b64(make_dicom(None, shape=(40, 40), **PHI))]
    entries = loaded.score(request, explain=True)
    assert [e["reason"] for e in entries] == [None, "lateral_view", "no_pixel_data"]
    # The overlay is pixels only (base64 of a PNG can spell two letters by chance): scanned as its decoded chunks.
    overlays = [base64.b64decode(e.pop(serving.GRADCAM_FIELD)) for e in entries if e[serving.GRADCAM_FIELD]]
    assert overlays and all(Image.open(stdio.BytesIO(o)).info == {} for o in overlays)  # no text chunks
    text = json.dumps(entries) + caplog.text
    for value in PHI.values():
        assert value not in text and value.split("^")[0] not in text


BAD = {
    "not an image": (b64(b"hello, world"), "not_an_image"),
    "invalid base64": ("@@@ not base64 @@@", "invalid_base64"),
    "not a string": (12, "invalid_base64"),
    "null": (None, "missing_image"),
    "empty string": ("  ", "missing_image"),
    "truncated PNG": (b64(base64.b64decode(png_b64(phantom()))[:300]), "truncated"),
    "constant image": (png_b64(np.full((40, 40), 0.5)), "zero_variance"),
    "panorama": (png_b64(np.tile(phantom(), (1, 3))), "not_chest_radiograph"),
    "CT slice": (dicom_b64(phantom(), modality="CT"), "not_chest_radiograph"),
    "hand radiograph": (dicom_b64(phantom(), BodyPartExamined="HAND"), "not_chest_radiograph"),
    "DX for processing": (dicom_b64(phantom(), modality="DX", PresentationIntentType="FOR PROCESSING"),
                          "not_for_presentation"),
    "lateral by header": (dicom_b64(phantom(), ViewPosition="LL"), "lateral_view"),
    "DICOM without pixels": (b64(make_dicom(None, shape=(40, 40))), "no_pixel_data"),
    "zero bytes": (b64(b""), "missing_image"),
    "PNG bomb": (b64(_huge_png(100_000, 100_000)), "too_large"),
    "JPEG-in-DICOM bomb": (b64(codestream_dicom("jpeg", 30_000, 30_000)), "too_large"),
    "J2K-in-DICOM bomb": (b64(codestream_dicom("j2k", 30_000, 30_000)), "too_large"),
    "frames beyond the data": (dicom_b64(phantom(), n_frames=50), "truncated"),
    "huge declared DICOM": (b64(make_dicom(np.zeros((40, 40)), shape=(65535, 65535))), "too_large"),
    "YBR colour DICOM": (b64(make_dicom(np.zeros((40, 40, 3), np.uint8), photometric="YBR_FULL", bits_allocated=8,
                                        bits_stored=8)), "unsupported_photometric"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_one_bad_image_gives_an_error_entry_not_a_failed_batch(loaded, case):
    value, reason = BAD[case]
    good = png_b64(phantom())
    entries = loaded.score([good, value, good])
    assert [e["accepted"] for e in entries] == [True, False, True]
    assert entries[1]["reason"] == reason and reason in serving.REASONS
    assert entries[1]["message"].startswith("image[1]") and entries[1]["covid_probability"] is None
    assert entries[0]["covid_probability"] == entries[2]["covid_probability"]


def test_a_patient_younger_than_the_intended_population_is_refused_by_the_header_age(loaded):
    """The training data's COVID-19 films are adults' (Kermany's children are all negatives): a child's film would be
    scored by a model whose sensitivity was never measured on children. Only a DICOM says the age; the message gives
    the limit, never the patient's age."""
    gated = with_config(loaded, min_age=18)
    request = [dicom_b64(phantom(), PatientAge="004Y"), dicom_b64(phantom(), PatientAge="018Y"),
               dicom_b64(phantom(), PatientAge="010M"), dicom_b64(phantom()), png_b64(phantom())]
    entries = gated.score(request)
    assert [e["reason"] for e in entries] == ["outside_intended_use", None, "outside_intended_use", None, None]
    assert [e["accepted"] for e in entries] == [False, True, False, True, True]
    child = entries[0]
    assert child["message"] == ("image[0]: the DICOM header gives an age under 18 years; the model's sensitivity was "
                                "never measured on such patients") and child["covid_probability"] is None
    assert all(e["accepted"] for e in loaded.score(request))  # min_age None: no age limit
    assert serving.Config.from_dict({"size": 32, "variant": "c"}).min_age is None  # a config saved before min_age
    with pytest.raises(ValueError, match="min_age"):
        serving.Config(size=32, variant="c", min_age=-1)


def _odd_but_valid() -> dict[str, str]:
    image = phantom()
    stored = np.round(image * 4000).astype(np.int64)
    lut = DicomSequence([_voi_lut_item(np.round(np.sqrt(np.arange(4096)) * 1000).astype(np.int64))])
    rgb = np.round(255 * np.stack([image, image * 0.9, image * 0.8], axis=-1)).astype(np.uint8)
    buffer = stdio.BytesIO()
    Image.fromarray((stored * 16).astype(np.uint16)).save(buffer, format="PNG")
    return {
        "signed 16-bit DICOM": b64(make_dicom(stored - 2048, signed=True, RescaleSlope=1, RescaleIntercept=-1024)),
        "MONOCHROME1": b64(make_dicom(4095 - stored, photometric="MONOCHROME1")),
        "MONOCHROME1 with a VOI LUT": b64(make_dicom(4095 - stored, photometric="MONOCHROME1", VOILUTSequence=lut)),
        "multi-frame DICOM": b64(make_dicom(np.stack([stored, stored // 2]), n_frames=2)),
        "deflated DICOM": b64(_deflated(pydicom.dcmread(stdio.BytesIO(make_dicom(stored))))),
        "RGB DICOM": b64(make_dicom(rgb, photometric="RGB", bits_allocated=8, bits_stored=8, shape=rgb.shape[:2])),
        "RGB photograph PNG": b64(_png(rgb)),
        "16-bit PNG": b64(buffer.getvalue()),
        "DX for presentation": b64(make_dicom(stored, modality="DX", PresentationIntentType="FOR PRESENTATION")),
    }


def _png(pixels: np.ndarray) -> bytes:
    buffer = stdio.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_odd_but_valid_files_are_scored(loaded):
    cases = _odd_but_valid()
    entries = loaded.score(list(cases.values()))
    for name, entry in zip(cases, entries):
        assert entry["accepted"] and 0.0 <= entry["covid_probability"] <= 1.0, (name, entry)


def test_request_errors_quote_nothing_of_the_request():
    """mlflow's scoring server rewrites a predict error's message to quote the input; ServingError keeps its own."""
    err = serving.invalid_request("param 'threshold' must be in [0, 1], got 2.0")
    err.message = f"Failed to predict data 'Zyxwvut^Qponmlk'. \nError: {err.message}"
    assert err.message == "param 'threshold' must be in [0, 1], got 2.0"
    assert "Zyxwvut" not in err.serialize_as_json() and err.get_http_status_code() == 400


def test_too_many_images_is_a_request_error(loaded):
    small = with_config(loaded, limits=serving.Limits(max_images=2))
    with pytest.raises(MlflowException, match="holds 3 images; at most 2") as err:
        small.score([png_b64(phantom())] * 3)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE" and err.value.get_http_status_code() == 400


@pytest.mark.parametrize("limits, needle", [
    (serving.Limits(max_image_bytes=500), "bytes per image"),
    (serving.Limits(max_pixels=40 * 40), "exceeds the limit of 1600"),
])
def test_byte_and_pixel_limits_refuse_the_image_with_a_clear_message(loaded, limits, needle):
    [entry] = with_config(loaded, limits=limits).score([png_b64(phantom())])
    assert entry["reason"] == "too_large" and needle in entry["message"]



def test_running_out_of_memory_is_told_apart_from_a_file_over_the_limits(loaded, monkeypatch):
    """A MemoryError while reading an image was answered too_large, as a file over the limits is: a client (the PACS
    worker) could not tell that another try may succeed, and wrote the image off. It is out_of_memory now, a reason
    that says the server failed (RETRY_REASONS, with internal_error). A real MemoryError cannot be had on demand."""
    def short_of_memory(*args, **kwargs):
        raise MemoryError

    over = with_config(loaded, limits=serving.Limits(max_image_bytes=100))
    monkeypatch.setattr(preprocess, "read_working_image", short_of_memory)
    [entry] = loaded.score([png_b64(phantom())])
    assert entry["reason"] == "out_of_memory" and "needs more memory than the server has" in entry["message"]
    monkeypatch.undo()
    [entry] = over.score([png_b64(phantom())])
    assert entry["reason"] == "too_large"
    assert serving.RETRY_REASONS == {"internal_error", "out_of_memory"} <= set(serving.REASONS)

@pytest.mark.parametrize("changes, reason, needle", [
    ({"frontal_threshold": 0.999}, "lateral_view", "projection filter"),
    ({"mask_threshold": 0.999, "min_area": 0.01}, "empty_lung_mask", "covers 0.0%"),
    ({"mask_threshold": 0.001, "max_area": 0.8}, "lung_mask_too_large", "covers 100.0%"),
])
def test_model_steps_refuse_with_their_reason(loaded, changes, reason, needle):
    [entry] = with_config(loaded, **changes).score([png_b64(phantom())])
    assert entry["reason"] == reason and needle in entry["message"]
    assert entry["projection"] is not None and entry["covid_probability"] is None


def test_threshold_param_overrides_the_operating_threshold(loaded):
    images = [png_b64(phantom(seed=s)) for s in range(3)]
    default = loaded.score(images)
    assert {e["threshold"] for e in default} == {0.5} and {e["thresholds_from"] for e in default} == {"model"}
    assert all(e["label"] == "covid" and e["thresholds_from"] == "request" for e in loaded.score(images, threshold=0.0))
    lowered = loaded.score(images, threshold=min(e["covid_probability"] for e in default))
    assert all(e["label"] == "covid" for e in lowered)
    assert [e["covid_probability"] for e in lowered] == [e["covid_probability"] for e in default]
    for bad in (1.5, -0.1, "x", True):
        with pytest.raises(MlflowException, match="threshold"):
            loaded.score(images, threshold=bad)


def test_a_server_with_a_site_file_applies_its_thresholds_and_refuses_per_request_ones(bundle, loaded, tmp_path,
                                                                                        monkeypatch):
    """$COVIDCXR_SITE: the site's thresholds (calibrate-site --output) on every request, whoever sends it; a file
    chosen on another model version, or on the same version number of another registered model (or one that does not
    say which model), stops the server from loading."""
    images = [png_b64(phantom(seed=s)) for s in range(4)]
    probabilities = sorted(e["covid_probability"] for e in loaded.score(images))
    site = tmp_path / "site.json"
    site.write_text(json.dumps({"threshold": probabilities[2], "ood_threshold": None, "model_name": "covidcxr",
                                "model_version": "unregistered"}))
    monkeypatch.setenv(sites.ENV, str(site))
    at_site = serving.Pipeline.load(bundle)
    entries = at_site.score(images)
    assert {(e["threshold"], e["thresholds_from"]) for e in entries} == {(probabilities[2], "site")}
    assert sorted(e["label"] for e in entries) == ["covid", "covid", "negative", "negative"]
    for params in ({"threshold": 0.0}, {"ood_threshold": 1e9}):
        with pytest.raises(MlflowException, match=r"applies the site's own thresholds \(\$COVIDCXR_SITE\)"):
            at_site.score(images, **params)
    site.write_text(json.dumps({"threshold": 0.2, "ood_threshold": None, "model_version": "7"}))
    with pytest.raises(sites.SiteFileError, match="chosen on model version 7's scores; the model answering is "
                                                  "version unregistered"):
        serving.Pipeline.load(bundle)
    # Pipeline.load refused above, before loading any network; the pipeline's constructor checks the same way, so the
    # other mismatches go through it on the loaded networks (three Component loads each spared)
    site.write_text(json.dumps({"threshold": 0.2, "ood_threshold": None, "model_name": "covidcxr-real",
                                "model_version": "unregistered"}))
    with pytest.raises(sites.SiteFileError, match="chosen on covidcxr-real vunregistered's scores; the model "
                                                  "answering is covidcxr vunregistered"):
        serving.Pipeline(loaded.projection, loaded.unet, loaded.classifier, loaded.config, site=sites.from_env())
    site.write_text(json.dumps({"threshold": 0.2, "ood_threshold": None, "model_version": "unregistered"}))
    with pytest.raises(sites.SiteFileError, match="record no model_name .* cannot be checked by name"):
        serving.Pipeline(loaded.projection, loaded.unet, loaded.classifier, loaded.config, site=sites.from_env())


@pytest.mark.filterwarnings("ignore:.*An input example was not provided")  # this model cannot score one
def test_a_site_file_for_another_model_stops_the_pyfunc_before_any_network_is_loaded(tmp_path, monkeypatch):
    """The served pyfunc read $COVIDCXR_SITE only after loading its three networks (seconds of Keras on a real model)
    before refusing a file chosen on another model. The model folders here are whole but their networks corrupt, so
    loading one would fail otherwise: the site's refusal, with its own message, shows that none was loaded."""
    import mlflow

    from covidcxr import folders

    artifacts = {}
    for name in serving.COMPONENTS:
        folder = tmp_path / name
        folder.mkdir()
        (folder / folders.MODEL_FILE).write_bytes(b"not a keras archive")
        (folder / folders.STANDARDIZER_FILE).write_text("{}")
        (folder / folders.RUN_FILE).write_text(json.dumps({"run_id": "test"}))
        artifacts[name] = str(folder)
    artifacts[serving.CONFIG_ARTIFACT] = str(tmp_path / "serving.json")
    serving.Config(size=32, variant="d", model_name="covidcxr", model_version="3").save(
        artifacts[serving.CONFIG_ARTIFACT])
    mlflow.pyfunc.save_model(tmp_path / "model", python_model=serving.CovidCxrModel(), artifacts=artifacts,
                             signature=serving.signature(), pip_requirements=["mlflow"])
    site = tmp_path / "site.json"
    site.write_text(json.dumps({"threshold": 0.2, "ood_threshold": None, "model_name": "covidcxr",
                                "model_version": "2"}))
    monkeypatch.setenv(sites.ENV, str(site))
    with pytest.raises(sites.SiteFileError, match=re.escape(f"site thresholds {site} were chosen on model version 2's "
                                                            "scores; the model answering is version 3")):
        mlflow.pyfunc.load_model(str(tmp_path / "model"))
    site.write_text("{not json")
    with pytest.raises(sites.SiteFileError, match=re.escape(f"site thresholds {site}: not JSON")):
        mlflow.pyfunc.load_model(str(tmp_path / "model"))


def test_explain_adds_a_gradcam_png_of_the_image_size(loaded):
    image = phantom(size=96)[:, 8:88]  # 96 x 80
    entries = loaded.score([png_b64(image), b64(b"junk")], explain=True)
    overlay = Image.open(stdio.BytesIO(base64.b64decode(entries[0]["gradcam_png"])))
    assert overlay.format == "PNG" and overlay.size == (80, 96) and overlay.mode == "RGB"
    assert entries[1]["gradcam_png"] is None
    assert serving.GRADCAM_FIELD not in loaded.score([png_b64(image)])[0]


def test_an_image_whose_display_decode_fails_is_refused_alone_and_the_others_are_answered_and_logged(loaded,
                                                                                                     monkeypatch):
    """With explain on, an image whose full-resolution display decode failed (out of memory on a huge file) was
    refused but its working image went on to the networks: the classifier marked it accepted and the overlay step
    raised KeyError, HTTP 500 for the whole request and nothing logged (the PACS worker always asks for overlays).
    A real MemoryError cannot be had on demand: the display step raises it for the one 96 x 80 image."""
    from covidcxr import gradcam, predlog

    display_image = gradcam.display_image

    def short_of_memory_for_one(pixels: np.ndarray, longest: int) -> np.ndarray:
        if pixels.shape == (96, 80):
            raise MemoryError
        return display_image(pixels, longest)

    monkeypatch.setattr(gradcam, "display_image", short_of_memory_for_one)
    pipeline = with_config(loaded)
    pipeline.prediction_log = predlog.MemoryLog()
    images = [png_b64(phantom()), png_b64(phantom(size=96)[:, 8:88]), png_b64(phantom(seed=1))]
    entries = pipeline.score(images, explain=True)
    assert [(e["accepted"], e["reason"]) for e in entries] == [(True, None), (False, "out_of_memory"), (True, None)]
    assert entries[1]["covid_probability"] is None and entries[1][serving.GRADCAM_FIELD] is None
    assert entries[0][serving.GRADCAM_FIELD] and entries[2][serving.GRADCAM_FIELD]
    logged = pipeline.prediction_log.records
    assert [(r["accepted"], r["reason"]) for r in logged] == [(e["accepted"], e["reason"]) for e in entries]


def test_a_jpeg_decoded_at_reduced_scale_still_gets_a_full_resolution_overlay(loaded):
    """The working image of a large JPEG comes from a reduced decode (as in the cache stage); the overlay a person
    reads is drawn on the full decode, at the display size, not on the reduced pixels."""
    big = Image.fromarray(np.round(255 * phantom(size=600)).astype(np.uint8)).resize((1000, 1200))
    buffer = stdio.BytesIO()
    big.save(buffer, "JPEG", quality=95)
    [entry] = loaded.score([b64(buffer.getvalue())], explain=True)
    overlay = Image.open(stdio.BytesIO(base64.b64decode(entry["gradcam_png"])))
    assert entry["accepted"] and overlay.size == (427, serving.DISPLAY_SIZE)  # 1000 x 1200 scaled to 512 high
    [plain] = loaded.score([b64(buffer.getvalue())])
    assert plain["covid_probability"] == entry["covid_probability"]


def test_the_label_follows_from_the_probability_and_threshold_shown(loaded):
    images = [png_b64(phantom(seed=s)) for s in range(4)]
    for entry in loaded.score(images):
        assert entry["covid_probability"] == round(entry["covid_probability"], 6)
        assert entry["label"] == ("covid" if entry["covid_probability"] >= entry["threshold"] else "negative")
    first = loaded.score(images[:1])[0]
    at_shown = loaded.score(images[:1], threshold=first["covid_probability"])[0]  # a client sets what it was shown
    assert at_shown["label"] == "covid" and at_shown["covid_probability"] == first["covid_probability"]
    above = loaded.score(images[:1], threshold=min(1.0, first["covid_probability"] + 1e-6))[0]
    assert above["label"] == "negative"


def test_the_dicom_view_position_decides_before_the_projection_filter(loaded):
    never_frontal = with_config(loaded, frontal_threshold=0.999)  # the filter calls everything lateral
    pa, ll, png = never_frontal.score([dicom_b64(phantom(), ViewPosition="PA"), dicom_b64(phantom(), ViewPosition="LL"),
                                       png_b64(phantom())])
    assert pa["accepted"] and pa["projection"] == "frontal"
    assert ll["reason"] == "lateral_view" and "view position" in ll["message"]
    assert png["reason"] == "lateral_view" and "projection filter" in png["message"]


def test_the_filter_threshold_is_the_filter_folders_own_unless_the_configuration_overrides_it(loaded):
    """As filter_frontal applies it: the threshold saved with the filter (register no longer copies it into the
    configuration); a number in the configuration overrides it; a filter without one is refused at load."""
    proj, own = loaded.projection, {**PERMISSIVE, "frontal_threshold": None}

    def served(threshold: float | None, config: dict) -> serving.Pipeline:
        part = models.Component(proj.model, proj.standardizer,
                                threshold=None if threshold is None else {"threshold": threshold})
        return serving.Pipeline(part, loaded.unet, loaded.classifier, serving.Config(**config))

    assert served(0.37, own).frontal_threshold == 0.37
    assert served(0.37, {**own, "frontal_threshold": 0.2}).frontal_threshold == 0.2
    entry = served(0.999, own).score([png_b64(phantom())])[0]  # the network calls everything lateral
    assert entry["reason"] == "lateral_view" and "< 0.999)" in entry["message"]
    assert served(0.0, own).score([png_b64(phantom())])[0]["projection"] == "frontal"
    with pytest.raises(ValueError, match="no operating threshold"):
        served(None, own)


def test_the_filters_lateral_check_keeps_what_resembles_no_training_lateral(loaded):
    """The network calls everything lateral (threshold 0.999); with a check fitted on dark noise the phantom resembles
    no lateral and is scored as frontal; with one fitted on the phantom itself the network's call stands."""
    from covidcxr import ood

    never_frontal = with_config(loaded, frontal_threshold=0.999)
    proj, size = never_frontal.projection, never_frontal.projection.model.input_shape[1]
    rng = np.random.default_rng(5)
    image = preprocess.working_image(np.round(255 * np.clip(phantom(), 0, 1)) / 255, size)  # as the PNG is read

    def served_with_check(laterals: np.ndarray, spread: float) -> dict:
        checked = models.Component(proj.model, proj.standardizer)
        checked.ood = ood.MahalanobisDetector(n_components=2).fit(models.ood_features(checked, laterals, None, "c"))
        calibration = np.clip(laterals[:3] + rng.normal(0, spread, laterals[:3].shape), 0, 1).astype(np.float32)
        checked.ood.calibrate(models.out_of_distribution(checked, calibration, None, "c").score)
        pipeline = serving.Pipeline(checked, never_frontal.unet, never_frontal.classifier, never_frontal.config)
        return pipeline.score([png_b64(phantom())])[0]

    dark = (rng.random((8, size, size)) * 0.1).astype(np.float32)
    kept = served_with_check(dark, 0.01)
    assert kept["projection"] == "frontal" and kept["reason"] != "lateral_view"
    assert kept["projection_probability"] < 0.999  # the network's own probability: it leaned lateral
    alike = np.clip(image[None] + rng.normal(0, 0.005, (8, size, size)), 0, 1).astype(np.float32)
    refused = served_with_check(alike, 0.05)
    assert refused["reason"] == "lateral_view" and "projection filter" in refused["message"]


def test_the_projection_filter_reads_each_image_at_its_own_working_size(tmp_path):
    """A filter trained on its own cache (train_projection.size) gets the request read at that size, as the
    cache_projection stage reads the corpus; the U-Net and the classifier keep the working size."""
    pipeline = serving.Pipeline.load(build_bundle(tmp_path, projection_size=64))
    assert pipeline.config.filter_size == 64 and pipeline.config.size == 32
    projection, unet, seen = pipeline.projection, pipeline.unet, {}

    def recording(name: str, part: models.Component):
        def call(images: np.ndarray) -> np.ndarray:
            seen[name] = images
            return part(images)
        return call

    def reading(name: str, part: models.Component) -> None:  # the filter reads images through its prepare
        prepare = part.prepare

        def call(images: np.ndarray, masks, variant: str):
            seen[name] = images
            return prepare(images, masks, variant)
        part.prepare = call

    reading("projection", projection)
    pipeline.unet = recording("unet", unet)
    image = png_b64(phantom(size=256))
    [entry] = pipeline.score([image])
    assert entry["accepted"] is True and entry["projection"] == "frontal"
    data = base64.b64decode(image)
    np.testing.assert_array_equal(seen["projection"][0], preprocess.read_working_image(data, 64)[0])
    np.testing.assert_array_equal(seen["unet"][0], preprocess.read_working_image(data, 32)[0])
    # A JPEG decoded at reduced scale for the 32-px models is decoded again for the filter, as its cache stage does.
    jpeg = stdio.BytesIO()
    Image.fromarray(np.round(255 * phantom(size=512)).astype(np.uint8)).save(jpeg, format="JPEG", quality=95)
    [entry] = pipeline.score([base64.b64encode(jpeg.getvalue()).decode()])
    assert entry["accepted"] is True
    reduced_for_unet = preprocess.read_working_image(jpeg.getvalue(), 32)
    assert io.is_reduced(reduced_for_unet[1], reduced_for_unet[2])
    np.testing.assert_array_equal(seen["projection"][0], preprocess.read_working_image(jpeg.getvalue(), 64)[0])
    np.testing.assert_array_equal(seen["unet"][0], reduced_for_unet[0])
    with pytest.raises(ValueError, match=r"takes 64x64 px images, the configuration reads 32 px"):
        serving.Pipeline(projection, unet, pipeline.classifier, serving.Config(**PERMISSIVE))


@pytest.mark.parametrize("wrap", [
    lambda s: s, lambda s: "\n".join(s[i:i + 76] for i in range(0, len(s), 76)) + "\n",
    lambda s: "data:application/dicom;base64," + s, lambda s: f"  {s}\t",
])
def test_base64_forms_that_are_accepted(wrap):
    data = bytes(range(256)) * 3
    assert serving.decode_field(wrap(b64(data)), 0, 10_000) == data


def test_encoded_size_is_checked_before_decoding():
    with pytest.raises(serving.Refused, match="more than the limit of 30 bytes") as err:
        serving.decode_field("A" * 10_000_000 + "!", 4, 30)  # would be invalid base64 if it were decoded
    assert err.value.reason == "too_large"


def test_config_round_trip_and_validation(tmp_path):
    config = serving.Config(size=64, variant="e", model_version="7", limits=serving.Limits(max_images=3))
    config.save(tmp_path / "c.json")
    assert serving.Config.load(tmp_path / "c.json") == config and config.frontal_threshold is None  # the filter's
    old = {**config.to_dict(), "frontal_threshold": 0.45}  # as registered models carried it before
    assert serving.Config.from_dict(old).frontal_threshold == 0.45
    for bad in ({"variant": "x"}, {"size": 50}, {"min_area": 0.9, "max_area": 0.1}, {"max_aspect": 0.5},
                {"projection_size": 50}, {"projection_size": 8}, {"projection_size": 64.0}, {"frontal_threshold": 1.5}):
        with pytest.raises(ValueError):
            serving.Config(**{"size": 64, "variant": "c", **bad})
    with pytest.raises(ValueError, match="max_images"):
        serving.Limits(max_images=0)


@pytest.mark.parametrize("model_input", [
    pd.DataFrame({"image": ["a", "b"]}), {"image": ["a", "b"]}, {"image": np.array(["a", "b"])},
    [{"image": "a"}, {"image": "b"}], ["a", "b"],
])
def test_input_forms(model_input):
    assert serving.images_from_input(model_input) == ["a", "b"]


def test_input_without_an_image_column_is_a_request_error():
    with pytest.raises(MlflowException, match="needs an 'image' column"):
        serving.images_from_input(pd.DataFrame({"img": ["a"]}))


def test_a_failure_inside_the_networks_is_a_500_without_traceback(loaded):
    broken = serving.CovidCxrModel()
    broken.pipeline = with_config(loaded, size=48, projection_size=32)  # the U-Net and the classifier take 32 px
    with pytest.raises(MlflowException) as err:
        broken.predict(None, pd.DataFrame({"image": [png_b64(phantom())]}))
    assert err.value.get_http_status_code() == 500
    assert "Traceback" not in err.value.message and "internal error while scoring" in err.value.message


def test_pyfunc_saves_loads_and_scores_in_process(bundle, tmp_path):
    import mlflow

    path = tmp_path / "model"
    example = {"image": [png_b64(phantom())]}
    mlflow.pyfunc.save_model(path, python_model=serving.CovidCxrModel(), artifacts=bundle,
                             signature=serving.signature(), input_example=example, pip_requirements=["mlflow"])
    model = mlflow.pyfunc.load_model(str(path))
    frame = pd.DataFrame({"image": [dicom_b64(phantom(), **PHI), "not base64!"]})
    entries = model.predict(frame, params={"explain": True, "threshold": 0.0})
    assert [e["accepted"] for e in entries] == [True, False] and entries[0]["label"] == "covid"
    assert entries[0]["gradcam_png"] and entries[1]["reason"] == "invalid_base64"
    assert all(v not in json.dumps(entries) for v in PHI.values())
    assert model.predict(example)[0]["threshold"] == 0.5
    with pytest.raises(MlflowException, match="missing inputs"):
        model.predict(pd.DataFrame({"img": ["x"]}))
    # Through the scoring server's own request handling: the 400 for a bad param quotes nothing of the request.
    from mlflow.pyfunc import scoring_server

    body = json.dumps({"dataframe_records": [{"image": PHI["PatientName"]}], "params": {"threshold": 2}})
    with pytest.raises(MlflowException) as err:
        scoring_server.invocations(body, "application/json", model, model.metadata.get_input_schema())
    assert err.value.get_http_status_code() == 400 and "must be in [0, 1]" in err.value.message
    assert PHI["PatientName"] not in err.value.serialize_as_json()


def test_real_files_are_scored(loaded, real_data):
    files = [real_data / "dicom/RG1_J2KI.dcm", real_data / "dicom/txv_chest_pa.dcm",
             sorted((real_data / "cohen/images").glob("*.jp*g"))[0],
             sorted((real_data / "montgomery_shenzhen/images").glob("*.png"))[0]]
    entries = loaded.score([serving.encode_file(f) for f in files])
    assert [e["reason"] for e in entries] == [None] * len(files)
    assert all(e["projection"] == "frontal" and 0 <= e["covid_probability"] <= 1 for e in entries)


def test_the_remote_scorer_never_sends_images_through_the_environments_proxy(monkeypatch):
    """With http_proxy set and no no_proxy, `predict --url` and `pacs --url` sent whole DICOM files (patient name, ID,
    birth date) to the proxy, even for a scoring server on 127.0.0.1. They now go to the server directly. The proxy: a
    loopback server that records what reaches it."""
    from tests.test_pacs import Quiet, loopback

    reached: dict[str, list[bytes]] = {"proxy": [], "server": []}

    def recording(name: str) -> type[Quiet]:
        class Recorder(Quiet):
            def do_POST(self):  # noqa: N802 - the http.server API
                reached[name].append(self.rfile.read(int(self.headers["Content-Length"])))
                self.answer(200, "application/json", json.dumps({"predictions": [{"accepted": True}]}).encode())

        return Recorder

    image = dicom_b64(phantom(seed=1), **PHI)
    with loopback(recording("proxy")) as proxy, loopback(recording("server")) as server:
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy}")
        assert serving.remote_scorer(f"http://127.0.0.1:{server}", timeout=10)([image], {}) == [{"accepted": True}]
    assert reached["proxy"] == [] and len(reached["server"]) == 1


@pytest.mark.parametrize(("header", "seconds"), [("30", 30.0), (" 7 ", 7.0), ("3600", serving.MAX_RETRY_AFTER),
                                                 ("Fri, 01 Mar 2024 12:00:30 GMT", 30.0),
                                                 ("Fri, 01 Mar 2024 11:00:00 GMT", 0.0), ("soon", None), (None, None)])
def test_retry_after_reads_delay_seconds_and_http_dates_at_most_the_cap(header, seconds):
    """The one reading of a Retry-After header, for the scorer's answers and the PACS's: a date in the past asks for
    no wait, an unreadable value for none of its own (the caller's backoff applies)."""
    import datetime as dt

    assert serving.retry_after(header, now=dt.datetime(2024, 3, 1, 12, 0, 0, tzinfo=dt.UTC)) == seconds


@pytest.mark.parametrize(("status", "headers", "seconds"), [(429, {"Retry-After": "30"}, 30.0), (503, {}, None)])
def test_the_remote_scorers_error_carries_the_retry_after_its_answer_asked(status, headers, seconds):
    """A 429's Retry-After was dropped with the answer: the PACS worker sent the request again 1 s later, whatever a
    rate limiter asked. The error now carries it (in seconds, capped), and nothing without one."""
    from tests.test_pacs import Quiet, loopback

    class Limiter(Quiet):
        def do_POST(self):  # noqa: N802 - the http.server API
            self.rfile.read(int(self.headers["Content-Length"]))
            self.answer(status, "application/json", b'{"message": "not now"}', headers)

    with loopback(Limiter) as port, pytest.raises(serving.ScoringError) as caught:
        serving.remote_scorer(f"http://127.0.0.1:{port}", timeout=10)([png_b64(phantom(seed=1))], {})
    assert (caught.value.status, caught.value.retry_after, caught.value.detail) == (status, seconds, "not now")


def test_answers_the_scoring_server_timed_out_on_leave_no_records(bundle, tmp_path, monkeypatch, caplog):
    """mlflow models serve answers HTTP 504 past MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT but its scoring thread runs on:
    the log recorded answers no client received, and the retried request logged the same images again. The real
    scoring server (MLflow's app under uvicorn, in a thread) with a 1 s timeout; the U-Net is made slow."""
    import threading
    import time
    import urllib.error
    import urllib.request

    import mlflow
    import uvicorn
    from mlflow.pyfunc import scoring_server

    from covidcxr import predlog
    from tests.test_predlog import closed_port

    mlflow.pyfunc.save_model(tmp_path / "model", python_model=serving.CovidCxrModel(), artifacts=bundle,
                             signature=serving.signature(), pip_requirements=["mlflow"])
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    pipeline = model.unwrap_python_model().pipeline
    pipeline.prediction_log, unet, delay = predlog.MemoryLog(), pipeline.unet, {"s": 2.5}

    def slow_unet(images: np.ndarray) -> np.ndarray:
        time.sleep(delay["s"])
        return unet(images)

    pipeline.unet = slow_unet
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "1")
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "false")  # init sets it true; restored after the test
    port = closed_port()
    server = uvicorn.Server(uvicorn.Config(scoring_server.init(model), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    body = json.dumps({"dataframe_records": [{"image": png_b64(phantom(seed=s))} for s in range(2)]}).encode()

    def post() -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert post() == 504
        while pipeline.undelivered == 0 and time.monotonic() < deadline:  # the scoring thread ends after the 504
            time.sleep(0.05)
        assert pipeline.undelivered == 2 and pipeline.prediction_log.records == []
        assert "2 record(s) not logged" in caplog.text and "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT" in caplog.text
        delay["s"] = 0.0
        assert post() == 200
        assert len(pipeline.prediction_log.records) == 2 and pipeline.undelivered == 2
    finally:
        server.should_exit = True
        thread.join(10)
