"""Query-layer speed and usefulness (issue 4), each against a same-run baseline.

- single-point lookup p50 (warm) vs encoding that point with the encoder;
- a cold ``hexatlas lookup`` process vs a cold ``hexatlas encode`` of one point;
- joining 1,000,000 points at resolution 5 vs encoding them;
- similar-place search p50 at resolution 5 with recall@10 vs exact brute-force search;
- downstream R^2 (air temperature at 3,076 stations) from atlas embeddings vs exact ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from benchmarks._common import Row, p50


def _points(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return np.degrees(np.arcsin(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)


def _speed_rows(tmp: Path, quick: bool) -> list[Row]:
    import query
    from builder.build import build
    from builder.encoders import load_encoder
    from catalog.vector_index import normalize
    from tests.data.satclip_checkpoint import make_checkpoint

    res = 3 if quick else 5
    ckpt = make_checkpoint(tmp / "satclip-l40.ckpt", legendre_polys=40)
    encoder = load_encoder("satclip-vit16-l40", checkpoint=ckpt, device="cpu")
    build(encoder=encoder, resolutions=str(res), output=tmp / "atlas", progress=False)
    atlas = query.open(tmp / "atlas")
    label = f"SatCLIP L=40 atlas, res {res} ({atlas.info()[encoder.name]['resolutions'][str(res)]['cells']:,} cells)"
    rows = []

    lat, lon = _points(1000, seed=1)
    atlas.lookup(lat[:10], lon[:10])  # warm: the blocks' mappings
    it = iter(range(1000))
    look = p50(lambda: atlas.lookup([lat[next(it) % 1000]], [lon[0]]), 500)
    enc = p50(lambda: encoder.encode(lat=[lat[0]], lon=[lon[0]]), 200)
    rows.append(Row("lookup p50, 1 point (warm)", label, look * 1e3, "ms", "encoder, 1 point", enc * 1e3, "< 1 ms"))

    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    cold = p50(lambda: subprocess.run([sys.executable, "-m", "catalog.cli", "lookup", str(tmp / "atlas"), "--lat", "48.85",
                                         "--lon", "2.35"], check=True, capture_output=True, env=env), 5)
    pts = tmp / "one.csv"
    pts.write_text("lat,lon\n48.85,2.35\n")
    cold_enc = p50(lambda: subprocess.run([sys.executable, "-m", "catalog.cli", "encode", "--model", "satclip-vit16-l40",
                                             "--checkpoint", str(ckpt), "--input", str(pts), "--output",
                                             str(tmp / "one.parquet"), "--device", "cpu"],
                                            check=True, capture_output=True, env=env), 3)
    rows.append(Row("cold `hexatlas lookup` process", label, cold * 1e3, "ms", "cold `hexatlas encode` of 1 point",
                    cold_enc * 1e3, "< 1,000 ms"))

    n = 100_000 if quick else 1_000_000
    lat, lon = _points(n, seed=2)
    points = pa.table({"id": np.arange(n), "lat": lat, "lon": lon})
    first_s = p50(lambda: atlas.join(points), 1)  # reads (and checks) the blocks from disk
    join_s = p50(lambda: atlas.join(points), 3)
    enc_s = p50(lambda: encoder.encode(lat=lat, lon=lon), 1)
    rows.append(Row(f"join {n:,} points (p50 of 3 warm; first run {n / first_s:,.0f} pts/s)", label, n / join_s,
                    "pts/s", "encoding them (SatCLIP L=40 float32)", n / enc_s, ">= 300,000 pts/s"))

    rows.append(_interpolation_row(atlas, encoder, label))

    data = atlas._data(None, res)
    unit = normalize(data.scan()[1])
    qrows = np.random.default_rng(3).choice(len(unit), 200, replace=False)
    found, times = [], []
    for r in qrows:
        start = time.perf_counter()
        result = atlas.similar(vector=unit[r], k=10)
        times.append(time.perf_counter() - start)
        found.append(result.column("score").to_numpy())
    exact_start = time.perf_counter()
    truth = np.sort(unit[qrows] @ unit.T, axis=1)[:, -10:]
    exact_s = (time.perf_counter() - exact_start) / len(qrows)
    recall = float(np.mean([np.mean(f >= t[0] - 1e-5) for f, t in zip(found, truth)]))
    index = atlas.info()[encoder.name]["resolutions"][str(res)]["index"]
    rows.append(Row(f"similar p50, k=10 ({index}, recall@10 {recall:.3f})", label, float(np.median(times)) * 1e3, "ms",
                    "exact brute force", exact_s * 1e3, "< 10 ms, recall >= 0.95"))
    return rows


def _interpolation_row(atlas, encoder, label: str) -> Row:
    """Mean distance to the exact embedding: the cell's embedding vs the interpolated one."""
    lat, lon = _points(5000, seed=4)
    exact = encoder.encode(lat=lat, lon=lon)
    err = {interp: float(np.linalg.norm(atlas.lookup(lat, lon, interpolate=interp) - exact, axis=1).mean())
           for interp in (False, True)}
    return Row("interpolation: mean L2 distance to the exact embedding", label, err[True], "", "cell embedding", err[False],
               "smaller is better")


def _downstream_rows(tmp: Path, quick: bool) -> list[Row]:
    from builder.build import build
    from examples.air_temperature import r2_scores

    res = 3 if quick else 5
    build("geoclip", resolutions=str(res), output=tmp / "geoclip-atlas", land_only=True, device="cpu", progress=False)
    scores = r2_scores(tmp / "geoclip-atlas", model="geoclip", res=res)
    return [
        Row("air temperature R^2 (ridge, 20% held out)", f"GeoCLIP land-only atlas res {res}, {name}", r2, "R^2",
            "exact embeddings at the stations", scores["exact"], "within 0.01 of exact")
        for name, r2 in scores.items() if name != "exact"
    ]


def run(quick: bool = False) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp_name:
        os.environ.setdefault("HEXATLAS_CACHE", str(Path(tmp_name) / "cache"))
        return _speed_rows(Path(tmp_name), quick) + _downstream_rows(Path(tmp_name), quick)
