"""Dataset adapters: each maps one public source's own layout into the manifest schema.

``load(name, root, **options)`` dispatches to ``covidcxr.datasets.<module>.load(root, **options)``.
Adapters read metadata only (CSV/TSV/JSON/text files and file names), never pixels; image facts
are filled in later by the ingest stage. Every adapter shares these rules:

- ``path`` is ``root`` (exactly as given, never made absolute) joined with the file's relative
  path, so manifests are portable and byte-identical across clones.
- ``image_id`` is ``"<source>/<relative path without suffix>"``; ``patient_id`` is
  ``"<source>:<the source's own patient id>"``.
- Rows are sorted by ``image_id``.
- A file that the metadata lists but that is missing on disk raises :class:`DatasetLayoutError`
  (``on_missing="raise"``, the default) or is left out with a warning (``on_missing="skip"``); the frame then
  names what it left out (:func:`skipped`), which the ingest stage reports as rejects of reason ``missing``.
- ``mask_path`` may hold several files joined with ``";"`` (e.g. separate left and right lung
  masks); the lung mask is their union.

The helpers below the registry are shared by the adapter modules.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

import pandas as pd

from covidcxr import manifest
from covidcxr.io import MAX_AGE, parse_age  # the one age rule, DICOM headers' too

log = logging.getLogger(__name__)

__all__ = ["MAX_AGE", "NAMES", "DatasetLayoutError", "load", "parse_age", "skipped"]


class DatasetLayoutError(ValueError):
    """A dataset folder does not have the documented layout (missing file, folder or column)."""


# name -> (module, function). Modules are imported on first use, so that an adapter under
# construction (or a heavy one) does not break the others.
_ADAPTERS: dict[str, tuple[str, str]] = {
    "bimcv": ("bimcv", "load"),
    "cohen": ("cohen", "load"),
    "demo": ("demo", "load"),
    "generic": ("generic", "load"),
    "jsrt": ("jsrt", "load"),
    "kermany": ("kermany", "load"),
    "montgomery": ("montgomery", "load"),
    "nih": ("nih", "load"),
    "padchest": ("padchest", "load"),
    "shenzhen": ("montgomery", "load_shenzhen"),
}

NAMES: tuple[str, ...] = tuple(sorted(_ADAPTERS))


def load(name: str, root: str | os.PathLike, **options) -> pd.DataFrame:
    """Load dataset ``name`` found at ``root`` as a manifest frame (see the adapter's docstring)."""
    if name not in _ADAPTERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(NAMES)}")
    module_name, function = _ADAPTERS[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, function)(root, **options)


# ----------------------------------------------------------------------------------------------
# Helpers shared by the adapters.

ON_MISSING = ("raise", "skip")
SKIPPED_COLUMNS = ["image_id", "path"]
_SKIPPED = "covidcxr.skipped"  # DataFrame.attrs key: (image_id, path) of each listed file missing on disk
_SHOW = 5  # how many names an error message lists before "... and N more"


def join(root: str | os.PathLike, *parts: str) -> str:
    """``root`` joined with relative parts as a POSIX string, without resolving anything."""
    return str(PurePosixPath(os.fspath(root), *parts))


def make_image_id(source: str, relative: str) -> str:
    """``"<source>/<relative path without its suffix>"``."""
    rel = PurePosixPath(relative)
    name = rel.name
    for suffix in (".nii.gz", rel.suffix):
        if suffix and name.lower().endswith(suffix.lower()):
            name = name[: -len(suffix)]
            break
    return str(PurePosixPath(source, rel.parent, name))


def check_on_missing(on_missing: str) -> None:
    """Refuse an ``on_missing`` option other than "raise" or "skip" before any work is done."""
    if on_missing not in ON_MISSING:
        raise ValueError(f"on_missing must be one of {ON_MISSING}, not {on_missing!r}")


def listing(names: Sequence[str]) -> str:
    """The first few names and a count, for error messages."""
    names = list(names)
    shown = ", ".join(names[:_SHOW])
    more = f" ... and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    return f"{len(names)}: {shown}{more}"


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else DatasetLayoutError naming it and ``what`` it should be."""
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: missing {what}")
    return path


def require_columns(df: pd.DataFrame, columns: Iterable[str], file: str | os.PathLike) -> None:
    """DatasetLayoutError naming ``file`` and the absent columns, if any are absent."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DatasetLayoutError(f"{file}: missing column(s) {missing}; found {list(df.columns)}")


def read_table(file: str | os.PathLike, sep: str = ",", usecols=None) -> pd.DataFrame:
    """Read a CSV/TSV as strings ("" for blanks), trying UTF-8, then cp1252, then latin-1."""
    last: Exception | None = None
    for encoding in ("utf-8", "cp1252", "latin-1"):
        try:
            df = pd.read_csv(
                file, sep=sep, dtype=str, keep_default_na=False, encoding=encoding, usecols=usecols
            )
        except UnicodeDecodeError as err:
            last = err
            continue
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise DatasetLayoutError(f"{file}: cannot be parsed as a table: {err}") from err
        if encoding != "utf-8":
            log.debug("%s: read as %s", file, encoding)
        df.columns = [str(c).strip() for c in df.columns]
        return df
    raise DatasetLayoutError(f"{file}: undecodable text ({last})")


def normalise_sex(value: object) -> str:
    """M, F or unknown, from M/F/male/female in any case."""
    text = str(value).strip().lower() if value is not None and value is not pd.NA else ""
    if text in ("m", "male", "man"):
        return "M"
    if text in ("f", "female", "woman"):
        return "F"
    return "unknown"


def skipped(frame: pd.DataFrame) -> pd.DataFrame:
    """The images an adapter's frame leaves out under ``on_missing="skip"``: listed by the source's metadata but
    missing on disk (columns :data:`SKIPPED_COLUMNS`, sorted by image_id; none for a frame no adapter skipped in)."""
    return pd.DataFrame(list(frame.attrs.get(_SKIPPED, ())), columns=SKIPPED_COLUMNS, dtype="string")


def finish(
    rows: list[dict] | pd.DataFrame,
    source: str,
    on_missing: str,
    described_by: str | os.PathLike,
) -> pd.DataFrame:
    """Check ids are unique and listed files exist, sort by image_id and conform to the manifest.

    ``described_by`` names the metadata (file or folder) that listed the images, for messages. Files skipped as
    missing (``on_missing="skip"``) are named by the returned frame: :func:`skipped`.
    """
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    if df.empty:
        log.warning("%s: no images found under %s", source, described_by)
        return manifest.empty()
    df = df.copy()
    df["source"] = source
    duplicated = df.loc[df["image_id"].duplicated(keep=False), "image_id"]
    if len(duplicated):
        raise DatasetLayoutError(
            f"{described_by}: the same image is listed more than once "
            f"({listing(sorted(set(duplicated)))})"
        )
    exists = df["path"].map(lambda p: Path(p).is_file())
    if not exists.all():
        missing = sorted(df.loc[~exists, "path"])
        if on_missing == "raise":
            raise DatasetLayoutError(
                f"{described_by}: {source} lists image files that are missing on disk "
                f"({listing(missing)}); pass on_missing='skip' to load only the present ones"
            )
        log.warning(
            "%s: %d image file(s) listed in %s are missing on disk and were skipped (first: %s)",
            source,
            len(missing),
            described_by,
            missing[0],
        )
    left_out = df.loc[~exists].sort_values("image_id", kind="stable")
    out = manifest.conform(df.loc[exists].sort_values("image_id", kind="stable"))
    if len(left_out):
        out.attrs[_SKIPPED] = tuple(zip(left_out["image_id"].astype(str), left_out["path"].astype(str)))
    return out
