"""The HTML model card: every section, escaping, offline rendering, embedded plots and images, counts without PHI."""

from __future__ import annotations

import base64
import io
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covidcxr import modelcard
from covidcxr.modelcard import CardData, ModelCardError

HOSTILE = '<script>alert("x")</script>'
HOSTILE_ATTR = '"><img src=https://evil.example/x.png>'


class Collector(HTMLParser):
    """Tags, attributes and text of a page (the standard library's HTML parser)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> Collector:
    parser = Collector()
    parser.feed(page)
    parser.close()
    return parser


def png(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def split_table() -> pd.DataFrame:
    rows = [("train", "site_a", "covid", "P1"), ("train", "site_a", "covid", "P1"),
            ("train", "site_b", "negative", "P2"),
            ("val", "site_a", "covid", "P3"), ("val", "site_b", "negative", "P4"), ("test", "site_b", "covid", "P5"),
            ("test", "site_b", "negative", "P6"), ("test", "site_b", "negative", "P7")]
    return pd.DataFrame(rows, columns=["split", "source", "label", "patient_id"])


def metrics_block(auc: float) -> dict:
    at = {"accuracy": 0.9, "sensitivity": 0.8, "specificity": 0.95, "precision": 0.93, "f1": 0.86, "roc_auc": auc,
          "average_precision": 0.9, "n": 40, "n_positive": 20, "tp": 16, "fn": 4, "tn": 19, "fp": 1}
    ci = {"roc_auc": {"low": 0.812, "high": 0.999, "value": auc}, "sensitivity": {"low": 0.61, "high": 0.94}}
    return {"at_operating": at, "ci_at_operating": ci, "ece": 0.071}


def heldout_row(spec: float, used: bool, auc: float | None = None) -> dict:
    return {"n_covid": 30 if auc is not None else 0, "n_negative": 40, "auc": auc, "auc_low": auc and auc - 0.1,
            "auc_high": auc and min(1.0, auc + 0.05), "specificity": spec, "specificity_low": spec - 0.1,
            "specificity_high": spec + 0.1, "sensitivity": 0.9 if auc is not None else None, "threshold": 0.4321,
            "used_to_choose": used}


HELDOUT = {"figure": "worst held-out specificity at the operating threshold (kermany)", "select": ["kermany"],
           "by_classifier": {"c_vgg16": 0.41, "e_vgg16": 0.12},
           "sources": {"kermany": {"c_vgg16": heldout_row(0.41, True), "e_vgg16": heldout_row(0.12, True)},
                       "hospitals": {"c_vgg16": heldout_row(0.6234, False, auc=0.7777)}}}


def card(**changes) -> CardData:
    table = split_table()
    base = dict(
        model={"model_name": "covidcxr", "version": 3, "alias": "champion", "classifier": "c_vgg16", "variant": "c",
               "backbone": "vgg16", "working_size": "64 px", "operating_threshold": 0.61234, "note": HOSTILE},
        data=modelcard.data_summary(table), split_check={"covid": modelcard.split_check(table)},
        metrics={"test": metrics_block(0.9137), "val": metrics_block(0.95)},
        curves={"roc": [{"fpr": 0.0, "tpr": 0.0}, {"fpr": 0.1, "tpr": 0.7}, {"fpr": 1.0, "tpr": 1.0}],
                "pr": [{"recall": 1.0, "precision": 0.5}, {"recall": 0.5, "precision": 0.9}],
                "reliability": [{"mean_predicted": 0.1, "observed_frequency": 0.0, "count": 4},
                                {"mean_predicted": None, "observed_frequency": None, "count": 0},
                                {"mean_predicted": 0.9, "observed_frequency": 0.8, "count": 5}]},
        gradcam={f"c_vgg16 {HOSTILE_ATTR}": png(1)},
        audit={"status": "fail", "checks": [
            {"name": "variant_e_auc", "subject": "e_vgg16", "value": 0.97, "warn": 0.7, "fail": 0.8, "status": "fail",
             "reason": f"lungs removed still separates the classes {HOSTILE}"},
            {"name": "source_accuracy", "subject": "all", "value": 0.55, "warn": 0.8, "fail": 0.9, "status": "pass",
             "reason": None}]},
        heldout=HELDOUT,
        selection=[{"classifier": "c_vgg16", "val_roc_auc": 0.95, "heldout": 0.41, "audit_status": "warn",
                    "chosen": True, "reason": "chosen: best worst held-out specificity (0.4100)"},
                   {"classifier": "e_vgg16", "val_roc_auc": 0.97, "heldout": 0.12, "audit_status": "fail",
                    "chosen": False, "reason": "not eligible: its audit failed (lungs_removed_auc:c_vgg16)"}],
        selected_by="heldout",
        classifiers={"c_vgg16": {"test_auc": 0.9137}, "e_vgg16": {"test_auc": 0.42}},
    )
    base.update(changes)
    return CardData(**base)


def test_card_has_every_section_and_parses_as_html():
    page = modelcard.render(card())
    parsed = parse(page)
    text = " ".join(parsed.text)
    for heading in ("Model", "Intended use", "Limitations", "Data", "Patient-level split",
                    "Performance at the operating threshold", "Curves", "Grad-CAM", "Shortcut audit",
                    "Hospitals and sources it never saw", "Which classifier was registered, and why",
                    "All classifiers of this run"):
        assert f"<h2>{heading}" in page, heading
    assert "not for diagnosis" in text and "Model card: covidcxr v3 (alias at registration: champion)" in text
    # metrics with their 95% CI at the operating threshold (from the data, not hard-wired)
    assert "0.914" in text and "0.812 – 0.999" in text and "0.6123" in text
    # counts per split and source, and the split statement computed from the table
    assert "no patient appears in more than one split" in text
    assert "site_a" in text and "site_b" in text
    # the audit table with its statuses, the held-out results of this model's settings and the selection
    assert "variant_e_auc" in text and 'class="badge fail"' in page
    assert "hospitals" in text and "0.778 [0.678, 0.828]" in text and "0.623 [0.523, 0.723]" in text
    assert "used to choose" in text and "test" in text and "not eligible: its audit failed" in text
    assert page.count("<table") >= 6 and page.rstrip().endswith("</html>")


def test_heldout_rows_over_seeds_show_mean_sd_and_range():
    row = {"n_covid": 0, "n_negative": 40, "n_seeds": 3, "used_to_choose": True, "specificity": 0.4,
           "specificity_sd": 0.4359, "specificity_min": 0.1, "specificity_max": 0.9, "auc": None, "sensitivity": None,
           "threshold_by_seed": [0.25, 0.5, 0.4], "called_covid": 0.3, "called_covid_sd": 0.1, "called_covid_min": 0.2,
           "called_covid_max": 0.4, "detected": None}
    heldout = {**HELDOUT, "seeds": 3, "sources": {"kermany": {"c_vgg16": row}}}
    text = " ".join(parse(modelcard.render(card(heldout=heldout))).text)
    assert "repeated with 3 seeds" in text and "specificity [range over seeds]" in text
    # what a new site sees: its negatives called COVID-19 by serving; the refused share was not recorded: a dash
    assert "negatives called COVID-19 by serving [range over seeds]" in text and "0.300 ± 0.100 [0.200, 0.400]" in text
    assert "negatives refused as unfamiliar [range over seeds]" in text and "—" in text
    assert "COVID-19 called COVID-19 by serving [range over seeds]" in text
    assert "bootstrap 95% CIs" not in text.split("never saw")[1].split("Which classifier")[0]
    assert "0.400 ± 0.436 [0.100, 0.900]" in text and "0.2500 to 0.5000" in text


def test_hostile_strings_are_escaped():
    page = modelcard.render(card(model={"model_name": HOSTILE, "version": HOSTILE_ATTR, "classifier": "c_vgg16"}))
    assert "<script" not in page.lower()
    assert "evil.example" in page  # present, but only as escaped text
    parsed = parse(page)
    assert [t for t, _ in parsed.tags if t == "script"] == []
    assert all("evil" not in str(attrs.get("src", "")) for _, attrs in parsed.tags)
    assert HOSTILE in " ".join(parsed.text)  # the browser shows the text as it was


def test_renders_offline_no_network_references():
    page = modelcard.render(card(gradcam={"c_vgg16": png(1)}))  # (escaped hostile text is test_hostile_...'s job)
    parsed = parse(page)
    refs = [v for _, attrs in parsed.tags for k, v in attrs.items() if k in ("src", "href", "xlink:href", "data")]
    assert refs and all(v.startswith("data:image/") for v in refs)
    assert not re.search(r"(?i)<[^>]*\b(src|href)\s*=\s*[\"']?\s*(https?:)?//", page)  # inside a tag
    assert "url(" not in page and "@import" not in page
    assert not {"script", "link", "iframe", "object"} & {t for t, _ in parsed.tags}


def test_plots_and_gradcam_are_embedded():
    page = modelcard.render(card())
    svgs = re.findall(r"<svg.*?</svg>", page, flags=re.S)
    assert len(svgs) == 3
    for svg in svgs:
        ET.fromstring(svg)  # well-formed
    roc = svgs[0]
    # three ROC points -> a polyline through three coordinates; the empty reliability bin is left out
    assert len(re.search(r'<polyline points="([^"]+)"', roc).group(1).split()) == 3
    assert len(re.findall(r"<circle", svgs[2])) == 2
    uris = [a["src"] for t, a in parse(page).tags if t == "img"]
    assert len(uris) == 1 and uris[0].startswith("data:image/png;base64,")
    assert base64.b64decode(uris[0].split(",", 1)[1]) == png(1)


def test_missing_audit_and_heldout_results_are_stated():
    page = modelcard.render(card(audit=None, heldout=None, selection=(), gradcam={}, curves={}))
    assert "audit not run" in page
    assert "No held-out-source results for this model's settings" in page
    assert "Which classifier was registered" not in page
    assert "No Grad-CAM images in this run" in page
    assert "ROC (test): not available" in page


def test_synthetic_note_only_for_demo_data():
    assert "synthetic phantoms" in modelcard.render(card(synthetic=True))
    assert "synthetic phantoms" not in modelcard.render(card(synthetic=False))


def test_no_patient_identifiers_reach_the_card():
    page = modelcard.render(card(model={"model_name": "covidcxr", "version": 3, "classifier": "c_vgg16",
                                        "patient_id": "P9"}))
    for pid in ("P1", "P2", "P5", "P9"):
        assert not re.search(rf"\b{pid}\b", page), pid
    assert "patient_id" not in page  # hidden keys of free-form data are dropped


def test_counts_and_split_check():
    table = split_table()
    summary = modelcard.data_summary(table)
    assert summary["sources"] == ["site_a", "site_b"]
    first = summary["rows"][0]
    assert first == {"split": "train", "source": "site_a", "label": "covid", "images": 2, "patients": 1}
    assert list(summary["totals"]) == ["train", "val", "test"]
    assert summary["totals"]["test"] == {"images": 3, "patients": 3}
    assert modelcard.split_check(table)["patients_in_several_splits"] == 0
    leaky = pd.concat([table, pd.DataFrame([{"split": "test", "source": "site_a", "label": "covid",
                                             "patient_id": "P1"}])])
    check = modelcard.split_check(leaky)
    assert check["patients_in_several_splits"] == 1 and check["patients"] == 7
    page = modelcard.render(card(split_check={"covid": check}))
    assert "1 patients appear in more than one split" in page


def test_bad_input_raises_typed_errors():
    with pytest.raises(ModelCardError, match="neither PNG nor JPEG"):
        modelcard.render(card(gradcam={"x": b"GIF89a..."}))
    with pytest.raises(ModelCardError, match="no list of checks"):
        modelcard.render(card(audit={"status": "pass"}))
    with pytest.raises(ModelCardError, match="lacks 'fpr'"):
        modelcard.render(card(curves={"roc": [{"x": 0}]}))
    with pytest.raises(ModelCardError, match="lacks columns"):
        modelcard.data_summary(pd.DataFrame({"split": ["train"]}))


def test_calibration_before_and_after_is_shown():
    block = {**metrics_block(0.9), "ece": 0.031, "ece_uncalibrated": 0.214}
    page = modelcard.render(card(metrics={"test": block}))
    assert "0.031" in page and "before the calibration fitted on validation: 0.214" in page


def test_a_held_out_hospital_s_own_thresholds_are_on_the_card():
    """What a new site would get from calibrate-site (its threshold, and its films admitted past the OOD check),
    beside what serving answers today, for the registered classifier only; no section where nothing measured it."""
    figures = {"site_n_per_class": 20, "site_specificity": 0.21, "site_sensitivity": 0.957,
               "admit_specificity": 0.197, "admit_sensitivity": 0.949, "admit_refused": 0.006,
               "admit_model_specificity": 0.177, "admit_model_sensitivity": 0.974, "admit_model_refused": 0.038}
    hospitals = {"c_vgg16": {**heldout_row(0.6234, False, auc=0.7777), **figures},
                 "e_vgg16": {**heldout_row(0.5, False, auc=0.7), "site_specificity": 0.4242}}
    heldout = {**HELDOUT, "sources": {**HELDOUT["sources"], "hospitals": hospitals}}
    text = " ".join(parse(modelcard.render(card(heldout=heldout))).text)
    assert "A new site's own thresholds" in text and "20 COVID-19 and 20 negative films" in text
    assert "this model version only (by registered name and version)" in text and "COVIDCXR_SITE" in text
    for value in ("0.210", "0.957", "0.197", "0.949", "0.006", "0.177", "0.974", "0.038"):
        assert value in text.split("A new site's own thresholds")[1]
    assert "0.424" not in text  # another classifier's figure: not this card's
    assert "A new site's own thresholds" not in " ".join(parse(modelcard.render(card())).text)


def test_held_out_rows_are_development_figures_unless_the_card_is_told_they_are_untouched():
    """The real-data profile's settings were chosen on held-out runs of the same rules and test images: the card never
    calls a held-out row an untouched test unless told no choice ever saw it."""
    section = " ".join(parse(modelcard.render(card())).text).split("never saw")[1].split("Which classifier")[0]
    assert "no row is an untouched external test" in section and "every row here is a development figure" in section
    assert "development (did not choose)" in section and "never influenced" not in section
    untouched = " ".join(parse(modelcard.render(card(heldout_untouched=True))).text)
    assert "influenced no choice, of the classifier or of its settings: they are the test" in untouched
    assert "development figure" not in untouched


def test_the_card_says_its_grad_cam_images_are_radiographs_and_leaves_them_out_when_told():
    shown = " ".join(parse(modelcard.render(card())).text)
    assert "the test radiographs themselves" in shown and "text burned into them" in shown
    page = modelcard.render(card(images=False))  # even with grids given: none is embedded
    assert "data:image" not in page and "<img" not in page and "Grad-CAM grids left out of this card" in page


def test_a_ci_shows_its_undefined_resamples_and_none_past_the_limit():
    """A bootstrap CI is over the resamples where its metric was defined: the card counts the others, and a CI
    undefined in more than SKIPPED_LIMIT of them is a dash, not an interval of the lucky resamples."""
    block = metrics_block(0.9)
    block["ci_at_operating"] = {"roc_auc": {"value": 0.9, "low": 0.812, "high": 0.999, "n_skipped": 0},
                                "sensitivity": {"value": 0.8, "low": 0.61, "high": 0.94, "n_skipped": 120},
                                "specificity": {"value": 0.95, "low": 0.9, "high": 0.99, "n_skipped": 30},
                                "f1": {"value": 0.86, "low": 0.7, "high": 0.9}}  # a report from before the count
    text = " ".join(parse(modelcard.render(card(metrics={"test": block}, n_boot=500))).text)
    assert "500 resamples" in text and "resamples undefined" in text
    assert "— (undefined in 24% of resamples)" in text and "120 of 500" in text and "0.610 – 0.940" not in text
    assert "0.900 – 0.990" in text and "30 of 500" in text and "0.812 – 0.999" in text and "0 of 500" in text
    assert "0.700 – 0.900" in text and "not recorded" in text
    unknown = " ".join(parse(modelcard.render(card(metrics={"test": block}))).text)  # n_boot not given: the count
    assert "0.610 – 0.940" in unknown and "120" in unknown


def test_held_out_rows_are_not_said_to_have_chosen_when_validation_chose():
    """register.heldout was set, but a candidate had no held-out figure and select fell back to validation: the card
    still said "Rows marked used to choose decided which classifier was registered" and marked rows so."""
    def section(**changes) -> str:
        text = " ".join(parse(modelcard.render(card(**changes))).text)
        return text.split("never saw")[1].split("Which classifier")[0]

    assert "used to choose" in section()  # held-out figures chose: their rows say so
    fallback = section(selected_by="val_roc_auc")
    assert "used to choose" not in fallback and "decided which classifier" not in fallback
    assert "No row chose the registered classifier: the validation figure did (val roc_auc)" in fallback
    assert "development (did not choose)" in fallback
    unknown = section(selected_by=None)
    assert "used to choose" not in unknown and "which figure chose it is not recorded" in unknown


def test_the_card_says_what_each_figure_is_of():
    """The alias is the one at registration (an older version's card kept "(champion)" after it moved on); the
    validation block's threshold and calibration were fitted on that split; precision has no CI computed, where the
    card showed a dash and "resamples undefined"."""
    page = modelcard.render(card())
    text = " ".join(parse(page).text)
    assert "Model card: covidcxr v3 (alias at registration: champion)" in text and "(champion)" not in text
    assert "<td>alias at registration</td><td>champion</td>" in page
    test, val = text.split("Validation split")
    assert "threshold chosen on this split" in val and "threshold chosen on this split" not in test
    assert "Expected calibration error (after the calibration fitted on this split): 0.071" in val
    assert "calibration fitted on this split" not in test
    precision = re.search(r"<tr><td>Precision</td>(.*?)</tr>", page).group(1)
    assert precision.count("not computed") == 2 and "—" not in precision
    specificity = re.search(r"<tr><td>Specificity</td>(.*?)</tr>", page).group(1)
    assert "not computed" in specificity  # metrics_block has CIs of roc_auc and sensitivity only
    sensitivity = re.search(r"<tr><td>Sensitivity</td>(.*?)</tr>", page).group(1)
    assert "0.610 – 0.940" in sensitivity and "not computed" not in sensitivity


def test_held_out_rows_say_why_serving_refused_and_of_how_many_films():
    """Held-out rows made since evaluate counted the films refused before scoring: their refused negatives are lateral
    views, failed lung masks and films out of distribution together (the card called them all "unfamiliar"); the card
    says so, shows the two kinds apart as shares of every test film, and beside the films scored (which the AUC and
    specificity are of) every film of the test; rows made before keep their wording."""
    served = {"called_covid": 0.25, "refused": 0.4, "refused_before": 0.3333, "refused_ood": 0.1667,
              "films_covid": 34, "films_negative": 45}
    heldout = {**HELDOUT, "sources": {"hospitals": {"c_vgg16": {**heldout_row(0.6234, False, auc=0.7777),
                                                                **served}}}}
    page = modelcard.render(card(heldout=heldout))
    section = " ".join(parse(page).text).split("never saw")[1].split("Which classifier")[0]
    assert "unfamiliar" not in section
    assert "negatives refused (lateral view, lung mask or out of distribution)" in section
    assert "all test films refused before scoring (lateral view, lung mask)" in section
    assert "all test films refused as out of distribution" in section
    assert "films covid / negative (of them scored)" in section and "34 / 45 (30 / 40)" in section
    assert "ROC AUC, specificity and sensitivity are of the films the classifier scored" in section
    assert "count every film, refused or not" not in section
    row = re.search(r"<tr><td>hospitals</td>(.*?)</tr>", page).group(1)
    assert re.findall(r'<td class="n">([^<]*)</td>', row)[4:8] == ["0.250", "0.400", "0.333", "0.167"]
    old = " ".join(parse(modelcard.render(card())).text)  # rows made before: refused out of distribution only
    assert "negatives refused as unfamiliar" in old and "n covid / negative" in old and "30 / 40" in old
    assert "before scoring" not in old and "count every film, refused or not" in old


def test_a_new_site_s_thresholds_say_whether_patients_or_films_were_drawn():
    """evaluate's site simulation draws patients where it has patient ids (its rows say ``site_unit``); the card said
    films whatever was drawn. Rows made before it drew films and say nothing."""
    figures = {"site_n_per_class": 20, "site_specificity": 0.21, "site_sensitivity": 0.957}

    def onboarding(**unit) -> str:
        heldout = {**HELDOUT, "sources": {"hospitals": {"c_vgg16": {**heldout_row(0.6, False, auc=0.7), **figures,
                                                                    **unit}}}}
        text = " ".join(parse(modelcard.render(card(heldout=heldout))).text)
        return text.split("A new site's own thresholds")[1].split("Which classifier")[0]

    patients = onboarding(site_unit="patients")
    assert "20 COVID-19 and 20 negative patients drawn at random" in patients and "negative films drawn" not in patients
    assert "each patient counted once by the rule); the other patients' films are called" in patients
    for films in (onboarding(site_unit="films"), onboarding()):
        assert ("20 COVID-19 and 20 negative films drawn at random, many times, choose; the run's other films are "
                "called with the site's thresholds") in films and "patients" not in films
