"""Benchmarks: each figure is reported beside a baseline measured in the same run (see bench/README.md).

Every benchmark module has ``run(..., smoke=False)`` (its raw figures) and ``rows(result)`` (those figures in the one
schema of ``bench/results.json``, built with :func:`row`).
"""

from __future__ import annotations

import math
import operator
import os
import platform
from collections.abc import Callable, Mapping

#: The keys of every row of bench/results.json, in this order.
ROW_KEYS = ("name", "value", "baseline", "baseline_name", "ratio", "unit", "goal", "pass", "skipped")
_OPS = {">=": operator.ge, "<=": operator.le, "<": operator.lt, ">": operator.gt}


def goal(on: str, op: str, target: float) -> dict:
    """A pass criterion: ``on`` (``value`` or ``ratio``) ``op`` ``target``."""
    if on not in ("value", "ratio") or op not in _OPS:
        raise ValueError(f"bad goal {on} {op} {target}")
    return {"on": on, "op": op, "target": target}


def row(name: str, value: float | None, baseline: float | None, baseline_name: str, unit: str,
        goal: dict | None = None, *, ndigits: int = 3) -> dict:
    """One figure beside its same-run baseline: ratio = value / baseline; ``pass`` is null without a goal."""
    ratio = value / baseline if value is not None and baseline else None
    checked = {"value": value, "ratio": ratio}[goal["on"]] if goal else None
    passed = bool(_OPS[goal["op"]](checked, goal["target"])) if goal and checked is not None else None
    return {"name": name, "value": _round(value, ndigits), "baseline": _round(baseline, ndigits),
            "baseline_name": baseline_name, "ratio": _round(ratio, ndigits), "unit": unit, "goal": goal,
            "pass": passed, "skipped": None}


def alternating_rounds(sides: Mapping[str, Callable[[], float]], rounds: int) -> list[dict[str, float]]:
    """Each of ``rounds`` rounds, every side's figure measured back to back, the order reversed every other round: a
    figure beside its baseline within one round compares one machine speed (this VM's drifts between minutes), and
    neither side gets the quieter half systematically."""
    return [{name: sides[name]() for name in (list(sides) if r % 2 == 0 else list(sides)[::-1])}
            for r in range(rounds)]


def skipped(name: str, reason: str) -> dict:
    """A benchmark that could not run here, and why (no figure, no verdict)."""
    return {"name": name, "value": None, "baseline": None, "baseline_name": None, "ratio": None, "unit": None,
            "goal": None, "pass": None, "skipped": reason}


def _round(x: float | None, ndigits: int) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), ndigits)


def machine() -> dict:
    """What a figure was measured on: cores, the CPU's name and the CPU kernels TensorFlow runs (portable: the
    ``COVIDCXR_PORTABLE_CPU`` kernels, capped at AVX2; native: TensorFlow's own, oneDNN on AVX-512). Benchmarks and
    the experiments' records (``pipelines.experiment``) name it: wall times and, with native kernels, trained weights
    differ from one machine to the next."""
    from covidcxr import runtime

    cpu = None
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    kernels = "portable" if runtime.portable_cpu_requested() else "native"
    return {"cpus": os.cpu_count(), "cpu": cpu or platform.processor() or None, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_kernels": kernels}
