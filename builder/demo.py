"""``make demo``: build a GeoCLIP atlas for H3 resolutions 0-3 on this machine and show it.

Run as ``python -m builder.demo --output DIR``. Builds (or resumes, or reuses) the atlas,
validates it, then shows what it holds: a SQL join of well-known places onto the embeddings
with DuckDB over the Parquet files (checked against encoding the places exactly), and the
places most similar to each through the FAISS index.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

PLACES = [
    ("Paris", 48.8566, 2.3522), ("Cairo", 30.0444, 31.2357), ("Mumbai", 19.076, 72.8777),
    ("Tokyo", 35.6762, 139.6503), ("Sydney", -33.8688, 151.2093), ("Manaus", -3.119, -60.0217),
    ("New York", 40.7128, -74.006), ("Reykjavik", 64.1466, -21.9426),
]


def _show(dataset: Path, res: int, encoder) -> None:
    import duckdb
    import faiss
    import h3.api.numpy_int as h3i
    import pyarrow as pa

    from catalog.manifest import read_manifest
    from catalog.vector_index import normalize

    manifest = read_manifest(dataset)
    names, lat, lon = zip(*PLACES)
    points = pa.table({
        "name": names, "lat": lat, "lon": lon,
        "cell": pa.array([h3i.latlng_to_cell(a, o, res) for a, o in zip(lat, lon)], pa.uint64()),
    })
    con = duckdb.connect()
    con.register("places", points)
    joined = con.sql(
        f"SELECT p.name, p.lat, p.lon, e.cell, e.embedding FROM places p "
        f"JOIN read_parquet('{dataset}/parquet/res={res}/*/*.parquet') e USING (cell) ORDER BY p.name"
    ).to_arrow_table()
    stored = np.stack(joined.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    exact = encoder.encode(lat=joined.column("lat").to_numpy(), lon=joined.column("lon").to_numpy())
    cosine = np.sum(normalize(stored) * normalize(exact), axis=1)

    index = faiss.read_index(str(dataset / manifest["resolutions"][str(res)]["index"]["path"]))
    _, found = index.search(normalize(stored), 4)
    print(f"\nPlaces joined onto the res-{res} embeddings in SQL (DuckDB over the Parquet files):")
    print(f"{'place':<10} {'cell':>16}  {'cos(atlas, exact)':>17}  most similar cells (lat, lon)")
    for i, name in enumerate(joined.column("name").to_pylist()):
        near = [h3i.cell_to_latlng(np.uint64(c)) for c in found[i] if c != joined.column("cell")[i].as_py()][:3]
        near_txt = "  ".join(f"({a:5.1f}, {o:6.1f})" for a, o in near)
        print(f"{name:<10} {joined.column('cell')[i].as_py():>16x}  {cosine[i]:>17.3f}  {near_txt}")


def main(argv: list[str] | None = None) -> int:
    from builder.build import build
    from builder.encoders import load_encoder
    from catalog.errors import HexatlasError
    from catalog.manifest import MANIFEST, dataset_name, validate_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo-atlas", help="atlas directory")
    parser.add_argument("--model", default="geoclip")
    parser.add_argument("--resolutions", default="0-3")
    args = parser.parse_args(argv)

    try:
        encoder = load_encoder(args.model)
        print(f"model: {encoder.name} ({encoder.dim}-d) from {encoder.provenance.source}, device {encoder.device}")
        dataset = Path(args.output) / dataset_name(encoder.name)
        if (dataset / MANIFEST).is_file():
            print(f"reusing the finished atlas in {dataset} (delete it to rebuild)")
        else:
            summary = build(encoder=encoder, resolutions=args.resolutions, output=args.output)
            print(f"built {summary}")
        problems = validate_dataset(dataset)
        print(f"validate: {'ok' if not problems else '; '.join(problems)}")
        from catalog.manifest import read_manifest

        finest = max(int(r) for r in read_manifest(dataset)["resolutions"])
        _show(dataset, finest, encoder)
    except HexatlasError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    print(f"\nNext: hexatlas validate {args.output}   |   files: {dataset}/manifest.json, collection.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
