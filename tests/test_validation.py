"""Data tests: the Great Expectations suites in expectations/ on manifests and split tables built here."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from covidcxr import manifest, validation
from covidcxr.validation import ExpectationFailure, SuiteError

EXPECTATIONS = Path(__file__).resolve().parents[1] / "expectations"
SUITE_FILES = sorted(EXPECTATIONS.glob("*.json"))
FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
N = 10


def make_manifest(n: int = N) -> pd.DataFrame:
    """A valid manifest: n images of n // 2 patients, the last two lateral, labels alternating."""
    frontal = n - 2
    return manifest.conform(
        pd.DataFrame(
            {
                "image_id": [f"demo/{i:04d}" for i in range(n)],
                "path": [f"/data/demo/{i:04d}.png" for i in range(n)],
                "source": "demo",
                "patient_id": [f"demo:p{i // 2}" for i in range(n)],
                "projection": ["frontal"] * frontal + ["lateral"] * 2,
                "view_position": ["PA"] * (frontal - 2) + [None, "AP SUPINE", "L", "LL"],
                "label": ["covid", "negative"] * (n // 2),
                "finding": "COVID-19",
                "site": "demo",
                "sex": ["M", "F"] * (n // 2),
                "age": [40.0] * (n - 1) + [None],
                "width": 256,
                "height": 256,
                "photometric": "L",
                "bits_stored": 8,
                "sha256": [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)],
                "mask_path": None,
                "modality": None,
                "pixel_sha256": [hashlib.sha256(f"pixels {i}".encode()).hexdigest() for i in range(n)],
            }
        )
    )


def make_splits(train: int, val: int, test: int) -> pd.DataFrame:
    """A split table with one image per patient and alternating labels within each split."""
    rows = []
    for split, count in (("train", train), ("val", val), ("test", test)):
        for j in range(count):
            i = len(rows)
            rows.append((f"demo/{i:04d}", f"demo:p{i}", ("covid", "negative")[j % 2], split))
    return pd.DataFrame(rows, columns=list(validation.SPLIT_COLUMNS)).astype("string")


def critical_failures(results: list[validation.SuiteResult]) -> set[str]:
    return {e.label for r in results for e in r.critical_failed}


def find(results: list[validation.SuiteResult], label: str) -> validation.ExpectationResult:
    return next(e for r in results for e in r.expectations if e.label == label)


def manifest_suite(df: pd.DataFrame, suite: str) -> validation.SuiteResult:
    """One manifest suite's result, run as the validate stage runs it (the projection suite on the derived views)."""
    return next(r for r in validation.validate_manifest(df, EXPECTATIONS) if r.name == suite)


@pytest.fixture(scope="module")
def valid_results() -> list[validation.SuiteResult]:
    return validation.validate_manifest(make_manifest(), EXPECTATIONS)


# ---------------------------------------------------------------------------------------------- suite files


@pytest.mark.parametrize("path", SUITE_FILES, ids=lambda p: p.name)
def test_suite_file_is_gx_suite_json_with_critical_and_why(path: Path) -> None:
    import great_expectations as gx

    spec = json.loads(path.read_text())
    assert gx.ExpectationSuite(**spec).to_json_dict() == spec  # exactly GX's own format, nothing dropped
    for entry in spec["expectations"]:
        assert isinstance(entry["meta"]["critical"], bool)
        assert entry["meta"]["why"].strip()


def test_suite_files_are_the_three_suites() -> None:
    assert [p.name for p in SUITE_FILES] == ["image_metadata.json", "projection_labels.json", "splits.json"]


def test_image_metadata_columns_follow_manifest_schema() -> None:
    spec = validation.load_suite(EXPECTATIONS / "image_metadata.json")
    (columns,) = [e["kwargs"]["column_set"] for e in spec["expectations"] if "column_set" in e["kwargs"]]
    assert columns == manifest.COLUMNS


def test_projection_checks_read_views_through_the_one_view_map() -> None:
    """The suite compared raw view spellings while the adapters map views through manifest.view_key: AP_SUPINE
    labelled lateral passed both critical checks, and a second list of spellings could drift from the map."""
    spec = validation.load_suite(EXPECTATIONS / "projection_labels.json")
    (pairs,) = [e["kwargs"]["value_pairs_set"] for e in spec["expectations"] if "value_pairs_set" in e["kwargs"]]
    assert pairs == {"$PARAMETER": "view_pairs"}  # no spelling in the suite: they come from the map
    assert {tuple(p) for p in validation.view_pairs()} == set(manifest.view_projections().items())
    assert all(manifest.view_key(view) == view for view, _ in validation.view_pairs())
    df = make_manifest()
    df.loc[0, ["view_position", "projection"]] = ["AP_SUPINE", "lateral"]
    df.loc[1, ["view_position", "projection"]] = ["ap-supine", "frontal"]
    df.loc[9, "view_position"] = "lat"  # lateral, as labelled
    df.loc[8, ["view_position", "projection"]] = ["l", "frontal"]
    result = manifest_suite(df, VIEWS)
    assert critical_failures([result]) == {f"{NOT_IN_SET}(projection)"}
    failed = {x["image_id"]: x for e in result.critical_failed for x in e.examples}
    assert failed == {"demo/0000": {"image_id": "demo/0000", "projection": "lateral", "view_position": "AP_SUPINE"},
                      "demo/0008": {"image_id": "demo/0008", "projection": "frontal", "view_position": "l"}}
    pairs = find([result], "expect_column_pair_values_to_be_in_set(view_key,projection)")
    assert {x["image_id"] for x in pairs.examples} == {"demo/0000", "demo/0008"}  # demo/0001 and 0009 are pairs


def test_cohen_s_own_view_spellings_are_pairs_of_the_view_map() -> None:
    """Cohen's APS and AP SEMI ERECT were mapped to frontal by a second map in the adapter, which the suite's pairs
    did not know: every such film tripped the pair warning."""
    from covidcxr.datasets import cohen

    df = make_manifest()
    df.loc[[0, 1, 2], "view_position"] = ["APS", "AP SEMI ERECT", "AP semi-erect"]
    df["projection"] = [cohen.projection(v) if isinstance(v, str) else p for v, p in zip(df["view_position"],
                                                                                          df["projection"])]
    assert list(df.loc[[0, 1, 2], "projection"]) == ["frontal"] * 3
    result = manifest_suite(df, VIEWS)
    assert result.success, validation.results_to_json([result])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s["expectations"][0].update(type="expect_nonsense"), "expect_nonsense"),
        (lambda s: s["expectations"][0]["meta"].pop("why"), "meta.why"),
        (lambda s: s["expectations"][0]["meta"].update(critical="yes"), "meta.critical"),
        (lambda s: s["expectations"][0].update(severity="warning"), "contradicts"),
        (lambda s: s["expectations"][1]["kwargs"].update(colum="x"), "not valid"),
    ],
    ids=["unknown-type", "no-why", "critical-not-bool", "severity-mismatch", "bad-kwargs"],
)
def test_invalid_suite_file_raises_naming_the_file(
    tmp_path: Path, edit: Callable[[dict], object], message: str
) -> None:
    spec = json.loads((EXPECTATIONS / "image_metadata.json").read_text())
    edit(spec)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(SuiteError, match=message) as err:
        validation.run_suite(make_manifest(), path)
    assert "broken.json" in str(err.value)


def test_missing_suite_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        validation.run_suite(make_manifest(), tmp_path / "nowhere.json")


# ---------------------------------------------------------------------------------------------- manifest suites


def test_valid_manifest_passes_all_suites(valid_results: list[validation.SuiteResult]) -> None:
    assert [r.name for r in valid_results] == ["image_metadata", "projection_labels"]
    assert all(r.success for r in valid_results), validation.results_to_json(valid_results)
    assert sum(len(r.expectations) for r in valid_results) == 29
    validation.raise_for_critical(valid_results)


def _set(row: int, column: str, value: object) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def edit(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[row, column] = value
        return df

    return edit


def _duplicate_sha(df: pd.DataFrame) -> pd.DataFrame:
    df.loc[3, "sha256"] = df.loc[4, "sha256"]
    return df


def _duplicate_pixels(df: pd.DataFrame) -> pd.DataFrame:  # two files of other bytes, one film
    df.loc[3, "pixel_sha256"] = df.loc[4, "pixel_sha256"]
    return df


META, VIEWS = "image_metadata", "projection_labels"
UNIQUE, NOT_NULL = "expect_column_values_to_be_unique", "expect_column_values_to_not_be_null"
BETWEEN, IN_SET = "expect_column_values_to_be_between", "expect_column_values_to_be_in_set"
NOT_IN_SET = "expect_column_values_to_not_be_in_set"
COLUMN_SET = "expect_table_columns_to_match_set"

# (name, suite, edit, failing expectation, example image_id or a word the message must hold)
BROKEN = [
    ("duplicate-sha256", META, _duplicate_sha, f"{UNIQUE}(sha256)", "demo/0003"),
    ("same-pixels", META, _duplicate_pixels, f"{UNIQUE}(pixel_sha256)", "demo/0003"),
    ("null-pixel-sha256", META, _set(2, "pixel_sha256", None), f"{NOT_NULL}(pixel_sha256)", "demo/0002"),
    ("null-patient", META, _set(1, "patient_id", None), f"{NOT_NULL}(patient_id)", "demo/0001"),
    ("width-5", META, _set(5, "width", 5), f"{BETWEEN}(width)", "demo/0005"),
    ("sideways", META, _set(2, "projection", "sideways"), f"{IN_SET}(projection)", "demo/0002"),
    ("extra-column", META, lambda df: df.assign(notes="x"), COLUMN_SET, "notes"),
    ("missing-column", META, lambda df: df.drop(columns="modality"), COLUMN_SET, "modality"),
    # the range and in-set checks skip empty values: an image fact never filled fails its not-null check
    ("empty-width", META, _set(slice(None), "width", pd.NA), f"{NOT_NULL}(width)", "demo/0000"),
    ("empty-photometric", META, _set(slice(None), "photometric", pd.NA), f"{NOT_NULL}(photometric)", "demo/0000"),
    ("empty-sex", META, _set(slice(None), "sex", pd.NA), f"{NOT_NULL}(sex)", "demo/0000"),
    ("empty-bits-stored", META, _set(slice(None), "bits_stored", pd.NA), f"{NOT_NULL}(bits_stored)", "demo/0000"),
    ("lateral-as-frontal", VIEWS, _set(9, "projection", "frontal"), f"{NOT_IN_SET}(projection)", "demo/0009"),
    ("frontal-as-lateral", VIEWS, _set(0, "projection", "lateral"), f"{NOT_IN_SET}(projection)", "demo/0000"),
]


@pytest.mark.parametrize(
    ("suite", "edit", "label", "evidence"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN]
)
def test_manifest_broken_one_way_fails_that_critical_expectation(
    suite: str, edit: Callable[[pd.DataFrame], pd.DataFrame], label: str, evidence: str
) -> None:
    results = [manifest_suite(edit(make_manifest()), suite)]
    assert critical_failures(results) == {label}
    with pytest.raises(ExpectationFailure) as err:
        validation.raise_for_critical(results)
    message = str(err.value)
    assert f"suite {suite}" in message and label in message and evidence in message
    assert [e.label for _, e in err.value.failures] == [label]


def test_a_rare_dicom_without_bits_stored_is_tolerated() -> None:
    df = make_manifest(200)
    df.loc[7, "bits_stored"] = pd.NA  # BitsStored absent from one file's header: io falls back to BitsAllocated
    (result,) = [validation.run_suite(df, EXPECTATIONS / "image_metadata.json")]
    assert find([result], f"{NOT_NULL}(bits_stored)").success and not result.critical_failed


def test_examples_are_rows_taken_from_the_dataframe() -> None:
    df = make_manifest()
    df.loc[[2, 6], "width"] = [5, 20000]
    (result,) = [validation.run_suite(df, EXPECTATIONS / "image_metadata.json")]
    width = find([result], "expect_column_values_to_be_between(width)")
    assert width.unexpected_count == 2 and width.unexpected_percent == 20.0
    assert list(width.examples) == [
        {"image_id": "demo/0002", "width": 5},
        {"image_id": "demo/0006", "width": 20000},
    ]


def test_examples_are_at_most_five() -> None:
    df = make_manifest(20)
    df.loc[:, "sha256"] = df.loc[0, "sha256"]
    df.loc[0, "bits_stored"] = 17
    (result,) = [validation.run_suite(df, EXPECTATIONS / "image_metadata.json")]
    sha = find([result], "expect_column_values_to_be_unique(sha256)")
    assert sha.unexpected_count == 20 and len(sha.examples) == validation.MAX_EXAMPLES
    assert critical_failures([result]) == {sha.label, "expect_column_values_to_be_between(bits_stored)"}


def test_patient_ids_never_appear_in_examples(tmp_path: Path) -> None:
    suite = {
        "name": "patients",
        "expectations": [
            {
                "type": "expect_column_values_to_match_regex",
                "kwargs": {"column": "patient_id", "regex": "^demo:p[0-9]+$"},
                "meta": {"critical": True, "why": "patient keys are <source>:<id>"},
            }
        ],
    }
    (tmp_path / "patients.json").write_text(json.dumps(suite))
    df = make_manifest()
    df.loc[3, "patient_id"] = "John Doe"
    result = validation.run_suite(df, tmp_path / "patients.json")
    assert result.expectations[0].examples == ({"image_id": "demo/0003", "patient_id": "<redacted>"},)
    with pytest.raises(ExpectationFailure) as err:
        validation.raise_for_critical([result])
    assert "John Doe" not in str(err.value) and "demo/0003" in str(err.value)


def test_non_critical_failure_does_not_raise(caplog: pytest.LogCaptureFixture) -> None:
    df = make_manifest()
    df.loc[4, "age"] = 150.0
    results = validation.validate_manifest(df, EXPECTATIONS)
    age = find(results, "expect_column_values_to_be_between(age)")
    assert not age.success and not age.critical
    assert not results[0].success and not critical_failures(results)
    with caplog.at_level(logging.WARNING, logger="covidcxr.validation"):
        validation.raise_for_critical(results)
    assert "demo/0004" in caplog.text and "age" in caplog.text


def test_unknown_view_spelling_is_only_a_warning() -> None:
    df = make_manifest()
    df.loc[0, "view_position"] = "?"
    df.loc[0, "projection"] = "unknown"
    result = manifest_suite(df, VIEWS)
    assert not result.success and not result.critical_failed
    pairs = find([result], "expect_column_pair_values_to_be_in_set(view_key,projection)")
    assert pairs.examples == (
        {"image_id": "demo/0000", "view_key": "?", "projection": "unknown", "view_position": "?"},
    )


def test_a_projection_check_over_no_row_is_not_measured_not_passed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A source without view positions (Kermany, a generic CSV without the column) left the row-conditioned projection
    checks with no row to check, and GX's vacuous success was reported as passed."""
    df = make_manifest().assign(view_position=pd.NA)
    result = manifest_suite(df, VIEWS)
    assert result.success and not result.failed  # not a failure either
    assert [(e.status, e.element_count, e.missing_count) for e in result.expectations] == [
        ("not measured", 0, 0), ("not measured", 0, 0), ("not measured", N, N)]  # the pairs: every view missing
    with caplog.at_level(logging.WARNING, logger="covidcxr.validation"):
        validation.raise_for_critical([result])
    assert "not measured (no row met its condition)" in caplog.text
    summary = validation.results_to_json([result])["suites"][VIEWS]
    assert summary["n_not_measured"] == 3 and summary["n_failed"] == 0
    assert [(e["status"], e["success"], e["element_count"]) for e in summary["expectations"]] == [
        ("not measured", None, 0), ("not measured", None, 0), ("not measured", None, N)]
    page = validation.render_data_docs([result])
    assert page.count('<span class="warn">not measured</span>') == 4  # the suite too: it measured nothing
    assert '<span class="pass">passed</span>' not in page
    assert page.count("nothing to check") == 3
    # one frontal view measured: the lateral check still has nothing to check, the frontal one passes on its row
    df.loc[0, "view_position"] = "PA"
    measured = manifest_suite(df, VIEWS)
    assert [e.status for e in measured.expectations] == ["not measured", "passed", "passed"]
    assert [e.element_count for e in measured.expectations] == [0, 1, N]


def test_empty_manifest_fails() -> None:
    (result,) = [validation.run_suite(manifest.empty(), EXPECTATIONS / "image_metadata.json")]
    assert critical_failures([result]) == {"expect_table_row_count_to_be_between"}


def test_run_suite_rejects_non_dataframe() -> None:
    with pytest.raises(TypeError, match="DataFrame"):
        validation.run_suite(make_manifest().to_dict(), EXPECTATIONS / "image_metadata.json")


# ---------------------------------------------------------------------------------------------- splits


def run_splits(splits: pd.DataFrame, tolerance: float = 0.05) -> list[validation.SuiteResult]:
    return validation.validate_splits(splits, EXPECTATIONS, fractions=FRACTIONS, tolerance=tolerance)


def test_correct_split_passes() -> None:
    results = run_splits(make_splits(12, 4, 4))
    assert [r.name for r in results] == ["splits.rows", "splits.per_patient", "splits.per_split"]
    assert all(r.success for r in results), validation.results_to_json(results)
    validation.raise_for_critical(results)


def test_patient_in_two_splits_fails() -> None:
    splits = make_splits(12, 4, 4)
    splits.loc[19, "patient_id"] = splits.loc[0, "patient_id"]  # a test image of a train patient
    results = run_splits(splits)
    assert critical_failures(results) == {"expect_column_values_to_be_between(n_splits)"}
    with pytest.raises(ExpectationFailure) as err:
        validation.raise_for_critical(results)
    message = str(err.value)
    assert "splits.per_patient" in message and "demo/0000" in message and "test,train" in message
    assert "demo:p0" not in message


def test_proportions_off_target_fail() -> None:
    results = run_splits(make_splits(36, 2, 2))  # 0.9 / 0.05 / 0.05 against 0.6 / 0.2 / 0.2
    assert critical_failures(results) == {"expect_column_values_to_be_between(deviation)"}
    deviation = find(results, "expect_column_values_to_be_between(deviation)")
    assert [x["split"] for x in deviation.examples] == ["train", "val", "test"]
    assert deviation.examples[0]["fraction"] == pytest.approx(0.9)


def test_tolerance_is_a_run_time_parameter() -> None:
    assert not critical_failures(run_splits(make_splits(36, 2, 2), tolerance=0.35))


def test_missing_suite_parameter_raises() -> None:
    table = validation.split_tables(make_splits(12, 4, 4), FRACTIONS)["per_split"]
    with pytest.raises(ValueError, match="tolerance"):
        validation.run_suite(table, EXPECTATIONS / "splits.json", table="per_split")


def test_split_without_one_class_fails() -> None:
    splits = make_splits(12, 4, 4)
    splits.loc[splits["split"] == "test", "label"] = "covid"
    results = run_splits(splits)
    assert critical_failures(results) == {"expect_column_values_to_be_between(n_missing_classes)"}
    assert find(results, "expect_column_values_to_be_between(n_missing_classes)").examples[0]["split"] == "test"


def test_split_classes_are_the_tasks_own() -> None:
    splits = make_splits(12, 4, 4)
    splits["label"] = splits["label"].map({"covid": "frontal", "negative": "lateral"})
    assert critical_failures(run_splits(splits)) == {"expect_column_values_to_be_in_set(label)",
                                                     "expect_column_values_to_be_between(n_missing_classes)"}
    results = validation.validate_splits(splits, EXPECTATIONS, fractions=FRACTIONS, tolerance=0.05,
                                         classes=["frontal", "lateral"])
    assert not critical_failures(results)


@pytest.mark.parametrize(
    ("edit", "label"),
    [
        (_set(3, "split", "holdout"), "expect_column_values_to_be_in_set(split)"),
        (_set(3, "patient_id", None), "expect_column_values_to_not_be_null(patient_id)"),
        (_set(3, "split", None), "expect_column_values_to_not_be_null(split)"),
    ],
    ids=["unknown-split", "null-patient", "null-split"],
)
def test_bad_split_rows_fail(edit: Callable[[pd.DataFrame], pd.DataFrame], label: str) -> None:
    assert critical_failures(run_splits(edit(make_splits(12, 4, 4)))) == {label}


def test_split_tables_derive_per_patient_and_per_split() -> None:
    tables = validation.split_tables(make_splits(12, 4, 4), FRACTIONS)
    per_split = tables["per_split"].set_index("split")
    assert per_split["n_images"].to_dict() == {"train": 12, "val": 4, "test": 4}
    assert per_split["deviation"].tolist() == [0.0, 0.0, 0.0]
    assert per_split[["n_covid", "n_negative"]].to_numpy().tolist() == [[6, 6], [2, 2], [2, 2]]
    assert per_split["n_missing_classes"].tolist() == [0, 0, 0]
    assert len(tables["per_patient"]) == 20 and set(tables["per_patient"]["n_splits"]) == {1}


@pytest.mark.parametrize(
    ("splits", "fractions", "message"),
    [
        (make_splits(2, 1, 1).drop(columns="label"), FRACTIONS, "label"),
        (make_splits(0, 0, 0), FRACTIONS, "no rows"),
        (make_splits(2, 1, 1), {"train": 1.5}, "fractions"),
    ],
    ids=["missing-column", "empty", "bad-fraction"],
)
def test_split_tables_reject_bad_input(splits: pd.DataFrame, fractions: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validation.split_tables(splits, fractions)


# ---------------------------------------------------------------------------------------------- outputs


def test_results_json_is_byte_stable() -> None:
    df = make_manifest()
    df.loc[3, "sha256"] = df.loc[4, "sha256"]
    df.loc[4, "age"] = 150.0
    dumps = [
        json.dumps(validation.results_to_json(validation.validate_manifest(df, EXPECTATIONS)), sort_keys=True)
        for _ in range(2)
    ]
    assert dumps[0] == dumps[1]
    summary = json.loads(dumps[0])
    assert summary["n_critical_failed"] == 1 and not summary["success"]
    sha = summary["suites"]["image_metadata"]["expectations"]
    keys = {"type", "column", "success", "critical", "unexpected_count", "unexpected_percent", "examples"}
    assert keys <= set(sha[0])


def test_data_docs_are_self_contained_and_escaped(
    tmp_path: Path, valid_results: list[validation.SuiteResult]
) -> None:
    df = make_manifest()
    df.loc[2, "image_id"] = "<script>alert(1)</script>"
    df.loc[2, "width"] = 5
    results = [validation.run_suite(df, EXPECTATIONS / "image_metadata.json", name="broken")] + valid_results
    page = validation.render_data_docs(results)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page and "src=" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "byte-identical files under two names" in page  # the why of each expectation is shown
    assert page.count("<h2") == 3


def test_data_docs_show_each_result_by_its_status() -> None:
    """The page's status cells are the results' ``status`` (one rule, not a second spelling of it in the renderer): a
    success on nothing measured is "not measured", for an expectation and for a suite that measured nothing."""

    def result(success: bool, critical: bool, element_count: int | None = None) -> validation.ExpectationResult:
        return validation.ExpectationResult(type="expect_x", column="c", success=success, critical=critical, why="w",
                                            element_count=element_count, missing_count=element_count)

    suites = [
        validation.SuiteResult("mixed", False, (result(True, True), result(True, False, 0), result(False, True),
                                                result(False, False), result(True, True, 3))),
        validation.SuiteResult("warning", False, (result(False, False), result(True, True))),
        validation.SuiteResult("nothing", True, (result(True, True, 0),)),
        validation.SuiteResult("none", True, ()),
    ]
    assert [s.status for s in suites] == ["failed", "failed", "not measured", "not measured"]
    assert [e.status for e in suites[0].expectations] == ["passed", "not measured", "failed", "failed", "not measured"]
    cells = re.findall(r"<tr><td>(?:<a [^>]*>[^<]*</a></td><td>)?(<span[^>]*>[^<]*</span>)",
                       validation.render_data_docs(suites))
    passed, not_measured = '<span class="pass">passed</span>', '<span class="warn">not measured</span>'
    failed, warned = '<span class="fail">FAILED</span>', '<span class="warn">failed (warning)</span>'
    assert cells == [failed, warned, not_measured, not_measured,  # the suites: a critical failure or only warnings
                     passed, not_measured, failed, warned, not_measured, warned, passed, not_measured]


def test_nothing_is_written_to_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    validation._batch_definition.cache_clear()  # a fresh GX context, created in this directory
    validation.validate_manifest(make_manifest(), EXPECTATIONS)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- real data


def test_real_cohen_duplicate_files_fail_sha256_uniqueness(real_data: Path) -> None:
    images = sorted((real_data / "cohen" / "images").iterdir())
    df = manifest.conform(
        pd.DataFrame(
            {
                "image_id": [f"cohen/{p.stem}" for p in images],
                "sha256": [hashlib.sha256(p.read_bytes()).hexdigest() for p in images],
            }
        )
    )
    duplicated = set(df.loc[df["sha256"].duplicated(keep=False), "image_id"])
    (result,) = [validation.run_suite(df, EXPECTATIONS / "image_metadata.json")]
    sha = find([result], "expect_column_values_to_be_unique(sha256)")
    assert duplicated, "the real Cohen images hold byte-identical files under two names"
    assert not sha.success and sha.critical and sha.unexpected_count == len(duplicated)
    assert {x["image_id"] for x in sha.examples} <= duplicated


def test_real_cohen_views_pass_projection_checks(real_data: Path) -> None:
    """The Cohen adapter's own projections (its APS and AP SEMI ERECT tripped the pair warning when they were a
    second view map in the adapter)."""
    from covidcxr.datasets import cohen

    meta = pd.read_csv(real_data / "cohen" / "metadata.csv")
    views = meta["view"].astype("string").str.strip().str.upper()
    df = pd.DataFrame(
        {
            "image_id": "cohen/" + meta["filename"].astype("string"),
            "view_position": views,
            "projection": pd.Series([cohen.projection(v) for v in views], dtype="string"),
        }
    )
    result = manifest_suite(df, VIEWS)
    assert not result.critical_failed
    pairs = find([result], "expect_column_pair_values_to_be_in_set(view_key,projection)")
    # only spellings the view map does not know (Cohen has "?", which the adapter reads as no view) are outside it
    assert {x["view_position"] for x in pairs.examples} == {"?"}
