"""covidcxr.sites: a site's own threshold by the model's rule, and what it buys on films it was not chosen on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from covidcxr import metrics, sites

RULE = {"threshold": 0.3, "objective": "sensitivity", "min_sensitivity": 0.9}


def test_local_threshold_is_the_model_s_rule_kept_on_the_site_s_next_films():
    y = np.r_[np.ones(10, int), np.zeros(10, int)]
    score = np.r_[np.linspace(0.55, 0.95, 10), np.linspace(0.1, 0.6, 10)]
    choice = sites.local_threshold(y, score, RULE)
    # 10 films promise 0.9 only if none falls below: the threshold is the lowest COVID-19 score, where "0.9 of these
    # films" (the point estimate) would leave one below
    assert choice.threshold == 0.55 and choice.sensitivity == 1.0 and choice.min_sensitivity == 0.9
    point = metrics.operating_threshold(y, score, "sensitivity", min_sensitivity=0.9)
    assert point.threshold > choice.threshold and point.sensitivity == 0.9
    assert choice.specificity == float((score[10:] < 0.55).mean())
    youden = sites.local_threshold(y, score, {"threshold": 0.5, "objective": "youden", "min_sensitivity": None})
    assert youden == metrics.operating_threshold(y, score, "youden")


@pytest.mark.parametrize("n, target, misses, promised", [
    (20, 0.95, 0, 20 / 21), (19, 0.95, 0, 19 / 20), (40, 0.95, 1, 39 / 41), (20, 0.9, 1, 19 / 21), (9, 0.9, 0, 0.9),
])
def test_site_rule_leaves_as_many_films_below_as_the_promise_allows(n, target, misses, promised):
    assert sites.site_rule(n, target) == (misses, pytest.approx(promised))
    assert (n - misses - 1) / (n + 1) < target  # one more miss would break the promise


@pytest.mark.parametrize("n, target, message", [(18, 0.95, "18 COVID-19 films .* at least 19"),
                                                 (10, 1.0, r"in \[0, 1\)")])
def test_site_rule_says_how_many_films_a_promise_takes(n, target, message):
    with pytest.raises(ValueError, match=message):
        sites.site_rule(n, target)


def test_the_site_rule_keeps_its_promise_on_new_films_where_the_point_estimate_does_not():
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(400, int), np.zeros(400, int)]
    score = np.r_[rng.beta(5, 2, 400), rng.beta(2, 5, 400)]
    rule = {"threshold": 0.5, "objective": "sensitivity", "min_sensitivity": 0.95}
    out = sites.local_calibration(y, score, rule, n_per_class=20, draws=400, seed=0)
    assert out["promised_sensitivity"] == pytest.approx(20 / 21)
    assert out["sensitivity"] >= 0.945  # 20/21 in expectation; the 400 draws' mean is within 0.005 of it
    # the point estimate on the same draws (one of 20 films below the threshold) averages 19/21
    g = np.random.default_rng(0)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    kept = []
    for _ in range(400):
        p, n = g.permutation(pos), g.permutation(neg)
        t = metrics.operating_threshold(y[np.r_[p[:20], n[:20]]], score[np.r_[p[:20], n[:20]]], "sensitivity",
                                        min_sensitivity=0.95).threshold
        kept.append(float((score[p[20:]] >= t).mean()))
    assert np.mean(kept) < 0.925


@pytest.mark.parametrize("y, score, message", [
    (np.r_[np.ones(9, int), np.zeros(10, int)], np.full(19, 0.5), "10 COVID-19 and 10 negative films; got 9 and 10"),
    (np.r_[np.ones(10, int), np.zeros(10, int)], np.r_[np.full(19, 0.5), np.nan], "finite probability"),
    (np.ones(3, int), np.full(4, 0.5), "3 labels for 4 scores"),
])
def test_local_threshold_refuses_what_it_cannot_choose_on(y, score, message):
    with pytest.raises(ValueError, match=message):
        sites.local_threshold(y, score, RULE)


def test_local_calibration_measures_the_site_threshold_on_the_other_films_beside_the_model_s():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(50, int), np.zeros(150, int)]
    score = np.r_[rng.uniform(0.6, 1.0, 50), rng.uniform(0.35, 0.75, 150)]  # a site whose healthy films score high
    out = sites.local_calibration(y, score, RULE, n_per_class=20, draws=100, seed=1)
    assert out["status"] == "measured" and (out["n_covid"], out["n_negative"], out["draws"]) == (50, 150, 100)
    assert out["model_specificity"] == 0.0 and out["model_sensitivity"] == 1.0
    assert 0.5 < out["specificity"] < 1.0 and out["sensitivity_p10"] <= out["sensitivity"] <= out["sensitivity_p90"]
    assert out["threshold_median"] > 0.55
    # by hand, the first draw: the same generator, the same films, the same threshold and figures
    g = np.random.default_rng(1)
    p, n = g.permutation(np.flatnonzero(y == 1)), g.permutation(np.flatnonzero(y == 0))
    t = float(np.sort(score[p[:20]])[1])  # 20 films promise 0.9 with one below: the second-lowest COVID-19 score
    once = sites.local_calibration(y, score, RULE, n_per_class=20, draws=1, seed=1)
    assert once["threshold_median"] == t
    assert once["specificity"] == pytest.approx(float((score[n[20:]] < t).mean()))
    assert once["sensitivity"] == pytest.approx(float((score[p[20:]] >= t).mean()))
    assert sites.local_calibration(y, score, RULE, n_per_class=20, draws=100, seed=1) == out  # seeded


def test_local_calibration_never_tests_a_drawn_patient_s_other_films():
    """A site labels patients' films: a COVID-19 patient's second film, scored like the first, tested a threshold
    chosen on the very patient. With patients, a draw takes patients (all their films of the drawn label), as
    calibrate-site counts them, and tests the films of the patients drawn in neither class."""
    rng = np.random.default_rng(2)
    patients = np.repeat([f"p{i}" for i in range(100)], 2)  # every patient twice, both films scored alike
    y = np.repeat(np.r_[np.ones(30, int), np.zeros(70, int)], 2)
    score = np.repeat(np.r_[rng.uniform(0.3, 1.0, 30), rng.uniform(0.0, 0.7, 70)], 2)
    once = sites.local_calibration(y, score, RULE, n_per_class=20, draws=1, seed=4, patients=patients)
    assert (once["unit"], once["n_covid"], once["n_covid_patients"], once["n_negative_patients"]) == (
        "patients", 60, 30, 70)
    g = np.random.default_rng(4)
    ids = np.unique(patients, return_inverse=True)[1]
    covid, negative = g.permutation(np.unique(ids[y == 1]))[:20], g.permutation(np.unique(ids[y == 0]))[:20]
    chosen = np.where(y == 1, np.isin(ids, covid), np.isin(ids, negative))
    rest = ~np.isin(ids, np.r_[covid, negative])
    assert chosen.sum() == 80 and rest.sum() == 120  # 20 + 20 patients of 2 films choose; the other 60 patients test
    t = sites.local_threshold(y[chosen], score[chosen], RULE, patients=patients[chosen]).threshold  # calibrate-site's
    assert once["threshold_median"] == t
    assert once["sensitivity"] == pytest.approx(float((score[rest & (y == 1)] >= t).mean()))
    assert once["specificity"] == pytest.approx(float((score[rest & (y == 0)] < t).mean()))
    with pytest.raises(ValueError, match="3 patient ids for 200 films"):
        sites.local_calibration(y, score, RULE, patients=patients[:3])


def test_local_calibration_by_patient_keeps_the_promise_the_film_draw_overstated():
    """20 films of a site whose 25 COVID-19 patients have 20 films each, all scored alike, are the films of about 14
    patients: the lowest of them keeps about 14/15 of the next patients, not the 20/21 counted by film. Drawn by
    patient, as calibrate-site counts a table with a patient column, 20 patients keep 20/21."""
    rng = np.random.default_rng(5)
    level = np.r_[rng.permutation(np.linspace(0.40, 0.99, 25)), rng.permutation(np.linspace(0.01, 0.60, 25))]
    patients = np.repeat([f"p{i}" for i in range(50)], 20)
    y = np.repeat(np.r_[np.ones(25, int), np.zeros(25, int)], 20)
    score = np.repeat(level, 20) + rng.uniform(-1e-4, 1e-4, 1000)  # a patient's films score alike
    rule = {"threshold": 0.5, "objective": "sensitivity", "min_sensitivity": 0.95}
    out = sites.local_calibration(y, score, rule, n_per_class=20, draws=1000, seed=0, patients=patients)
    assert out["status"] == "measured" and out["unit"] == "patients"
    assert out["promised_sensitivity"] == pytest.approx(20 / 21)  # 20 patients
    assert out["sensitivity"] >= 20 / 21 - 0.01  # 20/21 in expectation (the 5 other patients' films)
    # drawn by film (the threshold at the lowest of 20 COVID-19 films, the undrawn patients' films tested): the 20/21
    # counted by film is not kept
    g, pos, kept = np.random.default_rng(0), np.flatnonzero(y == 1), []
    for _ in range(1000):
        drawn = g.permutation(pos)[:20]
        tested = (y == 1) & ~np.isin(patients, patients[drawn])
        kept.append(float((score[tested] >= score[drawn].min()).mean()))
    assert np.mean(kept) < 20 / 21 - 0.01


def test_local_calibration_counts_patients_to_skip_and_draws_a_patient_of_both_labels_in_both():
    # 30 COVID-19 films of 10 patients: too few patients to choose on 20 and test on the rest
    patients = np.r_[np.repeat([f"c{i}" for i in range(10)], 3), [f"n{i}" for i in range(40)]]
    y, score = np.r_[np.ones(30, int), np.zeros(40, int)], np.r_[np.linspace(0.5, 1, 30), np.linspace(0, 0.6, 40)]
    short = sites.local_calibration(y, score, RULE, n_per_class=20, patients=patients)
    assert short["status"] == "skipped" and short["n_covid"] == 30
    assert "10 COVID-19 and 40 negative patients: a site threshold on 20 of each needs at least 25" in short["reason"]
    few = sites.local_calibration(y, score, {**RULE, "min_sensitivity": 0.95}, n_per_class=5, patients=patients)
    assert few["status"] == "skipped" and "5 COVID-19 patients cannot promise sensitivity 0.95" in few["reason"]
    # a patient with a film of each label is one of the COVID-19 patients and one of the negative ones
    mixed = np.r_[[f"m{i}" for i in range(30)], [f"m{i}" for i in range(30)], [f"n{i}" for i in range(10)]]
    y = np.r_[np.ones(30, int), np.zeros(40, int)]
    out = sites.local_calibration(y, score, RULE, n_per_class=10, draws=20, seed=0, patients=mixed)
    assert out["status"] == "measured" and (out["n_covid_patients"], out["n_negative_patients"]) == (30, 40)


def test_local_calibration_says_why_it_could_not_measure():
    y, score = np.r_[np.ones(24, int), np.zeros(100, int)], np.linspace(0, 1, 124)
    short = sites.local_calibration(y, score, RULE, n_per_class=20)
    assert short["status"] == "skipped" and "24 COVID-19 and 100 negative films" in short["reason"]
    unknown = sites.local_calibration(y, score, {"threshold": 0.5}, n_per_class=5)
    assert unknown["status"] == "skipped" and "by which rule" in unknown["reason"]
    few = sites.local_calibration(y, score, {**RULE, "min_sensitivity": 0.95}, n_per_class=10)
    assert few["status"] == "skipped" and "10 COVID-19 films cannot promise sensitivity 0.95" in few["reason"]


def test_a_site_admits_its_own_films_up_to_the_highest_ood_score_it_labelled():
    assert sites.local_ood_threshold([3.0, 7.5, 5.0], 6.0) == 7.5
    assert sites.local_ood_threshold([3.0, 5.0], 6.0) == 6.0  # never stricter than the model
    for bad in ([], [1.0, np.nan]):
        with pytest.raises(ValueError, match="finite OOD scores"):
            sites.local_ood_threshold(bad, 6.0)


def test_local_calibration_with_admission_answers_the_films_the_model_refuses():
    """A site whose COVID-19 films all lie beyond the model's OOD threshold: serving answers none of them, so the
    model's sensitivity is undefined in every draw; admitted, they are answered and the target holds."""
    rng = np.random.default_rng(5)
    y = np.r_[np.ones(60, int), np.zeros(120, int)]
    score = np.r_[rng.uniform(0.5, 1.0, 60), rng.uniform(0.0, 0.7, 120)]
    ood_scores = np.r_[rng.uniform(12.0, 20.0, 60), rng.uniform(0.0, 8.0, 120)]
    rule = {"threshold": 0.6, "objective": "sensitivity", "min_sensitivity": 0.9}
    out = sites.local_calibration(y, score, rule, n_per_class=20, draws=50, seed=2, ood=(ood_scores, 10.0))
    assert out["status"] == "measured"
    assert out["model_sensitivity"] is None and out["model_sensitivity_draws"] == 0  # no COVID-19 film answered
    assert out["model_refused"] == pytest.approx(40 / 140)  # every other COVID-19 film, in every draw
    assert out["refused"] < 0.05 and out["sensitivity"] >= 0.85 and out["sensitivity_draws"] == 50
    assert out["model_specificity"] == pytest.approx(float((score[60:] < 0.6).mean()), abs=0.05)
    # by hand, the first draw: the site admits up to the highest OOD score of its 40 drawn films
    g = np.random.default_rng(2)
    p, n = g.permutation(np.flatnonzero(y == 1)), g.permutation(np.flatnonzero(y == 0))
    chosen, rest = np.r_[p[:20], n[:20]], np.r_[p[20:], n[20:]]
    limit = max(10.0, ood_scores[chosen].max())
    once = sites.local_calibration(y, score, rule, n_per_class=20, draws=1, seed=2, ood=(ood_scores, 10.0))
    assert once["refused"] == pytest.approx(float((ood_scores[rest] > limit).mean()))
    t = float(np.sort(score[p[:20]])[1])
    answered = rest[ood_scores[rest] <= limit]
    assert once["sensitivity"] == pytest.approx(float((score[answered][y[answered] == 1] >= t).mean()))
    plain = sites.local_calibration(y, score, rule, n_per_class=20, draws=50, seed=2)
    assert "refused" not in plain and "sensitivity_draws" not in plain  # without OOD scores: as before


def test_a_thresholds_file_reads_back_as_the_params_that_apply_it(tmp_path):
    path = tmp_path / "site.json"
    path.write_text(json.dumps({"threshold": 0.25, "ood_threshold": 31.5, "model_version": 3, "n_covid": 20}))
    site = sites.SiteThresholds.load(path)
    assert (site.threshold, site.ood_threshold, site.model_version) == (0.25, 31.5, "3")
    assert site.params() == {"threshold": 0.25, "ood_threshold": 31.5}
    path.write_text(json.dumps({"threshold": 0.25, "ood_threshold": None, "model_version": "3"}))
    assert sites.SiteThresholds.load(path).params() == {"threshold": 0.25}  # the model's own OOD threshold
    assert sites.from_env({sites.ENV: str(path)}) == sites.SiteThresholds.load(path)
    assert sites.from_env({sites.ENV: " "}) is None and sites.from_env({}) is None


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("{not json", "not JSON"),
    ('{"ood_threshold": 3, "model_version": "1"}', "not a thresholds file of `covidcxr calibrate-site --output`"),
    ('{"threshold": true, "model_version": "1"}', "threshold must be a number in \\[0, 1\\], got True"),
    ('{"threshold": "0.3", "model_version": "1"}', "threshold must be a number in \\[0, 1\\], got '0.3'"),
    ('[0.3]', "not a thresholds file"),
    ('{"threshold": 1.5, "model_version": "1"}', r"threshold must be in \[0, 1\], got 1.5"),
    ('{"threshold": 0.3, "ood_threshold": -2, "model_version": "1"}',
     r"ood_threshold must be a finite non-negative number, got -2.0 \(or null: the model's own\)"),
    ('{"threshold": 0.3, "ood_threshold": "far", "model_version": "1"}',
     "ood_threshold must be a finite non-negative number, got 'far'"),
    ('{"threshold": 0.3}', "no model_version"),
    ('{"threshold": 0.3, "model_version": " "}', "no model_version"),
])
def test_a_thresholds_file_that_cannot_be_used_is_an_error_naming_it(tmp_path, content, message):
    path = tmp_path / "site.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(sites.SiteFileError, match=message) as caught:
        sites.SiteThresholds.load(path)
    assert str(path) in str(caught.value)


def test_thresholds_apply_only_to_the_model_version_they_were_chosen_on(tmp_path):
    path = tmp_path / "site.json"
    path.write_text(json.dumps({"threshold": 0.25, "ood_threshold": None, "model_name": "covidcxr-real",
                                "model_version": "3"}))
    site = sites.SiteThresholds.load(path)
    site.check_model("covidcxr-real", "3")
    site.check_model("covidcxr-real", 3)
    with pytest.raises(sites.SiteFileError, match="chosen on model version 3's scores; the model answering is version "
                                                  "4: calibrate the site again") as caught:
        site.check_model("covidcxr-real", "4")
    assert str(path) in str(caught.value)


def test_thresholds_apply_only_to_the_registered_model_they_were_chosen_on(tmp_path):
    """The registry holds covidcxr (demo) and covidcxr-real with overlapping version numbers: thresholds chosen on
    covidcxr-real v2 passed the check on covidcxr v2, which was then scored at them. Now the name is checked too; a
    file that records no name (written before calibrate-site did) is still read, but cannot be checked and is refused
    with the advice to calibrate again, as is a model that does not report its name."""
    path = tmp_path / "site.json"
    path.write_text(json.dumps({"threshold": 0.25, "ood_threshold": None, "model_name": "covidcxr-real",
                                "model_version": "2"}))
    site = sites.SiteThresholds.load(path)
    assert (site.model_name, site.model_version) == ("covidcxr-real", "2")
    with pytest.raises(sites.SiteFileError, match="chosen on covidcxr-real v2's scores; the model answering is "
                                                  "covidcxr v2: calibrate the site again") as caught:
        site.check_model("covidcxr", "2")
    assert str(path) in str(caught.value)
    with pytest.raises(sites.SiteFileError, match="does not report its name"):
        site.check_model(None, "2")

    path.write_text(json.dumps({"threshold": 0.25, "ood_threshold": None, "model_version": "2"}))  # an older file
    older = sites.SiteThresholds.load(path)
    assert older.model_name is None and older.threshold == 0.25
    for name in ("covidcxr", "covidcxr-real"):
        with pytest.raises(sites.SiteFileError, match=r"record no model_name .*cannot be checked by "
                                                      "name.*calibrate the site again"):
            older.check_model(name, "2")

    path.write_text(json.dumps({"threshold": 0.25, "model_name": "", "model_version": "2"}))
    with pytest.raises(sites.SiteFileError, match="model_name must be the registered model's name"):
        sites.SiteThresholds.load(path)


def test_a_site_threshold_is_refused_where_the_model_does_not_separate_the_site_s_films():
    """A model whose ROC at the site is on or below the diagonal: Youden's J is never above 0, and the training rule's
    threshold (kept as it was) lies above every score, 1.0000000000000002 for a top score of 1; the site path refused it
    only when the file was used. Now calibrating says why at once."""
    y = np.r_[np.ones(10, int), np.zeros(10, int)]
    score = np.r_[np.linspace(0.05, 0.5, 10), np.linspace(0.55, 1.0, 10)]  # the negatives score higher
    assert metrics.youden_threshold(y, score) == np.nextafter(1.0, 2.0)  # the training-time rule, unchanged
    for rule in ({"objective": "youden", "min_sensitivity": None}, RULE, {"objective": "f1", "min_sensitivity": None}):
        with pytest.raises(ValueError, match=r"does not separate this site's films: ROC AUC 0.000, at or below chance"):
            sites.local_threshold(y, score, rule)
    chance = np.r_[np.full(10, 0.4), np.full(10, 0.4)]  # AUC 0.5: no better than calling at random
    with pytest.raises(ValueError, match="ROC AUC 0.500, at or below chance"):
        sites.local_threshold(y, chance, RULE)


def test_the_sensitivity_objective_without_a_target_is_a_clear_error():
    """A rule of the sensitivity objective with no min_sensitivity (--objective sensitivity over a youden model) was a
    TypeError from float(None)."""
    y = np.r_[np.ones(10, int), np.zeros(10, int)]
    score = np.r_[np.linspace(0.55, 0.95, 10), np.linspace(0.1, 0.6, 10)]
    with pytest.raises(ValueError, match="the sensitivity objective needs a min_sensitivity"):
        sites.local_threshold(y, score, {"objective": "sensitivity", "min_sensitivity": None})


@pytest.mark.parametrize("n", [20, 50])  # too few films to measure (skipped, before), and enough (a TypeError)
@pytest.mark.parametrize("rule", [{"threshold": 0.3, "objective": "sensitivity", "min_sensitivity": None},
                                  {"threshold": 0.3, "objective": "sensitivity"}])
def test_local_calibration_refuses_the_sensitivity_objective_without_a_target_up_front(n, rule):
    """evaluate's site measurement took a sensitivity rule without its target as well: skipped it as short of films,
    or failed in float(None) once there were enough."""
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(n, int), np.zeros(n, int)]
    score = np.r_[rng.uniform(0.5, 1.0, n), rng.uniform(0.0, 0.6, n)]
    with pytest.raises(ValueError, match="the sensitivity objective needs a min_sensitivity"):
        sites.local_calibration(y, score, rule, n_per_class=20, draws=5)


def test_local_calibration_still_measures_draws_the_scores_do_not_separate():
    """Evaluate's measurement keeps every draw, a useless one included (its figures are unchanged): only a site's own
    calibration refuses scores at or below chance."""
    rng = np.random.default_rng(4)
    y = np.r_[np.ones(30, int), np.zeros(30, int)]
    score = rng.uniform(0, 1, 60)  # no signal: some draws of 10 + 10 fall at or below chance
    out = sites.local_calibration(y, score, {**RULE, "objective": "youden"}, n_per_class=10, draws=50, seed=0)
    assert out["status"] == "measured"


def test_a_labels_table_lists_each_film_once(tmp_path):
    """A film listed twice was scored twice and its rows paired with the wrong films' answers (and it counted twice):
    now refused, naming the film and its lines, however its path is spelled."""
    table = tmp_path / "labels.csv"
    table.write_text("file,label\nf0.png,covid\nf1.png,negative\n./f0.png,negative\nf2.png,covid\nsub/../f1.png,covid\n")
    with pytest.raises(sites.LabelsFileError, match=r"lists a film more than once \('f0.png' on lines 2, 4; 'f1.png' "
                                                    r"on lines 3, 6\)") as caught:
        sites.read_labels(table)
    assert str(table) in str(caught.value)
    table.write_text("file,label\nf0.png,covid\nf1.png,negative\n")
    assert sites.read_labels(table) == [(str(tmp_path / "f0.png"), True, None), (str(tmp_path / "f1.png"), False, None)]
    table.write_bytes(b"file,label\n\xff\xfe.png,covid\n")
    with pytest.raises(sites.LabelsFileError, match="not a UTF-8 CSV table"):
        sites.read_labels(table)


def test_a_labels_table_may_say_whose_films_they_are(tmp_path):
    table = tmp_path / "labels.csv"
    table.write_text("file,label,patient\nf0.png,covid,A\nf1.png,covid, A \nf2.png,negative,B\n")
    assert sites.read_labels(table) == [(str(tmp_path / "f0.png"), True, "A"), (str(tmp_path / "f1.png"), True, "A"),
                                        (str(tmp_path / "f2.png"), False, "B")]
    table.write_text("file,label,patient\nf0.png,covid,A\nf1.png,covid,\n")
    with pytest.raises(sites.LabelsFileError, match=r"needs the columns file, label \(covid or negative\) and patient "
                                                    r"on every row; lines \[3\]"):
        sites.read_labels(table)
    table.write_text("file,label\nf0.png,covid\n")
    assert sites.read_labels(table)[0].patient is None


def test_the_sensitivity_promise_counts_patients_where_the_labels_say_whose_films_they_are():
    """20 COVID-19 films of 10 patients (a follow-up each) promised 20/21 counted as films: a patient's two films score
    alike, so the next patients' films kept about 10/11. Counted by patient (each at their lowest film), 10 patients
    cannot promise 0.95; 20 patients of 2 films keep the 20/21 they promise."""
    from scipy.stats import norm

    rule = {"threshold": 0.5, "objective": "sensitivity", "min_sensitivity": 0.95}
    rng = np.random.default_rng(7)

    def kept(n_patients: int, by_patient: bool, reps: int = 400) -> float:
        """Mean over sites of the share of a next patient's films called COVID-19 (scores uniform: 1 - threshold)."""
        out = []
        for _ in range(reps):
            latent = rng.normal(size=(n_patients, 1)) + rng.normal(size=(n_patients, 2)) * 0.2  # a patient's alike
            covid = norm.cdf(latent / np.sqrt(1.04)).ravel()  # each film's score uniform on (0, 1)
            y = np.r_[np.ones(len(covid), int), np.zeros(20, int)]
            score = np.r_[covid, rng.uniform(0.0, 0.02, 20)]
            patients = np.r_[np.repeat(np.arange(n_patients), 2), 1000 + np.arange(20)].astype(str)
            out.append(1.0 - sites.local_threshold(y, score, rule, patients=patients if by_patient else None).threshold)
        return float(np.mean(out))

    assert kept(10, by_patient=False) < 0.94  # 20/21 = 0.952 promised on 20 films (standard error about 0.004)
    assert kept(20, by_patient=True) >= 0.945  # 20/21 promised on 20 patients (standard error about 0.002)
    y = np.r_[np.ones(20, int), np.zeros(20, int)]
    score = np.r_[np.linspace(0.5, 0.95, 20), np.linspace(0.0, 0.4, 20)]
    patients = np.r_[np.repeat(np.arange(10), 2), 100 + np.arange(20)].astype(str)
    with pytest.raises(ValueError, match="10 COVID-19 patients cannot promise sensitivity 0.95 .* at least 19"):
        sites.local_threshold(y, score, rule, patients=patients)
    # 0.9: 20 films may leave one below; 10 patients none (the threshold at the lowest film, not the second-lowest)
    by_film = sites.local_threshold(y, score, {**rule, "min_sensitivity": 0.9})
    by_patient = sites.local_threshold(y, score, {**rule, "min_sensitivity": 0.9}, patients=patients)
    assert by_film.threshold == score[1] and by_patient.threshold == score[0]
    assert (by_patient.sensitivity, by_patient.n_positive, by_patient.min_sensitivity) == (1.0, 20, 0.9)
    assert sites.covid_patients(y, patients) == 10 and sites.covid_patients(y, None) is None


def test_a_labels_table_saved_by_excel_or_spaced_by_hand_is_read_and_a_wrong_header_named(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark, and "file, label" names a column " label": both were refused
    as rows without file and label. Now read; a header without them says which columns it found."""
    table = tmp_path / "labels.csv"
    films = [(str(tmp_path / "f0.png"), True, None), (str(tmp_path / "f1.png"), False, None)]
    table.write_bytes("file,label\r\nf0.png,covid\r\nf1.png,negative\r\n".encode("utf-8-sig"))
    assert sites.read_labels(table) == films
    table.write_text("file, label\nf0.png, covid\nf1.png,negative \n")
    assert sites.read_labels(table) == films
    table.write_text("film,diagnosis\nf0.png,covid\n")
    with pytest.raises(sites.LabelsFileError, match=r"has no column file or label in its first line.*found "
                                                    r"\['film', 'diagnosis'\]") as caught:
        sites.read_labels(table)
    assert str(table) in str(caught.value)
    table.write_text("")
    with pytest.raises(sites.LabelsFileError, match=r"found none \(an empty file\)"):
        sites.read_labels(table)
