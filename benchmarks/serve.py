"""A bounded load test of ``hexatlas serve`` on loopback (issue 5), and its map at any scale (issue 28).

Starts the real command (uvicorn; one process, then ``--workers 2``) on a SatCLIP L=40 atlas at resolution 3, then
drives it from 16 client threads with keep-alive connections, a fixed number of requests per
endpoint. Reports requests/s with p50 and p99 latency, against the same call made in-process
through the Python API in the same run (the HTTP + JSON overhead is the difference). The
clients share the machine's cores with the server, as a loopback test must.

The map rows (issue 28) serve a land-only atlas of one resolution, 7 (28.4M cells; ``--quick``:
4), built with the toy encoder (``$HEXATLAS_BENCH_MAP_ATLAS``: an atlas built already, e.g. by
:func:`build_map_atlas`), to headless Debian chromium (software WebGL) through Playwright: the
time from opening the page to its first painted cells, for the globe and for a link to a city
view (``#map=11/48.8566/2.3522``); each view's ``/v1/map`` answer (bytes and server seconds);
a pan and zoom over a sequence of views (each from the view change to its cells drawn); and
the server's resident memory while it answers them (peak, from ``/proc``).
"""

from __future__ import annotations

import contextlib
import json
import math
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
MAP_MODEL = "tests.data.toy_encoder:load"  # the toy encoder: a res-7 land atlas (28.4M cells) in ~10 minutes


def build_map_atlas(output: str | Path, quick: bool = False) -> Path:
    """The map benchmark's atlas: land-only, one resolution (7; 4 with ``quick``), toy encoder."""
    from builder.build import build

    build(MAP_MODEL, resolutions="4" if quick else "7", land_only=True, output=output, device="cpu", progress=False)
    return Path(output)


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
        rows += _map_rows(quick, tmp, env)
    return rows


@contextlib.contextmanager
def _server(atlas: Path, env: dict, workers: int, pid: list[int] | None = None) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "catalog.cli", "serve", str(atlas), "--port", str(port),
                             "--workers", str(workers)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    if pid is not None:
        pid.append(proc.pid)
    try:
        wait_for_health(url, proc)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


# ---------------------------------------------------------------------------------------- the map
LOADS = 3  # page loads per first-paint measurement
GLOBE_VIEW = (1.1, 20.0, 0.0)  # zoom, lat, lon: the page's own opening view
CITY_VIEW = (11.0, 48.8566, 2.3522)  # Paris
PAN = [(5.0, 48.0, 2.0), (5.0, 48.0, 9.0), (5.0, 45.0, 15.0), (7.0, 45.5, 12.0), (9.0, 45.46, 9.19), (11.0, 45.46, 9.19),
       (11.0, 45.46, 9.35), (11.0, 45.5, 9.6), (8.0, 47.0, 8.0), (6.0, 50.0, 5.0), (4.0, 35.0, 20.0), (3.0, 0.0, 60.0),
       (2.0, 20.0, 100.0), (6.0, 35.7, 139.7), (11.0, 35.68, 139.77), (1.1, 20.0, 0.0)]


def _rss(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))


def _drawn(tab, before: float) -> float:
    """Milliseconds from ``before`` (page clock) until the page has painted the answer to its view."""
    tab.wait_for_function(f"window.hexatlasState.paintedAt !== null && window.hexatlasState.paintedAt > {before} "
                          "&& window.hexatlasState.status === 'ready'", timeout=120_000)
    return tab.evaluate("window.hexatlasState.paintedAt") - before


def _map_rows(quick: bool, tmp: Path, env: dict) -> list[Row]:
    import shutil

    import httpx

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if chromium is None or sync_playwright is None:
        return [Row("serve map", "skipped: needs Debian chromium and playwright", math.nan, "ms", "-", math.nan)]
    atlas = Path(os.environ.get("HEXATLAS_BENCH_MAP_ATLAS") or build_map_atlas(tmp / "map-atlas", quick))
    dataset = next(p for p in atlas.iterdir() if (p / "manifest.json").is_file()) if not (
        atlas / "manifest.json").is_file() else atlas
    manifest = json.loads((dataset / "manifest.json").read_text())
    res, cells = next((int(r), i["cells"]) for r, i in manifest["resolutions"].items())
    label = f"land-only res-{res} atlas ({cells:,} cells, toy encoder)"
    pid: list[int] = []
    rows = []
    with _server(atlas, env, 1, pid) as url, sync_playwright() as pw:
        idle = _rss(pid[0])
        browser = pw.chromium.launch(executable_path=chromium, args=["--enable-unsafe-swiftshader",
                                                                      "--use-angle=swiftshader"])
        for name, view in (("globe", GLOBE_VIEW), ("city", CITY_VIEW)):
            paints = []
            for attempt in range(LOADS):  # the first in a fresh browser (no cache), then as a user reloads
                tab = browser.new_page(viewport={"width": 1280, "height": 720})
                requests: list[str] = []
                tab.on("request", lambda r, requests=requests: requests.append(r.url) if "/v1/map" in r.url else None)
                tab.goto(f"{url}/#map={view[0]}/{view[1]}/{view[2]}")
                paints.append(_drawn(tab, 0.0))  # the page clock starts when the page is opened
                state = tab.evaluate("window.hexatlasState")
                if attempt < LOADS - 1 or name == "globe":
                    tab.close()
            pan_tab = tab
            with httpx.Client(timeout=60) as http:  # the same answer again, timed at the server's door
                start = time.perf_counter()
                body = http.get(requests[-1]).content
                server_ms = (time.perf_counter() - start) * 1e3
            what = f"res {state['res']} ({state['source']}), {state['cells']:,} cells"
            rows.append(Row("serve map", f"first paint of the {name} (page opened to cells drawn), {label}: {what}; "
                                         f"median of {LOADS} loads, the first {paints[0]:,.0f} ms",
                            float(np.median(paints)), "ms", "its /v1/map answer", server_ms,
                            "< 2,000 ms" if name == "globe" else ""))
            rows.append(Row("serve map", f"bytes of the {name}'s /v1/map answer: {what}", len(body), "B",
                            "11 B a cell (an overview file's cell + RGB)", 11 * max(state["cells"], 1)))
        times, sizes, peak = [], [], idle
        for zoom, lat, lon in PAN:
            before, asked = pan_tab.evaluate("[performance.now(), window.hexatlasState.requests]")
            pan_tab.evaluate(f"window.hexatlasGoTo({lon}, {lat}, {zoom})")
            pan_tab.wait_for_function(f"window.hexatlasState.requests > {asked} || performance.now() > {before + 1000}")
            if pan_tab.evaluate("window.hexatlasState.requests") > asked:  # else the cells drawn still cover it
                times.append(_drawn(pan_tab, before))
                sizes.append(pan_tab.evaluate("window.hexatlasState.bytes"))
            peak = max(peak, _rss(pid[0]))
        peak = max(peak, _rss(pid[0], "VmHWM"))
        browser.close()
    rows.append(Row("serve map", f"pan and zoom over {len(PAN)} views (globe to city), each view change to its cells "
                                 f"drawn, median (max {max(times):,.0f} ms)", float(np.median(times)), "ms",
                    "first paint of the globe", rows[0].value))
    rows.append(Row("serve map", f"bytes per /v1/map answer while panning, median (max {max(sizes):,})",
                    float(np.median(sizes)), "B", "the limit's bound: 1,024 + 32 B a cell x 300,000", 1024 + 32 * 300_000))
    rows.append(Row("serve map", f"server peak RSS over the first paints and the {len(PAN)} views", peak / 1e6, "MB",
                    "the server's RSS once started", idle / 1e6, "< 500 MB"))
    return rows
