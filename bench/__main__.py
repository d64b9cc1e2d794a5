"""`python -m bench`: run every benchmark and write bench/results.json (each figure beside its baseline)."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

from bench import ingest, training

HERE = Path(__file__).resolve().parent


def main() -> int:
    real = os.environ.get("COVIDCXR_REAL_DATA")
    results = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "ingest": ingest.run(Path("data/demo"), Path(real) if real else None),
        "training": training.run(),
        "serving": __import__("bench.serving", fromlist=["run"]).run(),  # skipped until `dvc repro register` ran
    }
    (HERE / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    json.dump(results, sys.stdout, indent=2, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
