"""Map a function over many files on all cores, in order, with a progress bar only on a terminal."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def parallel_map(
    fn: Callable[[T], R], jobs: Sequence[T], *, workers: int = 1, progress: bool = False, desc: str = ""
) -> list[R]:
    """``[fn(job) for job in jobs]`` on ``workers`` processes (``fn`` must be a module-level function)."""
    if workers > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers) as pool:
            return list(_bar(pool.map(fn, jobs, chunksize=8), len(jobs), progress, desc))
    return list(_bar(map(fn, jobs), len(jobs), progress, desc))


def _bar(iterable: Iterable[R], total: int, enabled: bool, desc: str) -> Iterable[R]:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, unit="img", desc=desc)
