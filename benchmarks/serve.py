"""A bounded load test of ``hexatlas serve`` on loopback (issue 5).

Starts the real command (uvicorn; one process, then ``--workers 2``) on a SatCLIP L=40 atlas at resolution 3, then
drives it from 16 client threads with keep-alive connections, a fixed number of requests per
endpoint. Reports requests/s with p50 and p99 latency, against the same call made in-process
through the Python API in the same run (the HTTP + JSON overhead is the difference). The
clients share the machine's cores with the server, as a loopback test must.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks._common import Row, best_rate
from tests.query._server import free_port, wait_for_health

CLIENTS = 16


def _load(url: str, requests: list[tuple[str, str, dict]]) -> tuple[float, float, float]:
    """Run ``requests`` from CLIENTS threads; returns (requests/s, p50 s, p99 s)."""
    import httpx

    clients = [httpx.Client(base_url=url, timeout=60) for _ in range(CLIENTS)]

    def worker(i: int) -> list[float]:
        times = []
        for method, path, kwargs in requests[i::CLIENTS]:
            start = time.perf_counter()
            answer = clients[i].request(method, path, **kwargs)
            times.append(time.perf_counter() - start)
            answer.raise_for_status()
        return times

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        latencies = np.concatenate([np.asarray(t) for t in pool.map(worker, range(CLIENTS))])
    wall = time.perf_counter() - start
    for client in clients:
        client.close()
    return len(requests) / wall, float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))


def run(quick: bool = False) -> list[Row]:
    import query
    from builder.build import build
    from builder.encoders import load_encoder
    from tests.data.satclip_checkpoint import make_checkpoint

    scale = 4 if quick else 1
    rng = np.random.default_rng(0)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, 4000)))
    lon = rng.uniform(-180, 180, 4000)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ckpt = make_checkpoint(tmp / "satclip-l40.ckpt", legendre_polys=40)
        encoder = load_encoder("satclip-vit16-l40", checkpoint=ckpt, device="cpu")
        build(encoder=encoder, resolutions="3", output=tmp / "atlas", progress=False)
        atlas = query.open(tmp / "atlas")
        env = {**os.environ, "HEXATLAS_CACHE": str(tmp / "cache")}
        n_get, n_sim, n_post = 3000 // scale, 1000 // scale, 200 // scale
        gets = [("GET", "/v1/lookup", {"params": {"lat": lat[i], "lon": lon[i]}}) for i in range(n_get)]
        sims = [("GET", "/v1/similar", {"params": {"lat": lat[i], "lon": lon[i], "k": 10}}) for i in range(n_sim)]
        batch = [{"lat": float(a), "lon": float(b)} for a, b in zip(lat[:100], lon[:100])]
        posts = [("POST", "/v1/lookup", {"json": {"points": batch}})] * n_post
        cases = [
            ("GET /v1/lookup (one point)", gets, lambda: atlas.lookup(lat[:1], lon[:1]), "in-process lookup"),
            ("GET /v1/similar (k=10)", sims, lambda: atlas.similar(lat=lat[0], lon=lon[0], k=10), "in-process similar"),
            ("POST /v1/lookup (100 points)", posts, lambda: atlas.lookup(lat[:100], lon[:100]),
             "in-process lookup of 100"),
        ]
        one_worker = {}
        for workers in (1, 2):
            with _server(tmp / "atlas", env, workers) as url:
                _load(url, gets[:200] + sims[:100])  # warm: block mappings, index, connections
                for name, requests, direct, base_name in cases:
                    rate, p50, p99 = _load(url, requests)
                    label = f"{name}, {CLIENTS} clients, --workers {workers}: p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms"
                    if workers == 1:
                        one_worker[name] = rate
                        rows.append(Row("serve", label, rate, "req/s", base_name, best_rate(direct, 1, repeats=50)))
                    else:
                        rows.append(Row("serve", label, rate, "req/s", "--workers 1", one_worker[name]))
    return rows


@contextlib.contextmanager
def _server(atlas: Path, env: dict, workers: int) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "catalog.cli", "serve", str(atlas), "--port", str(port),
                             "--workers", str(workers)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, proc)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
