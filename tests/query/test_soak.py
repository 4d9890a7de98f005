"""Soak: ``hexatlas serve`` under 64 concurrent clients on loopback, for a bounded time.

The server is the real command in its own process; the clients are 64 asyncio tasks with
one httpx connection pool. Each sends a mix of requests (one point, a batch of 20, an
interpolated point, similar places, and three kinds of bad request) and checks every
answer against the in-process Python API: the exact status, and for lookups and searches
the exact embedding or cells. Any other answer, a transport error or a timeout fails the
test. Latency percentiles and the server's resident memory are printed (``pytest -s``).

Memory: the server's RSS (``/proc/<pid>/status``) is sampled every half second after a
warm-up (which fills the block cache, loads the index and grows the thread pool). The
run fails if RSS grows by more than :func:`rss_tolerance` (16 MiB + 5% of the post-warm-up
level), either between the medians of the first and last quarter of the samples or as
the least-squares trend over the whole window. (Measured on 2 shared cores: RSS moves
within ~13 MiB over 60 s without any leak.) The printed line says which leak per request
the run would have caught: 2-3 KiB in the 60 s run (10,000-14,000 requests measured here),
30-40 KiB in the 5 s run of the default suite, which is there for errors under
concurrency and gross leaks.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import query
from tests.query._server import free_port, wait_for_health

MODEL = "satclip-vit16-l10"
CLIENTS = 64
MIB = 1 << 20


def rss_tolerance(baseline: float) -> float:
    return 16 * MIB + 0.05 * baseline


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@pytest.fixture(scope="module")
def server(atlas_dir):
    if not Path("/proc/self/status").is_file():
        pytest.skip("RSS is read from /proc (Linux)")
    port = free_port()
    command = [sys.executable, "-m", "catalog.cli", "serve", str(atlas_dir[0]), "--port", str(port)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, proc, timeout=60)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, err


@pytest.fixture(scope="module")
def expected(atlas_dir):
    """What each request must get back, from the Python API in this process."""
    atlas = query.open(atlas_dir[0])
    rng = np.random.default_rng(17)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, 256)))
    lon = rng.uniform(-180, 180, 256)
    lat[:4], lon[:4] = [90.0, -90.0, 0.0, 0.0], [0.0, 0.0, 180.0, -180.0]  # poles, the antimeridian
    similar = [atlas.similar(lat=float(a), lon=float(o), k=10, model=MODEL).column("cell").to_pylist()
               for a, o in zip(lat[:16], lon[:16])]
    return {"lat": lat, "lon": lon, "plain": atlas.lookup(lat, lon, model=MODEL),
            "interpolated": atlas.lookup(lat, lon, model=MODEL, interpolate=True),
            "similar": [[f"{c:x}" for c in cells] for cells in similar]}


KINDS = ["one"] * 8 + ["batch"] * 4 + ["interpolated"] * 2 + ["similar"] * 3 + ["bad-400", "bad-422",
                                                                                "bad-404"]


async def _client(http, seed: int, want: dict, stop: float, latencies: list, errors: list) -> None:
    rng = np.random.default_rng(seed)
    lat, lon = want["lat"], want["lon"]
    while time.monotonic() < stop:
        kind = KINDS[rng.integers(len(KINDS))]
        i = int(rng.integers(len(lat)))
        one = {"lat": float(lat[i]), "lon": float(lon[i]), "model": MODEL}
        if kind == "batch":
            rows = rng.integers(len(lat), size=20)
            request = ("POST", "/v1/lookup", {"json": {"points": [{"lat": float(lat[j]), "lon": float(lon[j])}
                                                                  for j in rows], "model": MODEL}}, 200)
        elif kind == "similar":
            i = i % 16
            request = ("GET", "/v1/similar", {"params": {"lat": float(lat[i]), "lon": float(lon[i]), "k": 10,
                                                         "model": MODEL}}, 200)
        elif kind == "interpolated":
            request = ("GET", "/v1/lookup", {"params": {**one, "interpolate": "true"}}, 200)
        elif kind == "bad-400":
            request = ("GET", "/v1/lookup", {"params": {**one, "lat": 95.0}}, 400)
        elif kind == "bad-422":
            malformed = {"points": [{"lat": "north", "lon": 0}], "model": MODEL}
            request = ("POST", "/v1/lookup", {"json": malformed}, 422)
        elif kind == "bad-404":
            request = ("GET", "/v1/lookup", {"params": {**one, "res": 9}}, 404)
        else:
            request = ("GET", "/v1/lookup", {"params": one}, 200)
        method, path, options, status = request
        start = time.perf_counter()
        try:
            answer = await http.request(method, path, **options)
        except Exception as exc:  # noqa: BLE001 - every failure to answer is an error of the run
            errors.append(f"{kind}: {type(exc).__name__}: {exc}")
            continue
        latencies.append(time.perf_counter() - start)
        if answer.status_code != status:
            errors.append(f"{kind}: status {answer.status_code}, wanted {status}: {answer.text[:200]}")
            continue
        body = answer.json()
        if kind == "one" or kind == "interpolated":
            table = want["plain" if kind == "one" else "interpolated"]
            if not np.array_equal(np.float32(body["embedding"]), table[i]):
                errors.append(f"{kind}: point {i} got another embedding")
        elif kind == "batch":
            if not np.array_equal(np.float32([r["embedding"] for r in body["results"]]), want["plain"][rows]):
                errors.append(f"batch: rows {rows.tolist()} got other embeddings")
        elif kind == "similar":
            if [r["cell"] for r in body["results"]] != want["similar"][i]:
                errors.append(f"similar: point {i} got other cells")
        elif "error" not in body or not body["detail"]:
            errors.append(f"{kind}: no error and detail in {answer.text[:200]}")


async def _soak(url: str, pid: int, want: dict, warm_up: float, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    samples: list[tuple[float, int]] = []
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        began = time.monotonic()
        measured_from, stop = began + warm_up, began + warm_up + seconds

        async def sample() -> None:
            while time.monotonic() < stop:
                if time.monotonic() >= measured_from:
                    samples.append((time.monotonic() - measured_from, _rss(pid)))
                await asyncio.sleep(0.5)

        tasks = [_client(http, seed, want, stop, latencies, errors) for seed in range(CLIENTS)]
        await asyncio.gather(sample(), *tasks)
        elapsed = time.monotonic() - began
    return {"latencies": np.asarray(latencies), "errors": errors, "samples": samples, "elapsed": elapsed}


def _run(server, expected, warm_up: float, seconds: float) -> None:
    url, pid = server
    run = asyncio.run(_soak(url, pid, expected, warm_up, seconds))
    lat_ms = run["latencies"] * 1000
    t, rss = (np.asarray(v, dtype=np.float64) for v in zip(*run["samples"]))
    quarter = max(1, len(rss) // 4)
    first, last = np.median(rss[:quarter]), np.median(rss[-quarter:])
    trend = np.polyfit(t, rss, 1)[0] * (t[-1] - t[0]) if len(t) > 2 else 0.0
    tolerance = rss_tolerance(first)
    print(f"\nsoak {seconds:.0f} s (+{warm_up:.0f} s warm-up), {CLIENTS} clients: {len(lat_ms):,} requests, "
          f"{len(lat_ms) / run['elapsed']:,.0f} req/s, p50 {np.percentile(lat_ms, 50):.1f} ms, "
          f"p99 {np.percentile(lat_ms, 99):.1f} ms, max {lat_ms.max():.1f} ms; "
          f"server RSS {rss.min() / MIB:.1f}-{rss.max() / MIB:.1f} MiB over {len(rss)} samples, "
          f"first-to-last quarter {(last - first) / MIB:+.1f} MiB, "
          f"trend {trend / MIB:+.1f} MiB (tolerance {tolerance / MIB:.1f} MiB: a leak over "
          f"{tolerance / max(1, len(lat_ms) * seconds / (seconds + warm_up)) / 1024:.1f} KiB a request "
          "fails)")
    assert not run["errors"], f"{len(run['errors'])} errors, first: {run['errors'][:5]}"
    assert len(lat_ms) >= CLIENTS * seconds  # every client kept asking: at least one answer a second each
    assert last - first <= tolerance, f"RSS grew {(last - first) / MIB:.1f} MiB, first to last quarter"
    assert trend <= tolerance, f"RSS trend {trend / MIB:+.1f} MiB over the run"


def test_short_soak(server, expected) -> None:
    _run(server, expected, warm_up=2, seconds=5)


@pytest.mark.slow
def test_soak_64_clients_for_60_seconds(server, expected) -> None:
    _run(server, expected, warm_up=10, seconds=60)
