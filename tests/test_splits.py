import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from covidcxr import splits


def frame(n_patients=60, images_per_patient=(1, 4), seed=0, covid_share=0.4):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = "covid" if rng.random() < covid_share else "negative"
        for k in range(rng.integers(*images_per_patient, endpoint=True)):
            rows.append({"image_id": f"s/p{p}_{k}", "patient_id": f"s:p{p}", "label": label, "source": "s"})
    return pd.DataFrame(rows)


def test_no_patient_in_two_splits_and_fractions_close():
    df = frame(200)
    df["split"] = splits.split_patients(df, seed=1)
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    share = df["split"].value_counts(normalize=True)
    for name, target in splits.PAPER_FRACTIONS.items():
        assert abs(share[name] - target) < 0.03
    for name in splits.SPLITS:  # stratified: label mix of every split near the overall one
        part = df[df["split"] == name]
        assert abs((part["label"] == "covid").mean() - (df["label"] == "covid").mean()) < 0.05


def test_seeded_and_independent_of_row_order():
    df = frame(80)
    a = splits.split_patients(df, seed=3)
    shuffled = df.sample(frac=1.0, random_state=0)
    b = splits.split_patients(shuffled, seed=3).reindex(df.index)
    assert a.equals(b)
    assert not a.equals(splits.split_patients(df, seed=4))


def test_custom_fractions_and_zero_share():
    df = frame(100)
    s = splits.split_patients(df, fractions={"train": 0.8, "val": 0.2, "test": 0.0}, seed=0)
    assert set(s) == {"train", "val"}
    assert abs((s == "train").mean() - 0.8) < 0.05


def test_fixed_patients_keep_their_split_and_the_others_fill_around_them():
    df = frame(200)
    patients = sorted(df["patient_id"].unique())
    fixed = {p: "train" for p in patients[:80]} | {p: "val" for p in patients[80:100]}
    s = splits.split_patients(df, seed=1, fixed=fixed)
    assert all(s[df["patient_id"] == p].eq(split).all() for p, split in fixed.items())
    share = s.value_counts(normalize=True)
    assert abs(share["test"] - 0.2) < 0.03 and abs(share["val"] - 0.2) < 0.03  # targets still met overall
    assert set(s[df["patient_id"].isin(patients[100:])]) == {"train", "val", "test"}


def test_fixed_patients_absent_from_the_frame_change_nothing():
    df = frame(80)
    assert splits.split_patients(df, seed=3, fixed={"other:p1": "test"}).equals(splits.split_patients(df, seed=3))
    with pytest.raises(ValueError, match=r"splits \['external'\]"):
        splits.split_patients(df, fixed={"s:p1": "external"})


@pytest.mark.parametrize("fractions", [{"train": 0.7, "val": 0.2}, {"train": 1.2, "val": -0.2}])
def test_bad_fractions_refused(fractions):
    with pytest.raises(ValueError, match="fractions"):
        splits.split_patients(frame(10), fractions=fractions)


def test_missing_patient_refused():
    df = frame(10)
    df.loc[0, "patient_id"] = None
    with pytest.raises(ValueError, match="no patient_id"):
        splits.split_patients(df)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)  # the same cases every run, no .hypothesis/
@given(st.integers(1, 40), st.integers(0, 10_000))
def test_property_patients_never_cross_splits(n_patients, seed):
    df = frame(n_patients, seed=seed)
    s = splits.split_patients(df, seed=seed)
    assert s.notna().all()
    assert (df.assign(split=s).groupby("patient_id")["split"].nunique() == 1).all()


def manifest():
    return pd.DataFrame(
        {
            "image_id": ["a/1", "a/2", "b/1", "b/2", "c/1"],
            "patient_id": ["a:1", "a:2", "b:1", "a:1", "c:1"],
            "source": ["a", "a", "b", "b", "c"],
            "label": ["covid", "negative", "negative", "negative", "unknown"],
        }
    )


def test_select_experiment_relabels_by_rules():
    out = splits.select_experiment(manifest(), [{"source": "a", "label": "covid"}], [{"source": ["b", "c"]}])
    assert list(out["image_id"]) == ["a/1", "b/1", "b/2", "c/1"]
    assert list(out["label"]) == ["covid", "negative", "negative", "negative"]


def test_select_experiment_refuses_overlap_empty_and_unknown_columns():
    with pytest.raises(splits.SelectionError, match="both positive and negative"):
        splits.select_experiment(manifest(), [{"source": "a"}], [{"label": "covid"}])
    with pytest.raises(splits.SelectionError, match="both classes"):
        splits.select_experiment(manifest(), [{"source": "zzz"}], [{"source": "b"}])
    with pytest.raises(splits.SelectionError, match="unknown columns"):
        splits.select_experiment(manifest(), [{"hospital": "x"}], [{"source": "b"}])


def test_curation_drops_negative_patients_seen_among_positives():
    selected = splits.select_experiment(manifest(), [{"label": "covid"}], [{"label": "negative"}])
    kept, dropped = splits.drop_negatives_among_positives(selected)
    assert list(dropped["image_id"]) == ["b/2"]  # patient a:1 is positive elsewhere
    assert "a/1" in set(kept["image_id"]) and "a/2" in set(kept["image_id"])
    assert len(kept) + len(dropped) == len(selected)


# --- held-out sources (leave-one-source-out, external segmentation data) ----------------------------------------------

def multi_source(seed=0):
    """Three sources: `a` with both classes, `b` and `c` negatives only (like Cohen vs Kermany/Montgomery)."""
    parts = []
    for source, share in (("a", 0.6), ("b", 0.0), ("c", 0.0)):
        f = frame(40, seed=seed, covid_share=share)
        f["source"] = source
        f["image_id"] = source + "/" + f["image_id"]
        f["patient_id"] = source + ":" + f["patient_id"]
        parts.append(f)
    return pd.concat(parts, ignore_index=True)


def test_holdout_source_is_the_whole_test_split_and_patients_stay_apart():
    df = multi_source()
    fractions = splits.without_split(splits.PAPER_FRACTIONS, "test")
    assert fractions == pytest.approx({"train": 0.75, "val": 0.25})
    df["split"] = splits.split_held_out(df, splits.rule_matches(df, [{"source": "b"}]), fractions=fractions, seed=3)
    assert set(df.loc[df["source"] == "b", "split"]) == {"test"}
    assert set(df.loc[df["source"] != "b", "split"]) == {"train", "val"}
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    test = df[df["split"] == "test"]
    assert set(test["label"]) == {"negative"}  # a one-class test: only specificity is defined there
    for name in ("train", "val"):
        assert set(df.loc[df["split"] == name, "label"]) == {"covid", "negative"}


def test_external_holdout_keeps_the_internal_three_way_split():
    df = multi_source()
    df["split"] = splits.split_held_out(df, splits.rule_matches(df, [{"source": "c"}]), holdout_split="external",
                                        seed=0)
    assert set(df.loc[df["source"] == "c", "split"]) == {"external"}
    assert set(df.loc[df["source"] != "c", "split"]) == {"train", "val", "test"}
    # the internal part is split exactly as it would be without the external source
    inner = df[df["source"] != "c"]
    assert inner["split"].tolist() == splits.split_patients(inner.drop(columns="split"), seed=0).tolist()


def test_holdout_refuses_everything_and_shared_patients():
    df = multi_source()
    with pytest.raises(splits.SelectionError, match="leaves no rows"):
        splits.split_held_out(df, splits.rule_matches(df, [{"source": ["a", "b", "c"]}]))
    shared = df.copy()
    shared.loc[shared["source"] == "b", "patient_id"] = shared.loc[shared["source"] == "a", "patient_id"].iloc[0]
    with pytest.raises(splits.SelectionError, match="1 patients have images both in and out"):
        splits.split_held_out(shared, splits.rule_matches(shared, [{"source": "b"}]))


def test_rule_patients_are_every_patient_with_a_matching_film():
    df = pd.DataFrame({"patient_id": ["p1", "p1", "p2", "p3"], "source": ["a", "b", "b", "c"]})
    assert splits.rule_patients(df, [{"source": "a"}]) == {"p1"}  # p1's other film (source b) goes with it
    assert splits.rule_patients(df, [{"source": "a"}, {"source": "c"}]) == {"p1", "p3"}
    assert splits.rule_patients(df, []) == set()


def test_hospitals_with_both_classes_are_held_out_by_rules():
    df = multi_source()
    df["site"] = np.where(df.groupby("patient_id").ngroup() % 2 == 0, "north", "south")  # a patient has one site
    held = splits.rule_matches(df, [{"source": "a", "site": "north"}, {"source": "b"}])
    df["split"] = splits.split_held_out(df, held, fractions={"train": 0.75, "val": 0.25}, seed=1)
    test = df[df["split"] == "test"]
    assert set(zip(test["source"], test["site"])) == {("a", "north"), ("b", "north"), ("b", "south")}
    assert set(test["label"]) == {"covid", "negative"}  # a held-out hospital with both classes: a real AUC
    with pytest.raises(ValueError, match="no split fractions left"):
        splits.without_split({"test": 1.0}, "test")
