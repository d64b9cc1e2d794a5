"""Model folders read without loading a network: a damaged run.json or threshold.json is an error naming the file."""

from __future__ import annotations

import json

import pytest

from covidcxr import folders


@pytest.fixture
def folder(tmp_path):
    (tmp_path / folders.MODEL_FILE).write_bytes(b"")
    (tmp_path / folders.STANDARDIZER_FILE).write_text("{}")
    (tmp_path / folders.RUN_FILE).write_text(json.dumps({"run_id": "a" * 32}))
    (tmp_path / folders.THRESHOLD_FILE).write_text(json.dumps({"threshold": 0.4, "objective": "youden"}))
    return tmp_path


def test_a_sound_folder_reads(folder):
    assert folders.folder_info(folder)["run_id"] == "a" * 32
    assert folders.operating_threshold(folder) == 0.4
    assert folders.folder_threshold(folder)["objective"] == "youden"


@pytest.mark.parametrize("content, message", [
    ('{"run_id": "aaa', "not valid JSON"),  # truncated: a bare JSONDecodeError before
    (b"\xff\xfe", "not valid JSON"),
    ('["run_id"]', "not a JSON object"),
])
def test_a_damaged_run_file_is_a_value_error_naming_it(folder, content, message):
    path = folder / folders.RUN_FILE
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message) as caught:
        folders.folder_info(folder)
    assert str(path) in str(caught.value) and "rerun the stage that trains it" in str(caught.value)


@pytest.mark.parametrize("content, message", [
    ('{"objective": "youden"}', "no threshold"),  # a KeyError before
    ('{"threshold": 0.4', "not valid JSON"),
    ('{"threshold": "0.4"}', r"threshold must be a number in \[0, 1\], got '0.4'"),
    ('{"threshold": 1.5}', r"threshold must be in \[0, 1\], got 1.5"),
    ('{"threshold": true}', "got True"),
    ('{"threshold": NaN}', "got nan"),
    # metrics.check_threshold's rule, the one serving loads it by (the 401 digits were echoed whole before)
    ('{"threshold": 1%s}' % ("0" * 400), "got an integer of 401 digits"),
])
def test_a_threshold_file_without_a_usable_threshold_is_a_value_error_naming_it(folder, content, message):
    path = folder / folders.THRESHOLD_FILE
    path.write_text(content)
    for read in (folders.folder_threshold, folders.operating_threshold):
        with pytest.raises(ValueError, match=message) as caught:
            read(folder)
        assert str(path) in str(caught.value) and "rerun the stage that trains it" in str(caught.value)
