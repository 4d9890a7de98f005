"""``python -m benchmarks [--quick] [--only GROUP]...``: print the benchmark table (markdown); groups below."""

from __future__ import annotations

import argparse
import importlib
import sys

from benchmarks._common import machine, markdown

SUITES = ["encoders", "builder", "query", "serve", "layout", "scale", "similar", "similar_kinds", "fidelity", "remote", "remote_search",
          "xarray_open", "join", "sql_join", "ray_nodes", "planet"]
DEFAULT = ["encoders", "builder", "query", "serve", "layout"]  # the scale group (scale, similar: an hour or so, tens of GB) runs only when asked for


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer points: a smoke run, noisier numbers")
    parser.add_argument("--only", choices=SUITES, action="append", help="run only these suites (scale runs only when named)")
    args = parser.parse_args()
    rows = []
    for suite in args.only or DEFAULT:
        print(f"running {suite} ...", file=sys.stderr)
        rows += importlib.import_module(f"benchmarks.{suite}").run(quick=args.quick)
    print(f"Machine: {machine()}\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
