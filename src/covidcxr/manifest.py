"""The manifest: one row per image, the single contract between dataset adapters and the rest.

Every adapter in :mod:`covidcxr.datasets` returns a frame with exactly these columns; image facts
(size, photometric, bits, hashes) are filled in by :func:`covidcxr.manifest.describe_images`.
"""

from __future__ import annotations

import hashlib
import os
from typing import Literal, overload

import numpy as np
import pandas as pd

# Column name -> pandas dtype. Extend, do not fork: new columns go at the end.
SCHEMA: dict[str, str] = {
    "image_id": "string",  # unique across the whole manifest: "<source>/<relative path without suffix>"
    "path": "string",  # path to the image file: the adapter's root joined with the file's relative path
    "source": "string",  # adapter (cohen, kermany, montgomery, shenzhen, jsrt, nih, bimcv, padchest, generic, demo)
    "patient_id": "string",  # source-scoped patient key "<source>:<id>" (pseudonymised on ingest when asked)
    "projection": "string",  # frontal | lateral | unknown
    "view_position": "string",  # as the source spells it, normalised to upper case: PA, AP, AP SUPINE, LL, L, ...
    "label": "string",  # covid | negative | unknown
    "finding": "string",  # the source's own finding text (COVID-19, No Finding, pneumonia, tuberculosis, ...)
    "site": "string",  # hospital / site / sub-collection when known, else the source name
    "sex": "string",  # M | F | unknown
    "age": "Float64",  # years, <NA> when unknown
    "width": "Int64",
    "height": "Int64",
    "photometric": "string",  # MONOCHROME1 | MONOCHROME2 | RGB | L | ... (as read)
    "bits_stored": "Int64",
    "sha256": "string",  # hash of the file's bytes
    "mask_path": "string",  # lung mask file(s) when the source has them, else <NA>; left;right files joined by ";"
    "modality": "string",  # CR | DX | ... for DICOM, else <NA>
    "header_view_position": "string",  # the file's own DICOM View Position (0018,5101), never metadata; else <NA>
    "pixel_sha256": "string",  # hash of the decoded pixels (pixel_digest): one film in two encodings has one
}

COLUMNS: list[str] = list(SCHEMA)

PROJECTIONS = ("frontal", "lateral", "unknown")
LABELS = ("covid", "negative", "unknown")
SEXES = ("M", "F", "unknown")

# View-position spellings seen in DICOM (0018,5101), Cohen, PadChest and BIMCV, mapped to projection: the one view
# map. Keys as :func:`view_key` spells them (PadChest's AP_horizontal is "AP HORIZONTAL"); the projection_labels
# expectation suite checks the manifest against it (covidcxr.validation.view_pairs).
_VIEW_TO_PROJECTION = {
    "PA": "frontal",
    "AP": "frontal",
    "AP SUPINE": "frontal",
    "APS": "frontal",  # Cohen's AP supine
    "AP SEMI ERECT": "frontal",  # Cohen
    "AP HORIZONTAL": "frontal",
    "AP ERECT": "frontal",
    "PA HORIZONTAL": "frontal",
    "FRONTAL": "frontal",
    "L": "lateral",
    "LL": "lateral",
    "RL": "lateral",
    "LAT": "lateral",
    "LATERAL": "lateral",
    # Lateral *decubitus* (DICOM RLD/LLD): the patient lies on one side and a horizontal beam passes AP or PA, so the
    # image is a frontal projection of an unusual posture; neither the header nor the label says frontal or lateral
    # for it: the projection filter decides
    "RLD": "unknown",
    "LLD": "unknown",
}


def view_key(view: object) -> str:
    """A view-position string as the view map knows it: upper case, '-' and '_' as spaces, one space between words
    (exports spell AP SUPINE also AP_SUPINE, AP-SUPINE, "ap  supine")."""
    return " ".join(str(view).upper().replace("-", " ").replace("_", " ").split())


def view_projections() -> dict[str, str]:
    """Every view spelling the view map knows (as :func:`view_key` spells it) and its projection."""
    return dict(_VIEW_TO_PROJECTION)


def projection_from_view(view: object) -> str:
    """Map a view-position string to ``frontal``, ``lateral`` or ``unknown``."""
    if view is None or (isinstance(view, float) and pd.isna(view)) or view is pd.NA:
        return "unknown"
    return _VIEW_TO_PROJECTION.get(view_key(view), "unknown")


class ManifestError(ValueError):
    """A manifest (file or frame) that does not follow :data:`SCHEMA`: a column it does not know or a value its dtype
    cannot hold."""


def empty() -> pd.DataFrame:
    """An empty manifest with the right columns and dtypes."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in SCHEMA.items()})


def conform(df: pd.DataFrame) -> pd.DataFrame:
    """Return ``df`` with exactly the manifest columns, in order, with the manifest dtypes.

    Missing columns are added as <NA>; extra columns raise :class:`ManifestError`, so that nothing is dropped
    silently, and so does a value the column's dtype cannot hold.
    """
    extra = [c for c in df.columns if c not in SCHEMA]
    if extra:
        raise ManifestError(f"columns not in the manifest schema: {extra}")
    out = df.copy()
    for col, dtype in SCHEMA.items():
        if col not in out:
            out[col] = pd.Series(pd.NA, index=out.index, dtype=dtype)
        else:
            try:
                out[col] = out[col].astype(dtype)
            except (TypeError, ValueError) as err:
                raise ManifestError(f"column {col!r} does not hold {dtype} values ({err})") from None
    return out[COLUMNS].reset_index(drop=True)


# --- filling image facts --------------------------------------------------------------------------------------------

REJECT_COLUMNS: list[str] = ["image_id", "path", "source", "kind", "reason", "problem"]  # kind: image | mask
# match: "bytes" (the kept copy's file, byte for byte) or "pixels" (another file that decodes to the same pixels);
# same_label: False only where this copy's label and the kept copy's (after a label it lacked was carried) are both
# known and differ: an unknown label agrees with any, whichever copy is listed first; carried: the CARRIED fields
# the kept copy took from this one (it had none), ";"-joined, else empty; conflicting: the CARRIED fields but the label
# where this copy holds another value than the kept copy (or a view that does not fit its projection), left unused:
# the manifest keeps the kept copy's (another label is same_label's); other_source: the CARRIED fields this copy, of
# another source or site (CARRY_WITHIN), holds where the kept copy has none, not carried
DUPLICATE_COLUMNS: list[str] = ["image_id", "kept_image_id", "sha256", "same_label", "match", "carried",
                                "conflicting", "other_source"]
#: What a kept copy takes from a dropped copy of the same radiograph where it has none (:func:`fill_from_copies`):
#: field -> the columns carried together. A lung mask and the patient's facts describe the film whichever file holds
#: it; ``view`` is ``view_position`` and ``projection``, filled only where the pair stays one the view map gives;
#: ``label`` is the task label with its ``finding`` (what experiments select by), filled only where the kept copy's
#: label is ``unknown``, the pair replacing the kept copy's finding: a labelled copy is never relabelled, and two known
#: labels that differ are ``same_label`` False. Not carried: the patient key (merged by :func:`merge_patients`), and
#: the file's own facts (size, hashes, photometric, modality, ``header_view_position``: what serving reads in that
#: same file).
CARRIED: dict[str, tuple[str, ...]] = {"mask_path": ("mask_path",), "view": ("view_position", "projection"),
                                       "sex": ("sex",), "age": ("age",), "label": ("label", "finding")}
#: A copy carries a field to the kept copy only where both hold these alike: the split's rules
#: (``split.segmentation_external``, ``split.holdout``) follow a film's and a mask's source and site, so a mask (or a
#: label) of one source's film never moves to another source's, where it would train the U-Net that source was kept
#: out of to test. What another source's copy holds is reported (``other_source``), not carried.
CARRY_WITHIN: tuple[str, ...] = ("source", "site")
NEAR_DUPLICATE_COLUMNS: list[str] = ["image_id", "other_image_id", "distance", "same_label"]

#: Side of the thumbnails near-duplicates are compared by: the working image (resize, min-max) at this size.
THUMBNAIL_SIZE = 32
#: Largest RMS difference (of the [0, 1] range) between two thumbnails that :func:`near_duplicates` lists. On the real
#: corpus (1,889 films) re-encodes of a film (JPEG quality 30 to 90, downscaled 0.7x, 1/2 or 1/4 and re-encoded) stay
#: under 0.022, two films of one patient days apart came as close as 0.013, and the closest films of two patients are
#: 0.059 apart (Shenzhen). Heavier re-encodes of 240 of its films reach 0.013 (quality 20), 0.023 (quality 10) and
#: 0.024 (a quarter-size copy at quality 20): hence 0.04, with room for them, not a value just above 0.022; nothing of
#: the real corpus is listed at 0.04 (nor of the demo, whose closest two patients' phantoms are 0.042 apart).
NEAR_DUPLICATE_DISTANCE = 0.04

# Header fields that fill a manifest column when the adapter left it empty.
_HEADER_TO_COLUMN = {"view_position": "view_position", "modality": "modality", "sex": "sex", "age": "age"}


def pixel_digest(pixels: np.ndarray) -> str:
    """Hex SHA-256 of a decoded image: its shape, dtype and values. Equal for two files (an 8-bit DICOM and a PNG of
    its pixels, one JPEG with other metadata) that :func:`covidcxr.io.read_image` decodes to the same array, where
    their file hashes differ; an 8-bit export of a 12-bit DICOM holds other values, and differs."""
    arr = np.ascontiguousarray(pixels)
    digest = hashlib.sha256(f"{arr.shape}|{arr.dtype.str}|".encode())
    digest.update(memoryview(arr).cast("B"))
    return digest.hexdigest()


def _describe_one(args: tuple[str, str | None, int, str | None, int | None, bool]) -> dict:
    """Read one image (and its mask files) and return its facts, or the reason it is rejected.

    The image is decoded as every later stage decodes it (with the source's photometric and bit depth,
    :func:`decode_hints`), for its pixel digest and, when asked, its :data:`THUMBNAIL_SIZE` thumbnail (``thumbnail``).
    A mask that cannot be used does not reject the image: the image keeps no mask and the problem is reported.
    """
    from covidcxr import io, preprocess

    path, mask_path, max_pixels, photometric, bits_stored, thumbnail = args
    try:
        pixels, header = io.read_image(path, max_pixels=max_pixels, photometric=photometric, bits_stored=bits_stored)
        facts = {
            "width": header["width"],
            "height": header["height"],
            "photometric": header.get("photometric"),
            "bits_stored": header.get("bits_stored"),
            "sha256": io.sha256_file(path),
            "pixel_sha256": pixel_digest(pixels),
        }
    except io.ImageReadError as err:
        return {"kind": "image", "reason": err.reason, "problem": str(err)}
    except OSError as err:  # missing or unreadable file
        return {"kind": "image", "reason": "unreadable", "problem": f"{path}: {err.strerror or err}"}
    facts.update({col: header.get(key) for key, col in _HEADER_TO_COLUMN.items()})
    facts["header_view_position"] = header.get("view_position")  # what serving will see in the same file
    if mask_path:
        facts["mask_problem"] = _mask_problem(mask_path, pixels.shape, max_pixels)
    if thumbnail:
        facts["thumbnail"] = preprocess.working_image(pixels, THUMBNAIL_SIZE)
    return facts


def _mask_problem(mask_path: str, shape: tuple[int, ...], max_pixels: int) -> dict | None:
    """Why a lung mask cannot be used with an image of ``shape``, or None."""
    from covidcxr import io

    try:
        mask = io.read_mask(mask_path.split(";"), max_pixels=max_pixels)
    except io.ImageReadError as err:
        return {"reason": err.reason, "problem": str(err)}
    except OSError as err:
        return {"reason": "unreadable", "problem": f"{mask_path}: {err.strerror or err}"}
    # Masks may be stored at another resolution (JSRT's SCR masks are 1024^2 for 2048^2 images), not another shape.
    if abs(mask.shape[0] / mask.shape[1] - shape[0] / shape[1]) > 0.01:
        return {"reason": "mask_shape", "problem": f"{mask_path}: mask shape {mask.shape} does not match image {shape}"}
    if not mask.any():
        return {"reason": "empty_mask", "problem": f"{mask_path}: lung mask is empty"}
    return None


@overload
def describe_images(
    df: pd.DataFrame, *, max_pixels: int | None = ..., workers: int = ..., progress: bool = ...,
    thumbnails: Literal[False] = ...,
) -> tuple[pd.DataFrame, pd.DataFrame]: ...


@overload
def describe_images(
    df: pd.DataFrame, *, max_pixels: int | None = ..., workers: int = ..., progress: bool = ...,
    thumbnails: Literal[True],
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]: ...


def describe_images(
    df: pd.DataFrame, *, max_pixels: int | None = None, workers: int = 1, progress: bool = False,
    thumbnails: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame] | tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Read every image of ``df`` and fill its facts; return ``(manifest, rejects)``, and with ``thumbnails`` each
    manifest row's :data:`THUMBNAIL_SIZE` thumbnail (``[rows, size, size]``, for :func:`near_duplicates`) after them.

    Size, photometric, bit depth and the content hashes (file and decoded pixels) come from the file; view position,
    modality, sex and age come from the header only where the adapter left them empty, and projection follows the
    view when it is unknown. Nothing is dropped silently: an image that cannot be used is a row of ``rejects`` (kind
    ``image``) with its reason; an unusable lung mask (kind ``mask``) is reported too, and its image stays in the
    manifest without a mask.
    """
    from covidcxr import io
    from covidcxr.parallel import parallel_map

    limit = io.DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    photometric, bits_stored = decode_hints(df)
    jobs = [
        (str(p), None if pd.isna(m) else str(m), limit, ph, bits, thumbnails)
        for p, m, ph, bits in zip(df["path"], df["mask_path"], photometric, bits_stored, strict=True)
    ]
    results = parallel_map(_describe_one, jobs, workers=workers, progress=progress, desc="reading images")

    out = df.reset_index(drop=True).copy()
    problems = []
    for i, r in enumerate(results):
        issue = r if "reason" in r else r.get("mask_problem")
        if issue:
            problems.append({**out.loc[i, ["image_id", "path", "source"]].to_dict(), "kind": r.get("kind", "mask"),
                             "reason": issue["reason"], "problem": issue["problem"]})
            if "reason" not in r:
                out.loc[i, "mask_path"] = pd.NA
    rejects = pd.DataFrame(problems, columns=REJECT_COLUMNS)
    keep = [i for i, r in enumerate(results) if "reason" not in r]
    thumbs = [results[i].pop("thumbnail") for i in keep] if thumbnails else []
    out = out.loc[keep].reset_index(drop=True)
    facts = pd.DataFrame([results[i] for i in keep], index=out.index)
    for col in ("width", "height", "sha256", "pixel_sha256", "header_view_position"):  # what the file itself says
        out[col] = facts[col] if len(facts) else out[col]
    # Where the source's metadata states photometric or bit depth (PNG exports of DICOM), it wins over the PNG mode.
    out["sex"] = out["sex"].mask(out["sex"] == "unknown")
    for col in ("photometric", "bits_stored", *_HEADER_TO_COLUMN.values()):
        if len(facts):
            out[col] = out[col].where(out[col].notna(), facts[col].where(facts[col].notna(), None))
    unknown = out["projection"].isna() | (out["projection"] == "unknown")
    out.loc[unknown, "projection"] = out.loc[unknown, "view_position"].map(projection_from_view)
    out["sex"] = out["sex"].fillna("unknown")
    if not thumbnails:
        return conform(out), rejects
    stacked = np.stack(thumbs) if thumbs else np.zeros((0, THUMBNAIL_SIZE, THUMBNAIL_SIZE), np.float32)
    return conform(out), rejects, stacked


def first_copies(manifest: pd.DataFrame) -> np.ndarray:
    """For each row, the position of the first row (manifest order) that holds the same radiograph: the same file
    bytes (``sha256``) or the same decoded pixels (``pixel_sha256``: an 8-bit DICOM and a PNG of its pixels, or a
    lossless re-save), linked transitively. A row holding no copy of an earlier one gets its own position; an empty hash
    links nothing."""
    parent = list(range(len(manifest)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    for col in ("sha256", "pixel_sha256"):
        seen: dict[str, int] = {}
        for i, value in enumerate(manifest[col]):
            if pd.isna(value):
                continue
            a, b = sorted((root(seen.setdefault(value, i)), root(i)))
            parent[b] = a  # the earlier row stays the group's root
    return np.array([root(i) for i in range(len(parent))], dtype=np.int64)


def merge_patients(manifest: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One patient key for the keys that share an image: ``(manifest with merged patient_id, keys merged)``.

    A radiograph listed by two sources, or twice by one under two patient ids, as the same file or as two files that
    decode to the same pixels (:func:`first_copies`), is one person's film: their keys are grouped (union-find over
    keys linked by a shared image) and every row of a group takes the key of the group's first row in manifest order,
    which is the kept copy's for :func:`find_duplicates`. Ingest merges before it drops the later copies, so the split,
    which splits by ``patient_id``, keeps the person's remaining images together; no column is added. Returns how many
    keys were merged into another one (0: the manifest is unchanged).
    """
    keys = manifest["patient_id"].astype("string")
    order = {key: i for i, key in enumerate(keys.dropna().unique())}
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.get(key, key) != key:
            key = parent[key]
        return key

    for _, shared in keys.groupby(first_copies(manifest), sort=False):
        linked = shared.dropna().unique()
        for other in linked[1:]:
            a, b = sorted((root(linked[0]), root(other)), key=order.__getitem__)
            if a != b:
                parent[b] = a  # the earlier key stays
    if not parent:
        return manifest, 0
    out = manifest.copy()
    out["patient_id"] = pd.array([k if pd.isna(k) else root(k) for k in keys], dtype="string")
    return out, len(parent)


def find_duplicates(manifest: pd.DataFrame) -> pd.DataFrame:
    """Images that hold the same radiograph as an earlier image (manifest order; :func:`first_copies`): which one is
    kept, label agreement (with the kept copy's label after :func:`fill_from_copies`), whether the kept copy is the
    same file (``match`` ``bytes``) or decodes to the same pixels (``pixels``), which :data:`CARRIED` fields the kept
    copy takes from it (``carried``), in which it holds another value than the kept copy, left unused
    (``conflicting``), and which it, of another source or site, holds where the kept copy has none, not carried
    (``other_source``)."""
    first = first_copies(manifest)
    rows = np.flatnonzero(first != np.arange(len(manifest)))
    filled, carried, conflicting, other = _carry(manifest, first)
    dup, kept = manifest.iloc[rows], manifest.iloc[first[rows]]
    same_bytes = dup["sha256"].reset_index(drop=True).eq(kept["sha256"].reset_index(drop=True)).fillna(False)
    return pd.DataFrame(
        {
            "image_id": dup["image_id"].to_numpy(),
            "kept_image_id": kept["image_id"].to_numpy(),
            "sha256": dup["sha256"].to_numpy(),
            "same_label": [_missing(a) or _missing(b) or a == b
                           for a, b in zip(dup["label"].to_numpy(), filled["label"][first[rows]], strict=True)],
            "match": np.where(same_bytes.to_numpy(dtype=bool), "bytes", "pixels"),
            "carried": [";".join(fields) for fields in carried],
            "conflicting": [";".join(fields) for fields in conflicting],
            "other_source": [";".join(fields) for fields in other],
        },
        columns=DUPLICATE_COLUMNS,
    )


def _missing(value: object) -> bool:
    """An empty manifest value: <NA>, or the ``unknown`` of ``projection``, ``label`` and ``sex``."""
    return bool(pd.isna(value)) or value == "unknown"


def _fits(field: str, values: tuple) -> bool:
    """Whether a :data:`CARRIED` field's values go together: a view with the projection the view map gives it."""
    if field != "view" or _missing(values[0]):
        return True
    return projection_from_view(values[0]) == values[1]


def _same_origin(manifest: pd.DataFrame, first: np.ndarray) -> np.ndarray:
    """For each row, whether it holds the :data:`CARRY_WITHIN` columns (source, site) as its first copy does."""
    same = np.ones(len(manifest), dtype=bool)
    for col in CARRY_WITHIN:
        values = manifest[col].astype("string").fillna("").to_numpy(dtype=object)
        same &= values == values[first]
    return same


def _offer(field: str, mine: tuple, theirs: tuple) -> tuple[bool, bool, tuple]:
    """What a copy's values ``mine`` of a :data:`CARRIED` field offer the kept copy's ``theirs``: ``(gains, clash,
    merged)``, whether it fills an empty column, whether it holds another value than one the kept copy has, and the
    values after filling. The label fills only a kept copy's unknown label, with its finding; two known labels that
    differ are no clash here (``same_label`` says so)."""
    if field == "label":
        gains = not _missing(mine[0]) and _missing(theirs[0])
        return gains, False, mine if gains else theirs
    pairs = list(zip(mine, theirs, strict=True))
    clash = any(not _missing(a) and not _missing(b) and a != b for a, b in pairs)
    gains = any(not _missing(a) and _missing(b) for a, b in pairs)
    return gains, clash, tuple(a if _missing(b) and not _missing(a) else b for a, b in pairs)


def _carry(manifest: pd.DataFrame, first: np.ndarray) -> tuple[dict[str, np.ndarray], list[list[str]],
                                                                 list[list[str]], list[list[str]]]:
    """What :func:`fill_from_copies` fills: ``(each carried column's values after filling, carried, conflicting,
    other_source)``, the last three the :data:`CARRIED` fields of each later copy (manifest order) that filled its
    kept copy's empty columns; that it holds but did not fill: another value than the kept copy's (or the one it
    already took from an earlier copy), or a view that would not fit the kept copy's projection; and that it would
    have filled but holds as a copy of another source or site (:data:`CARRY_WITHIN`). The earliest copy of the kept
    copy's source and site that holds a value fills it (:func:`_missing`: an empty one); a value is never replaced.
    Copies of another source or site are weighed last, against the kept copy as filled."""
    columns = [c for cols in CARRIED.values() for c in cols]
    given = {c: manifest[c].to_numpy(dtype=object) for c in columns}
    filled = {c: v.copy() for c, v in given.items()}
    same = _same_origin(manifest, first)
    later = np.flatnonzero(first != np.arange(len(manifest)))
    found: dict[int, tuple[list[str], list[str], list[str]]] = {}
    for row in sorted(later, key=lambda r: (not same[r], r)):
        kept = first[row]
        took, differ, other = [], [], []
        for field, cols in CARRIED.items():
            mine = tuple(given[c][row] for c in cols)
            if all(_missing(v) for v in mine):
                continue
            gains, clash, merged = _offer(field, mine, tuple(filled[c][kept] for c in cols))
            if clash or (gains and not _fits(field, merged)):
                differ.append(field)
            elif gains and not same[row]:
                other.append(field)
            elif gains:
                for c, v in zip(cols, merged, strict=True):
                    filled[c][kept] = v
                took.append(field)
        found[row] = (took, differ, other)
    return filled, *([found[r][i] for r in later] for i in range(3))


def fill_from_copies(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest with each first copy of a radiograph (:func:`first_copies`) given the :data:`CARRIED` fields it
    lacks from its later copies of the same source and site (:data:`CARRY_WITHIN`), the earliest that holds one
    first; a value it has is never replaced, nor a known label.

    Ingest keeps only the first copy: a lung mask (or the patient's age, sex, view, or the label of a film the kept
    copy lists as unknown) that only a later copy held, say a lossless re-save of a film its source lists twice, was
    dropped with it. What each copy gave, where it held another value than the kept one, and what a copy of another
    source held, left with it, :func:`find_duplicates` reports (``carried``, ``conflicting``, ``other_source``).
    """
    filled, carried, _, _ = _carry(manifest, first_copies(manifest))
    if not any(carried):
        return manifest
    out = manifest.copy()
    for col, values in filled.items():
        out[col] = pd.array(values, dtype=SCHEMA[col])
    return out


def near_duplicates(
    manifest: pd.DataFrame, thumbnails: np.ndarray, max_distance: float = NEAR_DUPLICATE_DISTANCE
) -> pd.DataFrame:
    """Pairs of images of different patients whose thumbnails (:func:`describe_images`) differ by at most
    ``max_distance`` (root mean square, of the [0, 1] range): probably one film re-encoded lossily or rescaled under
    two patient ids, which the hashes cannot see. Listed for a person to decide, never merged: a false merge would make
    two patients one. Closest first.

    Sort-and-sweep on each thumbnail's mean (two means differ by no more than the two thumbnails' RMS difference), so
    each block of thumbnails is compared, vectorised, only with those whose mean lies within ``max_distance``.
    """
    n = len(manifest)
    if thumbnails.shape[0] != n:
        raise ValueError(f"{thumbnails.shape[0]} thumbnails for {n} manifest rows")
    if n < 2:
        return pd.DataFrame(columns=NEAR_DUPLICATE_COLUMNS)
    thumbs = thumbnails.reshape(n, -1).astype(np.float64)
    order = np.argsort(thumbs.mean(axis=1), kind="stable")
    flat = thumbs[order]
    means = flat.mean(axis=1)
    squares = np.einsum("ij,ij->i", flat, flat)
    limit = max_distance**2 * flat.shape[1]
    found_i, found_j = [], []
    block = 256
    for start in range(0, n, block):
        stop = min(start + block, n)
        end = int(np.searchsorted(means, means[stop - 1] + max_distance, side="right"))
        sq = squares[start:stop, None] + squares[None, start:end] - 2 * flat[start:stop] @ flat[start:end].T
        i, j = np.nonzero(sq <= limit + 1e-9)
        i, j = i + start, j + start
        found_i.append(i[j > i])
        found_j.append(j[j > i])
    i, j = order[np.concatenate(found_i)], order[np.concatenate(found_j)]
    a, b = np.minimum(i, j), np.maximum(i, j)  # manifest order within a pair
    patients = manifest["patient_id"].to_numpy(dtype=object)
    # a pair with a patient unknown is listed: nothing says it is one person's
    other = np.array([pd.isna(patients[x]) or pd.isna(patients[y]) or patients[x] != patients[y]
                      for x, y in zip(a, b, strict=True)], dtype=bool)
    a, b = a[other], b[other]
    distance = np.sqrt(((thumbs[a] - thumbs[b]) ** 2).mean(axis=1))
    close = distance <= max_distance
    a, b, distance = a[close], b[close], distance[close]
    pairs = pd.DataFrame(
        {
            "image_id": manifest["image_id"].to_numpy()[a],
            "other_image_id": manifest["image_id"].to_numpy()[b],
            "distance": distance.round(6),
            "same_label": manifest["label"].to_numpy()[a] == manifest["label"].to_numpy()[b],
        },
        columns=NEAR_DUPLICATE_COLUMNS,
    )
    return pairs.sort_values(["distance", "image_id", "other_image_id"], kind="stable").reset_index(drop=True)


def read_raw_csv(path: str | os.PathLike) -> pd.DataFrame:
    """A manifest file exactly as written: its own columns (none added, none dropped), each schema column read with
    the schema's dtype. What the validate stage checks, so that a missing or empty column fails there."""
    try:
        header = pd.read_csv(path, nrows=0).columns
        return pd.read_csv(path, dtype={c: SCHEMA[c] for c in header if c in SCHEMA}, keep_default_na=False,
                           na_values=[""])
    except ValueError as err:  # pandas' parser errors, an empty file, a value its column's dtype cannot hold
        raise ManifestError(f"{path}: not a readable manifest CSV: {err}") from None


def read_csv(path: str | os.PathLike) -> pd.DataFrame:
    """A manifest written by the ingest stage, conformed (:func:`conform`: missing columns added as <NA>)."""
    frame = read_raw_csv(path)
    try:
        return conform(frame)
    except ManifestError as err:
        raise ManifestError(f"{path}: {err}") from None


def decode_hints(m: pd.DataFrame) -> tuple[list[str | None], list[int | None]]:
    """Each manifest row's ``photometric`` and ``bits_stored`` as :func:`covidcxr.io.read_image` takes them: what every
    stage that decodes a manifest file passes, so that a MONOCHROME1 PNG export (BIMCV's, PadChest's) reads air dark
    in the cache and in the Grad-CAM overlays alike."""
    photometric = [None if pd.isna(x) else str(x) for x in m["photometric"]]
    bits_stored = [None if pd.isna(x) else int(x) for x in m["bits_stored"]]
    return photometric, bits_stored
