"""Atlas build throughput (issue 3): per-stage and end-to-end cells/s against encode-only.

For each model, the encode-only rate is measured on the same cell centres in the same run;
the end-to-end rate covers everything after the model is loaded (enumerate, encode, write
the part files, FAISS index, manifest). Bytes per cell (data, and index apart) are measured
per storage precision against the raw embedding bytes.
"""

from __future__ import annotations

import tempfile
import time
from functools import partial
from pathlib import Path

from benchmarks._common import Row, best_rate
from builder.build import build
from builder.encoders import load_encoder
from builder.grid import Shard, cell_centers, cell_count, parse_resolutions, shard_cells


def _models(tmp: Path, quick: bool) -> list[tuple[str, object, str]]:
    from tests.data.satclip_checkpoint import make_checkpoint

    ckpt = make_checkpoint(tmp / "satclip-l40.ckpt", legendre_polys=40)
    satclip = load_encoder("satclip-vit16-l40", checkpoint=ckpt, device="cpu")
    geoclip = load_encoder("geoclip", device="cpu")
    return [
        ("SatCLIP L=40 (random weights)", satclip, "0-3" if quick else "0-5"),
        ("GeoCLIP", geoclip, "0-3" if quick else "0-4"),
    ]


def _free_encoder(dim: int) -> object:
    """A ``dim``-wide encoder that costs next to nothing (a fixed projection of the unit
    vector, through sin): a build with it times the finishing stages alone."""
    import torch

    from builder.encoders import Encoder
    from catalog.provenance import Provenance

    class Projection(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            weights = torch.randn(3, dim, generator=torch.Generator().manual_seed(0)) * 3
            self.weights = torch.nn.Parameter(weights, requires_grad=False)

        def forward(self, lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
            la, lo = torch.deg2rad(lat).float(), torch.deg2rad(lon).float()
            xyz = torch.stack([la.cos() * lo.cos(), la.cos() * lo.sin(), la.sin()], dim=1)
            return (xyz @ self.weights).sin_()

    provenance = Provenance(model="projection", dim=dim, source="benchmarks/builder.py", revision=None,
                            sha256="0" * 64, coordinate_order="lat,lon", licence="MIT", paper="none")
    return Encoder(Projection(), provenance=provenance, device="cpu")


def run(quick: bool = False) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for label, encoder, resolutions in _models(tmp, quick):
            res = parse_resolutions(resolutions)
            n = sum(cell_count(r) for r in res)
            lat, lon = cell_centers(shard_cells(Shard(min(max(res), 4))))
            encode_only = best_rate(partial(encoder.encode, lat=lat, lon=lon), len(lat), repeats=2)
            start = time.perf_counter()
            summary = build(encoder=encoder, resolutions=resolutions, output=tmp / "atlas", progress=False,
                            overwrite=True)
            seconds = time.perf_counter() - start
            case = f"{label}, res {resolutions} ({n:,} cells), float16"
            rows.append(Row("build end-to-end", case, n / seconds, "cells/s", "encode only", encode_only,
                            ">= 0.70x of encode only"))
            for stage in ("enumerate", "encode", "write", "index"):
                rows.append(Row(f"build stage: {stage}", case, n / summary.seconds[stage], "cells/s",
                                "encode only", encode_only))
            rows.append(Row("build: encoder idle", case, summary.seconds["wait enumerate"] +
                            summary.seconds["wait write"], "s", "build", seconds))
            if encoder.dim == 256:  # SatCLIP: how fast everything but the encoder runs on these cores
                start = time.perf_counter()
                build(encoder=_free_encoder(encoder.dim), resolutions=resolutions, output=tmp / "atlas",
                      progress=False, overwrite=True)
                rows.append(Row("build with a free encoder (finishing alone)", f"{n:,} cells of 256-d, float16",
                                n / (time.perf_counter() - start), "cells/s", "encode only", encode_only))
        # storage per cell, per precision: one model, one resolution, against the raw embedding bytes
        for precision, itemsize in (("float32", 4), ("float16", 2), ("int8", 1)):
            summary = build(encoder=encoder, resolutions="2" if quick else "3", output=tmp / "sizes", progress=False,
                            overwrite=True, precision=precision)
            cells = sum(summary.cells.values())
            data = sum(p.stat().st_size for d in ("data", "blocks") for p in (summary.dataset / d).rglob("*.*"))
            index = sum(p.stat().st_size for p in (summary.dataset / "index").rglob("*.faiss"))
            raw = encoder.dim * itemsize
            rows.append(Row("bytes per cell: data (parts + block tables)", f"GeoCLIP {precision}", data / cells, "B",
                            "raw embedding", raw, "<= 1.25x raw"))
            rows.append(Row("bytes per cell: index", f"GeoCLIP {precision}", index / cells, "B", "raw embedding", raw))
    return rows
