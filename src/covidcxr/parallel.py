"""Map a function over many files on all cores, in order, with a progress bar only on a terminal."""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def parallel_map(
    fn: Callable[[T], R], jobs: Sequence[T], *, workers: int = 1, progress: bool = False, desc: str = ""
) -> list[R]:
    """``[fn(job) for job in jobs]`` on ``workers`` processes of :func:`worker_pool` (``fn``: a module-level function).
    With one worker it runs here, in the caller's process, whose allocator is left as it is."""
    if workers > 1 and len(jobs) > 1:
        with worker_pool(workers) as pool:
            return list(_bar(pool.map(fn, jobs, chunksize=8), len(jobs), progress, desc))
    return list(_bar(map(fn, jobs), len(jobs), progress, desc))


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes for image work, each with :func:`keep_freed_memory` applied."""
    return ProcessPoolExecutor(max_workers=workers, initializer=keep_freed_memory)


def keep_freed_memory() -> bool:
    """Let glibc keep freed buffers of up to 32 MiB in the heap for reuse instead of unmapping each one; whether it did.

    Reading an image allocates and frees a few buffers of about a megabyte (the decoded pixels, their float copy, the
    resize's input) per file. By default glibc maps each from the kernel and unmaps it on free, so every file pays the
    page faults and zeroing again: 1.2 ms of the 2.8 ms a 512-px JPEG took to become a 224-px working image in a fresh
    process, and a fifth of the time of drawing a demo phantom. Forked workers inherit some of the parent's raised
    threshold, so in the cache stage's pool it gained less: 11% on those JPEGs, nothing on the demo DICOMs. Meant for
    worker processes (it changes the whole process's allocator); elsewhere than glibc it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        log.debug("no glibc mallopt: the allocator keeps its default settings")
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, 256 << 20)) and bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20))


def _bar(iterable: Iterable[R], total: int, enabled: bool, desc: str) -> Iterable[R]:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, unit="img", desc=desc)
