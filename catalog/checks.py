"""What an atlas says is its publisher's word: every name and number checked where it enters.

An atlas is published once and opened by strangers (``hf://``, ``https://``, ``s3://``), so
its manifest, its ``atlas.json`` and its binary files are untrusted input. This module is
the one place where the names and numbers of a manifest are checked, when it is read
(:func:`catalog.manifest.read_manifest`), before any file it names is read or written:

- **Names.** Every path is relative, ``/``-separated, made of segments of letters, digits and
  ``._=-`` that do not start with a dot (so no ``..``, ``.``, empty segments, backslashes,
  drive letters, control characters or percent-escapes), and lies in the part of the format's
  layout its field belongs to (parts under ``data/res=<r>/``, block tables under
  ``blocks/res=<r>/``, the index under ``index/``...). Dataset names (a folder, or an entry of
  ``atlas.json``) are one such segment. :func:`inside` checks that a local path, once every
  link in it is resolved, stays in its folder (a dataset's, or the cache's).
- **Numbers.** Counts and sizes are bounded and consistent before memory or disk is sized
  from them: cells per resolution at most the H3 count, parts sorted and disjoint with rows
  summing to the cells, the dimension and precision within the format's, each file's size
  within what its counts imply (so nothing downloaded or read whole is larger than the
  atlas justifies).

A violation raises :class:`~catalog.errors.UnsafeAtlasError` (a path) or
:class:`~catalog.errors.AtlasCorruptError` (a number), naming the field and the value.
Binary files are checked where they are parsed: block tables in :mod:`catalog.blocks`, FAISS
indexes in :mod:`catalog.index_file`, the exported encoder in :mod:`query.exact`.
"""

from __future__ import annotations

import math
import re
from typing import Any

from catalog.errors import AtlasCorruptError
from catalog.paths import safe_relpath

__all__ = ["MAX_DIM", "MAX_MANIFEST_BYTES", "check_colors", "check_manifest", "h3_cells"]

MAX_MANIFEST_BYTES = 64 << 20  # a resolution-8 manifest of 842 parts is ~0.5 MB
MAX_DIM = 8192  # SatCLIP 256, GeoCLIP 512: room for larger encoders, not for a hostile allocation
MAX_RES = 15
MAX_FILES = 1 << 22
MAX_NLIST = 1 << 20
MAX_RERANK = 1024
MAX_RECALL_KINDS = 32  # kinds of query an index records its recall for
MAX_ONNX_BYTES = 2 << 30  # protobuf's own limit on one message
STORED_ITEMSIZE = {"float16": 2, "float32": 4, "int8": 1}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_INDEX_TYPE = re.compile(r"IVF(\d+),PQ(\d+)")


def h3_cells(res: int) -> int:
    """The number of H3 cells at resolution ``res``: 2 + 120 * 7**res."""
    return 2 + 120 * 7 ** res


# ---------------------------------------------------------------- the manifest
class _Check:
    """Helpers that raise an :class:`AtlasCorruptError` naming the field (``where``: the manifest)."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field: str, value: Any, why: str) -> AtlasCorruptError:
        shown = repr(value) if len(repr(value)) <= 120 else repr(value)[:117] + "..."
        return AtlasCorruptError(f"{self.where}: {field} = {shown} {why}; the manifest is damaged or was not "
                                 "written by hexatlas (run 'hexatlas validate', or ask its publisher)")

    def dict(self, value: Any, field: str, *, optional: bool = False) -> dict[str, Any]:
        if value is None and optional:
            return {}
        if not isinstance(value, dict):
            raise self.fail(field, value, "is not an object")
        return value

    def list(self, value: Any, field: str, limit: int) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(field, value, "is not a list")
        if len(value) > limit:
            raise self.fail(field, f"<{len(value)} entries>", f"has more than {limit:,} entries")
        return value

    def int(self, value: Any, field: str, lo: int, hi: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise self.fail(field, value, f"is not an integer from {lo:,} to {hi:,}")
        return value

    def str(self, value: Any, field: str, *, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or len(value) > 4096:
            raise self.fail(field, value, "is not a (short) string")
        return value

    def bool(self, value: Any, field: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(field, value, "is not true or false")
        return value

    def number(self, value: Any, field: str) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise self.fail(field, value, "is not a finite number")
        return float(value)


def check_manifest(manifest: dict[str, Any], where: str) -> dict[str, Any]:
    """Check a manifest's names and numbers (its format and version already checked); returns it.

    Everything the readers take from a manifest is checked here, once: after this, a
    missing key or a wrong type cannot reach them, and no count they size memory or a
    download from exceeds what the format allows or the manifest's own files justify.

    Raises
    ------
    UnsafeAtlasError
        A path outside the dataset's layout.
    AtlasCorruptError
        A missing or mistyped field, a count out of bounds or inconsistent with another.
    """
    c = _Check(where)
    c.int(manifest.get("generation", 0), "generation", 0, 1 << 31)
    precision = manifest.get("precision")
    if precision not in STORED_ITEMSIZE:
        raise c.fail("precision", precision, f"is not one of {', '.join(STORED_ITEMSIZE)}")
    prov = c.dict(manifest.get("provenance"), "provenance")
    dim = c.int(prov.get("dim"), "provenance.dim", 1, MAX_DIM)
    for key in ("model", "source", "sha256", "licence", "paper"):
        c.str(prov.get(key), f"provenance.{key}")
    c.str(manifest.get("created"), "created")
    build = c.dict(manifest.get("build"), "build")
    c.bool(build.get("land_only"), "build.land_only")
    region = c.dict(build.get("region"), "build.region", optional=True)
    if region:
        box = c.list(region.get("bbox"), "build.region.bbox", 4)
        if len(box) != 4:
            raise c.fail("build.region.bbox", box, "is not 4 numbers")
        for i, v in enumerate(box):
            c.number(v, f"build.region.bbox[{i}]")
    quant = manifest.get("quantization")
    if (quant is not None) != (precision == "int8"):
        raise c.fail("quantization", quant, f"does not go with precision {precision!r} (int8 needs it, floats not)")
    if quant is not None:
        quant = c.dict(quant, "quantization")
        for key in ("scale", "offset"):
            values = c.list(quant.get(key), f"quantization.{key}", dim)
            if len(values) != dim:
                raise c.fail(f"quantization.{key}", f"<{len(values)} numbers>", f"does not hold {dim} numbers")
            for v in values:
                c.number(v, f"quantization.{key}[]")
    files = _check_files(c, manifest.get("files"))
    value_bytes = dim * STORED_ITEMSIZE[precision]
    resolutions = c.dict(manifest.get("resolutions"), "resolutions")
    if len(resolutions) > MAX_RES + 1:
        raise c.fail("resolutions", f"<{len(resolutions)} entries>", f"has more than {MAX_RES + 1}")
    for key, info in resolutions.items():
        if not isinstance(key, str) or not key.isdigit() or int(key) > MAX_RES or str(int(key)) != key:
            raise c.fail("resolutions", key, f"is not an H3 resolution (0 to {MAX_RES})")
        _check_resolution(c, int(key), c.dict(info, f"resolutions.{key}"), files, dim, value_bytes, precision)
    _check_encoder(c, manifest, files, dim)
    if manifest.get("colors") is not None:
        _check_colors(c, manifest["colors"], dim)
    _check_overview(c, manifest, files)
    return manifest


def _check_files(c: _Check, value: Any) -> dict[str, int]:
    """The ``files`` list: safe unique paths, sizes, sha256s. Returns path -> bytes."""
    files: dict[str, int] = {}
    for i, rec in enumerate(c.list(value, "files", MAX_FILES)):
        rec = c.dict(rec, f"files[{i}]")
        path = safe_relpath(rec.get("path"), field=f"files[{i}].path", where=c.where)
        if path in files:
            raise c.fail(f"files[{i}].path", path, "is listed twice")
        files[path] = c.int(rec.get("bytes"), f"files[{i}].bytes", 0, 1 << 50)
        if not isinstance(rec.get("sha256"), str) or not _SHA256.fullmatch(rec["sha256"]):
            raise c.fail(f"files[{i}].sha256", rec.get("sha256"), "is not a sha256 (64 hexadecimal digits)")
    return files


def _listed(c: _Check, files: dict[str, int], path: str, field: str, most: int, least: int = 0) -> None:
    """A path the manifest names must be in its files list, of a size its counts justify."""
    if path not in files:
        raise c.fail(field, path, "is not in the manifest's files list (no size or sha256 to check it by)")
    if not least <= files[path] <= most:
        raise c.fail(f"the size of {path}", files[path], f"is not what its counts imply ({least:,} to {most:,} bytes)")


def _check_resolution(c: _Check, res: int, info: dict[str, Any], files: dict[str, int], dim: int,
                      value_bytes: int, precision: str) -> None:
    from catalog.blocks import block_rows

    field = f"resolutions.{res}"
    cells = c.int(info.get("cells"), f"{field}.cells", 0, h3_cells(res))
    rows_per_block = block_rows(dim, precision)
    if "block_rows" in info and info["block_rows"] != rows_per_block:
        raise c.fail(f"{field}.block_rows", info["block_rows"], f"is not the format's {rows_per_block} for "
                                                                f"{dim} values of {precision}")
    total, previous = 0, -1
    for i, part in enumerate(c.list(info.get("parts"), f"{field}.parts", h3_cells(res))):
        pf = f"{field}.parts[{i}]"
        part = c.dict(part, pf)
        rows = c.int(part.get("rows"), f"{pf}.rows", 0, cells)
        first = c.int(part.get("first_cell"), f"{pf}.first_cell", 0, (1 << 64) - 1)
        last = c.int(part.get("last_cell"), f"{pf}.last_cell", 0, (1 << 64) - 1)
        if rows and not previous < first <= last:
            raise c.fail(f"{pf}.first_cell", first, "does not start after the previous part's last cell (or "
                                                    "passes its own last): parts must be sorted and disjoint")
        if rows and ((first >> 52) & 0xF != res or (last >> 52) & 0xF != res):
            raise c.fail(f"{pf}.first_cell", f"{first:x}..{last:x}", f"are not cells of resolution {res}")
        previous = last if rows else previous
        total += rows
        blocks = -(-rows // rows_per_block)
        path = safe_relpath(part.get("path"), field=f"{pf}.path", where=c.where, kind="part", res=res)
        _listed(c, files, path, f"{pf}.path", rows * (9 + value_bytes) + blocks * (16 << 10) + (1 << 20),
                rows * (8 + value_bytes))
        table = safe_relpath(part.get("blocks"), field=f"{pf}.blocks", where=c.where, kind="blocks", res=res)
        _listed(c, files, table, f"{pf}.blocks", 48 * blocks + 4096, 48 * blocks)
    if total != cells:
        raise c.fail(f"{field}.cells", cells, f"is not the {total:,} rows its parts hold")
    index = c.dict(info.get("index"), f"{field}.index")
    path = safe_relpath(index.get("path"), field=f"{field}.index.path", where=c.where, kind="index")
    exact = c.bool(index.get("exact"), f"{field}.index.exact")
    kind = c.str(index.get("type"), f"{field}.index.type")
    ivf = _INDEX_TYPE.fullmatch(kind or "")
    if exact != (kind == "IDMap2,Flat") or not (exact or ivf):
        raise c.fail(f"{field}.index.type", kind, "is not 'IDMap2,Flat' (exact) or 'IVF<nlist>,PQ<m>'")
    nlist = 0
    if ivf:
        nlist = c.int(index.get("nlist"), f"{field}.index.nlist", 1, MAX_NLIST)
        if int(ivf[1]) != nlist or dim % c.int(int(ivf[2]), f"{field}.index.type's PQ", 1, dim):
            raise c.fail(f"{field}.index.type", kind, f"does not agree with nlist {nlist} and dimension {dim}")
        nprobe = c.int(index.get("nprobe"), f"{field}.index.nprobe", 1, nlist)
        if "nprobe_placed" in index:
            c.int(index["nprobe_placed"], f"{field}.index.nprobe_placed", 1, nprobe)
    c.int(index.get("rerank", 1), f"{field}.index.rerank", 1, MAX_RERANK)
    c.number(index.get("recall_at_10"), f"{field}.index.recall_at_10")
    for key in ("recall_lower_bound", "recall_epsilon", "bytes_per_cell", "share_of_embeddings", "build_s"):
        if key in index:
            c.number(index[key], f"{field}.index.{key}")
    kinds = c.dict(index.get("recall"), f"{field}.index.recall", optional=True)
    if len(kinds) > MAX_RECALL_KINDS:
        raise c.fail(f"{field}.index.recall", f"<{len(kinds)} kinds>", f"has more than {MAX_RECALL_KINDS} kinds")
    for kind, measured in kinds.items():
        where = f"{field}.index.recall.{kind}"
        if not re.fullmatch(r"[a-z0-9_]{1,40}", kind):
            raise c.fail(f"{field}.index.recall", kind, "names a kind of query that is not a short lowercase name")
        c.int(c.dict(measured, where).get("queries"), f"{where}.queries", 1, 1 << 20)
        for key in ("at_10", "at_10_lower_bound", "at_100"):
            c.number(measured.get(key), f"{where}.{key}")
    _listed(c, files, path, f"{field}.index.path", cells * (4 * dim + 8) + nlist * (4 * dim + 16) + 1024 * dim
            + (1 << 16))
    if ivf and index.get("lists") is not None:
        lists = safe_relpath(index["lists"], field=f"{field}.index.lists", where=c.where, kind="lists")
        _listed(c, files, lists, f"{field}.index.lists", 20 * nlist + 4096, 20 * nlist)
        c.int(index.get("head_bytes"), f"{field}.index.head_bytes", 1, files[path])
        if not isinstance(index.get("head_sha256"), str) or not _SHA256.fullmatch(index["head_sha256"]):
            raise c.fail(f"{field}.index.head_sha256", index.get("head_sha256"), "is not a sha256")
    if ivf and index.get("sample") is not None:
        from catalog.vector_index import SAMPLE_BYTES, sample_dtype

        sample = safe_relpath(index["sample"], field=f"{field}.index.sample", where=c.where, kind="sample")
        _listed(c, files, sample, f"{field}.index.sample", SAMPLE_BYTES + sample_dtype(dim).itemsize + 4096)
    land = c.dict(info.get("land"), f"{field}.land", optional=True)
    if land:
        count = c.int(land.get("cells"), f"{field}.land.cells", 0, cells)
        path = safe_relpath(land.get("path"), field=f"{field}.land.path", where=c.where, kind="land")
        _listed(c, files, path, f"{field}.land.path", 8 * count + 4096, 8 * count)
    zarr = info.get("zarr")
    if zarr is not None:
        safe_relpath(zarr, field=f"{field}.zarr", where=c.where, kind="zarr")
    fidelity = c.dict(info.get("fidelity"), f"{field}.fidelity", optional=True)
    if fidelity:
        c.int(fidelity.get("points"), f"{field}.fidelity.points", 0, 1 << 40)
        for kind in ("cell", "interpolated"):
            stats = c.dict(fidelity.get(kind), f"{field}.fidelity.{kind}")
            for key in ("mean_cosine", "p05_cosine", "min_cosine", "mean_l2"):
                if stats.get(key) is not None:
                    c.number(stats[key], f"{field}.fidelity.{kind}.{key}")


def _check_encoder(c: _Check, manifest: dict[str, Any], files: dict[str, int], dim: int) -> None:
    info = manifest.get("encoder_onnx")
    if info is None:
        return
    info = c.dict(info, "encoder_onnx")
    if not info.get("path"):
        c.str(info.get("reason"), "encoder_onnx.reason", optional=True)
        return
    path = safe_relpath(info["path"], field="encoder_onnx.path", where=c.where, kind="encoder")
    _listed(c, files, path, "encoder_onnx.path", MAX_ONNX_BYTES, 1)
    if info.get("sha256") is None or info.get("sha256") != _sha_of(manifest, path):
        raise c.fail("encoder_onnx.sha256", info.get("sha256"), f"is not the sha256 the files list gives {path}")
    inputs = c.list(info.get("inputs"), "encoder_onnx.inputs", 2)
    if len(inputs) != 2:
        raise c.fail("encoder_onnx.inputs", inputs, "are not two (lat, lon)")
    for i, spec in enumerate(inputs):
        c.str(c.dict(spec, f"encoder_onnx.inputs[{i}]").get("name"), f"encoder_onnx.inputs[{i}].name")
    c.int(info.get("opset"), "encoder_onnx.opset", 1, 1000)
    c.str(info.get("licence"), "encoder_onnx.licence")
    c.number(c.dict(info.get("parity"), "encoder_onnx.parity").get("max_abs_diff"), "encoder_onnx.parity.max_abs_diff")
    output = c.dict(info.get("output"), "encoder_onnx.output")
    c.str(output.get("name"), "encoder_onnx.output.name")
    shape = c.list(output.get("shape"), "encoder_onnx.output.shape", 2)
    if len(shape) != 2 or shape[1] != dim:
        raise c.fail("encoder_onnx.output.shape", shape, f"is not (n, {dim})")


def check_colors(basis: Any, dim: int, where: str) -> dict[str, Any]:
    """A colour basis (:mod:`catalog.colors`) read from a manifest or the cache, checked; returns it."""
    _check_colors(_Check(where), basis, dim)
    return basis


def _check_colors(c: _Check, basis: Any, dim: int) -> None:
    """``colors``: the map's principal-component basis, numbers of the dataset's dimension."""
    basis = c.dict(basis, "colors")
    if basis.get("method") != "pca3":
        raise c.fail("colors.method", basis.get("method"), "is not 'pca3'")
    rows = c.list(basis.get("components"), "colors.components", 3)
    if len(rows) != 3:
        raise c.fail("colors.components", f"<{len(rows)} rows>", "are not 3 rows")
    vectors = [("mean", basis.get("mean"), dim), *((f"components[{i}]", row, dim) for i, row in enumerate(rows)),
               ("low", basis.get("low"), 3), ("high", basis.get("high"), 3), ("explained", basis.get("explained"), 3)]
    for field, values, size in vectors:
        if len(c.list(values, f"colors.{field}", size)) != size:
            raise c.fail(f"colors.{field}", f"<{len(values)} numbers>", f"does not hold {size} numbers")
        for v in values:
            c.number(v, f"colors.{field}[]")
    sample = c.dict(basis.get("sample"), "colors.sample", optional=True)
    if sample:
        c.int(sample.get("cells"), "colors.sample.cells", 0, 1 << 40)


def _check_overview(c: _Check, manifest: dict[str, Any], files: dict[str, int]) -> None:
    """``overview``: the map's coarse levels, each a file of at most its level's cells (11 bytes each)."""
    from catalog.colors import OVERVIEW_DTYPE, OVERVIEW_MAX_CELLS

    overview = c.dict(manifest.get("overview"), "overview", optional=True)
    if not overview:
        return
    finest = c.int(overview.get("from_res"), "overview.from_res", 0, MAX_RES)
    if str(finest) not in manifest["resolutions"]:
        raise c.fail("overview.from_res", finest, "is not a resolution of the dataset")
    most = manifest["resolutions"][str(finest)]["cells"]
    levels = c.dict(overview.get("levels"), "overview.levels")
    for key, level in levels.items():
        if not isinstance(key, str) or not key.isdigit() or str(int(key)) != key or int(key) >= finest:
            raise c.fail("overview.levels", key, f"is not a resolution coarser than {finest}")
        level = c.dict(level, f"overview.levels.{key}")
        cells = c.int(level.get("cells"), f"overview.levels.{key}.cells", 0,
                      min(h3_cells(int(key)), most, OVERVIEW_MAX_CELLS))
        path = safe_relpath(level.get("path"), field=f"overview.levels.{key}.path", where=c.where, kind="overview")
        _listed(c, files, path, f"overview.levels.{key}.path", OVERVIEW_DTYPE.itemsize * cells + 4096,
                OVERVIEW_DTYPE.itemsize * cells)


def _sha_of(manifest: dict[str, Any], path: str) -> str | None:
    return next((rec["sha256"] for rec in manifest["files"] if rec["path"] == path), None)
