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


def train_auc(x: np.ndarray, y: np.ndarray, parts: dict[str, np.ndarray], epochs: int = 4) -> float:
    """Test ROC AUC of a tiny VGG trained on the train part (standardized on train, as the pipeline does)."""
    model = seeded_model()
    training.seed_everything(TINY["seed"])
    std = preprocess.Standardizer().fit(x[parts["train"]])
    training.fit(model, (std.transform(x[parts["train"]]), y[parts["train"]]),
                 (std.transform(x[parts["val"]]), y[parts["val"]]), epochs=epochs, batch_size=TINY["batch_size"],
                 seed=TINY["seed"], class_weight=training.balanced_class_weight(y[parts["train"]]))
    score = training.predict(model, std.transform(x[parts["test"]])).ravel()
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y[parts["test"]], score))


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
    def check(c, e):
        return audit.lungs_removed_check("vgg16", c, e, warn=0.3, fail=0.6, min_c_auc=0.6)

    assert (check(0.99, 0.97).status, check(0.99, 0.7).status, check(0.99, 0.55).status) == ("fail", "warn", "pass")
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


def test_report_shape_and_the_checks_of_one_model():
    checks = [audit.lungs_removed_check("vgg16", 0.99, 0.98, warn=0.3, fail=0.6),
              audit.heatmap_check("d_vgg16/covid", 0.7, 0.25, warn=1.5, fail=1.0),
              audit.heatmap_check("c_vgg16/covid", 0.7, 0.25, warn=1.5, fail=1.0),
              audit.source_check(None, warn=0.6, fail=0.7, skip_reason="one source in training")]
    result = audit.report(checks)
    assert result["status"] == "fail"
    for c in result["checks"]:
        assert set(c) == {"name", "subject", "value", "warn", "fail", "status", "reason"}
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
    assert [(c.subject, c.status) for c in partial] == [("d_vgg19/covid", "pass"), ("d_vgg19/negative", "skipped")]
    assert "7 of 9 covid validation maps hold heat" in partial[0].reason


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
    auc_c = train_auc(preprocess.apply_variant(x, mask, "c"), y, parts)
    auc_e = train_auc(preprocess.apply_variant(x, mask, "e"), y, parts)
    check = audit.lungs_removed_check("vgg16", auc_c, auc_e, warn=0.3, fail=0.6, min_c_auc=0.6)
    assert auc_c > 0.9, auc_c
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
