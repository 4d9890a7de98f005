"""SQL at join speed (issue 25): ``python -m benchmarks --only sql_join``.

``SELECT p.*, hexatlas_embedding(p.lat, p.lon, R) AS embedding FROM pts p`` on 1M random land
points against ``atlas.join`` of the same points, on a land-only SatCLIP L=40 atlas (random
weights, float16, 256-d) at resolution 7 (``$HEXATLAS_BENCH_RES``), in fresh processes of this
checkout and of the baseline commit ``$HEXATLAS_BENCH_BASELINE`` (default: the commit before
the cell directory; checked out in a temporary git worktree), each under ``/usr/bin/time -v``:
cold (atlas dropped from the page cache first) and warm (the same call again in that process).

The atlas is ``$HEXATLAS_BENCH_ATLAS`` when given (a folder holding ``satclip-vit16-l40``),
else built under ``$HEXATLAS_BENCH_DIR`` (about 25 minutes on 2 cores, 15 GB) and deleted
after unless ``$HEXATLAS_BENCH_KEEP`` is set. ``--quick``: resolution 5, 100,000 points.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from benchmarks._common import Row
from benchmarks.scale import _CALL, _drop_page_cache, _land_points, _run

REPO = Path(__file__).resolve().parents[1]
MODEL = "satclip-vit16-l40"
BASELINE = "3274109"  # main before the resolution-level cell directory


def run(quick: bool = False) -> list[Row]:
    import pyarrow.parquet as pq

    from builder.build import build
    from tests.data.satclip_checkpoint import make_checkpoint

    res = 5 if quick else int(os.environ.get("HEXATLAS_BENCH_RES", "7"))
    n = 100_000 if quick else 1_000_000
    work = Path(os.environ.get("HEXATLAS_BENCH_DIR") or tempfile.mkdtemp(prefix="hexatlas-sql-join-"))
    work.mkdir(parents=True, exist_ok=True)
    given = os.environ.get("HEXATLAS_BENCH_ATLAS")
    atlas = Path(given) if given else work / "atlas"
    if not (atlas / MODEL / "manifest.json").is_file():
        ckpt = make_checkpoint(work / "l40.ckpt", legendre_polys=40)
        build(MODEL, checkpoint=str(ckpt), resolutions=str(res), land_only=True, output=atlas, device="cpu",
              progress=False)
    points = work / f"points-{n}.parquet"
    if not points.is_file():
        pq.write_table(_land_points(n, 25), points)
    baseline = work / "baseline-code"
    commit = os.environ.get("HEXATLAS_BENCH_BASELINE", BASELINE)
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(baseline), commit],
                   check=True, capture_output=True)
    sql = f"SELECT p.*, hexatlas_embedding(p.lat, p.lon, {res}) AS embedding FROM pts p"
    results = {}
    try:
        for code_name, code in (("this checkout", REPO), (f"baseline {commit}", baseline)):
            for call, text in (("sql", sql), ("join", None)):
                _drop_page_cache(atlas)
                results[code_name, call] = _run(_CALL, code=code, scratch=work, atlas=str(atlas), res=res,
                                                points=str(points), sql=text)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline)], check=False,
                       capture_output=True)
        if not given and not os.environ.get("HEXATLAS_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    label = f"{n:,} random land points, SatCLIP L=40 land res {res}"
    rows = []
    for kind in ("warm", "cold"):
        for code_name in ("this checkout", f"baseline {commit}"):
            (got, rss), (join, _) = results[code_name, "sql"], results[code_name, "join"]
            rows.append(Row("sql join", f"{label}: hexatlas_embedding, {kind}, {code_name} (peak RSS {rss / 1e9:.2f} GB)",
                            got[kind], "points/s", f"atlas.join, {kind}, same code", join[kind],
                            ">= 300,000 warm, equal to atlas.join" if kind == "warm" else ""))
        (now, _), (then, _) = results["this checkout", "sql"], results[f"baseline {commit}", "sql"]
        rows.append(Row("sql join", f"{label}: hexatlas_embedding, {kind}, this checkout", now[kind], "points/s",
                        f"baseline {commit}", then[kind]))
    return rows
