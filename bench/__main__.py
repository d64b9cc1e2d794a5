"""`python -m bench`: run every benchmark (ingest, training, serving, pipeline) and write one results file in which
each figure stands beside its same-run baseline (schema: bench/README.md).

``--smoke`` (or COVIDCXR_BENCH_SMOKE=1) shrinks every benchmark to seconds and writes bench/.work/results-smoke.json:
it checks that the benchmarks run, its figures mean little. ``--gpu`` runs only bench/gpu.py into
bench/results-gpu.json; where it is skipped (no GPU), that file, the record of a lent GPU's run, is left as it is.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
import time
from pathlib import Path

import covidcxr  # noqa: F401 - its CPU kernel settings (covidcxr.runtime) before any benchmark starts TensorFlow
from bench import ROW_KEYS, machine, skipped

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("ingest", "training", "serving", "pipeline")


def measure(name: str, smoke: bool, demo: Path, real: Path | None) -> dict:
    """Run one benchmark; its raw figures (or the error that stopped it)."""
    module = importlib.import_module(f"bench.{name}")
    if name == "ingest":
        return module.run(demo, real, smoke=smoke)
    if name == "training":  # reads no data
        return module.run(smoke=smoke)
    return module.run(smoke=smoke, demo=demo)  # serving: skipped until `dvc repro register` ran


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", default=os.environ.get("COVIDCXR_BENCH_SMOKE") == "1",
                        help="tiny sizes: check that every benchmark runs (seconds, not minutes)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), metavar="NAME",
                        help=f"run only these ({', '.join(BENCHMARKS)})")
    parser.add_argument("--gpu", action="store_true",
                        help="only the GPU benchmark of the paper profile (bench/gpu.py): bench/results-gpu.json")
    parser.add_argument("--data", type=Path, default=Path("data/demo"), help="the demo data folder")
    parser.add_argument("--out", type=Path, help="results file (default bench/results.json; smoke: "
                                                 "bench/.work/results-smoke.json)")
    args = parser.parse_args(argv)
    if args.gpu:
        args.only = ["gpu"]
    default = "results-gpu.json" if args.gpu else "results.json"
    out = args.out or (HERE / ".work" / "results-smoke.json" if args.smoke else HERE / default)
    real = os.environ.get("COVIDCXR_REAL_DATA")

    rows, details = [], {}
    for name in args.only:
        start = time.perf_counter()
        try:
            details[name] = measure(name, args.smoke, args.data, Path(real) if real else None)
            rows += importlib.import_module(f"bench.{name}").rows(details[name])
        except Exception as err:  # one broken benchmark must not lose the others' figures
            details[name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
            rows.append(skipped(name, f"failed: {type(err).__name__}: {str(err)[:300]}"))
        details[name]["bench_seconds"] = round(time.perf_counter() - start, 1)
        details[name]["date"] = datetime.date.today().isoformat()
    if args.gpu and "skipped" in details["gpu"] and out.is_file():
        print(f"gpu: skipped ({details['gpu']['skipped']}); {out} kept as it is")
        return 0
    # --only into an existing results file of the same mode: the benchmarks not rerun keep their rows (each
    # benchmark's details say when it ran)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    if previous.get("mode") == ("smoke" if args.smoke else "full"):
        kept = [n for n in previous.get("details", {}) if n not in details]
        rows = [{k: r[k] for k in ROW_KEYS} for r in previous["results"] if r["name"].split(".")[0] in kept] + rows
        details = {**{n: previous["details"][n] for n in kept}, **details}
    assert all(tuple(r) == ROW_KEYS for r in rows)
    results = {
        "mode": "smoke" if args.smoke else "full",
        "date": datetime.date.today().isoformat(),
        "machine": {**machine(), **({k: details["gpu"].get(k) for k in ("gpu", "backend")} if args.gpu else {})},
        "results": rows,
        "details": details,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    for r in rows:
        verdict = {True: "pass", False: "FAIL", None: "-"}[r["pass"]]
        figure = (f"{r['value']} {r['unit']} vs {r['baseline']} (ratio {r['ratio']})" if r["skipped"] is None
                  else f"skipped: {r['skipped']}")
        print(f"{r['name']:<32} {figure}  [{verdict}]")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
