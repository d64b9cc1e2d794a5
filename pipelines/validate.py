"""Stage `validate`: the image-metadata and projection-label expectation suites on the manifest.

The manifest file is checked as written (:func:`covidcxr.manifest.read_raw_csv`, not conformed): a column it lacks
fails the column-set expectation rather than being added empty, and an empty image-fact column fails its not-null one.

Results go to a small JSON (a DVC metric) and to offline Data Docs; a failing critical expectation fails the stage.
"""

from __future__ import annotations

from covidcxr import manifest, validation
from pipelines import _common

MANIFEST = _common.MANIFEST
CHECKS = "reports/validate/manifest.json"
DOCS = "reports/validate/data_docs"
DATA_DOCS = f"{DOCS}/index.html"


def run(p: dict) -> None:
    log = _common.setup_logging()
    results = validation.validate_manifest(manifest.read_raw_csv(MANIFEST), p["expectations"])
    _common.write_json(CHECKS, validation.results_to_json(results))
    page = validation.render_data_docs(results)
    _common.write_with(DATA_DOCS, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    for r in results:
        log.info("suite %s: %s (%d not measured)", r.name, "passed" if r.success else "failed", len(r.not_measured))
    validation.raise_for_critical(results)


if __name__ == "__main__":
    run(_common.params("validate"))
    _common.finish()
