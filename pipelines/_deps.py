"""Dependencies correct by construction: the project files each DVC stage's command imports, and the params sections
it reads, against what dvc.yaml declares.

    python -m pipelines._deps            # check: exit 1, naming each stage and the file or params key it misses
    python -m pipelines._deps --write    # rewrite the code deps of every stage in dvc.yaml (comments kept)

Imports are found statically (``ast``), anywhere in a module (inside functions too), transitively through the
project's own modules (``covidcxr`` under src/, ``pipelines``); importing ``a.b.c`` also runs ``a/__init__.py`` and
``a/b/__init__.py``. A module that imports by name at run time (``importlib.import_module``) depends on its whole
package folder. Params reads are the literal first arguments of ``params(...)`` calls in a stage's own module
(``_common.params("segment")`` reads the section, ``_common.params("split.experiment")`` one key); the one read that is
not an input, ``_common.filed_under()`` (the MLflow experiment a selection-independent stage files its run under), is
deliberately not seen.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Iterable
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
PACKAGES = {"covidcxr": Path("src/covidcxr"), "pipelines": Path("pipelines")}
CODE_PREFIXES = ("src/", "pipelines/")


def _is_code(dep: str) -> bool:
    return dep.rstrip("/") in ("src", "pipelines") or dep.startswith(CODE_PREFIXES)
_STAGE_CMD = re.compile(r"python\s+-m\s+([\w.]+)")


def module_path(name: str, root: Path = PROJECT) -> Path | None:
    """The project file of dotted module ``name`` (relative to ``root``), or None when it is not a project module."""
    top, _, rest = name.partition(".")
    if top not in PACKAGES:
        return None
    base = PACKAGES[top].joinpath(*rest.split(".")) if rest else PACKAGES[top]
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if (root / candidate).is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    for top, folder in PACKAGES.items():
        if path.is_relative_to(folder):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts and parts[-1] == "__init__" else parts
            return ".".join((top, *parts))
    raise ValueError(f"{path} is not in a project package")


def imported_names(path: Path, root: Path = PROJECT) -> set[str]:
    """Dotted names a module imports anywhere in its body (relative imports resolved)."""
    tree = ast.parse((root / path).read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def _imports_dynamically(path: Path, root: Path) -> bool:
    return "importlib.import_module" in (root / path).read_text(encoding="utf-8")


def code_closure(module: str, root: Path = PROJECT) -> tuple[set[Path], set[Path]]:
    """``(files, folders)`` a module needs: every project file it imports transitively, and the package folders of
    modules that import by name at run time (their every file counts)."""
    files: set[Path] = set()
    folders: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # the packages on the way run first
            path = module_path(".".join(parts[:i]), root)
            if path is None or path in files:
                continue
            files.add(path)
            todo.extend(imported_names(path, root))
            if _imports_dynamically(path, root):
                folder = path.parent
                folders.add(folder)
                for inner in sorted((root / folder).rglob("*.py")):
                    todo.append(_module_name(inner.relative_to(root)))
    return files, folders


def params_read(path: Path, root: Path = PROJECT) -> set[str]:
    """The params keys a module reads: literal first arguments of its ``params(...)`` calls."""
    tree = ast.parse((root / path).read_text(encoding="utf-8"), filename=str(path))
    keys = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "params":
            if not node.args or not isinstance(node.args[0], ast.Constant) or not isinstance(node.args[0].value, str):
                raise ValueError(f"{path}:{node.lineno}: params() must be called with a literal key, so that "
                                 "its dvc.yaml declaration can be checked")
            keys.add(node.args[0].value)
    return keys


def stages(dvc_yaml: Path) -> dict[str, dict]:
    """The stages of a dvc.yaml as written (a matrix stage once, under its own name)."""
    import yaml

    return (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages", {})


def stage_module(stage: dict) -> str | None:
    match = _STAGE_CMD.search(str(stage.get("cmd", "")))
    return match.group(1) if match else None


def _entries(items: Iterable) -> list[str]:
    return [next(iter(i)) if isinstance(i, dict) else str(i) for i in items or []]


def _covered(path: str, deps: Iterable[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def _param_covered(key: str, declared: Iterable[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


def problems(root: Path = PROJECT) -> list[str]:
    """Every stage's missing code dependency and undeclared params read, one line each, naming stage and file."""
    out = []
    for name, stage in stages(root / "dvc.yaml").items():
        module = stage_module(stage)
        if module is None:
            continue
        files, folders = code_closure(module, root)
        deps = _entries(stage.get("deps"))
        for path in sorted(p.as_posix() for p in files | folders):
            if not _covered(path, deps):
                out.append(f"stage {name}: imports {path}, which is not in its deps")
        declared = _entries(stage.get("params"))
        own = module_path(module, root)
        for key in sorted(params_read(own, root)):
            if not _param_covered(key, declared):
                out.append(f"stage {name}: reads params {key!r} ({own.as_posix()}), which is not in its params")
    return out


def code_deps(module: str, keep: Iterable[str] = (), root: Path = PROJECT) -> list[str]:
    """The code deps a stage should declare: folders (run-time imports, and ``keep``'s code folders still needed),
    then every imported file not under one of them, sorted."""
    files, folders = code_closure(module, root)
    paths = sorted(p.as_posix() for p in files)
    kept = [k for k in keep if _is_code(k) and (root / k).is_dir() and any(_covered(p, [k]) for p in paths)]
    dirs = sorted({f.as_posix() for f in folders} | set(kept))
    dirs = [d for d in dirs if not _covered(d, [o for o in dirs if o != d])]
    return dirs + [p for p in paths if not _covered(p, dirs)]


def write(root: Path = PROJECT) -> list[str]:
    """Rewrite the code deps of every stage in dvc.yaml (data deps first, as they were); returns the stages changed."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 120
    yaml.indent(mapping=2, sequence=4, offset=2)
    path = root / "dvc.yaml"
    document = yaml.load(path.read_text(encoding="utf-8"))
    changed = []
    for name, stage in document["stages"].items():
        module = stage_module(stage)
        if module is None:
            continue
        current = list(stage.get("deps") or [])
        data = [d for d in current if not _is_code(str(d))]
        code = code_deps(module, [str(d) for d in current], root)
        if [str(d) for d in current] != [*map(str, data), *code]:
            _replace_code_deps(stage, data, code)
            changed.append(name)
    with path.open("w", encoding="utf-8") as fh:
        yaml.dump(document, fh)
    return changed


def _replace_code_deps(stage, data: list, code: list[str]) -> None:
    """``stage``'s deps made ``data`` then ``code``, in the document's own sequence where the data deps already lead
    it, so that their end-of-line comments stay on them (a new list would drop every comment of the stage's deps)."""
    deps = stage.get("deps")
    if deps is None or list(deps[:len(data)]) != data:
        stage["deps"] = [*data, *code]
        return
    comments = getattr(deps, "ca", None)
    if comments is not None:
        for index in [i for i in comments.items if i >= len(data)]:  # code deps carry none worth keeping
            del comments.items[index]
    del deps[len(data):]
    deps.extend(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines._deps", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite the code deps of dvc.yaml, then check")
    args = parser.parse_args(argv)
    if args.write:
        changed = write()
        print(f"dvc.yaml: code deps rewritten for {', '.join(changed) or 'no stage'}")
    found = problems()
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
