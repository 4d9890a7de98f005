"""Query-side commands of the ``hexatlas`` CLI (dispatched from :mod:`catalog.cli`); no torch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["configure_validate", "run_validate"]


def configure_validate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("atlas", help="atlas directory (all its datasets) or one dataset directory")


def run_validate(args: argparse.Namespace) -> int:
    from catalog.manifest import MANIFEST, list_datasets, validate_dataset

    root = Path(args.atlas)
    datasets = [root] if (root / MANIFEST).is_file() else [root / name for name in list_datasets(root)]
    if not datasets:
        print(f"hexatlas validate: {root}: no finished datasets (no {MANIFEST} in any subdirectory)", file=sys.stderr)
        return 1
    failed = 0
    for dataset in datasets:
        problems = validate_dataset(dataset)
        failed += bool(problems)
        for line in problems:
            print(f"{dataset}: {line}")
        if not problems:
            print(f"{dataset}: ok")
    return 1 if failed else 0
