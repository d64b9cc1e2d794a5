"""Data validation with Great Expectations: the JSON suites in ``expectations/`` run on the manifest and splits.

The suites are GX 1.x ExpectationSuite JSON (what ``ExpectationSuite.to_json_dict()`` writes) and are the
source of truth: this module only loads them, computes the derived tables some of them run on, and reduces GX's
results. Every expectation carries ``meta.critical`` (a failure stops the pipeline) and ``meta.why`` (shown to the
user). The splits suite runs on three tables, named by each expectation's ``meta.table``: the split table itself
(``rows``), one row per patient (``per_patient``) and one row per split (``per_split``).

GX runs in an ephemeral, in-memory context on a pandas dataframe: nothing is written to disk, nothing is sent
anywhere. Results become a small byte-stable JSON (a DVC metrics file) and a self-contained HTML page, which the
stages write.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from covidcxr import manifest as manifest_schema
from covidcxr.manifest import LABELS

if TYPE_CHECKING:
    from great_expectations import ExpectationSuite
    from great_expectations.core.batch_definition import BatchDefinition

log = logging.getLogger(__name__)

MANIFEST_SUITES = ("image_metadata.json", "projection_labels.json")
SPLITS_SUITE = "splits.json"
SPLIT_COLUMNS = ("image_id", "patient_id", "label", "split")
SPLIT_TABLES = ("rows", "per_patient", "per_split")
CLASSES = tuple(label for label in LABELS if label != "unknown")  # the two classes every split needs
MAX_EXAMPLES = 5

# Values of these columns never appear in examples, messages or reports (a pseudonym is still an identifier).
_REDACTED_COLUMNS = frozenset({"patient_id"})
# SUMMARY keeps only the first MAX_EXAMPLES unexpected values and row indices, whatever the table's size.
_RESULT_FORMAT = {
    "result_format": "SUMMARY",
    "partial_unexpected_count": MAX_EXAMPLES,
    "return_unexpected_index_query": False,
}


class SuiteError(ValueError):
    """An expectation suite file that cannot be read or is not a valid GX 1.x suite."""


class ExpectationFailure(ValueError):
    """Critical expectations failed; ``failures`` holds (suite name, expectation result) pairs."""

    def __init__(self, message: str, failures: Sequence[tuple[str, ExpectationResult]]) -> None:
        super().__init__(message)
        self.failures = list(failures)


@dataclass(frozen=True)
class ExpectationResult:
    """One expectation's outcome, reduced to what reports need."""

    type: str
    column: str | None  # "a" for column expectations, "a,b" for pairs, None for table expectations
    success: bool
    critical: bool
    why: str
    unexpected_count: int | None = None
    unexpected_percent: float | None = None
    examples: tuple[dict[str, Any], ...] = ()  # <= MAX_EXAMPLES offending rows (image_id + values) or details
    error: str | None = None  # GX could not evaluate the expectation (e.g. a missing column)
    # rows GX looked at (after the expectation's row condition) and, of those, the missing values it skipped; None for
    # table-level expectations, which observe the table itself
    element_count: int | None = None
    missing_count: int | None = None

    @property
    def label(self) -> str:
        """``type(column)``, the way messages name an expectation."""
        return f"{self.type}({self.column})" if self.column else self.type

    @property
    def measured(self) -> bool:
        """False when a row-level expectation had no value to check (no row met its row condition, or every value it
        would check is missing): GX then says it passed, which says nothing. Never a failure either."""
        return self.element_count is None or self.element_count - (self.missing_count or 0) > 0

    @property
    def status(self) -> str:
        """``passed``, ``failed`` or ``not measured`` (passed by GX on no value at all)."""
        return _status(self.success, self.measured)


@dataclass(frozen=True)
class SuiteResult:
    """One suite run on one table."""

    name: str
    success: bool
    expectations: tuple[ExpectationResult, ...]

    @property
    def failed(self) -> tuple[ExpectationResult, ...]:
        return tuple(e for e in self.expectations if not e.success)

    @property
    def critical_failed(self) -> tuple[ExpectationResult, ...]:
        return tuple(e for e in self.failed if e.critical)

    @property
    def not_measured(self) -> tuple[ExpectationResult, ...]:
        return tuple(e for e in self.expectations if e.status == "not measured")

    @property
    def status(self) -> str:
        """:attr:`ExpectationResult.status` of the suite: ``not measured`` when it passed with no expectation measured
        (a suite of none included)."""
        return _status(self.success, len(self.not_measured) < len(self.expectations))


def _status(success: bool, measured: bool) -> str:
    """The one rule for an expectation's and a suite's status: a success on nothing measured is not a pass."""
    if not success:
        return "failed"
    return "passed" if measured else "not measured"


# ---------------------------------------------------------------------------------------------- running suites


def run_suite(
    df: pd.DataFrame,
    suite_path: str | os.PathLike[str],
    *,
    parameters: Mapping[str, Any] | None = None,
    name: str | None = None,
    table: str | None = None,
) -> SuiteResult:
    """Validate ``df`` against the suite stored at ``suite_path``.

    ``parameters`` fill the suite's ``{"$PARAMETER": ...}`` values; ``table`` keeps only the expectations whose
    ``meta.table`` equals it (suites that span several derived tables); ``name`` defaults to the suite's name
    (with ``.table`` appended when given).
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"run_suite needs a pandas DataFrame, got {type(df).__name__}")
    path = Path(suite_path)
    spec = load_suite(path)
    entries = [e for e in spec["expectations"] if table is None or e["meta"].get("table") == table]
    if not entries:
        raise SuiteError(f"{path}: no expectations with meta.table == {table!r}")
    parameters = dict(parameters or {})
    missing = sorted(_parameter_names(entries) - set(parameters))
    if missing:
        raise ValueError(f"{path}: suite parameters {missing} were not given")
    suite_name = name or (f"{spec['name']}.{table}" if table else spec["name"])

    data = df.reset_index(drop=True)  # examples are looked up by GX's row indices
    batch = _batch_definition().get_batch(batch_parameters={"dataframe": data})
    gx_results = batch.validate(
        _gx_suite(suite_name, entries, path), result_format=_RESULT_FORMAT, expectation_parameters=parameters
    )
    by_id = {r.expectation_config.id: r for r in gx_results.results}
    results = tuple(_reduce(entry, by_id[str(i)], data) for i, entry in enumerate(entries))
    outcome = SuiteResult(suite_name, all(r.success for r in results), results)
    log.info(
        "suite %s: %d expectations, %d failed (%d critical) on %d rows",
        suite_name, len(results), len(outcome.failed), len(outcome.critical_failed), len(data),
    )
    return outcome


def validate_manifest(manifest: pd.DataFrame, expectations_dir: str | os.PathLike[str]) -> list[SuiteResult]:
    """Run the image-metadata and projection-label suites on a manifest as given: it is not conformed first, so that
    a missing column fails (the validate stage reads the file with :func:`covidcxr.manifest.read_raw_csv`)."""
    metadata, projection = (Path(expectations_dir) / suite for suite in MANIFEST_SUITES)
    return [run_suite(manifest, metadata),
            run_suite(view_table(manifest), projection, parameters={"view_pairs": view_pairs()})]


def view_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest with the columns the projection-label suite runs on, derived from ``view_position`` by the one
    view map: ``view_key`` (:func:`covidcxr.manifest.view_key`: AP_SUPINE, ap-supine and AP SUPINE are one spelling)
    and ``view_projection`` (:func:`covidcxr.manifest.projection_from_view`), both null where the view is. A manifest
    without ``view_position`` is returned as it is: the suite then fails on the missing column."""
    if "view_position" not in manifest.columns:
        return manifest
    view = manifest["view_position"].astype("string")
    known = view.notna()
    keys = pd.Series(pd.NA, index=manifest.index, dtype="string")
    keys[known] = [manifest_schema.view_key(v) for v in view[known]]
    projections = pd.Series(pd.NA, index=manifest.index, dtype="string")
    projections[known] = [manifest_schema.projection_from_view(v) for v in view[known]]
    return manifest.assign(view_key=keys, view_projection=projections)


def view_pairs() -> list[list[str]]:
    """Every (view key, projection) pair the view map gives: the pairs the projection-label suite allows."""
    return [[view, projection] for view, projection in sorted(manifest_schema.view_projections().items())]


def validate_splits(
    splits: pd.DataFrame,
    expectations_dir: str | os.PathLike[str],
    *,
    fractions: Mapping[str, float],
    tolerance: float,
    classes: Sequence[str] = CLASSES,
) -> list[SuiteResult]:
    """Run the splits suite on the split table and on the per-patient and per-split tables derived from it.

    ``fractions`` are the target share of images per split (``{"train": 0.6, "val": 0.2, "test": 0.2}``);
    a split's share may differ from its target by at most ``tolerance``. ``classes`` are the task's labels, every one
    of which each split must hold (covid/negative by default; frontal/lateral for the projection task).
    """
    if not (isinstance(tolerance, (int, float)) and 0 <= tolerance <= 1):
        raise ValueError(f"tolerance must be a number in [0, 1], got {tolerance!r}")
    tables = split_tables(splits, fractions, classes)
    path = Path(expectations_dir) / SPLITS_SUITE
    parameters = {"tolerance": float(tolerance), "classes": list(classes)}
    return [run_suite(tables[t], path, parameters=parameters, table=t) for t in SPLIT_TABLES]


def split_tables(
    splits: pd.DataFrame, fractions: Mapping[str, float], classes: Sequence[str] = CLASSES
) -> dict[str, pd.DataFrame]:
    """The tables the splits suite runs on, keyed by ``meta.table``: ``rows``, ``per_patient``, ``per_split``.

    ``per_patient`` has one row per patient with a representative ``image_id`` (the smallest), so that examples
    name an image rather than the patient; rows with a null patient or split are left to the ``rows`` checks.
    ``per_split`` has one row per target split (present or not) with its share of all images (``fraction``),
    ``target``, ``deviation = |fraction - target|``, one ``n_<class>`` count per class, ``n_missing_classes`` and
    ``missing_classes`` (their names, comma-separated, so that a failure says which class a split lacks);
    splits outside the targets are left to the ``rows`` checks.
    """
    if not isinstance(splits, pd.DataFrame):
        raise TypeError(f"split table must be a pandas DataFrame, got {type(splits).__name__}")
    missing = [c for c in SPLIT_COLUMNS if c not in splits.columns]
    if missing:
        raise ValueError(f"split table lacks columns {missing} (needs {list(SPLIT_COLUMNS)})")
    if splits.empty:
        raise ValueError("split table has no rows")
    _check_fractions(fractions)
    rows = splits.reset_index(drop=True)

    assigned = rows[rows["patient_id"].notna() & rows["split"].notna()]
    grouped = assigned.groupby("patient_id", sort=True)
    per_patient = pd.DataFrame(
        {
            "image_id": grouped["image_id"].min(),
            "n_images": grouped.size(),
            "n_splits": grouped["split"].nunique(),
            "splits": _patient_splits(assigned),
        }
    ).reset_index(drop=False)

    names = list(fractions)
    n_images = rows.groupby("split").size().reindex(names, fill_value=0)
    by_class = (
        rows.groupby(["split", "label"]).size().unstack(fill_value=0).reindex(index=names, columns=list(classes))
    ).fillna(0)
    fraction = n_images / len(rows)
    target = pd.Series([float(fractions[n]) for n in names], index=names)
    per_split = pd.DataFrame(
        {
            "split": names,
            "n_images": n_images.to_numpy(dtype=np.int64),
            "fraction": fraction.to_numpy(dtype=float),
            "target": target.to_numpy(dtype=float),
            # rounded so that a share exactly at the tolerance is not failed by float noise
            "deviation": (fraction - target).abs().round(9).to_numpy(dtype=float),
            **{f"n_{c}": by_class[c].to_numpy(dtype=np.int64) for c in classes},
            "n_missing_classes": (by_class == 0).sum(axis=1).to_numpy(dtype=np.int64),
            "missing_classes": [",".join(c for c in classes if by_class.at[n, c] == 0) for n in names],
        }
    )
    return {"rows": rows, "per_patient": per_patient, "per_split": per_split}


def _patient_splits(assigned: pd.DataFrame) -> pd.Series:
    """Per patient (index, sorted), the names of the splits their rows are in, sorted and comma-separated.

    Joined per group only for the patients in more than one split (a leak, rare): a Python call per patient cost
    seconds on a corpus of thousands, and the split stage builds this table for every task."""
    pairs = (assigned[["patient_id"]].assign(split=assigned["split"].astype(str)).drop_duplicates()
             .sort_values(["patient_id", "split"], kind="stable"))
    several = pairs["patient_id"].duplicated(keep=False)
    joined = pairs[several].groupby("patient_id", sort=True)["split"].agg(",".join)
    single = pairs[~several].set_index("patient_id")["split"]
    return pd.concat([single, joined]).sort_index()


def raise_for_critical(results: Iterable[SuiteResult]) -> None:
    """Raise :class:`ExpectationFailure` if any critical expectation failed; log non-critical failures."""
    failures: list[tuple[str, ExpectationResult]] = []
    for suite in results:
        for exp in suite.not_measured:
            log.warning("expectation not measured in suite %s: %s", suite.name, _describe(exp))
        for exp in suite.failed:
            if exp.critical:
                failures.append((suite.name, exp))
            else:
                log.warning("non-critical expectation failed in suite %s: %s", suite.name, _describe(exp))
    if failures:
        lines = [f"{len(failures)} critical data expectation(s) failed:"]
        lines += [f"- suite {name}: {_describe(exp)}; why it matters: {exp.why}" for name, exp in failures]
        raise ExpectationFailure("\n".join(lines), failures)


# ---------------------------------------------------------------------------------------------- reporting


def results_to_json(results: Iterable[SuiteResult]) -> dict[str, Any]:
    """Small, stable summary of ``results`` for a DVC metrics file: no times, ids or run names.

    An expectation that had no value to check has status ``not measured`` and success ``null``: it is counted in
    ``n_not_measured``, not as a failure, and a suite's success says only that nothing failed."""
    suites: dict[str, Any] = {}
    for suite in results:
        if suite.name in suites:
            raise ValueError(f"two suite results are named {suite.name!r}; pass distinct names to run_suite")
        suites[suite.name] = {
            "success": suite.success,
            "n_expectations": len(suite.expectations),
            "n_failed": len(suite.failed),
            "n_critical_failed": len(suite.critical_failed),
            "n_not_measured": len(suite.not_measured),
            "expectations": [
                {
                    "type": e.type,
                    "column": e.column,
                    "status": e.status,
                    "success": e.success if e.measured else None,  # not measured: neither passed nor failed
                    "critical": e.critical,
                    "element_count": e.element_count,
                    "missing_count": e.missing_count,
                    "unexpected_count": e.unexpected_count,
                    "unexpected_percent": e.unexpected_percent,
                    "examples": [dict(x) for x in e.examples],
                    "error": e.error,
                }
                for e in suite.expectations
            ],
        }
    return {
        "success": all(s["success"] for s in suites.values()),
        "n_critical_failed": sum(s["n_critical_failed"] for s in suites.values()),
        "suites": suites,
    }


def render_data_docs(results: Iterable[SuiteResult]) -> str:
    """The data docs: one self-contained HTML page (inline CSS, no scripts, no links) that renders offline. The
    stages write it as ``<docs folder>/index.html`` with their atomic writer (``pipelines._common.write_with``)."""
    return _render_html(list(results))


# ---------------------------------------------------------------------------------------------- suite files


def load_suite(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a suite file and check what this module relies on: a name, and meta.critical/meta.why everywhere."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expectation suite not found: {path}")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SuiteError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise SuiteError(f"{path}: not a GX ExpectationSuite (needs a non-empty 'name')")
    entries = spec.get("expectations")
    if not isinstance(entries, list) or not entries:
        raise SuiteError(f"{path}: 'expectations' must be a non-empty list")
    for i, entry in enumerate(entries):
        where = f"{path}: expectation {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            raise SuiteError(f"{where}: needs a 'type'")
        meta = entry.get("meta")
        if not isinstance(meta, dict) or not isinstance(meta.get("critical"), bool):
            raise SuiteError(f"{where} ({entry['type']}): meta.critical must be true or false")
        if not isinstance(meta.get("why"), str) or not meta["why"].strip():
            raise SuiteError(f"{where} ({entry['type']}): meta.why must say why the expectation matters")
        severity = entry.get("severity", "critical")
        if (severity == "critical") != meta["critical"]:
            raise SuiteError(f"{where} ({entry['type']}): severity {severity!r} contradicts meta.critical")
    return spec


def _gx_suite(name: str, entries: list[dict[str, Any]], path: Path) -> ExpectationSuite:
    """Build the GX suite one expectation at a time: ``ExpectationSuite(...)`` logs and drops invalid ones."""
    import great_expectations.exceptions as gx_exceptions
    from great_expectations import ExpectationSuite
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    configs = []
    for i, entry in enumerate(entries):
        # the position is the id, so that results (returned in GX's own order) map back to entries
        config = ExpectationConfiguration(**({k: v for k, v in entry.items() if k != "id"} | {"id": str(i)}))
        try:
            config.to_domain_obj()
        except (TypeError, ValueError, gx_exceptions.GreatExpectationsError) as err:
            raise SuiteError(f"{path}: expectation {i} ({entry['type']}) is not valid: {err}") from err
        configs.append(config)
    suite = ExpectationSuite(name=name, expectations=configs)
    if len(suite.expectations) != len(configs):
        raise SuiteError(f"{path}: GX accepted {len(suite.expectations)} of {len(configs)} expectations")
    return suite


def _parameter_names(obj: Any) -> set[str]:
    """Names used as ``{"$PARAMETER": name}`` anywhere in ``obj``."""
    if isinstance(obj, dict):
        if isinstance(obj.get("$PARAMETER"), str):
            return {obj["$PARAMETER"]}
        return set().union(*(_parameter_names(v) for v in obj.values()))
    if isinstance(obj, list):
        return set().union(*(_parameter_names(v) for v in obj))
    return set()


def _check_fractions(fractions: Mapping[str, float]) -> None:
    if not isinstance(fractions, Mapping) or not fractions:
        raise ValueError(f"fractions must be a non-empty mapping split -> share, got {fractions!r}")
    bad = {k: v for k, v in fractions.items() if not isinstance(v, (int, float)) or not 0 <= v <= 1}
    if bad:
        raise ValueError(f"fractions must be numbers in [0, 1], got {bad}")


@functools.cache
def _batch_definition() -> BatchDefinition:
    """A whole-dataframe batch definition in an ephemeral GX context, built once per process (import is slow)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    asset = context.data_sources.add_pandas("covidcxr").add_dataframe_asset("dataframe")
    return asset.add_batch_definition_whole_dataframe("whole dataframe")


# ---------------------------------------------------------------------------------------------- reducing results


def _reduce(entry: dict[str, Any], gx_result: Any, data: pd.DataFrame) -> ExpectationResult:
    """GX's result for one expectation -> :class:`ExpectationResult`, with example rows taken from ``data``."""
    kwargs, meta = entry["kwargs"], entry["meta"]
    result = gx_result.result or {}
    count = result.get("unexpected_count")
    percent = result.get("unexpected_percent")
    elements, missing = result.get("element_count"), result.get("missing_count")
    index = result.get("partial_unexpected_index_list")
    if index:
        examples = _row_examples(data, index, _example_columns(kwargs, meta, data))
    elif not gx_result.success:
        examples = _aggregate_examples(result)
    else:
        examples = ()
    return ExpectationResult(
        type=entry["type"],
        column=_column_label(kwargs),
        success=bool(gx_result.success),
        critical=meta["critical"],
        why=meta["why"],
        unexpected_count=None if count is None else int(count),
        unexpected_percent=None if percent is None else round(float(percent), 4),
        examples=examples,
        error=_exception_message(gx_result.exception_info),
        element_count=None if elements is None else int(elements),
        missing_count=None if missing is None else int(missing),
    )


def _column_label(kwargs: Mapping[str, Any]) -> str | None:
    if "column" in kwargs:
        return str(kwargs["column"])
    if "column_A" in kwargs:
        return f"{kwargs['column_A']},{kwargs['column_B']}"
    if "column_list" in kwargs:
        return ",".join(map(str, kwargs["column_list"]))
    return None


def _example_columns(kwargs: Mapping[str, Any], meta: Mapping[str, Any], data: pd.DataFrame) -> list[str]:
    """image_id first (when the table has one), then the expectation's columns, then ``meta.show``."""
    wanted = ["image_id", kwargs.get("column"), kwargs.get("column_A"), kwargs.get("column_B")]
    wanted += list(kwargs.get("column_list", [])) + list(meta.get("show", []))
    return [c for c in dict.fromkeys(wanted) if c is not None and c in data.columns]


def _row_examples(data: pd.DataFrame, index: Sequence[Any], columns: list[str]) -> tuple[dict[str, Any], ...]:
    rows = data.loc[list(index)[:MAX_EXAMPLES], columns]
    return tuple(
        {c: _redact(c, _jsonable(row[c])) for c in columns} for _, row in rows.iterrows()
    )


def _aggregate_examples(result: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    """Examples for table-level expectations: the mismatch details, else the observed value."""
    mismatched = (result.get("details") or {}).get("mismatched")
    if mismatched:
        return ({k: _jsonable(v) for k, v in sorted(mismatched.items())},)
    if "observed_value" in result:
        return ({"observed_value": _jsonable(result["observed_value"])},)
    return ()


def _redact(column: str, value: Any) -> Any:
    return "<redacted>" if column in _REDACTED_COLUMNS and value is not None else value


def _jsonable(value: Any) -> Any:
    """Plain JSON value: numpy scalars unwrapped, every kind of missing value as None."""
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)  # JSON has no infinities
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _exception_message(info: Any) -> str | None:
    """GX's exception info is one flat dict or one dict per failed metric; keep the distinct messages."""
    if not isinstance(info, dict):
        return None
    parts = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    messages = sorted({str(p.get("exception_message")) for p in parts if p.get("raised_exception")})
    return "; ".join(messages) or None


def _not_measured_reason(exp: ExpectationResult) -> str:
    if not exp.element_count:
        return "no row met its condition"
    return f"all {exp.element_count} value(s) it checks are missing"


def _describe(exp: ExpectationResult) -> str:
    text = exp.label
    if exp.error:
        text += f": could not be evaluated ({exp.error})"
    elif not exp.measured:
        text += f": not measured ({_not_measured_reason(exp)})"
    elif exp.unexpected_count is not None:
        text += f": {exp.unexpected_count} unexpected row(s) ({exp.unexpected_percent}%)"
    if exp.examples:
        text += "; examples: " + ", ".join(json.dumps(x) for x in exp.examples)
    return text


# ---------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;width:100%}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}
.pass{color:#1a7f37;font-weight:600}.fail{color:#b42318;font-weight:600}.warn{color:#9a6700;font-weight:600}
code{font-size:12px}ul{margin:0;padding-left:1.2em}
"""


def _status_html(status: str, critical: bool) -> str:
    """A ``status`` (:attr:`ExpectationResult.status`, :attr:`SuiteResult.status`) as the data docs show it; a failure
    of nothing ``critical`` is a warning."""
    if status == "failed":
        return '<span class="fail">FAILED</span>' if critical else '<span class="warn">failed (warning)</span>'
    return f'<span class="{"pass" if status == "passed" else "warn"}">{status}</span>'


def _render_html(results: list[SuiteResult]) -> str:
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>covidcxr data validation</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>covidcxr data validation</h1>",
        "<table><tr><th>suite</th><th>status</th><th>expectations</th><th>failed</th>"
        "<th>critical failed</th><th>not measured</th></tr>",
    ]
    for s in results:
        out.append(
            f'<tr><td><a href="#{esc(s.name)}">{esc(s.name)}</a></td>'
            f"<td>{_status_html(s.status, bool(s.critical_failed))}</td>"
            f"<td>{len(s.expectations)}</td>"
            f"<td>{len(s.failed)}</td><td>{len(s.critical_failed)}</td><td>{len(s.not_measured)}</td></tr>"
        )
    out.append("</table>")
    for s in results:
        out.append(f'<h2 id="{esc(s.name)}">{esc(s.name)}</h2>')
        out.append(
            "<table><tr><th>status</th><th>critical</th><th>expectation</th><th>column</th><th>why</th>"
            "<th>unexpected</th><th>examples</th></tr>"
        )
        for e in s.expectations:
            unexpected = "" if e.unexpected_count is None else f"{e.unexpected_count} ({e.unexpected_percent}%)"
            details = [f"<li>{esc(json.dumps(x))}</li>" for x in e.examples]
            if e.error:
                details.insert(0, f"<li>error: {esc(e.error)}</li>")
            elif not e.measured:
                details.insert(0, f"<li>nothing to check: {esc(_not_measured_reason(e))}</li>")
            out.append(
                f"<tr><td>{_status_html(e.status, e.critical)}</td><td>{'yes' if e.critical else 'no'}</td>"
                f"<td><code>{esc(e.type)}</code></td><td>{esc(e.column or '(table)')}</td><td>{esc(e.why)}</td>"
                f"<td>{esc(unexpected)}</td><td><ul>{''.join(details)}</ul></td></tr>"
            )
        out.append("</table>")
    out.append("</body></html>\n")
    return "\n".join(out)
