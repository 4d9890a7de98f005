"""The xarray backend (issue 26): ``xr.open_dataset(DATASET, engine="hexatlas", res=R)`` of a global
resolution-6 atlas (14,117,882 cells) in a fresh process, then ``xdggs.decode`` and ``sel_latlon``,
against the same on the opt-in Zarr face (``xr.open_zarr``, the second copy it replaces).

``python -m benchmarks --only xarray_open`` (about five minutes on 2 cores, ~1 GB of disk;
``--quick``: resolution 4). The atlas is the toy encoder's (4-d, float16), built with its Zarr
face (``formats="parquet,zarr"``) in a process of its own: opening costs what the manifest and
the row count cost, not the model. Each measurement runs in a fresh Python process under
``/usr/bin/time -v`` (peak RSS), with the atlas's files dropped from the page cache first
(cold), as :mod:`benchmarks.scale` does; each step includes the ones before it:

- opening: ``import xarray, xdggs`` and ``open_dataset`` (lazy: no block read); ``xr.open_zarr`` of
  the face loads ``cell_ids``, its dimension coordinate, to index it;
- ``xdggs.decode`` after opening: the backend's ``cell_ids`` are read then (every block's cell
  run, 8 B a cell) and indexed;
- ``ds.dggs.sel_latlon`` of 5 points after decoding (checked against ``Atlas.lookup``), and
  against ``query.open`` + ``Atlas.lookup`` of the same points (the query layer, no xarray);
- the backend over HTTP (nginx on loopback, when installed), against the query layer over HTTP.

The atlas goes under ``$HEXATLAS_BENCH_DIR`` (default: a new directory under /tmp) and is deleted
at the end unless ``$HEXATLAS_BENCH_KEEP`` is set.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks._common import Row
from benchmarks.scale import REPO, _drop_page_cache, _run

TOY = "tests.data.toy_encoder:load"
POINTS = {"lat": [48.85, -33.87, 0.0, -1.29, 61.22], "lon": [2.35, 151.21, -140.0, 36.82, -149.9]}

_BUILD = """
from builder.build import build
start = time.perf_counter()
summary = build(P["model"], resolutions=str(P["res"]), output=P["atlas"], device="cpu", progress=False,
                formats="parquet,zarr")
emit(cells=sum(summary.cells.values()), seconds=time.perf_counter() - start)
"""

# P["step"]: "open", "decode" or "sel", each including the ones before; P["zarr"]: the Zarr face
# to open instead of the backend.
_XARRAY = """
start = time.perf_counter()
import numpy as np
import xarray as xr
import xdggs
import query
from query.xarray_backend import HexatlasBackendEntrypoint
engine = "hexatlas" if "hexatlas" in xr.backends.list_engines() else HexatlasBackendEntrypoint
imported = time.perf_counter()
if P["zarr"]:
    ds = xr.open_zarr(P["zarr"])
else:
    ds = xr.open_dataset(P["location"], engine=engine, res=P["res"])
opened = time.perf_counter()
result = {"import_s": imported - start, "open_s": opened - start, "by_name": engine == "hexatlas"}
if P["step"] != "open":
    ds = xdggs.decode(ds)
    decoded = time.perf_counter()
    result["decode_s"] = decoded - opened
if P["step"] == "sel":
    emb = ds.dggs.sel_latlon(P["lat"], P["lon"]).embedding.values
    result["sel_s"] = time.perf_counter() - decoded
    expected = query.open(P["location"]).lookup(P["lat"], P["lon"], res=P["res"])
    assert np.array_equal(emb.astype(np.float32), expected), "sel_latlon and lookup disagree"
emit(**result)
"""

_QUERY = """
start = time.perf_counter()
import query
atlas = query.open(P["location"])
opened = time.perf_counter()
atlas.lookup(P["lat"], P["lon"], res=P["res"])
emit(open_s=opened - start, lookup_s=time.perf_counter() - opened)
"""


def _log(message: str) -> None:
    import sys

    print(f"[xarray_open {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _measure(snippet: str, atlas: Path, work: Path, **params: object) -> dict:
    _drop_page_cache(atlas)
    try:
        result, rss = _run(snippet, code=REPO, scratch=work, res=params.pop("res"), **POINTS, **params)
    except (RuntimeError, OSError) as exc:
        _log(f"failed: {exc}")
        return {"error": str(exc)}
    result["rss_mb"] = rss / 1e6
    _log(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return result


def _rows(res: int, cells: int, got: dict[str, dict], where: str) -> list[Row]:
    """Locally the backend against the Zarr face, step by step; over HTTP (where xarray would need
    fsspec for the face) against the query layer. Last, the whole path against the query layer."""

    def v(name: str, key: str, scale: float = 1.0) -> float:
        return got.get(name, {}).get(key, float("nan")) * scale

    label, n = f"res {res} ({cells:,} cells), {where}", len(POINTS["lat"])
    engine = "engine='hexatlas'" if got.get("open", {}).get("by_name") else "engine=HexatlasBackendEntrypoint"
    local = "zarr-open" in got
    face = "the Zarr face (xr.open_zarr)"
    opened = f"xr.open_dataset({engine}), fresh process, cold: import xarray, xdggs + open"
    decoded = "xdggs.decode after open (reads and indexes cell_ids)"
    if local:
        rows = [
            Row(opened, label, v("open", "open_s"), "s", face, v("zarr-open", "open_s"),
                "< 5 s" if res == 6 else ""),
            Row("xr.open_dataset peak RSS", label, v("open", "rss_mb"), "MB", face, v("zarr-open", "rss_mb"),
                "< 700 MB" if res == 6 else ""),
            Row(decoded, label, v("decode", "decode_s"), "s", face, v("zarr-decode", "decode_s")),
            Row("open + xdggs.decode peak RSS", label, v("decode", "rss_mb"), "MB", face,
                v("zarr-decode", "rss_mb")),
            Row(f"ds.dggs.sel_latlon of {n} points after decode, cold", label, v("sel", "sel_s", 1e3), "ms",
                face, v("zarr-sel", "sel_s", 1e3)),
            Row("open + decode + sel_latlon peak RSS", label, v("sel", "rss_mb"), "MB", face,
                v("zarr-sel", "rss_mb")),
        ]
    else:
        base = "import query + query.open"
        rows = [
            Row(opened, label, v("open", "open_s"), "s", base, v("query", "open_s")),
            Row("xr.open_dataset peak RSS", label, v("open", "rss_mb"), "MB", base, v("query", "rss_mb")),
            Row(decoded, label, v("decode", "decode_s"), "s", "xr.open_dataset before it",
                v("decode", "open_s")),
        ]
    whole = v("sel", "open_s") + v("sel", "decode_s") + v("sel", "sel_s")
    return [*rows,
            Row(f"import + open + decode + sel_latlon of {n} points, cold", label, whole, "s",
                "import query + query.open + Atlas.lookup", v("query", "open_s") + v("query", "lookup_s")),
            Row("import + open + decode + sel_latlon peak RSS", label, v("sel", "rss_mb"), "MB",
                "query.open + Atlas.lookup", v("query", "rss_mb"))]


def run(quick: bool = False) -> list[Row]:
    res = 4 if quick else 6
    base = Path(os.environ.get("HEXATLAS_BENCH_DIR") or "/tmp")
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hexatlas-xarray-", dir=base))
    atlas = work / f"toy-res{res}"
    try:
        _log(f"building a global toy atlas at resolution {res} in {atlas} ...")
        built, rss = _run(_BUILD, code=REPO, scratch=work, model=TOY, res=res, atlas=str(atlas))
        _log(f"built {built['cells']:,} cells in {built['seconds']:.0f} s, peak RSS {rss / 1e9:.1f} GB")
        rows = []
        manifest = json.loads((atlas / "toy" / "manifest.json").read_text())
        face = str(atlas / "toy" / manifest["resolutions"][str(res)]["zarr"])
        for where, location in _locations(atlas):
            got = {}
            for step in ("open", "decode", "sel"):
                common = {"location": location, "res": res, "step": step}
                got[step] = _measure(_XARRAY, atlas, work, zarr=None, **common)
                if where == "local":
                    got[f"zarr-{step}"] = _measure(_XARRAY, atlas, work, zarr=face, **common)
            got["query"] = _measure(_QUERY, atlas, work, location=location, res=res)
            rows += _rows(res, built["cells"], got, where)
        return rows
    finally:
        if os.environ.get("HEXATLAS_BENCH_KEEP"):
            _log(f"kept {work} (HEXATLAS_BENCH_KEEP is set)")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _locations(atlas: Path):
    """("local", the atlas folder), then ("HTTP", its URL on nginx) while nginx serves it."""
    yield "local", str(atlas / "toy")
    from tests.data.http_server import nginx, nginx_binary

    if nginx_binary() is None:
        _log("no nginx: the HTTP rows are skipped")
        return
    import pytest

    with contextlib.ExitStack() as stack:
        try:
            base = stack.enter_context(nginx(atlas))
        except (OSError, pytest.skip.Exception) as exc:  # nginx() skips the test when it cannot start
            _log(f"nginx did not start ({exc}): the HTTP rows are skipped")
            return
        yield "HTTP (nginx on loopback)", f"{base}/atlas/toy"
