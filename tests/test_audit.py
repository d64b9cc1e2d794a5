"""The shortcut audit on data built with a shortcut (the audit must fail it) and without one (it must pass).

Synthetic 32 px "radiographs": two lungs (the mask) on a noisy background. In the shortcut data only positives (or
only one site, mostly positive) carry a bright marker in a corner, outside the lungs; in the clean data positives carry
an opacity inside the lungs only. Tiny seeded VGGs are trained for real.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from covidcxr import audit, gradcam, models, preprocess, training

SIZE = 32
TINY = {"depth": 16, "width": 0.0625, "head": (16,), "lr": 0.003, "batch_size": 16, "seed": 7}


def lungs(size: int = SIZE) -> np.ndarray:
    """Two upright elliptical lungs, (size, size) bool."""
    r, c = np.mgrid[:size, :size] / size
    return (((r - 0.55) / 0.3) ** 2 + ((c - 0.3) / 0.13) ** 2 <= 1) | (((r - 0.55) / 0.3) ** 2
                                                                        + ((c - 0.7) / 0.13) ** 2 <= 1)


def radiographs(n: int, marked: np.ndarray, opacity: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images [n, 32, 32] in [0, 1] and their lung masks; ``marked`` images get a corner marker (outside the lungs),
    ``opacity`` images a bright blob confined to the left lung."""
    rng = np.random.default_rng(seed)
    mask = lungs()
    r, c = np.mgrid[:SIZE, :SIZE]
    blob = np.exp(-((r - 0.55 * SIZE) ** 2 + (c - 0.3 * SIZE) ** 2) / (2 * 2.0 ** 2)) * mask
    images = 0.45 - 0.25 * mask + rng.normal(0, 0.05, (n, SIZE, SIZE))
    images[opacity] += 0.5 * blob
    images[marked, 1:7, 1:7] = 1.0
    return np.clip(images, 0, 1).astype(np.float32), np.repeat(mask[None], n, axis=0)


def split(n: int) -> dict[str, np.ndarray]:
    """80 images to train, 20 to validate, the rest to test: a large test set keeps chance-level AUCs near 0.5."""
    i = np.arange(n)
    return {"train": i < 80, "val": (i >= 80) & (i < 100), "test": i >= 100}


@functools.cache
def _tiny_vgg() -> tuple:
    """One compiled tiny VGG of ``TINY`` for the module (both variants, both data sets: same shapes), with every
    variable (the model's and Adam's) and its seeded initial value."""
    import keras

    training.seed_everything(TINY["seed"])
    model = models.build_vgg(TINY["depth"], (SIZE, SIZE, 1), width=TINY["width"], head=TINY["head"])
    model.compile(keras.optimizers.Adam(TINY["lr"]), "binary_crossentropy")
    model.optimizer.build(model.trainable_variables)
    variables = [*model.variables, *model.optimizer.variables]
    return model, variables, [np.array(v.numpy()) for v in variables]


def seeded_model():
    """The compiled tiny VGG of ``TINY``, every variable back to its seeded initial value: a new model's first fit
    traces its train and test steps, about 3 CPU-seconds of the 4 that a 4-epoch fit costs; refitting the same model
    reuses them, and each training still starts from the same weights as a fresh build."""
    model, variables, initial = _tiny_vgg()
    for variable, value in zip(variables, initial, strict=True):
        variable.assign(value)
    return model


def train_scores(x: np.ndarray, y: np.ndarray, parts: dict[str, np.ndarray], epochs: int = 4) -> np.ndarray:
    """Test scores of a tiny VGG trained on the train part (standardized on train, as the pipeline does)."""
    model = seeded_model()
    training.seed_everything(TINY["seed"])
    std = preprocess.Standardizer().fit(x[parts["train"]])
    training.fit(model, (std.transform(x[parts["train"]]), y[parts["train"]]),
                 (std.transform(x[parts["val"]]), y[parts["val"]]), epochs=epochs, batch_size=TINY["batch_size"],
                 seed=TINY["seed"], class_weight=training.balanced_class_weight(y[parts["train"]]))
    return training.predict(model, std.transform(x[parts["test"]])).ravel()


# --- grading ------------------------------------------------------------------------------------------------------

def test_grade_both_directions_and_worst():
    assert [audit.grade(v, 0.3, 0.6) for v in (0.1, 0.3, 0.59, 0.6, 2.0)] == ["pass", "warn", "warn", "fail", "fail"]
    assert [audit.grade(v, 1.5, 1.0, higher_is_worse=False) for v in (3.0, 1.5, 1.2, 1.0, 0.2)] == [
        "pass", "warn", "warn", "fail", "fail"]
    with pytest.raises(ValueError, match="out of order"):
        audit.grade(0.5, 0.6, 0.3)
    assert audit.worst(["pass", "skipped", "warn"]) == "warn"
    assert audit.worst(["warn", "fail", "pass"]) == "fail"
    assert audit.worst(["skipped", "skipped"]) == "warn"  # nothing graded: the audit cannot vouch for the model
    with pytest.raises(ValueError, match="unknown status"):
        audit.worst(["ok"])


@pytest.mark.parametrize("higher_is_worse", [True, False])
def test_an_undefined_value_is_never_graded(higher_is_worse):
    """NaN fails every comparison, so it graded as a pass."""
    warn, fail = (0.3, 0.6) if higher_is_worse else (1.5, 1.0)
    with pytest.raises(ValueError, match="cannot grade an undefined value"):
        audit.grade(float("nan"), warn, fail, higher_is_worse=higher_is_worse)


def test_lungs_removed_check_rules():
    def check(c, e, interval=(0.0, 0.2)):
        return audit.lungs_removed_check("vgg16", c, e, warn=0.3, fail=0.6, min_c_auc=0.6, interval=interval)

    assert (check(0.99, 0.97).status, check(0.99, 0.7).status, check(0.99, 0.55).status) == ("fail", "warn", "pass")
    assert (check(0.99, 0.55).low, check(0.99, 0.55).high) == (0.0, 0.2) and "[0%, 20%]" in check(0.99, 0.55).reason
    # A point below warn passes only with the interval's upper bound below warn too; without one nothing shows it low.
    straddles = check(0.99, 0.55, (0.0, 0.45))
    assert straddles.status == "inconclusive" and straddles.value == pytest.approx(0.05 / 0.49)
    assert "[0%, 45%]" in straddles.reason and "could not show" in straddles.reason
    assert check(0.99, 0.55, None).status == "inconclusive" and check(0.99, 0.55, None).high is None
    unbounded = check(0.99, 0.55, (0.0, float("inf")))  # c fell to chance on enough resamples
    assert unbounded.status == "inconclusive" and unbounded.high is None and "unbounded" in unbounded.reason
    assert check(0.99, 0.55, (0.0, float("nan"))).status == "inconclusive"
    # warn and fail are graded on the point, whatever the interval
    assert check(0.99, 0.7, (0.1, 0.9)).status == "warn" and check(0.99, 0.97, (0.5, 1.0)).status == "fail"
    assert check(0.9, 0.3).value == 0.0  # below chance keeps nothing
    assert check(0.9, 0.7).value == pytest.approx(0.5) and check(0.9, 0.7).subject == "c_vgg16"
    skipped = check(0.99, None)
    assert skipped.status == "skipped" and "e_vgg16 not trained" in skipped.reason and skipped.value is None
    # Could not measure: inconclusive (a warning), never skipped and ignored; e far above a near-chance c included.
    assert "too close to chance" in check(0.55, 0.85).reason and check(0.55, 0.85).status == "inconclusive"
    assert check(float("nan"), 0.7).status == "inconclusive" and "one class in validation" in check(
        float("nan"), 0.7).reason
    assert audit.worst([check(0.55, 0.85).status, "pass"]) == "inconclusive"


@pytest.mark.parametrize(("auc_c", "auc_e", "min_c_auc"), [(0.5, 0.6, 0.5), (0.45, 0.7, 0.4), (0.45, 0.3, 0.4),
                                                           (0.5, 0.99, 0.0)])
def test_a_c_at_or_below_chance_is_inconclusive_whatever_min_c_auc_says(auc_c, auc_e, min_c_auc):
    """At chance the share divided by zero; below it the denominator turned negative and an e above chance passed."""
    check = audit.lungs_removed_check("vgg16", auc_c, auc_e, warn=0.3, fail=0.6, min_c_auc=min_c_auc)
    assert check.status == "inconclusive" and check.value is None
    assert f"c_vgg16 validation AUC {auc_c:.3f} is at or below chance (0.5)" in check.reason
    assert f"e_vgg16 ({auc_e:.3f})" in check.reason


def scored(n_patients: int, films: int, e_auc: float, seed: int) -> tuple[np.ndarray, ...]:
    """Labels, c's scores (AUC about 0.95), e's (about ``e_auc``) and patient ids: ``films`` films per patient, alike
    in label and score (a patient's films are read alike)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n_patients) % 2
    from scipy.stats import norm

    def scores(auc: float) -> np.ndarray:  # binormal: AUC = Phi(d / sqrt(2))
        return y * np.sqrt(2) * norm.ppf(auc) + rng.normal(size=n_patients)

    c, e = scores(0.95), scores(e_auc)
    return (np.repeat(y, films), np.repeat(c, films), np.repeat(e, films),
            np.repeat([f"p{i}" for i in range(n_patients)], films))


def test_a_low_share_whose_interval_reaches_warn_is_inconclusive():
    """The demo's case: 60 validation patients, e keeps about a fifth of c's AUC above chance. The point is below warn,
    the interval reaches well past it: the check could not show that e keeps little."""
    y, c, e, patients = scored(60, 1, 0.6, seed=5)
    share = audit.paired_kept_share(y, c, e, patients, n_boot=500)
    kept = audit.kept_share(share.auc_c, share.auc_e)
    assert kept < 0.3 <= share.high and share.low <= kept, share
    check = audit.lungs_removed_check("vgg16", share.auc_c, share.auc_e, warn=0.3, fail=0.6,
                                      interval=(share.low, share.high))
    assert check.status == "inconclusive" and check.value == pytest.approx(kept)
    assert (check.low, check.high) == (share.low, share.high) and "the interval reaches it" in check.reason
    assert audit.worst([check.status, "pass"]) == "inconclusive"


def test_a_clearly_low_share_of_many_patients_passes():
    y, c, e, patients = scored(4000, 1, 0.52, seed=6)
    share = audit.paired_kept_share(y, c, e, patients, n_boot=300)
    assert share.high < 0.3 and share.n_unbounded == share.n_skipped == 0, share
    check = audit.lungs_removed_check("vgg16", share.auc_c, share.auc_e, warn=0.3, fail=0.6,
                                      interval=(share.low, share.high))
    assert check.status == "pass" and check.high == share.high


def test_the_share_resamples_the_same_patients_for_c_and_e():
    """c and e score the same images: one resample of patients serves both. An e that scores exactly as c keeps all of
    c's AUC on every resample, so the paired interval is the point; drawn apart, the two AUCs would scatter it."""
    y, c, _, patients = scored(40, 1, 0.5, seed=7)
    same = audit.paired_kept_share(y, c, c, patients, n_boot=200)
    assert same.low == same.high == 1.0 and same.auc_c == same.auc_e
    # Patients, not films, are resampled: five films per patient are not five times the evidence.
    y, c, e, patients = scored(40, 5, 0.75, seed=8)
    by_patient = audit.paired_kept_share(y, c, e, patients, n_boot=500)
    by_film = audit.paired_kept_share(y, c, e, np.arange(len(y)), n_boot=500)
    assert by_film.auc_c == by_patient.auc_c and by_film.auc_e == by_patient.auc_e
    assert by_patient.high - by_patient.low > 1.5 * (by_film.high - by_film.low)
    with pytest.raises(ValueError, match="must score the same images"):
        audit.paired_kept_share(y, c, e[:-1], patients)


def test_a_c_at_chance_on_a_resample_leaves_the_share_unbounded():
    """A resample on which c's AUC falls to chance has no share to take; counted above every other, never dropped
    (dropping it would narrow the interval towards a pass)."""
    y = np.arange(8) % 2
    c = np.where(np.arange(8) < 2, 1 - y, y) + 0.01 * np.arange(8)  # 8 patients, 2 of them inverted: AUC 0.75
    e = np.arange(1, 9) / 10  # AUC 0.625: the point keeps half of c's
    share = audit.paired_kept_share(y, c, e, np.arange(8), n_boot=400)
    assert (share.auc_c, share.auc_e) == (0.75, 0.625)
    assert share.n_unbounded > 0.025 * 400 and share.high == float("inf"), share
    assert share.n_skipped > 0  # a resample of one class has no AUC at all: left out
    check = audit.lungs_removed_check("vgg16", share.auc_c, share.auc_e, warn=0.6, fail=0.9, min_c_auc=0.6,
                                      interval=(share.low, share.high), unbounded=share.n_unbounded,
                                      undefined=share.n_skipped)
    assert check.status == "inconclusive" and check.value == 0.5 and check.high is None and "unbounded" in check.reason
    assert (f"; {share.n_unbounded} resamples where c fell to chance, counted unbounded; {share.n_skipped} resamples "
            "of one class, left out)") in check.reason  # how many resamples the interval could not take as they came


def test_report_shape_and_the_checks_of_one_model():
    checks = [audit.lungs_removed_check("vgg16", 0.99, 0.98, warn=0.3, fail=0.6),
              audit.heatmap_check("d_vgg16/covid", 0.7, 0.25, warn=1.5, fail=1.0),
              audit.heatmap_check("c_vgg16/covid", 0.7, 0.25, warn=1.5, fail=1.0),
              audit.source_check(None, warn=0.6, fail=0.7, skip_reason="one source in training")]
    result = audit.report(checks)
    assert result["status"] == "fail"
    for c in result["checks"]:
        assert set(c) == {"name", "subject", "value", "warn", "fail", "status", "reason", "low", "high"}
        assert c["status"] in audit.STATUSES and isinstance(c["reason"], str) and c["reason"]
    assert result["checks"][-1]["status"] == "skipped" and result["checks"][-1]["subject"] == "all"
    # The lungs-removed failure concerns c and e of that backbone, not d (which never sees outside the lungs).
    assert audit.model_verdict(result, "c_vgg16") == ("fail", [result["checks"][0]])
    assert audit.model_verdict(result, "e_vgg16")[0] == "fail"
    assert audit.model_verdict(result, "d_vgg16") == ("pass", [])
    assert audit.model_verdict(result, "c_vgg19") == ("warn", [])  # only the skipped source check: nothing vouched


# --- heat maps: mass on a marker outside the lungs vs mass on the lungs ----------------------------------------------

def test_heatmap_check_on_heat_maps_with_and_without_a_shortcut():
    x, mask = radiographs(6, marked=np.ones(6, bool), opacity=np.ones(6, bool), seed=0)
    area = float(mask.mean())
    on_marker = np.zeros_like(x)
    on_marker[:, :9, :9] = 1.0  # the corner marker and its surroundings
    on_marker[:, 12:20, 6:12] = 0.1  # a little in the lungs
    on_lungs = gradcam.mass_inside(np.where(mask, 1.0, 0.05), mask)
    shortcut = audit.heatmap_check("c_vgg16/covid", float(np.nanmean(gradcam.mass_inside(on_marker, mask))), area,
                                   warn=1.5, fail=1.0)
    clean = audit.heatmap_check("c_vgg16/covid", float(np.nanmean(on_lungs)), area, warn=1.5, fail=1.0)
    uniform = audit.heatmap_check("c_vgg16/covid", float(np.nanmean(gradcam.mass_inside(np.ones_like(x), mask))),
                                  area, warn=1.5, fail=1.0)
    assert shortcut.status == "fail" and shortcut.value < 0.5
    assert clean.status == "pass" and clean.value > 2.5
    assert uniform.status == "fail" and uniform.value == pytest.approx(1.0)  # a flat map says nothing about the lungs
    per_class = audit.heatmap_checks("e_vgg19", {"lung_mass_share_covid": 0.1, "lung_area_share_covid": 0.3,
                                                 "n_maps_covid": 9, "n_empty_covid": 0}, warn=1.5, fail=1.0)
    assert [c.status for c in per_class] == ["skipped", "skipped"]
    partial = audit.heatmap_checks("d_vgg19", {"lung_mass_share_covid": 0.6, "lung_area_share_covid": 0.25,
                                               "n_maps_covid": 9, "n_empty_covid": 2}, warn=1.5, fail=1.0, min_maps=5)
    # No negative image to explain: the check applies to d but could not measure (a warning, never ignored as skipped)
    assert [(c.subject, c.status) for c in partial] == [("d_vgg19/covid", "pass"),
                                                        ("d_vgg19/negative", "inconclusive")]
    assert "7 of 9 covid validation maps hold heat" in partial[0].reason
    assert "no negative validation images to explain" in partial[1].reason and partial[1].value is None
    assert audit.model_verdict(audit.report(partial), "d_vgg19")[0] == "inconclusive"
    assert audit.heatmap_check("d_vgg19/covid", None, 0.25, warn=1.5, fail=1.0).status == "inconclusive"


def test_heatmap_check_with_too_few_maps_holding_heat_is_inconclusive():
    """Empty maps argue for nothing and have no share: graded on the few others, a class's mean says nothing, and a
    class whose every map is empty must not pass unnoticed (it was skipped, and ignored by the verdict)."""
    few = {"lung_mass_share_negative": 0.05, "lung_area_share_negative": 0.25, "n_maps_negative": 22,
           "n_empty_negative": 18}
    none = {"lung_mass_share_negative": None, "lung_area_share_negative": None, "n_maps_negative": 22,
            "n_empty_negative": 22}
    for figures, heat in ((few, 4), (none, 0)):
        (check,) = audit.heatmap_checks("d_vgg16", figures, warn=1.5, fail=1.0, min_maps=5, classes=("negative",))
        assert check.status == "inconclusive" and check.value is None
        assert f"{heat} of 22 negative validation heat maps hold any heat, fewer than 5" in check.reason
    enough = audit.heatmap_checks("d_vgg16", few, warn=1.5, fail=1.0, min_maps=4, classes=("negative",))
    assert enough[0].status == "fail"


# --- lungs removed: trained models --------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("shortcut", [True, False], ids=["marker-outside-lungs", "opacity-inside-lungs"])
def test_lungs_removed_model_exposes_a_marker_outside_the_lungs(shortcut):
    n = 400
    y = (np.arange(n) % 2).astype(np.float32)
    positive = y == 1
    x, mask = radiographs(n, marked=positive if shortcut else np.zeros(n, bool), opacity=positive, seed=1)
    parts = split(n)
    score_c = train_scores(preprocess.apply_variant(x, mask, "c"), y, parts)
    score_e = train_scores(preprocess.apply_variant(x, mask, "e"), y, parts)
    test = y[parts["test"]]
    share = audit.paired_kept_share(test, score_c, score_e, np.arange(len(test)))  # one image per patient
    check = audit.lungs_removed_check("vgg16", share.auc_c, share.auc_e, warn=0.3, fail=0.6, min_c_auc=0.6,
                                      interval=(share.low, share.high))
    assert share.auc_c > 0.9, share
    assert check.status == ("fail" if shortcut else "pass"), check


# --- the source classifier ------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("confounded", [True, False], ids=["site-predicts-label", "site-balanced"])
def test_source_classifier_fails_a_readable_site_that_predicts_the_label(confounded):
    n = 400
    site = np.where(np.arange(n) % 2 == 0, "site_a", "site_b")
    rank = np.arange(n) // 2 % 10  # within each site, 10 images in turn
    covid = np.where(site == "site_a", rank < (8 if confounded else 5), rank < (2 if confounded else 5))
    x, _ = radiographs(n, marked=site == "site_a", opacity=covid, seed=2)  # site a burns in a marker
    parts = split(n)
    seen: list[dict] = []
    model, classes, epoch = audit.train_source_classifier(
        x[parts["train"]], site[parts["train"]], x[parts["val"]], site[parts["val"]], epochs=4,
        on_epoch_end=lambda e, logs: seen.append(logs),
        **{k: TINY[k] for k in ("depth", "width", "head", "lr", "batch_size", "seed")})
    assert classes == ("site_a", "site_b") and len(seen) == 4
    # The weights of the epoch of the highest validation balanced accuracy are restored, whichever epoch that was.
    scores = [logs["val_balanced_accuracy"] for logs in seen]
    assert epoch == 1 + int(np.argmax(scores))
    y_val = (site[parts["val"]] == "site_b").astype(int)
    called = training.predict(model, x[parts["val"]]).argmax(axis=1)
    assert np.mean([np.mean(called[y_val == k] == k) for k in (0, 1)]) == pytest.approx(max(scores))
    reading = audit.read_sources(classes, training.predict(model, x[parts["test"]]), site[parts["test"]],
                                 covid[parts["test"]], site[parts["train"]], covid[parts["train"]])
    assert reading.balanced_accuracy > 0.9 and reading.chance == 0.5  # the site is readable either way
    check = audit.source_check(reading, warn=0.6, fail=0.7)
    if confounded:
        assert check.status == "fail" and check.value > 0.75 and reading.label_auc_true_source > 0.75, check
    else:  # equally balanced sites: the site, however readable, says nothing about the label
        assert check.status == "pass" and check.value == pytest.approx(0.5), check


@pytest.mark.slow
def test_a_site_the_classifier_cannot_learn_is_inconclusive_never_pass():
    """Sites drawn at random with no mark on the image: nothing to read, so the check cannot measure anything."""
    n = 400
    site = np.random.default_rng(7).choice(["site_a", "site_b", "site_c"], n)
    covid = np.arange(n) % 2 == 1
    x, _ = radiographs(n, marked=np.zeros(n, bool), opacity=covid, seed=3)
    parts = split(n)
    model, classes, _ = audit.train_source_classifier(
        x[parts["train"]], site[parts["train"]], x[parts["val"]], site[parts["val"]], epochs=4,
        **{k: TINY[k] for k in ("depth", "width", "head", "lr", "batch_size", "seed")})
    reading = audit.read_sources(classes, training.predict(model, x[parts["test"]]), site[parts["test"]],
                                 covid[parts["test"]], site[parts["train"]], covid[parts["train"]])
    check = audit.source_check(reading, warn=0.6, fail=0.7)
    assert not reading.readable and reading.balanced_accuracy_low <= reading.chance
    assert check.status == "inconclusive" and check.value is None and "not clearly above chance" in check.reason


def test_source_check_is_inconclusive_when_the_sources_are_read_at_chance():
    rng = np.random.default_rng(0)
    classes = ("a", "b", "c")
    truth = rng.choice(classes, 300)
    y = (truth == "a").astype(int)  # the source would predict the label perfectly, if it could be read
    at_chance = audit.read_sources(classes, rng.dirichlet([1, 1, 1], 300), truth, y, truth, y)
    assert not at_chance.readable
    assert audit.source_check(at_chance, warn=0.6, fail=0.65).status == "inconclusive"
    read = audit.read_sources(classes, np.eye(3)[[classes.index(t) for t in truth]] * 0.9 + 0.03, truth, y, truth, y)
    assert read.readable and read.balanced_accuracy_low > 0.9
    check = audit.source_check(read, warn=0.6, fail=0.65)
    assert check.status == "fail" and check.value == pytest.approx(1.0)
    assert audit.worst(["pass", "inconclusive"]) == "inconclusive" and audit.worst(["inconclusive", "warn"]) == "warn"


def test_a_source_classifier_collapsed_onto_one_source_reads_nothing():
    """What a real run's source classifier did: it named one source (Hannover) for nearly every test image, so it read
    that source's own images right and nothing else: balanced accuracy 0.15 [0.13, 0.18] against a chance of 0.125.
    Graded, its label AUC (0.40) passed the check; it measured nothing."""
    classes = ("China", "Germany", "Italy", "cohen", "guangzhou", "montgomery", "shenzhen", "unknown")
    truth = np.repeat(classes, [6, 22, 12, 40, 154, 22, 89, 6])
    called = np.full(len(truth), "Germany", dtype=object)  # Hannover for nearly every image
    called[np.flatnonzero(truth == "montgomery")[:5]] = "montgomery"
    called[np.flatnonzero(truth == "guangzhou")[:6]] = "montgomery"
    y = np.isin(truth, ["China", "Germany", "Italy", "cohen", "unknown"]).astype(int)
    p = np.eye(len(classes))[[classes.index(c) for c in called]] * 0.9 + 0.1 / len(classes)
    reading = audit.read_sources(classes, p, truth, y, truth, y)
    assert reading.chance < reading.balanced_accuracy_low < reading.readable_above  # above chance, yet reads nothing
    assert not reading.readable
    check = audit.source_check(reading, warn=0.6, fail=0.65)
    assert check.status == "inconclusive" and check.value is None and "must exceed 0.21" in check.reason


def test_small_sites_are_read_as_their_dataset():
    site = np.array(["Germany"] * 30 + ["Peru"] * 3 + ["Italy"] * 25 + ["kermany"] * 40)
    source = np.array(["cohen"] * 58 + ["kermany"] * 40)
    train = np.ones(len(site), bool)
    train[-5:] = False
    grouped = audit.group_sources(site, source, train, min_images=20)
    assert set(grouped) == {"Germany", "cohen", "Italy", "kermany"}
    assert list(grouped[30:33]) == ["cohen"] * 3


def two_sources(n_patients: int, positives_at_a: float, negatives_at_a: float) -> tuple:
    """A source classifier that reads both sources right, on ``n_patients`` one-film patients; source a holds 70% COVID
    in training, b 30%, so the label AUC from the read source is ``0.5 + (positives_at_a - negatives_at_a) / 2``."""
    classes = ("a", "b")
    y = np.arange(n_patients) % 2
    rank = (np.arange(n_patients) // 2) / (n_patients // 2)
    source = np.where(np.where(y == 1, rank < positives_at_a, rank < negatives_at_a), "a", "b")
    proba = np.where(source[:, None] == np.array(classes), 0.9, 0.1)
    train_source, train_y = np.repeat(["a", "b"], 10), np.array([1] * 7 + [0] * 3 + [1] * 3 + [0] * 7)
    return classes, proba, source, y, train_source, train_y


def test_a_source_label_auc_below_warn_passes_only_when_its_interval_does():
    """AUC 0.55 from the read source: on 40 patients the interval reaches past warn 0.6 (inconclusive); on 4000 it stays
    below (pass). Both readings are clearly readable: the label AUC alone decides."""
    small = audit.read_sources(*two_sources(40, 0.55, 0.45), patients=[f"p{i}" for i in range(40)])
    large = audit.read_sources(*two_sources(4000, 0.55, 0.45))
    for reading in (small, large):
        assert reading.readable and reading.label_auc_read_source == pytest.approx(0.55)
        assert reading.label_auc_read_source_low < 0.55 < reading.label_auc_read_source_high
    assert small.label_auc_read_source_high >= 0.6 > large.label_auc_read_source_high
    check = audit.source_check(small, warn=0.6, fail=0.65)
    assert check.status == "inconclusive" and check.value == pytest.approx(0.55)
    assert (check.low, check.high) == (small.label_auc_read_source_low, small.label_auc_read_source_high)
    assert "the interval reaches it" in check.reason and f"[{check.low:.2f}, {check.high:.2f}]" in check.reason
    passed = audit.source_check(large, warn=0.6, fail=0.65)
    assert passed.status == "pass" and passed.high < 0.6
    # At or above warn the point grades as before.
    assert audit.source_check(audit.read_sources(*two_sources(40, 0.9, 0.1)), warn=0.6, fail=0.65).status == "fail"


def test_read_sources_scores_and_unknown_sources():
    classes = ("a", "b")
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    reading = audit.read_sources(classes, proba, ["a", "b", "b", "z"], np.array([1, 0, 1, 0]),
                                 ["a", "a", "b", "b"], np.array([1, 1, 0, 1]))
    assert reading.n_read == 3 and reading.split == "validation"  # the unseen source z cannot be read
    assert reading.accuracy == pytest.approx(2 / 3) and reading.balanced_accuracy == pytest.approx(0.75)
    assert reading.label_auc_read_source == 1.0 and reading.label_auc_true_source == pytest.approx(0.75)
    with pytest.raises(ValueError, match="do not match"):
        audit.read_sources(classes, proba[:2], ["a", "b", "b"], np.zeros(3), ["a", "b"], np.zeros(2))
    with pytest.raises(ValueError, match="2 patient ids for 4 validation images"):
        audit.read_sources(classes, proba, ["a", "b", "b", "z"], np.zeros(4), ["a", "b"], np.zeros(2),
                           patients=["p1", "p2"])
    with pytest.raises(ValueError, match="at least two sources"):
        audit.train_source_classifier(np.zeros((2, 32, 32)), ["a", "a"], np.zeros((1, 32, 32)), ["a"], epochs=1,
                                      **{k: TINY[k] for k in ("depth", "width", "head", "lr", "batch_size", "seed")})


def test_the_source_readings_interval_resamples_patients_not_films():
    """A patient's films share a site and are read alike: resampling films treats 10 films of one patient as 10
    independent readings and narrows the interval whose lower bound decides whether the check may grade at all."""
    rng = np.random.default_rng(3)
    classes = ("a", "b")
    site = np.repeat(rng.choice(classes, 20), 10)  # 20 patients, 10 films each
    patients = np.repeat([f"p{i}" for i in range(20)], 10)
    right = np.repeat(rng.random(20) < 0.7, 10)  # read right or wrong per patient, all films alike
    called = np.where(right, site, np.where(site == "a", "b", "a"))
    proba = np.array([[0.9, 0.1] if c == "a" else [0.1, 0.9] for c in called])
    y = (site == "a").astype(int)
    by_film = audit.read_sources(classes, proba, site, y, site, y)
    by_patient = audit.read_sources(classes, proba, site, y, site, y, patients=patients)
    assert by_film.balanced_accuracy == by_patient.balanced_accuracy
    width = {r: r.balanced_accuracy_high - r.balanced_accuracy_low for r in (by_film, by_patient)}
    assert width[by_patient] > 2 * width[by_film]
