"""Pins in one source: every package the code imports is a declared direct dependency, pinned in requirements.lock."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()


def lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"requirements.lock: {line!r} is not an exact pin"
            pins[norm(name)] = version
    return pins


def declared() -> tuple[list[str], list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"], project["optional-dependencies"]["test"]


def imported_distributions(folders: list[str]) -> dict[str, str]:
    """Third-party distributions imported anywhere under ``folders`` (top-level module -> a file importing it)."""
    own = {"covidcxr", "pipelines", "tests", "bench"}
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
                for name in names:
                    top = name.split(".")[0]
                    if top not in own and top not in sys.stdlib_module_names:
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_direct_dependencies_are_names_pinned_only_in_the_lock_file():
    deps, test = declared()
    pins = lock()
    for name in deps + test:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[a-z,]+\])?", name), \
            f"pyproject.toml pins {name!r}: pin it in requirements.lock instead"
        assert norm(name) in pins, f"{name} is a dependency but requirements.lock does not pin it"


def test_the_environment_is_the_lock_file():
    for name, version in lock().items():
        assert metadata.version(name) == version, f"{name}: installed {metadata.version(name)}, locked {version}"


#: Imported only where they exist: the GPU benchmark runs Keras on JAX on a GPU machine without TensorFlow.
OPTIONAL = {"jax": "bench/gpu.py"}


def test_every_imported_package_is_a_declared_dependency():
    deps, test = declared()
    providers = metadata.packages_distributions()
    library = {norm(d) for d in deps}
    for folders, allowed, what in ((["src", "pipelines"], library, "dependencies"),
                                   (["tests", "bench"], library | {norm(t) for t in test}, "dependencies or test")):
        for module, where in imported_distributions(folders).items():
            if OPTIONAL.get(module) == where:
                continue
            dists = {norm(d) for d in providers.get(module, [module])}
            assert dists & allowed, f"{where} imports {module} ({sorted(dists)}), not in pyproject's {what}"
