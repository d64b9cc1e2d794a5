"""Command line: `covidcxr demo-data OUT_DIR`, `covidcxr inspect FILE...`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _demo_data(args: argparse.Namespace) -> int:
    from covidcxr.datasets import demo

    counts = demo.generate(args.out_dir, seed=args.seed)
    print(json.dumps(counts, indent=2, sort_keys=True))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    """Print what read_image sees in each file (whitelisted header only), or why it refuses it."""
    from covidcxr import io

    status = 0
    for path in args.files:
        try:
            pixels, header = io.read_image(path)
        except io.ImageReadError as err:
            print(f"{path}\tREFUSED\t{err.reason}\t{err}")
            status = 1
            continue
        stats = {"min": float(pixels.min()), "max": float(pixels.max()), "mean": round(float(pixels.mean()), 3)}
        print(f"{path}\tOK\t{json.dumps({**header, **stats}, default=str, sort_keys=True)}")
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covidcxr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo-data", help="write the deterministic synthetic demo dataset (DICOM phantoms + masks)")
    demo.add_argument("out_dir", help="folder to write, e.g. data/demo (must be empty or a previous demo output)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (the committed data.dvc matches seed 0)")
    demo.set_defaults(func=_demo_data)

    inspect = sub.add_parser("inspect", help="read image files as the pipeline does and print their header and range")
    inspect.add_argument("files", nargs="+", help="DICOM, PNG, JPEG or JSRT .IMG files")
    inspect.set_defaults(func=_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
