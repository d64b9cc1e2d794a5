"""Stage `split`: held-out rules matched once on the manifest and applied to every task, the projection task pinned to
the covid task's patients. In memory (task_tables), and one stage run in a scratch directory."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from covidcxr import splits
from pipelines import _common
from pipelines import split as split_stage

EXPECTATIONS = str(Path(__file__).resolve().parents[2] / "expectations")


def manifest_rows() -> pd.DataFrame:
    """Three sources of two-image patients: `pos` (covid and negative, masks), `neg1` (negatives, no masks) and
    `neg2` (masks; each patient's first film a negative frontal, the second a lateral of unknown label, which no
    experiment selects but the projection and segmentation tasks use)."""
    rows = []
    for source, n in (("pos", 60), ("neg1", 40), ("neg2", 40)):
        for i in range(n):
            label = ("covid" if i < 30 else "negative") if source == "pos" else "negative"
            if source == "neg2" and i % 2:
                label = "unknown"
            rows.append({"image_id": f"{source}/{i:03d}", "patient_id": f"{source}:{i // 2}", "source": source,
                         "label": label, "projection": "lateral" if i % 4 == 3 else "frontal",
                         "mask_path": None if source == "neg1" else f"m/{source}{i}.png"})
    return pd.DataFrame(rows)


def write_inputs(m: pd.DataFrame) -> None:
    """The split stage's inputs in the working directory: the manifest, and the validate stage's report passing it
    (the report of no suite: these manifests hold only the columns the split reads)."""
    from covidcxr import validation

    _common.write_csv(split_stage.MANIFEST, m)
    _common.write_json(split_stage.VALIDATED, validation.results_to_json([]))


def stage_params(**extra) -> dict:
    return {"seed": 1, "fractions": dict(splits.PAPER_FRACTIONS), "tolerance": 0.15, "experiment": "all",
            "holdout": [], "holdout_with_test": False, "segmentation_external": [],
            "experiments": {"all": {"positives": [{"source": "pos", "label": "covid"}],
                                    "negatives": [{"label": "negative"}]}}, **extra}


def by_patient(table: pd.DataFrame) -> dict[str, str]:
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()
    return dict(zip(table["patient_id"], table["split"]))


RULE = {"source": "neg2", "label": "negative"}


@pytest.mark.parametrize("with_test", [False, True])
def test_a_held_out_rule_naming_the_label_holds_its_patients_out_of_the_projection_filter(with_test):
    """The projection table's label is frontal/lateral: a rule naming the label matched none of its rows and was
    dropped, so the filter trained on the held-out source, while the summary listed the rule as applied."""
    m = manifest_rows()
    p = stage_params(holdout=[RULE], holdout_with_test=with_test)
    tables, _ = split_stage.task_tables(m, p)
    held_patients = set(m.loc[splits.rule_matches(m, [RULE]), "patient_id"])
    for task in ("projection", "segmentation"):
        table = tables[task]
        assert set(table.loc[table["patient_id"].isin(held_patients), "split"]) == {"external"}, task
        assert set(table.loc[table["split"] == "external", "patient_id"]) == held_patients, task
        assert len(table[table["patient_id"].isin(held_patients)]) == 40  # the unknown-label laterals too
    covid = tables["covid"]
    assert set(covid.loc[covid["patient_id"].isin(held_patients), "split"]) == {"test"}
    assert split_stage._held_out("projection", p, m) == ([RULE], "external")
    assert split_stage._held_out("segmentation", p, m) == ([RULE], "external")


def test_a_held_out_patient_in_the_filter_s_or_the_unet_s_training_is_an_error():
    m = manifest_rows()
    tables, _ = split_stage.task_tables(m, stage_params())  # nothing held out: neg2 trains both
    held = set(m.loc[m["source"] == "neg2", "patient_id"])
    with pytest.raises(split_stage.HeldOutLeak, match=r"projection task: \d+ held-out patient\(s\) \(\d+ images\) "
                                                      r"are in its train or val split: the projection filter"):
        split_stage.check_held_out(tables, held)
    tables["projection"] = tables["projection"].assign(split="external")
    with pytest.raises(split_stage.HeldOutLeak, match="segmentation task: .* the U-Net"):
        split_stage.check_held_out(tables, held)
    assert issubclass(split_stage.HeldOutLeak, splits.SelectionError)
    tables["segmentation"] = tables["segmentation"].assign(split="external")
    split_stage.check_held_out(tables, held)


def test_held_out_rules_matching_nothing_in_their_task_are_errors():
    m = manifest_rows()
    with pytest.raises(splits.SelectionError, match=r"held-out rule \{'source': 'neg3'\} matches no row of the covid"):
        split_stage.task_tables(m, stage_params(holdout=[{"source": "neg3"}]))
    with pytest.raises(splits.SelectionError, match="segmentation_external: source 'neg1' has no image with lung"):
        split_stage.task_tables(m, stage_params(segmentation_external=["neg1"]))


@pytest.mark.parametrize("extra", [{}, {"holdout": [{"source": "neg1"}], "holdout_with_test": True},
                                   {"holdout": [{"source": "neg1"}]}])
def test_no_covid_test_patient_s_films_train_or_select_the_projection_filter(extra):
    """The projection split was drawn apart from the covid split: a covid test patient's films trained the filter
    that then decides which covid test images are usable."""
    m = manifest_rows()
    tables, _ = split_stage.task_tables(m, stage_params(**extra))
    covid, projection = by_patient(tables["covid"]), by_patient(tables["projection"])
    held = set(m.loc[splits.rule_matches(m, extra.get("holdout", [])), "patient_id"])
    tested = {p for p, s in covid.items() if s == "test"}
    if extra.get("holdout_with_test", not extra):  # the covid task has test patients of its own
        assert tested - held
    assert {projection[p] for p in tested - held} <= {"test"}
    assert {projection[p] for p in tested & held} <= {"external"}
    # the others are split around them, every split present (a covid task without a test of its own included)
    assert {"train", "val", "test"} <= set(tables["projection"]["split"])


def test_the_stage_lists_only_the_rules_it_applied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    m = manifest_rows()
    write_inputs(m)
    summary = split_stage.run(stage_params(holdout=[RULE, {"source": "neg1"}]), EXPECTATIONS)
    assert summary["held_out"]["projection"] == [RULE, {"source": "neg1"}]
    assert summary["held_out"]["segmentation"] == [RULE]  # neg1 has no masks
    projection = pd.read_csv(_common.split_table("projection")).merge(m[["image_id", "source"]])
    assert set(projection.loc[projection["split"] == "external", "source"]) == {"neg1", "neg2"}
    assert json.loads(Path(split_stage.SUMMARY).read_text())["held_out"]["projection"] == [RULE, {"source": "neg1"}]


@pytest.mark.parametrize("with_test", [False, True])
def test_a_patient_key_merged_across_sources_is_held_out_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 with_test: bool):
    """Ingest gives a file found in two sources one patient key: holding out the second source matched only its
    images of that person, and split failed ("1 patients have images both in and out of the held-out rows")."""
    m = manifest_rows()
    merged = {"image_id": "neg1/dup", "patient_id": "pos:20", "source": "neg1", "label": "negative",
              "projection": "frontal", "mask_path": None}  # pos:20's negative films, one also filed under neg1
    m = pd.concat([m, pd.DataFrame([merged])], ignore_index=True)
    p = stage_params(holdout=[{"source": "neg1"}], holdout_with_test=with_test)
    tables, _ = split_stage.task_tables(m, p)
    for task, held_split in (("covid", "test"), ("projection", "external")):
        person = tables[task][tables[task]["patient_id"] == "pos:20"]
        assert len(person) == 3 and set(person["split"]) == {held_split}, task
    assert by_patient(tables["segmentation"])["pos:20"] == "external"  # its masks never train the U-Net either
    monkeypatch.chdir(tmp_path)
    write_inputs(m)
    summary = split_stage.run(p, EXPECTATIONS)
    assert summary["covid"]["test"]["negative"] >= 42  # neg1's 40 and pos:20's two pos films


def test_a_critical_split_check_failure_leaves_the_split_tables_as_they_were(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch):
    """The tables were written before the suite's verdict: a failing split stage left its failing tables in
    artifacts/splits, where a stage run directly (python -m pipelines.train_classifier) would train on them."""
    from covidcxr import validation

    monkeypatch.chdir(tmp_path)
    write_inputs(manifest_rows())
    failing = stage_params(seed=7, tolerance=0.0)  # no split's share is exactly its target: a critical failure
    with pytest.raises(validation.ExpectationFailure, match="critical data expectation"):
        split_stage.run(failing, EXPECTATIONS)
    assert not Path(_common.SPLITS_DIR).exists()  # the first run: no table at all
    assert json.loads(Path(split_stage.CHECKS).read_text())["n_critical_failed"] > 0  # the reports say why
    split_stage.run(stage_params(), EXPECTATIONS)
    tables = {path.name: path.read_bytes() for path in Path(_common.SPLITS_DIR).iterdir()}
    assert sorted(tables) == ["covid.csv", "projection.csv", "segmentation.csv"]
    assert [p.name for p in Path(split_stage.DOCS).iterdir()] == ["index.html"]
    with pytest.raises(validation.ExpectationFailure):
        split_stage.run(failing, EXPECTATIONS)  # another seed: other tables, had they been written
    assert {path.name: path.read_bytes() for path in Path(_common.SPLITS_DIR).iterdir()} == tables


def test_a_corpus_without_laterals_fails_the_projection_split_check_naming_the_class(tmp_path: Path,
                                                                                     monkeypatch: pytest.MonkeyPatch):
    """The projection task's classes were taken from its own rows: an all-frontal table had one class, frontal, and
    every split held it, so the filter's split passed and train_projection trained on no lateral."""
    from covidcxr import validation

    monkeypatch.chdir(tmp_path)
    write_inputs(manifest_rows().assign(projection="frontal"))
    with pytest.raises(validation.ExpectationFailure) as err:
        split_stage.run(stage_params(), EXPECTATIONS)
    assert [(name, e.label) for name, e in err.value.failures] == [
        ("projection/splits.per_split", "expect_column_values_to_be_between(n_missing_classes)")]
    assert {x["missing_classes"] for x in err.value.failures[0][1].examples} == {"lateral"}
    assert '"missing_classes": "lateral"' in str(err.value)
    assert not Path(_common.SPLITS_DIR).exists()


def test_the_segmentation_classes_are_the_manifest_s_masked_sources_not_held_out():
    m = manifest_rows()
    assert split_stage.task_classes("segmentation", stage_params(), m) == ["neg2", "pos"]
    assert split_stage.task_classes("segmentation", stage_params(segmentation_external=["pos"]), m) == ["neg2"]
    assert split_stage.task_classes("segmentation", stage_params(holdout=[RULE]), m) == ["pos"]
    assert split_stage.task_classes("projection", stage_params(), m.assign(projection="frontal")) == [
        "frontal", "lateral"]


def test_the_split_stage_refuses_a_manifest_that_failed_or_missed_validation(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch):
    """Split depended on the validate report but never read it: after a failed validate, `dvc repro -s split` or
    `python -m pipelines.split` split a manifest that had failed its critical checks."""
    from covidcxr import validation
    from pipelines import validate as validate_stage

    assert split_stage.VALIDATED == validate_stage.CHECKS
    monkeypatch.chdir(tmp_path)
    _common.write_csv(split_stage.MANIFEST, manifest_rows())  # never validated
    with pytest.raises(split_stage.ManifestNotValidated, match=rf"{split_stage.VALIDATED}: not found: .* validate"):
        split_stage.run(stage_params(), EXPECTATIONS)
    with pytest.raises(validation.ExpectationFailure):  # the real stage: no image facts, columns missing
        validate_stage.run({"expectations": EXPECTATIONS})
    with pytest.raises(split_stage.ManifestNotValidated) as err:
        split_stage.run(stage_params(), EXPECTATIONS)
    message = str(err.value)
    assert message.startswith(f"{split_stage.VALIDATED}: the manifest {split_stage.MANIFEST} failed ")
    assert "image_metadata: expect_table_columns_to_match_set(table)" in message
    assert not Path(_common.SPLITS_DIR).exists() and not Path(split_stage.SUMMARY).exists()
    Path(split_stage.VALIDATED).write_text("{not json")
    with pytest.raises(split_stage.ManifestNotValidated, match="not a readable validation report"):
        split_stage.run(stage_params(), EXPECTATIONS)
    write_inputs(manifest_rows())
    split_stage.run(stage_params(), EXPECTATIONS)
    assert Path(_common.split_table("covid")).is_file()


def test_a_warning_in_the_validate_report_does_not_stop_the_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """As it does not stop the validate stage: only a critical failure does."""
    from covidcxr import validation

    monkeypatch.chdir(tmp_path)
    write_inputs(manifest_rows())
    warning = validation.ExpectationResult(type="expect_column_values_to_be_between", column="age", success=False,
                                           critical=False, why="ages are plausible", unexpected_count=1)
    report = validation.results_to_json([validation.SuiteResult("image_metadata", False, (warning,))])
    _common.write_json(split_stage.VALIDATED, report)
    assert not report["success"] and report["n_critical_failed"] == 0
    split_stage.run(stage_params(), EXPECTATIONS)
