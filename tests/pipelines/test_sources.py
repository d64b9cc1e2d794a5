"""Stage `sources`: DVC sees the corpus folders of ingest.sources through their fingerprints, and ingest follows."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from covidcxr.datasets import DatasetLayoutError
from pipelines import sources
from tests.pipelines.conftest import ROOT, run


def corpus(root: Path) -> Path:
    for name in ("metadata.csv", "images/a.png", "images/b.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x" * 10)
    return root


def test_a_fingerprint_changes_when_a_file_is_added_or_touched_and_not_otherwise(tmp_path):
    root = corpus(tmp_path / "cohen")
    first = sources.fingerprint(root)
    assert first["files"] == 3 and sources.fingerprint(root) == first  # listed again: the same
    (root / "images/c.png").write_bytes(b"y")
    grown = sources.fingerprint(root)
    assert grown["files"] == 4 and grown["sha256"] != first["sha256"]
    st = (root / "metadata.csv").stat()
    os.utime(root / "metadata.csv", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # rewritten in place, same size
    touched = sources.fingerprint(root)
    assert touched["files"] == 4 and touched["sha256"] not in (first["sha256"], grown["sha256"])
    # The same files elsewhere (another mount point of the corpus): the same fingerprint, no path in it.
    moved = tmp_path / "elsewhere"
    root.rename(moved)
    assert sources.fingerprint(moved) == touched


def test_the_stage_writes_counts_and_digests_only(tmp_path, monkeypatch):
    root = corpus(tmp_path / "corpus" / "montgomery_shenzhen")
    monkeypatch.chdir(tmp_path)
    result = sources.run([{"name": "montgomery", "root": str(root)}, {"name": "shenzhen", "root": str(root)}])
    written = (tmp_path / sources.FINGERPRINTS).read_text()
    assert json.loads(written) == result and [s["name"] for s in result["sources"]] == ["montgomery", "shenzhen"]
    assert result["sources"][0]["sha256"] == result["sources"][1]["sha256"]
    assert str(tmp_path) not in written and "metadata" not in written and "png" not in written


def test_a_root_that_is_no_folder_names_the_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetLayoutError, match=r"ingest.sources\[1\] \(kermany\): .*missing: not a folder"):
        sources.run([{"name": "cohen", "root": str(corpus(tmp_path / "cohen"))},
                     {"name": "kermany", "root": str(tmp_path / "missing")}])
    assert not (tmp_path / sources.FINGERPRINTS).exists()


INGEST = """\
import pathlib
runs = pathlib.Path("runs.txt")
runs.write_text(runs.read_text() + "ran\\n" if runs.exists() else "ran\\n")
pathlib.Path("artifacts/manifest.csv").write_text(pathlib.Path("artifacts/sources.json").read_text())
"""


@pytest.mark.slow
def test_dvc_reruns_ingest_when_a_corpus_outside_the_repository_changes(tmp_path):
    """Ingest's only data dep was data/: a corpus refreshed in place (outside the repository, named by a string in
    params) left `dvc repro` skipping ingest. The stages as dvc.yaml declares them (real dvc; ingest a stand-in)."""
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert "artifacts/sources.json" in declared["ingest"]["deps"]
    repo, root = tmp_path / "repo", corpus(tmp_path / "cohen")
    repo.mkdir()
    (repo / "ingest.py").write_text(INGEST)
    stage = {k: v for k, v in declared["sources"].items() if k != "deps"}  # its code is the project's
    stage["cmd"] = f"PYTHONPATH={ROOT} {stage['cmd']}"
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"sources": stage, "ingest": {
        "cmd": f"{sys.executable} ingest.py", "deps": ["ingest.py", sources.FINGERPRINTS],
        "outs": ["artifacts/manifest.csv"]}}}))
    (repo / "params.yaml").write_text(yaml.safe_dump({"ingest": {"sources": [{"name": "cohen", "root": str(root)}]}}))

    def repro() -> int:
        run(["dvc", "repro"], repo, timeout=120)
        return len((repo / "runs.txt").read_text().splitlines())

    run(["dvc", "init", "--no-scm", "-q"], repo)
    assert repro() == 1
    assert repro() == 1  # nothing changed: ingest skipped
    (root / "images/c.png").write_bytes(b"y")  # the collection grew
    assert repro() == 2
    st = (root / "metadata.csv").stat()
    os.utime(root / "metadata.csv", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert repro() == 3
    assert json.loads(run(["dvc", "status", "--json"], repo).stdout) == {"sources": ["always changed"]}
