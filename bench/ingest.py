"""Ingest throughput: what the `cache` stage does per file against the bare decoder (pydicom / Pillow), all cores busy.

"Ours" is :func:`covidcxr.preprocess.load_working_image` at 224 px, the function the cache stage runs for every image:
`read_image` (header and truncation checks, LUTs, MONOCHROME1 inversion, float conversion; a JPEG far above the working
size decoded at reduced scale in Pillow's draft mode), resize, min-max and rounding to the cache's float16. The
baseline decodes the same file whole: `pydicom.dcmread(path).pixel_array` or Pillow's `Image.open(path).load()`. The
figure is the ratio ours / decoder-alone (goal >= 0.8); above 1 where the reduced decode saves more than the rest costs.
"""

from __future__ import annotations

import itertools
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from covidcxr import io, preprocess

SIZE = 224  # the paper's working size


def ours(path: str) -> float:
    image, _ = preprocess.load_working_image(path, SIZE)  # the cache stage's work for one file (no mask here)
    return float(image[0, 0])


def decode_only(path: str) -> float:
    if path.endswith(".dcm"):
        return float(pydicom.dcmread(path).pixel_array.flat[0])
    with Image.open(path) as im:
        im.load()
        return float(np.asarray(im).flat[0])


def images_per_second(fn, paths: list[str], workers: int, repeats: int) -> float:
    work = paths * repeats
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fn, paths[:workers]))  # warm the workers (imports)
        start = time.perf_counter()
        list(pool.map(fn, work, chunksize=8))
        elapsed = time.perf_counter() - start
    return len(work) / elapsed


def find_files(demo: Path, real: Path | None, n: int = 120) -> dict[str, list[str]]:
    readable = (p for p in sorted(str(p) for p in demo.rglob("*.dcm")) if _readable(p))
    files = {"dicom": list(itertools.islice(readable, n))}
    if real is not None and (real / "kermany").is_dir():
        files["jpeg"] = sorted(str(p) for p in (real / "kermany").rglob("*.jpeg"))[:n]
    return files


def _readable(path: str) -> bool:
    try:
        io.read_image(path)
        return True
    except io.ImageReadError:
        return False


def run(demo: Path, real: Path | None, repeats: int = 3, *, smoke: bool = False) -> dict:
    """Smoke: 8 files once each (checks the benchmark works; the figures mean little)."""
    workers = os.cpu_count() or 1
    result: dict = {"workers": workers, "resize_to": SIZE, "ours": "preprocess.load_working_image (the cache stage)"}
    for kind, paths in find_files(demo, real, n=8 if smoke else 120).items():
        if not paths:
            continue
        repeats = 1 if smoke else repeats
        base = images_per_second(decode_only, paths, workers, repeats)
        mine = images_per_second(ours, paths, workers, repeats)
        result[kind] = {
            "files": len(paths),
            "working_image_ips": round(mine, 1),
            "decode_only_ips": round(base, 1),
            "ratio": round(mine / base, 3),
        }
    return result


def rows(result: dict) -> list[dict]:
    """One row per file kind: our reader's images/s beside the bare decoder's (goal: ratio >= 0.8)."""
    from bench import goal, row, skipped

    kinds = [k for k in ("dicom", "jpeg") if k in result]
    if not kinds:
        return [skipped("ingest", "no readable DICOM under the demo data folder")]
    return [row(f"ingest.{kind}", result[kind]["working_image_ips"], result[kind]["decode_only_ips"],
                "decoder alone (pydicom / Pillow), same files, same pool", "images/s", goal("ratio", ">=", 0.8))
            for kind in kinds]
