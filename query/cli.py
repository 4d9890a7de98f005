"""Query-side commands of the ``hexatlas`` CLI (dispatched from :mod:`catalog.cli`); no torch."""

from __future__ import annotations

import argparse
import json
import sys

import pyarrow as pa

from query.output import FORMATS, emit

__all__ = [f"{verb}_{cmd}" for cmd in ("info", "lookup", "join", "similar", "sql", "validate")
           for verb in ("configure", "run")]


def _atlas_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("atlas", help="atlas directory, s3://BUCKET/PREFIX, https://HOST/PATH or "
                        "hf://datasets/ORG/NAME[@REVISION] (or one dataset in any of them)")


def _format_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")


def _place_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--res", type=int, default=None, help="H3 resolution (default: the finest built)")
    parser.add_argument("--model", default=None, help="dataset, when the atlas holds several models")


def _land_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--land", action="store_true",
                        help="add a land column: whether each point's cell touches land (the build's land mask)")


def _exact_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exact", action="store_true",
                        help="the encoder's embedding at each point, from the encoder the atlas stores (needs "
                             "pip install 'hexatlas[exact]'), instead of its cell's; --res then only picks the cell")


def configure_info(parser: argparse.ArgumentParser) -> None:
    _atlas_arg(parser)
    parser.add_argument("--format", choices=("table", "json"), default="table")


def run_info(args: argparse.Namespace) -> int:
    import query

    info = query.open(args.atlas).info()
    if args.format == "json":
        print(json.dumps(info, indent=1))
        return 0
    for name, d in info.items():
        prov = d["provenance"]
        region = f", region {tuple(d['region']['bbox'])}" if d.get("region") else ""
        print(f"{name}: {d['model']} {d['dim']}-d, {d['precision']}{', land only' if d['land_only'] else ''}{region}, "
              f"built {d['created']}, format {d['format_version']}")
        if "source" in d:
            src = d["source"]
            pin = f", commit {src['commit']} (asked for {src['revision']})" if src.get("commit") else (
                f", revision {src['revision']}" if src.get("revision") else "")
            etag = f", ETag {src['etag']}" if src.get("etag") else ""
            print(f"  read from {src.get('url', d['path'])}{pin}{etag}, manifest sha256 {src['manifest_sha256'][:12]}...")
        print(f"  weights: {prov['source']} (sha256 {prov['sha256'][:12]}...), {prov['licence']}")
        ex = d["exact"]
        print(f"  exact (--exact): {ex['path']}, {ex['bytes'] / 1e6:.1f} MB, ONNX opset {ex['opset']}, max diff to torch "
              f"{ex['parity']['max_abs_diff']:.1g}" if ex["available"] else f"  exact (--exact): unavailable: {ex['reason']}")
        for r, ri in d["resolutions"].items():
            zarr = " + Zarr" if ri["zarr"] else ""
            ix = ri["index_detail"]
            size = f", {ix['bytes_per_cell']} B a cell" if "bytes_per_cell" in ix else ""
            placed = f" (with a place: {ix['nprobe_placed']})" if ix.get("nprobe_placed", ix.get("nprobe")) != ix.get("nprobe") else ""
            probe = f", nprobe {ix['nprobe']}{placed}, re-rank x{ix['rerank']}" if not ix.get("exact", True) else ""
            print(f"  res {r}: {ri['cells']:,} cells in {ri['parts']} part{'s' * (ri['parts'] != 1)}{zarr}, "
                  f"index {ri['index']} (recall@10 {ri['recall_at_10']}{probe}{size}){_fidelity_text(ri.get('fidelity'))}")
            if ix.get("recall"):
                print("    recall@10 (lower bound) / @100 by query kind: " + ", ".join(
                    f"{kind} {m['at_10']:.3f} ({m['at_10_lower_bound']:.3f}) / {m['at_100']:.3f}"
                    for kind, m in ix["recall"].items()))
    return 0


def _fidelity_text(fidelity: dict | None) -> str:
    """The info line's fidelity column: mean (5th percentile) cosine to the encoder, cell and interpolated."""
    if not fidelity:
        return ", fidelity not measured (built before hexatlas measured it)"
    cell, interp = fidelity["cell"], fidelity["interpolated"]
    if cell["mean_cosine"] is None:
        return f", fidelity: none of {fidelity['points']:,} points answered"
    return (f", cosine to encoder cell {cell['mean_cosine']:.4f} (p05 {cell['p05_cosine']:.4f}), "
            f"interpolated {interp['mean_cosine']:.4f} (p05 {interp['p05_cosine']:.4f}) at {fidelity['points']:,} points")


def configure_lookup(parser: argparse.ArgumentParser) -> None:
    _atlas_arg(parser)
    parser.add_argument("--lat", type=float, required=True, nargs="+", help="latitude(s), degrees")
    parser.add_argument("--lon", type=float, required=True, nargs="+", help="longitude(s), degrees")
    parser.add_argument("--interpolate", action="store_true", help="blend the three nearest cell centres")
    _exact_arg(parser)
    _land_arg(parser)
    _place_args(parser)
    _format_arg(parser)


def run_lookup(args: argparse.Namespace) -> int:
    import query
    from catalog.errors import InvalidCoordinateError

    if len(args.lat) != len(args.lon):
        raise InvalidCoordinateError(f"--lat has {len(args.lat)} values but --lon has {len(args.lon)}")
    table = query.open(args.atlas).join(pa.table({"lat": args.lat, "lon": args.lon}), res=args.res, model=args.model,
                                        interpolate=args.interpolate, exact=args.exact, land=args.land)
    emit(table, args.format)
    return 0


def configure_join(parser: argparse.ArgumentParser) -> None:
    _atlas_arg(parser)
    parser.add_argument("--input", required=True,
                        help="points: .csv, .parquet or GeoParquet; with GeoPandas also .gpkg, .geojson, .fgb, .shp")
    parser.add_argument("--output", required=True,
                        help=".parquet (embedding as a list column; GeoParquet when the input has a geometry) or .csv")
    parser.add_argument("--lat-col", default=None,
                        help="latitude column, degrees (default: lat, else the input's point geometry)")
    parser.add_argument("--lon-col", default=None,
                        help="longitude column, degrees (default: lon, else the input's point geometry)")
    parser.add_argument("--interpolate", action="store_true", help="blend the three nearest cell centres")
    parser.add_argument("--on-invalid", choices=("raise", "null"), default="raise",
                        help="bad coordinates or geometries: fail (default) or give null cell and embedding")
    parser.add_argument("--batch-rows", type=int, default=None,
                        help="rows read, looked up and written at a time (default: what joins in about 64 MB)")
    parser.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    _exact_arg(parser)
    _land_arg(parser)
    _place_args(parser)


def run_join(args: argparse.Namespace) -> int:
    import query

    rows = query.open(args.atlas).join_file(
        args.input, args.output, lat_col=args.lat_col, lon_col=args.lon_col, res=args.res, model=args.model,
        interpolate=args.interpolate, on_invalid=args.on_invalid, exact=args.exact, land=args.land,
        batch_rows=args.batch_rows, progress=False if args.no_progress else None)
    print(f"wrote {rows:,} rows to {args.output}", file=sys.stderr)
    return 0


def configure_similar(parser: argparse.ArgumentParser) -> None:
    _atlas_arg(parser)
    parser.add_argument("--lat", type=float)
    parser.add_argument("--lon", type=float)
    parser.add_argument("--cell", help="H3 cell (hex) instead of --lat/--lon")
    parser.add_argument("-k", "--k", type=int, default=10, help="how many results (default 10)")
    parser.add_argument("--bbox", help="keep results inside min_lon,min_lat,max_lon,max_lat")
    parser.add_argument("--exclude-within-km", type=float, help="drop results this close to the query place")
    parser.add_argument("--land-only", action="store_true", help="keep cells that touch land (a global atlas)")
    _place_args(parser)
    _format_arg(parser)


def run_similar(args: argparse.Namespace) -> int:
    import query
    from catalog.errors import InvalidArgumentError

    bbox = None
    if args.bbox:
        try:
            bbox = tuple(float(v) for v in args.bbox.split(","))
        except ValueError:
            raise InvalidArgumentError(f"--bbox {args.bbox!r}: give four numbers min_lon,min_lat,max_lon,max_lat") from None
    table = query.open(args.atlas).similar(lat=args.lat, lon=args.lon, cell=args.cell, k=args.k, res=args.res,
                                           model=args.model, bbox=bbox, exclude_within_km=args.exclude_within_km,
                                           land_only=args.land_only)
    emit(table, args.format)
    return 0


def configure_sql(parser: argparse.ArgumentParser) -> None:
    _atlas_arg(parser)
    parser.add_argument("query", help="SQL over the view 'embeddings' (cell, res, lat, lon, embedding)")
    _format_arg(parser)


def run_sql(args: argparse.Namespace) -> int:
    import query

    emit(query.open(args.atlas).sql(args.query), args.format)
    return 0


def configure_validate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("atlas", help="atlas directory, s3://BUCKET/PREFIX, https://HOST/PATH or hf://datasets/ORG/NAME "
                        "(all its datasets), or one dataset (over HTTP, extra files cannot be seen)")


def run_validate(args: argparse.Namespace) -> int:
    from catalog.manifest import MANIFEST, list_datasets, validate_dataset
    from catalog.storage import open_store

    root = open_store(args.atlas)
    datasets = [root] if root.exists(MANIFEST) else [root.child(name) for name in list_datasets(root)]
    if not datasets:
        print(f"hexatlas validate: {root}: no finished datasets (no {MANIFEST} in any subdirectory)", file=sys.stderr)
        return 1
    failed = 0
    for dataset in datasets:
        problems = validate_dataset(dataset)
        failed += bool(problems)
        for line in problems:
            print(f"{dataset}: {line}")
        if not problems:
            print(f"{dataset}: ok")
    return 1 if failed else 0
