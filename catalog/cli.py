"""The ``hexatlas`` command: a thin dispatcher over the packages' own command modules.

Each command lives with the package that does the work (``builder.cli`` for the jobs that
need torch, ``query.cli`` for reading atlases) and is imported only when it is run, so
``hexatlas lookup`` never pays for, or needs, PyTorch. A command module provides
``configure_<command>(parser)`` and ``run_<command>(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from collections.abc import Sequence

from catalog.errors import HexatlasError

__all__ = ["main"]

# command -> (module, one-line summary); the module is imported only when its command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("builder.cli", "list the location encoders that can be loaded"),
    "encode": ("builder.cli", "embed the points of a CSV, Parquet or GeoParquet file with a location encoder"),
    "build": ("builder.cli", "build (or resume) an atlas: an encoder over the global H3 grid"),
    "info": ("query.cli", "describe an atlas: models, resolutions, cells, provenance"),
    "lookup": ("query.cli", "embeddings at points"),
    "join": ("query.cli", "add cell and embedding columns to a CSV, Parquet or GeoParquet file of points (streamed)"),
    "similar": ("query.cli", "the cells most similar to a place or cell"),
    "sql": ("query.cli", "run SQL over the atlas (view 'embeddings', h3_* functions)"),
    "validate": ("query.cli", "recompute an atlas's checksums and counts; exit 1 on any problem"),
    "publish": ("catalog.upload", "copy a finished, valid atlas to s3:// or the Hugging Face Hub (hf://datasets/...)"),
    "serve": ("query.server", "serve an atlas read-only over HTTP: JSON API (OpenAPI) and a map page"),
    "map": ("query.mapping", "draw one resolution as a PNG world map coloured by principal components"),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hexatlas")
    except PackageNotFoundError:
        return "unknown"


def _top_parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="hexatlas",
        description="Precomputed location embeddings on the H3 grid.",
        epilog=f"commands:\n{listing}\n\nRun 'hexatlas COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hexatlas {_version()}")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] not in COMMANDS:
        top.parse_args(argv[:1] or ["--help"])  # prints help, version or the usage error and exits
    command, rest = argv[0], argv[1:]
    module_name, summary = COMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"hexatlas {command}", description=summary[0].upper() + summary[1:] + ".")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    if "-v" in rest or "--verbose" in rest:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        module = importlib.import_module(module_name)
        getattr(module, f"configure_{command}")(parser)
        args = parser.parse_args(_negative_lists(rest))
        return int(getattr(module, f"run_{command}")(args) or 0)
    except HexatlasError as exc:
        print(f"hexatlas {command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions: the user's environment, not a bug
        print(f"hexatlas {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hexatlas {command}: interrupted", file=sys.stderr)
        return 130


def _negative_lists(argv: list[str]) -> list[str]:
    """``--bbox -10,35,30,60`` as ``--bbox=-10,35,30,60``: argparse reads a value that starts
    with ``-`` as an option unless it is a single number, so a list of numbers starting with a
    negative one is joined to its option."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.fullmatch(r"-[\d.][\d.,eE+-]*,[\d.,eE+-]*", arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main())
