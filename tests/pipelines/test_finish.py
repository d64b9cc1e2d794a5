"""`_common.finish`, how every stage's process ends: Python's exit handlers still run and the buffered output still
arrives, the exit status is 0, and a stage that fails never reaches it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]

SCRIPT = """
import atexit, logging, sys
from pipelines import _common
marker = sys.argv[1]
atexit.register(lambda: open(marker, "w").write("handlers ran"))
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
logging.getLogger("stage").info("logged before the end")
print("buffered", end="")  # no newline: still in the buffer when finish() runs
if sys.argv[2] == "fail":
    raise RuntimeError("the stage failed")
_common.finish()
print("never printed")
"""


def test_finish_runs_exit_handlers_flushes_and_exits_zero(tmp_path):
    marker = tmp_path / "marker.txt"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(marker), "ok"], cwd=PROJECT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "buffered"
    assert "logged before the end" in done.stderr
    assert marker.read_text() == "handlers ran"


def test_a_failing_stage_exits_nonzero_with_its_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "m.txt"), "fail"], cwd=PROJECT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "RuntimeError: the stage failed" in done.stderr
