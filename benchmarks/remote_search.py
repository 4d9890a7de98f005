"""Search and SQL on a published atlas, read in place (issue 23): ``--only remote_search``.

A SatCLIP L=40 atlas (random weights, the tests' checkpoint writer), land only, at
``HEXATLAS_BENCH_RES`` (default 7: 28.4M cells; 5 with ``--quick``), served by nginx on
loopback, timed straight from nginx, and counted (requests and body bytes) in a second pass
behind the tests' counting proxy (Python threads in the reader's process, so its own times
are slower and are given beside). Against the same
queries from local disk and against the download path (the index fetched whole, as before
list directories), in the same run:

- first ``similar``: ``query.open`` and one search in a fresh ``Atlas`` with an empty cache
  (the process's imports are warm);
- 100 searches of new places: p50 and p99, bytes and requests per search, and whether each
  answer equals the local one;
- ``SELECT res, count(*) ... GROUP BY res`` and a join of 10,000 points clustered in France,
  through DuckDB's httpfs: seconds and bytes, as a share of the parts' bytes; the Parquet
  footer bytes per part.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import Row

COUNTS = "SELECT res, count(*) AS n FROM embeddings GROUP BY res ORDER BY res"


def _places(n: int, seed: int, atlas) -> list[tuple[float, float]]:
    rng = np.random.default_rng(seed)
    out: list[tuple[float, float]] = []
    while len(out) < n:  # land points: those the land-only atlas answers
        lat, lon = np.degrees(np.arcsin(rng.uniform(-1, 1, 4 * n))), rng.uniform(-180, 180, 4 * n)
        held = ~np.isnan(atlas.lookup(lat, lon, on_invalid="null")[:, 0])
        out += list(zip(lat[held].tolist(), lon[held].tolist()))
    return out[:n]


def run(quick: bool = False) -> list[Row]:
    import query
    from builder.build import build
    from tests.data.fault_proxy import FaultProxy
    from tests.data.http_server import nginx
    from tests.data.satclip_checkpoint import make_checkpoint

    res = 5 if quick else int(os.environ.get("HEXATLAS_BENCH_RES", "7"))
    rows: list[Row] = []
    work = Path(os.environ.get("HEXATLAS_BENCH_DIR") or tempfile.mkdtemp(prefix="hexatlas-remote-search-"))
    atlas_dir = work / "atlas"
    if not (atlas_dir / "satclip-vit16-l40" / "manifest.json").exists():
        ckpt = make_checkpoint(work / "l40.ckpt", legendre_polys=40)
        build("satclip-vit16-l40", checkpoint=str(ckpt), resolutions=str(res), land_only=True, output=atlas_dir,
              device="cpu", progress=False)
    local = query.open(atlas_dir)
    info = local.info()["satclip-vit16-l40"]["resolutions"][str(res)]
    parts_bytes = sum(p.stat().st_size for p in atlas_dir.glob(f"*/data/res={res}/*.parquet"))
    label = f"SatCLIP L=40 land, res {res} ({info['cells']:,} cells, {info['index']})"
    places = _places(101, 7, local)
    for lat, lon in places[:5]:
        local.similar(lat=lat, lon=lon)  # warm local: its index's lists paged in
    start = time.perf_counter()
    fresh = query.open(atlas_dir)
    fresh.similar(lat=places[0][0], lon=places[0][1])
    local_first = time.perf_counter() - start
    local_times = []
    for lat, lon in places[1:]:
        t = time.perf_counter()
        local.similar(lat=lat, lon=lon)
        local_times.append(time.perf_counter() - t)
    with nginx(atlas_dir) as base, FaultProxy(base) as proxy:
        os.environ["HEXATLAS_CACHE"] = tempfile.mkdtemp(prefix="cache-in-place-", dir=work)
        proxy.reset_counts()
        start = time.perf_counter()
        far = query.open(f"{proxy.url}/atlas")
        first = far.similar(lat=places[0][0], lon=places[0][1])
        first_s, first_bytes, first_req = time.perf_counter() - start, proxy.bytes, proxy.requests
        same = [first.column("cell").to_pylist() == local.similar(lat=places[0][0], lon=places[0][1])
                .column("cell").to_pylist()]
        times, sizes, requests = [], [], []
        for lat, lon in places[1:]:
            proxy.reset_counts()
            t = time.perf_counter()
            got = far.similar(lat=lat, lon=lon)
            times.append(time.perf_counter() - t)
            sizes.append(proxy.bytes)
            requests.append(proxy.requests)
            same.append(got.column("cell").to_pylist() == local.similar(lat=lat, lon=lon).column("cell").to_pylist())
        # the same searches timed straight from nginx: the counting proxy is Python threads in
        # this process, relaying every byte under the reader's GIL (it measured itself, too)
        os.environ["HEXATLAS_CACHE"] = tempfile.mkdtemp(prefix="cache-direct-", dir=work)
        start = time.perf_counter()
        direct = query.open(f"{base}/atlas")
        direct.similar(lat=places[0][0], lon=places[0][1])
        direct_first = time.perf_counter() - start
        direct_times, same_direct = [], []
        for lat, lon in places[1:]:
            t = time.perf_counter()
            got = direct.similar(lat=lat, lon=lon)
            direct_times.append(time.perf_counter() - t)
            same_direct.append(got.column("cell").to_pylist() == local.similar(lat=lat, lon=lon).column("cell").to_pylist())
        # the download path: the same atlas without its list directory in the manifest read
        os.environ["HEXATLAS_CACHE"] = tempfile.mkdtemp(prefix="cache-download-", dir=work)
        proxy.reset_counts()
        start = time.perf_counter()
        old = query.open(f"{proxy.url}/atlas")
        old._manifest(None)["resolutions"][str(res)]["index"].pop("lists", None)
        old.similar(lat=places[0][0], lon=places[0][1])
        old_s, old_bytes = time.perf_counter() - start, proxy.bytes
        # SQL through httpfs
        proxy.reset_counts()
        start = time.perf_counter()
        counts = far.sql(COUNTS).to_pydict()
        sql_s, sql_bytes = time.perf_counter() - start, proxy.bytes
        assert counts == local.sql(COUNTS).to_pydict()
        rng = np.random.default_rng(3)
        con = far.connect()
        lat, lon = rng.uniform(43.5, 49.5, 10_000), rng.uniform(-1.5, 7.0, 10_000)
        import pyarrow as pa

        con.register("pts", pa.table({"id": np.arange(10_000), "lat": lat, "lon": lon}))
        proxy.reset_counts()
        start = time.perf_counter()
        joined = con.sql(f"SELECT p.id, e.embedding FROM pts p JOIN embeddings e ON e.res = {res} AND "
                         f"e.cell = h3_latlng_to_cell(p.lat, p.lon, {res})").to_arrow_table()
        join_s, join_bytes = time.perf_counter() - start, proxy.bytes
        proxy.reset_counts()
        start = time.perf_counter()
        looked = con.sql(f"SELECT p.id, hexatlas_embedding(p.lat, p.lon, {res}) AS embedding FROM pts p "
                         "WHERE embedding IS NOT NULL").to_arrow_table()
        udf_s, udf_bytes = time.perf_counter() - start, proxy.bytes
    import pyarrow.parquet as pq

    parts = sorted(atlas_dir.glob(f"*/data/res={res}/*.parquet"))
    footer = statistics.mean(pq.read_metadata(p).serialized_size for p in parts)
    p50, p99 = (float(np.percentile(direct_times, q)) * 1e3 for q in (50, 99))
    proxied50 = float(np.percentile(times, 50)) * 1e3
    lp50 = float(np.percentile(local_times, 50)) * 1e3
    rows += [
        Row("remote similar", f"{label}: first search, fresh Atlas, empty cache, {first_req} requests, "
            f"{first_bytes / 1e6:.2f} MB (through the proxy: {first_s * 1e3:,.0f} ms)", direct_first * 1e3, "ms",
            f"index downloaded whole first: {old_bytes / 1e6:,.1f} MB", old_s * 1e3, "< 1,500 ms and < 30 MB"),
        Row("remote similar", f"{label}: first search (as above)", direct_first * 1e3, "ms",
            "local disk, fresh Atlas", local_first * 1e3),
        Row("remote similar", f"{label}: 100 searches warm, p50 (p99 {p99:.1f} ms; through the proxy p50 "
            f"{proxied50:.1f} ms), median {statistics.median(sizes) / 1e3:,.1f} KB and "
            f"{statistics.median(requests):.0f} requests a search; answers equal to local: {sum(same)}/{len(same)} through the proxy, "
            f"{sum(same_direct)}/{len(same_direct)} straight",
            p50, "ms", "local disk, warm p50", lp50, "< 40 ms"),
        Row("remote SQL", f"{label}: {COUNTS!r} over httpfs, {sql_bytes / 1e6:.2f} MB = "
            f"{100 * sql_bytes / parts_bytes:.3f}% of the parts ({len(parts)} parts, footer {footer / 1e3:,.0f} KB "
            "each)", sql_s * 1e3, "ms", "", 0.0, "< 2,000 ms and < 1%"),
        Row("remote SQL", f"{label}: view join of 10,000 points in France ({joined.num_rows:,} rows), "
            f"{join_bytes / 1e6:.2f} MB = {100 * join_bytes / parts_bytes:.3f}% of the parts", join_s * 1e3, "ms",
            "", 0.0, "< 2% of the parts"),
        Row("remote SQL", f"{label}: the same 10,000 points through hexatlas_embedding ({looked.num_rows:,} rows; "
            f"blocks read in place), {udf_bytes / 1e6:.2f} MB = {100 * udf_bytes / parts_bytes:.3f}% of the parts",
            udf_s * 1e3, "ms", "the view join", join_s * 1e3, "< 2% of the parts"),
    ]
    return rows
