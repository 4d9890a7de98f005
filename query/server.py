"""``hexatlas serve``: a read-only HTTP/JSON API and a map page over an atlas.

Built on FastAPI (the OpenAPI description is at ``/openapi.json``) and served by uvicorn.
What it offers is what :class:`query.Atlas` offers, minus SQL: health, info, lookup (one
point by GET, many by POST), similar-place search and the map layer the page draws. Every
input is checked; a bad one gets a 4xx answer whose ``detail`` says what is wrong. Request
bodies, batch lengths, ``k`` and concurrent connections are bounded (:class:`Limits`).

Cells travel as hex strings (``"8a2a1072b59ffff"``): JSON numbers cannot hold a uint64.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from catalog.cells import cell_to_hex, hex_to_cell
from catalog.errors import (
    AtlasChangedError,
    AtlasCorruptError,
    HexatlasError,
    InvalidArgumentError,
    MissingDependencyError,
    UnknownEncoderError,
    UnknownResolutionError,
)

try:
    import orjson
    from fastapi import Depends, FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException
except ImportError as exc:
    raise MissingDependencyError(f"hexatlas serve needs FastAPI: pip install 'hexatlas[serve]' ({exc})") from exc

__all__ = ["Limits", "configure_serve", "create_app", "run_serve", "serve"]

WEB_DIR = Path(__file__).with_name("web")
# Front-end files the page loads, all from packages npm installs into web/node_modules
# (query/web/package.json); the page fetches nothing from the internet.
VENDOR_FILES = {
    "deck.gl.min.js": "deck.gl/dist.min.js",
    "h3-js.umd.js": "h3-js/dist/h3-js.umd.js",
    "topojson-client.min.js": "topojson-client/dist/topojson-client.min.js",
    "land-110m.json": "world-atlas/land-110m.json",
}
NPM_INSTALL = "npm ci --legacy-peer-deps --no-audit --no-fund --prefix {dir}"
_ENV_ATLAS, _ENV_LIMITS = "HEXATLAS_SERVE_ATLAS", "HEXATLAS_SERVE_LIMITS"  # for worker processes
MAX_NAME = 64  # longest model name or dataset a request may give; errors may quote it
MAX_DETAIL = 480  # an error's detail is cut to this many characters
MAX_RES = 15  # H3's finest resolution
HALF_EARTH_KM = 20_016  # no two points on Earth are farther apart (pi * 6371.0088 km)


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request, and the server as a whole, may ask for."""

    max_body_bytes: int = 2 << 20
    max_points: int = 10_000
    max_k: int = 1_000
    max_connections: int = 256
    max_map_cells: int = 300_000  # cells in one /v1/map answer (query.mapping.MAX_MAP_CELLS at most)

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_points", "max_k", "max_connections", "max_map_cells"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise InvalidArgumentError(f"Limits.{name} must be a positive integer, got {getattr(self, name)!r}")


def _status(exc: HexatlasError) -> int:
    if isinstance(exc, (UnknownEncoderError, UnknownResolutionError)):
        return 404
    if isinstance(exc, AtlasChangedError):
        return 503
    if isinstance(exc, AtlasCorruptError):
        return 500
    return 400


class _BodyLimit:
    """ASGI middleware: answer 413 to a body over ``limit`` bytes, declared or streamed."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._reject(send)
        if declared is not None:
            return await self.app(scope, receive, send)
        # A streamed body (no Content-Length): read it here, up to the limit, then replay it.
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await self._reject(send)
            more = message.get("more_body", False)
        body = b"".join(chunks)

        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:  # later reads wait for the disconnect, as the server's own receive does
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _reject(self, send: Any) -> None:
        body = orjson.dumps({"detail": f"request body over {self.limit} bytes; send fewer points per request",
                             "error": "RequestTooLarge"})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class ErrorBody(BaseModel):
    """What every 4xx (and the rare 5xx) answer holds: never the request itself."""

    detail: str = Field(description="what is wrong and how to fix it, in one short sentence")
    error: str = Field(description="the kind of error, e.g. InvalidCoordinateError")


_ERROR_TEXT = {
    400: "bad coordinates, arguments or cell",
    404: "a model or resolution the atlas lacks",
    413: "request body over Limits.max_body_bytes",
    422: "malformed parameters or body: the field and the problem",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody, "description": _ERROR_TEXT[code]} for code in codes}


class Point(BaseModel):
    # Strict: a number is a number, not true/false or "1.5" (lax pydantic would coerce them).
    model_config = ConfigDict(extra="forbid", strict=True)
    lat: float = Field(description="latitude, degrees, -90..90")
    lon: float = Field(description="longitude, degrees, -180..180")


class LookupBatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    points: list[Point] = Field(min_length=1, description="at most Limits.max_points (default 10,000)")
    res: int | None = Field(None, ge=0, le=MAX_RES, description="H3 resolution (default: the finest built)")
    model: str | None = Field(None, max_length=MAX_NAME,
                              description="dataset, when the atlas holds several models")
    interpolate: bool = Field(False, description="blend the three nearest cell centres")
    exact: bool = Field(False, description="the encoder's embedding at each point (the atlas's exported encoder), "
                                           "not its cell's; not with interpolate")
    land: bool = Field(False, description="also say whether each point's cell touches land (the build's land mask)")
    on_invalid: str = Field("raise", pattern="^(raise|null)$",
                            description="bad or missing points: 400 (raise) or null results (null)")


class Embedding(BaseModel):
    cell: str | None
    embedding: list[float] | None
    land: bool | None = Field(None, description="with land=true: the cell touches land (null: no answer)")


class LookupOne(Embedding):
    model: str
    res: int
    lat: float
    lon: float


class LookupMany(BaseModel):
    model: str
    res: int
    results: list[Embedding]


class Neighbour(BaseModel):
    cell: str
    lat: float
    lon: float
    score: float = Field(description="cosine similarity to the query")


class SimilarResult(BaseModel):
    model: str
    res: int
    results: list[Neighbour]


class MapLevel(BaseModel):
    res: int
    source: str = Field(description="held (the atlas's cells), overview (stored coarse level) or averaged "
                                    "(the mean of held children, read in view)")


class MapData(BaseModel):
    model: str
    res: int = Field(description="the level drawn: the finest whose cells in view fit max_cells, or the one asked for")
    source: str = Field(description="held, overview or averaged (see levels)")
    from_res: int | None = Field(description="overview and averaged levels: the resolution whose cells they average")
    bbox: list[float] = Field(description="the view: min_lon, min_lat, max_lon, max_lat")
    max_cells: int = Field(description="the budget the answer was chosen for")
    cells: list[str]
    colors: list[int] = Field(description="r, g, b per cell, flattened, 0..255")
    explained_variance: list[float]
    levels: list[MapLevel] = Field(description="every level this dataset's map draws, finest first")


def create_app(atlas: Any, *, limits: Limits | None = None) -> Any:
    """The FastAPI application serving ``atlas`` (an :class:`query.Atlas` or a path)."""
    import query
    from query import mapping

    if not isinstance(atlas, query.Atlas):
        atlas = query.open(atlas)
    limits = limits or Limits()

    def respond(payload: Any) -> Response:
        # orjson writes numpy arrays directly: 10,000 x 512 floats in well under a second.
        return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")

    app = FastAPI(
        title="hexatlas", version=_version(),
        description="Read-only access to precomputed location embeddings on the H3 grid.",
        docs_url=None, redoc_url=None,  # their pages load scripts from a CDN; /openapi.json is served
        dependencies=[Depends(_one_value_each)],
    )
    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)
    app.state.atlas, app.state.limits = atlas, limits
    described: dict[str, tuple[Any, bytes]] = {}  # /v1/info's answer for the atlas served

    @app.exception_handler(HexatlasError)
    async def _domain_error(request: Request, exc: HexatlasError) -> JSONResponse:
        nonlocal atlas
        if isinstance(exc, AtlasChangedError):  # rebuilt under the server: serve the new one from now on
            with contextlib.suppress(HexatlasError, OSError):
                atlas = app.state.atlas = atlas.reopen()
            return JSONResponse({"detail": "the atlas was rebuilt while this request read it; send it again",
                                 "error": type(exc).__name__}, status_code=503, headers={"Retry-After": "0"})
        return JSONResponse({"detail": _clip(str(exc), MAX_DETAIL), "error": type(exc).__name__},
                            status_code=_status(exc))

    @app.exception_handler(RequestValidationError)
    async def _malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler answers with every error's ``input``: the whole body, again.
        return JSONResponse({"detail": _describe(exc.errors()), "error": "RequestValidationError"},
                            status_code=422)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Starlette's own: unknown paths, wrong methods, a body that cannot be read as text.
        from http import HTTPStatus

        return JSONResponse({"detail": _clip(str(exc.detail), MAX_DETAIL),
                             "error": HTTPStatus(exc.status_code).phrase},
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this answer; the client gets no internals.
        return JSONResponse({"detail": "internal error; the server's log has the details",
                             "error": "InternalError"}, status_code=500)

    res_query = Query(None, ge=0, le=MAX_RES, description="H3 resolution, 0..15 (default: the finest built)")
    model_query = Query(None, max_length=MAX_NAME, description="dataset, when the atlas holds several models")

    @app.get("/v1/health", tags=["atlas"])
    def health() -> dict[str, Any]:
        """Liveness: the models served and whether the map page's front-end files are installed."""
        return {"status": "ok", "models": atlas.models, "map_page": _missing_vendor() == []}

    @app.get("/v1/info", tags=["atlas"])
    def info() -> Response:
        """Per model: provenance, dimension, precision, resolutions with cell counts and index."""
        held = described.get("atlas")
        if held is None or held[0] is not atlas:  # the same until the atlas is reopened: the page's first call
            out = atlas.info()
            for entry in out.values():
                entry.pop("path", None)  # the server's file system is nobody's business
            held = described["atlas"] = (atlas, orjson.dumps(out))
        return Response(held[1], media_type="application/json")

    @app.get("/v1/lookup", response_model=LookupOne, tags=["lookup"], responses=_errors(400, 404, 422))
    def lookup_one(lat: float = Query(description="latitude, degrees"),
                   lon: float = Query(description="longitude, degrees"),
                   res: int | None = res_query, model: str | None = model_query,
                   interpolate: bool = False,
                   exact: bool = Query(False, description="the encoder's embedding at the point (the atlas's "
                                                          "exported encoder), not its cell's; not with interpolate"),
                   land: bool = Query(False, description="also say whether the point's cell touches land")
                   ) -> Response:
        """The embedding at one point."""
        name = atlas._name(model)
        r = atlas._res(res, name)
        table = atlas.join(_points([lat], [lon]), res=r, model=name, interpolate=interpolate, exact=exact, land=land)
        return respond({"model": name, "res": r, "lat": lat, "lon": lon,
                        "cell": cell_to_hex(table.column("cell")[0].as_py()),
                        "embedding": _matrix(table)[0],
                        **({"land": table.column("land")[0].as_py()} if land else {})})

    @app.post("/v1/lookup", response_model=LookupMany, tags=["lookup"], responses=_errors(400, 404, 413, 422))
    def lookup_many(body: LookupBatch) -> Response:
        """Embeddings at up to ``max_points`` points, in order."""
        if len(body.points) > limits.max_points:
            raise InvalidArgumentError(f"{len(body.points):,} points in one request; the limit is "
                                       f"{limits.max_points:,}: split the batch")
        name = atlas._name(body.model)
        r = atlas._res(body.res, name)
        table = atlas.join(_points([p.lat for p in body.points], [p.lon for p in body.points]), res=r,
                           model=name, interpolate=body.interpolate, on_invalid=body.on_invalid, exact=body.exact,
                           land=body.land)
        cells = table.column("cell").to_pylist()
        emb = _matrix(table)
        results = [{"cell": None, "embedding": None} if c is None else {"cell": cell_to_hex(c), "embedding": e}
                   for c, e in zip(cells, emb)]
        if body.land:
            for result, flag in zip(results, table.column("land").to_pylist()):
                result["land"] = flag
        return respond({"model": name, "res": r, "results": results})

    @app.get("/v1/similar", response_model=SimilarResult, tags=["search"], responses=_errors(400, 404, 422))
    def similar(lat: float | None = None, lon: float | None = None,
                cell: str | None = Query(None, max_length=32, description="H3 cell (hex) instead of lat/lon"),
                k: int = Query(10, ge=1, le=limits.max_k), res: int | None = res_query,
                model: str | None = model_query,
                bbox: str | None = Query(None, max_length=128, description="min_lon,min_lat,max_lon,max_lat"),
                exclude_within_km: float | None = Query(None, ge=0, le=HALF_EARTH_KM, allow_inf_nan=False),
                land_only: bool = Query(False, description="keep cells that touch land (a global atlas)")
                ) -> Response:
        """The ``k`` cells most similar to a place or a cell (cosine), best first."""
        name = atlas._name(model)
        r = atlas._res(res, name)
        table = atlas.similar(lat=lat, lon=lon, cell=None if cell is None else _cell(cell), k=k, res=r,
                              model=name, bbox=_bbox(bbox),
                              exclude_within_km=exclude_within_km, land_only=land_only)
        rows = [{**row, "cell": cell_to_hex(row["cell"])} for row in table.to_pylist()]
        return respond({"model": name, "res": r, "results": rows})

    @app.get("/v1/map", response_model=MapData, tags=["map"], responses=_errors(400, 404, 422))
    def map_data(res: int | None = Query(None, ge=0, le=MAX_RES, description="this level only (default: the finest "
                                                                             "whose cells in view fit max_cells)"),
                 model: str | None = model_query,
                 bbox: str | None = Query(None, max_length=128, description="the view, min_lon,min_lat,max_lon,"
                                          "max_lat (default: the globe; min_lon > max_lon crosses the antimeridian)"),
                 max_cells: int | None = Query(None, ge=1, le=1 << 31,
                                               description="most cells in the answer (default and at most "
                                                           "Limits.max_map_cells, 300,000)"),
                 max_res: int | None = Query(None, ge=0, le=MAX_RES, description="no level finer than this (the "
                                             "finest whose cells the picture shows at a few pixels)")) -> Response:
        """The cells of a view coloured by the first three principal components of the embeddings
        (the dataset's basis), at the finest level whose cells in view fit ``max_cells``."""
        most = min(limits.max_map_cells, mapping.MAX_MAP_CELLS)
        layer = mapping.map_view(atlas, _bbox(bbox), max_cells=min(max_cells or most, most), res=res,
                                 max_res=max_res, model=model)
        levels = [{"res": r, "source": s} for r, s in mapping.map_levels(atlas, layer.model).items()]
        return respond({"model": layer.model, "res": layer.res, "source": layer.source, "from_res": layer.from_res,
                        "bbox": list(layer.bbox), "max_cells": min(max_cells or most, most),
                        "cells": [cell_to_hex(c) for c in layer.cells.tolist()], "colors": layer.rgb.ravel(),
                        "explained_variance": list(layer.explained), "levels": levels})

    @app.get("/", include_in_schema=False)
    def page() -> Response:
        missing = _missing_vendor()
        if missing:
            return HTMLResponse(
                "<h1>hexatlas: the map page's front-end packages are not installed</h1>"
                f"<p>Missing: {', '.join(missing)}. Run <code>{NPM_INSTALL.format(dir=WEB_DIR)}</code> "
                "(<code>make setup</code> does this), then reload. The API under /v1 works without them.</p>",
                status_code=503)
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name in VENDOR_FILES:
            path = WEB_DIR / "node_modules" / VENDOR_FILES[name]
        elif name in ("app.js", "style.css"):
            path = WEB_DIR / name
        else:
            return JSONResponse({"detail": f"no static file {name!r}"}, status_code=404)
        if not path.is_file():
            return JSONResponse({"detail": f"{name} is not installed: run {NPM_INSTALL.format(dir=WEB_DIR)}"},
                                status_code=404)
        return FileResponse(path)

    return app


def _points(lat: list[float], lon: list[float]) -> Any:
    import pyarrow as pa

    return pa.table({"lat": pa.array(lat, pa.float64()), "lon": pa.array(lon, pa.float64())})


def _matrix(table: Any) -> list[Any]:
    """The embedding column as a list of float32 rows (None for null rows)."""
    from catalog.tables import embedding_matrix

    column = table.column("embedding")
    if column.null_count == 0:
        return list(embedding_matrix(column))
    return [None if v is None else np.asarray(v, dtype=np.float32) for v in column.to_pylist()]


_QUERY_NAMES = {"lat", "lon", "res", "model", "interpolate", "exact", "land", "cell", "k", "bbox", "exclude_within_km",
                "land_only", "max_cells", "max_res"}


def _one_value_each(request: Request) -> None:
    """Refuse a repeated query parameter: which of ``lat=1&lat=2`` was meant is anyone's guess."""
    # Only the parameters the API reads: others are ignored, repeated or not.
    repeated = sorted({k for k in request.query_params
                       if k in _QUERY_NAMES and len(request.query_params.getlist(k)) > 1})
    if repeated:
        raise RequestValidationError([
            {"type": "repeated", "loc": ("query", name),
             "msg": f"given {len(request.query_params.getlist(name))} times; give it once"}
            for name in repeated])


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit - 1]}\u2026"


def _describe(errors: Any) -> str:
    """FastAPI's validation errors as one short line: where, and what is wrong; no inputs."""
    errors = list(errors)
    parts = []
    for error in errors[:3]:
        where = ".".join(_clip(str(p), 32) for p in error.get("loc", ()))
        what = error.get("msg", "invalid")
        if error.get("type") == "json_invalid":
            what = f"not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
        parts.append(f"{where}: {_clip(str(what), 120)}")
    more = f"; and {len(errors) - 3} more" if len(errors) > 3 else ""
    return "; ".join(parts) + more if parts else "malformed request"


def _cell(text: str) -> int:
    """An H3 cell id from a request's hex string, refusing anything that is not a valid cell."""
    import h3.api.basic_int as h3i

    cid = hex_to_cell(text)
    if not 0 < cid < 1 << 64 or not h3i.is_valid_cell(cid):
        raise InvalidArgumentError(f"{text!r} is not an H3 cell (hex string like 831fb4fffffffff)")
    return cid


def _bbox(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not all(np.isfinite(values)):
        raise InvalidArgumentError(f"bbox {text!r}: give four numbers min_lon,min_lat,max_lon,max_lat")
    return values


def _missing_vendor() -> list[str]:
    return [rel for rel in VENDOR_FILES.values() if not (WEB_DIR / "node_modules" / rel).is_file()]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hexatlas")
    except PackageNotFoundError:
        return "0+unknown"


def serve(atlas: Any, *, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
          workers: int = 1) -> None:
    """Serve ``atlas`` until interrupted. Binds to loopback unless ``host`` says otherwise.

    ``workers`` > 1 runs that many server processes on one socket (uvicorn's process
    manager); each opens the atlas itself, so ``atlas`` must then be a path or URI. They
    share the decoded, memory-mapped embeddings through the operating system's page cache.
    """
    try:
        import uvicorn
    except ImportError as exc:
        raise MissingDependencyError("hexatlas serve needs uvicorn: pip install 'hexatlas[serve]'") from exc
    limits = limits or Limits()
    options = {"host": host, "port": port, "log_level": "warning", "limit_concurrency": limits.max_connections}
    if workers == 1:
        uvicorn.run(create_app(atlas, limits=limits), **options)
        return
    if not isinstance(atlas, (str, os.PathLike)):
        raise InvalidArgumentError("serving with several workers needs the atlas's path or URI, not an opened Atlas")
    os.environ[_ENV_ATLAS] = os.fspath(atlas)
    os.environ[_ENV_LIMITS] = json.dumps(asdict(limits))
    uvicorn.run("query.server:_app_from_environment", factory=True, workers=workers, **options)


def _app_from_environment() -> Any:
    """The app factory each worker process of :func:`serve` calls."""
    return create_app(os.environ[_ENV_ATLAS], limits=Limits(**json.loads(os.environ[_ENV_LIMITS])))


def _check_bindable(host: str, port: int) -> None:
    """Fail with one clear line, before announcing anything, when the address cannot be bound."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InvalidArgumentError(f"--host {host!r} is not an address of this machine ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind(address)
        except OSError as exc:
            raise InvalidArgumentError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port "
                                       "(or stop what is using it)") from None


def configure_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("atlas", help="atlas directory (or one dataset directory)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-points", type=int, default=Limits.max_points, help="most points per POST /v1/lookup")
    parser.add_argument("--max-map-cells", type=int, default=Limits.max_map_cells,
                        help="most cells in one /v1/map answer (default 300,000)")
    parser.add_argument("--workers", type=int, default=1, help="server processes sharing the port (default 1)")


def run_serve(args: argparse.Namespace) -> int:
    import query

    if not 0 < args.port < 65536:
        raise InvalidArgumentError(f"--port must be 1..65535, got {args.port}")
    if not 1 <= args.workers <= 64:
        raise InvalidArgumentError(f"--workers must be 1..64, got {args.workers}")
    atlas = query.open(args.atlas)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"hexatlas serve: warning: binding {args.host}: anyone who can reach this machine can read the atlas",
              file=sys.stderr)
    _check_bindable(args.host, args.port)
    if _missing_vendor():
        print(f"hexatlas serve: the map page needs its front-end packages: {NPM_INSTALL.format(dir=WEB_DIR)}",
              file=sys.stderr)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {atlas!r} at http://{shown}:{args.port}/ (API under /v1, OpenAPI at /openapi.json)"
          f"{f' with {args.workers} worker processes' if args.workers > 1 else ''}; Ctrl-C stops", file=sys.stderr)
    serve(atlas if args.workers == 1 else args.atlas, host=args.host, port=args.port,
          limits=Limits(max_points=args.max_points, max_map_cells=args.max_map_cells), workers=args.workers)
    return 0
