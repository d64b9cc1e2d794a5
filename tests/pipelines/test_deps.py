"""dvc.yaml declares what every stage imports and the params it reads (computed, so a stale output cannot hide)."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
import yaml

from pipelines import _deps

ROOT = _deps.PROJECT
HELPERS = {"pipelines._cache", "pipelines._common", "pipelines._models", "pipelines._tracking", "pipelines._params"}


def test_every_stage_declares_the_files_it_imports_and_the_params_it_reads():
    assert _deps.problems() == [], "run `make deps` (python -m pipelines._deps --write) and declare params"


def test_a_new_selection_does_not_rerun_the_stages_it_does_not_change(tmp_path, monkeypatch):
    """Ingest, the caches and the U-Net read no selection: their params and deps leave it out, and the segmentation
    split they read is byte-identical under two selections. The projection split pins the selection's covid test
    patients into its test split, so train_projection, filter_frontal and what follows do rerun per selection."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("ingest", "cache", "cache_projection", "tune_unet", "train_unet"):
        declared = stages[name].get("params", [])
        assert not {"split", "split.experiment"} & set(declared), name
        assert not {"artifacts/splits/covid.csv", "artifacts/splits/projection.csv"} & set(stages[name]["deps"]), name
    assert "artifacts/splits/projection.csv" in stages["train_projection"]["deps"]
    assert "artifacts/models/projection" in stages["filter_frontal"]["deps"]

    from pipelines import _common
    from pipelines import split as split_stage
    from tests.pipelines.test_split import EXPECTATIONS, manifest_rows, stage_params, write_inputs

    monkeypatch.chdir(tmp_path)
    write_inputs(manifest_rows())
    covid = [{"source": "pos", "label": "covid"}]
    selections = {"all": {"positives": covid, "negatives": [{"label": "negative"}]},
                  "pos-only": {"positives": covid, "negatives": [{"source": "pos", "label": "negative"}]}}
    written = {}
    for name in selections:
        split_stage.run(stage_params(experiment=name, experiments=selections), EXPECTATIONS)
        written[name] = {task: (tmp_path / _common.split_table(task)).read_bytes()
                         for task in ("covid", "projection", "segmentation")}
    assert written["all"]["segmentation"] == written["pos-only"]["segmentation"]  # the U-Net's inputs: unchanged
    assert written["all"]["covid"] != written["pos-only"]["covid"]
    assert written["all"]["projection"] != written["pos-only"]["projection"]  # the filter trains again


def test_no_stage_module_imports_another_stage_module():
    stages = _deps.stages(ROOT / "dvc.yaml")
    modules = {_deps.stage_module(s) for s in stages.values()} - {None}
    for module in sorted(modules):
        imported = {n for n in _deps.imported_names(_deps.module_path(module)) if n.startswith("pipelines.")}
        stage_imports = imported - HELPERS - {"pipelines"}
        assert not stage_imports, f"{module} imports stage modules {sorted(stage_imports)}"


def _mini_project(root: Path, dvc: str) -> Path:
    """A tiny project with the real layout: two library modules, a dynamic-import package, two stages."""
    files = {
        "src/covidcxr/__init__.py": "",
        "src/covidcxr/base.py": "X = 1\n",
        "src/covidcxr/lazy.py": "def f():\n    from covidcxr import base\n    return base.X\n",
        "src/covidcxr/plugins/__init__.py": "import importlib\n\n\ndef load(name):\n"
                                            "    return importlib.import_module(f'{__name__}.{name}')\n",
        "src/covidcxr/plugins/one.py": "from .. import base\n",
        "pipelines/__init__.py": "",
        "pipelines/_common.py": "def params(key):\n    return key\n",
        "pipelines/alpha.py": textwrap.dedent("""\
            from covidcxr import lazy
            from pipelines import _common

            if __name__ == "__main__":
                _common.params("alpha")
                _common.params("beta.key")
            """),
        "pipelines/gamma.py": "from covidcxr import plugins\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "dvc.yaml").write_text(dvc)
    return root


def test_function_level_relative_and_run_time_imports_are_found(tmp_path):
    root = _mini_project(tmp_path, "stages: {}\n")
    files, folders = _deps.code_closure("pipelines.alpha", root)
    assert {p.as_posix() for p in files} == {"pipelines/__init__.py", "pipelines/alpha.py", "pipelines/_common.py",
                                             "src/covidcxr/__init__.py", "src/covidcxr/lazy.py",
                                             "src/covidcxr/base.py"}
    assert not folders
    files, folders = _deps.code_closure("pipelines.gamma", root)
    assert {p.as_posix() for p in folders} == {"src/covidcxr/plugins"}
    assert Path("src/covidcxr/plugins/one.py") in files and Path("src/covidcxr/base.py") in files
    assert _deps.params_read(Path("pipelines/alpha.py"), root) == {"alpha", "beta.key"}


def test_a_missing_dependency_or_params_key_is_named(tmp_path):
    dvc = {"stages": {
        "alpha": {"cmd": "python -m pipelines.alpha", "params": ["alpha"],
                  "deps": ["data", "pipelines/__init__.py", "pipelines/_common.py", "pipelines/alpha.py",
                           "src/covidcxr/__init__.py", "src/covidcxr/lazy.py"]},
        "gamma": {"cmd": "python -m pipelines.gamma", "deps": ["src/covidcxr", "pipelines"]},
    }}
    root = _mini_project(tmp_path, yaml.safe_dump(dvc))
    assert _deps.problems(root) == [
        "stage alpha: imports src/covidcxr/base.py, which is not in its deps",
        "stage alpha: reads params 'beta.key' (pipelines/alpha.py), which is not in its params",
    ]
    _deps.write(root)  # the generator fixes the files; params stay a declaration
    written = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    assert written["alpha"]["deps"][0] == "data" and "src/covidcxr/base.py" in written["alpha"]["deps"]
    assert written["gamma"]["deps"] == ["pipelines", "src/covidcxr"]  # folders that cover everything are kept
    assert _deps.problems(root) == [
        "stage alpha: reads params 'beta.key' (pipelines/alpha.py), which is not in its params"]


def test_a_non_literal_params_key_is_refused(tmp_path):
    root = _mini_project(tmp_path, "stages: {}\n")
    (root / "pipelines/alpha.py").write_text("from pipelines import _common\nname = 'x'\n_common.params(name)\n")
    with pytest.raises(ValueError, match="literal key"):
        _deps.params_read(Path("pipelines/alpha.py"), root)


def test_the_real_dvc_yaml_is_what_the_generator_writes(tmp_path):
    copy = tmp_path / "project"
    for name in ("src", "pipelines"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", copy / "dvc.yaml")
    _deps.write(copy)
    assert (copy / "dvc.yaml").read_text() == (ROOT / "dvc.yaml").read_text()


def test_the_generator_keeps_the_comments_of_a_stage_s_data_deps(tmp_path):
    dvc = textwrap.dedent("""\
        stages:
          alpha:
            cmd: python -m pipelines.alpha
            params:
              - alpha
            deps:
              - data  # why this stage reads the data
              - artifacts/table.csv  # and this table
              - pipelines/alpha.py
        """)
    root = _mini_project(tmp_path, dvc)
    assert _deps.write(root) == ["alpha"]
    text = (root / "dvc.yaml").read_text()
    assert "- data  # why this stage reads the data" in text and "- artifacts/table.csv  # and this table" in text
    deps = yaml.safe_load(text)["stages"]["alpha"]["deps"]
    assert deps[:2] == ["data", "artifacts/table.csv"] and "src/covidcxr/base.py" in deps
    assert _deps.problems(root) == [  # every import declared now
        "stage alpha: reads params 'beta.key' (pipelines/alpha.py), which is not in its params"]
