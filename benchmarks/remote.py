"""Remote reads (issue 15): lookups of 1 and 100 points from an atlas served over loopback HTTP
(nginx) and S3 (moto's server), cold and warm, against the same lookups from local disk.

The atlas is the toy encoder's (4-d, float16) at resolution 6 (14.7M cells; ``--quick``:
resolution 2): a transport benchmark, where what matters is how many requests and bytes a
lookup costs and how long they take, not the model. Both servers sit behind the tests'
counting proxy (tests/data/fault_proxy.py, no faults), which gives requests and body bytes.

- cold: ``query.open`` and the lookup together, in a fresh ``Atlas`` (new connections, no
  block table or block cached), the median of 5 point sets;
- warm: an opened atlas that has answered lookups before (its block tables read, its
  connections open), looking up points it has not seen: the median of 20.

Local disk is read through the page cache (warm after the first run), so its cold case is a
cold ``Atlas``, not a cold disk. nginx and moto run on the same 2 cores as the reader.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import Row

TOY = "tests.data.toy_encoder:load"


def _points(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return np.degrees(np.arcsin(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)


def _measure(location: str, n: int, proxy, local_atlas) -> dict[str, float]:
    """Median latency (ms), requests and bytes of cold and warm lookups of ``n`` points."""
    import query

    out: dict[str, float] = {}
    cold_s, cold_req, cold_bytes = [], [], []
    for rep in range(5):
        lat, lon = _points(n, 100 + rep)
        if proxy is not None:
            proxy.reset_counts()
        start = time.perf_counter()
        got = query.open(location).lookup(lat, lon)
        cold_s.append(time.perf_counter() - start)
        if proxy is not None:
            cold_req.append(proxy.requests)
            cold_bytes.append(proxy.bytes)
        np.testing.assert_array_equal(got, local_atlas.lookup(lat, lon))  # a benchmark of right answers only
    atlas = query.open(location)
    for rep in range(3):  # warm-up: block tables, connections
        atlas.lookup(*_points(n, 200 + rep))
    warm_s, warm_req, warm_bytes = [], [], []
    for rep in range(20):
        lat, lon = _points(n, 300 + rep)
        if proxy is not None:
            proxy.reset_counts()
        start = time.perf_counter()
        atlas.lookup(lat, lon)
        warm_s.append(time.perf_counter() - start)
        if proxy is not None:
            warm_req.append(proxy.requests)
            warm_bytes.append(proxy.bytes)
    out["cold_ms"], out["warm_ms"] = statistics.median(cold_s) * 1e3, statistics.median(warm_s) * 1e3
    if proxy is not None:
        out["cold_req"], out["cold_bytes"] = statistics.median(cold_req), statistics.median(cold_bytes)
        out["warm_req"], out["warm_bytes"] = statistics.median(warm_req), statistics.median(warm_bytes)
    return out


def run(quick: bool = False) -> list[Row]:
    import query
    from builder.build import build
    from catalog.upload import publish
    from tests.data.fault_proxy import FaultProxy
    from tests.data.http_server import nginx
    from tests.data.s3_server import BUCKET, s3_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    res = 2 if quick else 6
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ.setdefault("HEXATLAS_CACHE", str(tmp / "cache"))
        build(TOY, resolutions=str(res), output=tmp / "atlas", device="cpu", progress=False)
        local_atlas = query.open(tmp / "atlas")
        cells = local_atlas.info()["toy"]["resolutions"][str(res)]["cells"]
        label = f"toy 4-d float16 atlas, res {res} ({cells:,} cells)"
        results: dict[str, dict[int, dict[str, float]]] = {"local": {}}
        for n in (1, 100):
            results["local"][n] = _measure(str(tmp / "atlas"), n, None, local_atlas)
        with nginx(tmp / "atlas") as base, FaultProxy(base) as proxy:
            results["HTTP (nginx)"] = {n: _measure(f"{proxy.url}/atlas", n, proxy, local_atlas) for n in (1, 100)}
        saved = os.environ.get("AWS_ENDPOINT_URL")
        with s3_server() as endpoint:
            publish(tmp / "atlas", f"s3://{BUCKET}/bench", progress=False)
            with FaultProxy(endpoint) as proxy:
                os.environ["AWS_ENDPOINT_URL"] = proxy.url  # reads go through the counting proxy
                try:
                    results["S3 (moto)"] = {n: _measure(f"s3://{BUCKET}/bench", n, proxy, local_atlas) for n in (1, 100)}
                finally:
                    os.environ["AWS_ENDPOINT_URL"] = endpoint
        if saved is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = saved
    for transport in ("HTTP (nginx)", "S3 (moto)"):
        for n in (1, 100):
            got, base = results[transport][n], results["local"][n]
            for phase in ("cold", "warm"):
                case = (f"{label}: {transport}, {n} point{'s' * (n > 1)}, {phase}: {got[f'{phase}_req']:.0f} requests, "
                        f"{got[f'{phase}_bytes'] / 1e3:,.1f} KB")
                rows.append(Row("remote lookup", case, got[f"{phase}_ms"], "ms", f"local disk, {phase}",
                                base[f"{phase}_ms"]))
    return rows
