"""Stage `sources`: a fingerprint of every folder in ``ingest.sources``, so that DVC reruns `ingest` when a corpus
changes in place.

The corpus roots are strings in params, mostly outside the repository, where DVC sees no file: a collection that grew
or a file replaced under the same name left `dvc repro` skipping ingest, or restoring the old manifest from its run
cache, and the data version unchanged. This stage runs on every `dvc repro` (``always_changed``; one stat per file,
no file read) and writes, per source, how many files its folder holds and one SHA-256 of their sorted relative paths,
sizes and modification times (ns); ingest depends on that file, so DVC reruns it only when a fingerprint changes.
Roots are taken as ingest takes them (as given, relative to the project; the experiment runner fills in
``{real_data}`` before DVC sees them). No path is written: a site's folder names the site, and a file name can carry
an identifier.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from covidcxr.datasets import DatasetLayoutError
from pipelines import _common

FINGERPRINTS = "artifacts/sources.json"


def fingerprint(root: str | os.PathLike) -> dict[str, int | str]:
    """``{"files": n, "sha256": ...}`` of every file under ``root`` (symbolic links followed, each folder once), from
    its path relative to ``root``, size and modification time; a DatasetLayoutError when ``root`` is no folder or a
    folder under it cannot be listed."""
    top = Path(root)
    if not top.is_dir():
        raise DatasetLayoutError(f"{top}: not a folder (a root of ingest.sources)")

    def unreadable(err: OSError) -> None:
        raise DatasetLayoutError(f"{err.filename}: cannot be listed ({err.strerror})")

    seen: set[tuple[int, int]] = set()
    entries = []
    for folder, subfolders, files in os.walk(top, onerror=unreadable, followlinks=True):
        here = os.stat(folder)
        if (here.st_dev, here.st_ino) in seen:  # a link back to a folder already walked
            subfolders.clear()
            continue
        seen.add((here.st_dev, here.st_ino))
        for name in files:
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:  # a dangling link: ingest reports it; its own change still counts
                st = os.lstat(path)
            entries.append(f"{Path(path).relative_to(top).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(sorted(entries)).encode("utf-8", "surrogateescape")).hexdigest()
    return {"files": len(entries), "sha256": digest}


def run(sources: list[dict]) -> dict:
    """Fingerprint each source's root (a root two sources share, once) and write them, in params order."""
    log = _common.setup_logging()
    by_root: dict[str, dict] = {}
    rows = []
    for i, source in enumerate(sources):
        root = str(source["root"])
        if root not in by_root:
            try:
                by_root[root] = fingerprint(root)
            except DatasetLayoutError as err:
                raise DatasetLayoutError(f"ingest.sources[{i}] ({source['name']}): {err}") from None
        rows.append({"name": source["name"], **by_root[root]})
        log.info("%s: %d files, fingerprint %s", source["name"], rows[-1]["files"], rows[-1]["sha256"][:12])
    result = {"sources": rows}
    _common.write_json(FINGERPRINTS, result)
    return result


if __name__ == "__main__":
    run(_common.params("ingest.sources"))
    _common.finish()
