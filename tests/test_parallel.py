"""covidcxr.parallel: the file map keeps order, and its workers keep freed memory in the heap (glibc)."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from covidcxr.parallel import parallel_map, worker_pool


def _has_mallinfo2() -> bool:
    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:  # another C library (musl)
        return False


GLIBC = _has_mallinfo2()
needs_glibc = pytest.mark.skipif(not GLIBC, reason="the allocator settings are glibc's (mallinfo2: glibc >= 2.33)")

# Allocate 24 MiB and report how many memory-mapped chunks glibc added for it: by default glibc maps a block
# that large from the kernel (and unmaps it on free); with the settings kept, it comes from the heap.
PROBE = """
import ctypes
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
def mapped_chunks_holding_24_mib():
    before = libc.mallinfo2().hblks
    buf = ctypes.create_string_buffer(24 << 20)
    return libc.mallinfo2().hblks - before
"""


def _square(x: int) -> int:
    return x * x


def _probe_in_worker(_: int) -> int:
    scope: dict = {}
    exec(PROBE, scope)  # noqa: S102 - the probe's text is this module's constant
    return scope["mapped_chunks_holding_24_mib"]()


def _fresh_process(setup: str) -> int:
    code = f"{PROBE}\n{setup}\nprint(mapped_chunks_holding_24_mib())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_parallel_map_keeps_the_jobs_order_on_several_workers():
    jobs = list(range(40))
    assert parallel_map(_square, jobs, workers=2) == [x * x for x in jobs] == parallel_map(_square, jobs, workers=1)


@needs_glibc
def test_keep_freed_memory_serves_large_buffers_from_the_heap():
    assert _fresh_process("") == 1  # the default: mapped from the kernel, so the probe can tell the two apart
    assert _fresh_process("from covidcxr.parallel import keep_freed_memory\nassert keep_freed_memory()") == 0


@needs_glibc
def test_worker_pool_applies_it_in_each_worker():
    with worker_pool(2) as pool:
        assert list(pool.map(_probe_in_worker, range(4))) == [0, 0, 0, 0]
