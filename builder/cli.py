"""Builder commands of the ``hexatlas`` CLI (dispatched from :mod:`catalog.cli`)."""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["configure_build", "configure_encode", "configure_models", "run_build", "run_encode", "run_models"]


def _add_encoder_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="geoclip", help="encoder name (see 'hexatlas models') or module:callable")
    parser.add_argument("--checkpoint", help="local weights file instead of the published ones")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a checkpoint that needs full unpickling (can run code from the file)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=None, help="points per forward pass")


def configure_models(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "SatCLIP weights come from the Hugging Face Hub (or --checkpoint); GeoCLIP's from its wheel."


def run_models(args: argparse.Namespace) -> int:
    from builder.encoders import encoder_spec, list_encoders

    for name in list_encoders():
        spec = encoder_spec(name)
        print(f"{name:<22} {spec.dim if spec else '?':>4}  {spec.summary if spec else 'plugin (hexatlas.encoders)'}")
    return 0


def configure_encode(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default=None, choices=["float32", "float64", "float16", "bfloat16"],
                        help="compute dtype of the network (default float32)")
    parser.add_argument("--input", required=True,
                        help="points: .csv, .parquet or GeoParquet; with GeoPandas also .gpkg, .geojson, .fgb, .shp")
    parser.add_argument("--output", required=True, help="output .parquet: the input columns plus 'embedding' "
                        "(GeoParquet when the input has a geometry)")
    parser.add_argument("--lat-col", default=None,
                        help="latitude column, degrees (default: lat, else the input's point geometry)")
    parser.add_argument("--lon-col", default=None,
                        help="longitude column, degrees (default: lon, else the input's point geometry)")
    parser.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    _add_encoder_options(parser)


def run_encode(args: argparse.Namespace) -> int:
    from builder.points import encode_file

    start = time.perf_counter()
    table = encode_file(
        args.input, args.output, args.model, lat_col=args.lat_col, lon_col=args.lon_col, batch_size=args.batch_size,
        progress=False if args.no_progress else None, checkpoint=args.checkpoint, device=args.device,
        dtype=args.dtype, trust_checkpoint=args.trust_checkpoint,
    )
    dim = table.schema.field("embedding").type.list_size
    print(f"wrote {table.num_rows:,} {dim}-d embeddings ({args.model}) to {args.output} "
          f"in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def configure_build(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True,
                        help="atlas directory or s3://BUCKET/PREFIX (the dataset goes to OUTPUT/<model>/)")
    parser.add_argument("--resolutions", default="0-3",
                        help="H3 resolutions: a range 0-5, a list 3,5, or both; or auto (with --min-cosine): the "
                             "coarsest that is close enough to the encoder, auto:0 with its coarser ones from 0")
    parser.add_argument("--min-cosine", type=float, default=None,
                        help="with --resolutions auto: the interpolated mean cosine to the encoder to reach "
                             "(measured at random points before building; e.g. 0.99)")
    parser.add_argument("--land-only", action="store_true", help="keep only cells that touch land")
    parser.add_argument("--region", default=None,
                        help="keep only cells touching this area: MINLON,MINLAT,MAXLON,MAXLAT (MINLON > MAXLON "
                             "crosses the antimeridian) or a GeoJSON file of polygons; resolutions up to 10")
    parser.add_argument("--precision", default="float16", choices=["float16", "float32", "int8"],
                        help="storage of the embeddings (default float16)")
    parser.add_argument("--formats", default="parquet",
                        help="faces to write, comma-separated: parquet (the store: plain Parquet, always written), "
                             "zarr (adds a Zarr store per resolution for xarray/xdggs: a second copy)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset of this model (built beside it, swapped in when complete)")
    parser.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    parser.add_argument("--executor", default="local", choices=["local", "ray"],
                        help="run shards in this process (default) or as Ray tasks (pip install 'hexatlas[ray]')")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to join (ray://HOST:10001, HOST:6379 or auto; default: $RAY_ADDRESS, "
                             "else a new local Ray)")
    parser.add_argument("--break-lock", action="store_true",
                        help="first remove the lock a dead build left on an s3:// dataset (only when none runs)")
    _add_encoder_options(parser)


def _auto_resolutions(args: argparse.Namespace, region: object) -> tuple[str, object]:
    """``--resolutions auto[:LOW]``: measure the encoder, choose, and say why; returns the
    resolutions to build and the loaded encoder."""
    import re

    from builder.encoders import load_encoder
    from builder.fidelity import choose_resolution
    from catalog.errors import InvalidArgumentError

    match = re.fullmatch(r"auto(?::(\d+))?", args.resolutions.strip())
    if match is None:
        raise InvalidArgumentError(f"--resolutions {args.resolutions!r}: write auto, or auto:LOW to add the coarser "
                                   "resolutions from LOW")
    if args.min_cosine is None:
        raise InvalidArgumentError("--resolutions auto needs --min-cosine (the interpolated mean cosine to reach, "
                                   "e.g. 0.99)")
    encoder = load_encoder(args.model, checkpoint=args.checkpoint, device=args.device, batch_size=args.batch_size,
                           trust_checkpoint=args.trust_checkpoint)
    print(f"measuring {encoder.name} at random points{' on land' if args.land_only else ''}"
          f"{' in the region' if region is not None else ''} (what each resolution's atlas would return):",
          file=sys.stderr)
    res = choose_resolution(encoder, args.min_cosine, precision=args.precision, land_only=args.land_only,
                            region=region, report=lambda line: print(f"  {line}", file=sys.stderr))
    low = match[1]
    if low is not None and int(low) > res:
        raise InvalidArgumentError(f"--resolutions auto:{low}: the chosen resolution {res} is coarser than {low}")
    chosen = f"{low}-{res}" if low is not None else str(res)
    print(f"chose resolution {res}: the coarsest whose interpolated mean cosine reaches {args.min_cosine}"
          f"{f'; building {chosen}' if low is not None else ''}", file=sys.stderr)
    return chosen, encoder


def run_build(args: argparse.Namespace) -> int:
    from builder.build import build
    from catalog.errors import InvalidArgumentError

    region = None
    if args.region is not None:
        from builder.region import parse_region

        region = parse_region(args.region)
    resolutions, encoder = args.resolutions, None
    if args.resolutions.strip().startswith("auto"):
        resolutions, encoder = _auto_resolutions(args, region)
    elif args.min_cosine is not None:
        raise InvalidArgumentError("--min-cosine goes with --resolutions auto")
    summary = build(
        args.model, resolutions=resolutions, output=args.output, checkpoint=args.checkpoint,
        land_only=args.land_only, device=args.device, precision=args.precision, batch_size=args.batch_size,
        overwrite=args.overwrite, trust_checkpoint=args.trust_checkpoint,
        progress=False if args.no_progress else None, executor=args.executor, ray_address=args.ray_address,
        formats=args.formats, region=region, encoder=encoder, break_lock=args.break_lock,
    )
    print(f"built {summary}", file=sys.stderr)
    return 0
