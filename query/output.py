"""Arrow tables as text for the CLI and CSV outputs: an aligned table, JSON records or CSV."""

from __future__ import annotations

import json
import sys
from typing import Any

import pyarrow as pa

from catalog.cells import cell_to_hex

__all__ = ["FORMATS", "emit"]

FORMATS = ("table", "json", "csv")


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def emit(table: pa.Table, fmt: str, *, out: Any = None, header: bool = True) -> None:
    """Print an Arrow table as an aligned table, JSON records or CSV (lists as JSON text);
    ``header=False`` leaves out CSV's header line (a later block of a stream)."""
    out = out or sys.stdout
    rows = table.to_pylist()
    if fmt == "json":
        json.dump([{k: _plain(v) for k, v in r.items()} for r in rows], out)
        out.write("\n")
        return
    def cell(v: Any, width_limit: bool) -> str:
        if isinstance(v, list):
            text = json.dumps(_plain(v))
            return text if not width_limit or len(v) <= 4 else json.dumps(_plain(v[:4]))[:-1] + f", ... ({len(v)} values)]"
        if isinstance(v, float):
            return f"{v:.6g}"
        if isinstance(v, int) and v > 2**52:  # H3 cells read best in hex
            return cell_to_hex(v)
        return "" if v is None else str(v)
    if fmt == "csv":
        import csv

        writer = csv.writer(out)
        if header:
            writer.writerow(table.column_names)
        writer.writerows([cell(v, False) if not isinstance(v, int) else v for v in r.values()] for r in rows)
        return
    texts = [[cell(v, True) for v in r.values()] for r in rows]
    widths = [max([len(n)] + [len(t[i]) for t in texts]) for i, n in enumerate(table.column_names)]
    out.write("  ".join(n.ljust(w) for n, w in zip(table.column_names, widths)).rstrip() + "\n")
    for t in texts:
        out.write("  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip() + "\n")
