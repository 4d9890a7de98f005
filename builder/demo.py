"""``make demo``: build a GeoCLIP atlas for H3 resolutions 0-3 on this machine and show it.

Run as ``python -m builder.demo --output DIR``. Builds (or resumes, or reuses) the atlas,
validates it, then shows it through the query layer: cells per resolution in SQL, a join of
well-known places onto the atlas (with and without interpolation, against encoding the
places exactly) and, for each place, the most similar cells elsewhere. Then a fine regional
layer: resolution 8 around Paris only (``--region``), and the measured fidelity of both.
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


def _show(atlas_dir: Path, model: str, encoder) -> None:
    import pyarrow as pa

    import query
    from catalog.cells import cell_to_hex
    from catalog.tables import embedding_matrix
    from catalog.vector_index import normalize
    from query.cli import emit

    atlas = query.open(atlas_dir)
    res = atlas.resolutions(model)[-1]
    print(f"\n{atlas!r}")
    emit(atlas.sql("SELECT res, count(*) AS cells, min(lat) AS min_lat, max(lat) AS max_lat FROM embeddings "
                   "GROUP BY res ORDER BY res"), "table")
    names, lat, lon = zip(*PLACES)
    joined = atlas.join(pa.table({"name": names, "lat": lat, "lon": lon}), model=model)
    stored = embedding_matrix(joined.column("embedding"))
    blended = atlas.lookup(lat, lon, model=model, interpolate=True)
    exact = encoder.encode(lat=lat, lon=lon)
    cos_cell = np.sum(normalize(stored) * normalize(exact), axis=1)
    cos_blend = np.sum(normalize(blended) * normalize(exact), axis=1)
    print(f"\nPlaces joined onto the res-{res} atlas; cosine similarity to the exact embedding of the cell's")
    print("embedding and of the interpolated one; then the most similar cells more than 300 km away:")
    print(f"{'place':<10} {'cell':>16} {'cell':>6} {'interp':>6}  similar places (lat, lon, cosine)")
    for i, name in enumerate(names):
        near = atlas.similar(lat=lat[i], lon=lon[i], k=3, model=model, exclude_within_km=300).to_pylist()
        near_txt = "  ".join(f"({r['lat']:5.1f}, {r['lon']:6.1f}, {r['score']:.2f})" for r in near)
        print(f"{name:<10} {cell_to_hex(joined.column('cell')[i].as_py()):>16} {cos_cell[i]:>6.3f} {cos_blend[i]:>6.3f}  {near_txt}")


REGION = (1.9, 48.6, 2.8, 49.1)  # Paris and its suburbs, (min lon, min lat, max lon, max lat)
REGION_RES = 8


def _fidelity_table(atlas_dir: Path, title: str) -> None:
    import query

    print(f"\n{title}: cosine similarity to the encoder at 2,000 seeded random points, measured by the build")
    print(f"{'res':>4} {'cells':>10}  {'cell mean':>9} {'p05':>6}  {'interp mean':>11} {'p05':>6}")
    for name, entry in query.open(atlas_dir).info().items():
        for res, info in entry["resolutions"].items():
            fid = info["fidelity"]
            c, i = fid["cell"], fid["interpolated"]
            print(f"{res:>4} {info['cells']:>10,}  {c['mean_cosine']:>9.4f} {c['p05_cosine']:>6.3f}  "
                  f"{i['mean_cosine']:>11.4f} {i['p05_cosine']:>6.3f}")


def _regional(atlas_dir: Path, regional_dir: Path, encoder) -> None:
    import query
    from builder.build import build
    from catalog.manifest import MANIFEST, dataset_name
    from catalog.vector_index import normalize

    dataset = regional_dir / dataset_name(encoder.name)
    if (dataset / MANIFEST).is_file():
        print(f"\nreusing the finished regional atlas in {dataset} (delete it to rebuild)")
    else:
        summary = build(encoder=encoder, resolutions=str(REGION_RES), output=regional_dir, region=REGION)
        print(f"\nregional layer (--region {','.join(map(str, REGION))} --resolutions {REGION_RES}): built {summary}")
    _fidelity_table(atlas_dir, "The global atlas")
    _fidelity_table(regional_dir, f"The regional atlas around Paris {REGION}")
    lat, lon = np.array([48.8566, 48.8049, 48.9362]), np.array([2.3522, 2.1204, 2.3574])  # Paris, Versailles, Saint-Denis
    exact = normalize(encoder.encode(lat=lat, lon=lon))
    coarse = normalize(query.open(atlas_dir).lookup(lat, lon, interpolate=True))
    fine = normalize(query.open(regional_dir).lookup(lat, lon, interpolate=True))
    res = query.open(atlas_dir).resolutions()[-1]
    print(f"\nInterpolated lookups against the encoder: global res {res} vs regional res {REGION_RES}")
    for name, a, b in zip(("Paris", "Versailles", "Saint-Denis"), np.sum(coarse * exact, 1), np.sum(fine * exact, 1)):
        print(f"  {name:<12} {a:.4f}  {b:.5f}")


def main(argv: list[str] | None = None) -> int:
    from builder.build import build
    from builder.encoders import load_encoder
    from catalog.errors import HexatlasError
    from catalog.manifest import MANIFEST, dataset_name, validate_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo-atlas", help="atlas directory")
    parser.add_argument("--model", default="geoclip")
    parser.add_argument("--resolutions", default="0-3")
    parser.add_argument("--map", default=None, help="also draw the finest resolution to this PNG")
    parser.add_argument("--regional", default=None,
                        help="atlas directory of the regional layer (default: OUTPUT-paris); 'none' to skip it")
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
        _show(Path(args.output), dataset.name, encoder)
        if args.map:
            import query
            from query.mapping import render_png

            render_png(query.open(args.output), args.map, model=dataset.name)
            print(f"\nmap of the finest resolution, coloured by principal components: {args.map}")
        if args.regional != "none":
            _regional(Path(args.output), Path(args.regional or f"{args.output}-paris"), encoder)
    except HexatlasError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    print(f"\nTry: hexatlas info {args.output}; hexatlas similar {args.output} --lat 48.85 --lon 2.35 -k 5; "
          f"hexatlas sql {args.output} \"SELECT * FROM embeddings LIMIT 3\"")
    print(f"Serve the API and the interactive map page: hexatlas serve {args.output}   (then open http://127.0.0.1:8000/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
