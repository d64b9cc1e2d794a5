"""Stage `validate` on manifest files written here, read by the stage itself: a missing or empty column fails it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from covidcxr import validation
from pipelines import _common
from pipelines import validate as validate_stage
from tests.test_validation import EXPECTATIONS, make_manifest


def run_stage(workdir: Path, frame: pd.DataFrame) -> list[str]:
    """Write ``frame`` as the stage's manifest and run the stage; the labels of the critical failures."""
    _common.write_csv(workdir / validate_stage.MANIFEST, frame)
    with pytest.raises(validation.ExpectationFailure) as err:
        validate_stage.run({"expectations": str(EXPECTATIONS)})
    return [e.label for _, e in err.value.failures]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_valid_manifest_file_passes(workdir: Path) -> None:
    _common.write_csv(workdir / validate_stage.MANIFEST, make_manifest())
    validate_stage.run({"expectations": str(EXPECTATIONS)})
    assert validation_json(workdir)["success"]
    assert (workdir / validate_stage.DOCS / "index.html").is_file()


def test_a_manifest_file_missing_columns_fails(workdir: Path) -> None:
    """The stage conformed the file (every missing column added empty), so the column-set check always passed."""
    failed = run_stage(workdir, make_manifest().drop(columns=["modality", "header_view_position"]))
    assert failed == ["expect_table_columns_to_match_set"]
    assert not validation_json(workdir)["success"]


def test_a_manifest_file_with_an_empty_width_column_fails(workdir: Path) -> None:
    """The width range check skips empty values: an all-empty column passed it."""
    failed = run_stage(workdir, make_manifest().assign(width=pd.NA))
    assert failed == ["expect_column_values_to_not_be_null(width)"]


def validation_json(workdir: Path) -> dict:
    import json

    return json.loads((workdir / validate_stage.CHECKS).read_text())


def test_the_data_docs_page_is_replaced_whole_never_written_in_place(workdir: Path) -> None:
    """write_data_docs wrote index.html in place, unlike every other output (a stage killed part way left half a
    page that DVC could take as valid). A page replaced by renaming a finished file leaves whatever the old path
    pointed at untouched; a write in place goes through it."""
    elsewhere = workdir / "elsewhere.html"
    elsewhere.write_text("an older page")
    docs = workdir / validate_stage.DATA_DOCS
    docs.parent.mkdir(parents=True)
    docs.symlink_to(elsewhere)
    _common.write_csv(workdir / validate_stage.MANIFEST, make_manifest())
    validate_stage.run({"expectations": str(EXPECTATIONS)})
    assert elsewhere.read_text() == "an older page"
    assert not docs.is_symlink() and "covidcxr data validation" in docs.read_text()
    assert [p.name for p in docs.parent.iterdir()] == ["index.html"]
