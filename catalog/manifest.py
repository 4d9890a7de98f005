"""The atlas format: directory layout, the manifest, validation and a STAC export.

An atlas is a directory holding one dataset per model::

    ATLAS/
      <model>/
        manifest.json                       # written last: a dataset without it is unfinished
        collection.json                     # STAC Collection describing the dataset
        data/res=<r>/part-<key>.parquet      # the embeddings, once: plain Parquet read in place
        blocks/res=<r>/part-<key>.blocks     # where each block's bytes are, with their CRC-32s
        zarr/res=<r>.zarr/                  # opt-in (--formats zarr): xarray/xdggs embedding(cell_ids, dim)
        index/res=<r>.faiss                 # cosine index (IVF-PQ, memory-mapped; flat when small), ids = cells
        land/res=<r>.npy                    # global atlases: the sorted cells that touch land
        encoder/model.onnx                  # the encoder, exported: exact embeddings without torch
        overview/res=<r>.npy                # the map's coarse levels: cell + RGB, from the finest resolution
        _build/                             # resume state while a build runs; removed at the end

The dataset may also live under an ``s3://`` prefix (see :mod:`catalog.storage`); reading,
listing and validating work the same there. Only the standard library and pyarrow are needed here, so both the builder and the query layer use it.

Generations: a published file is never overwritten. A first build writes the names above
(generation 0); an ``--overwrite`` rebuild writes generation ``g`` (the published one + 1)
beside them, under names that carry it (``part-<key>.g<g>.parquet``, ``res=<r>.g<g>.faiss``,
``res=<r>.g<g>.zarr/``...), and the manifest's ``"generation"`` says which (absent: 0). The
swap is the manifest alone, replaced atomically (a rename; one PUT in object storage); only
then are the files of the old generation deleted. A reader holding the old manifest thus
reads old files or finds them gone, never a new file under an old name: it sees the old
dataset or an error saying it was rebuilt (:class:`catalog.errors.AtlasChangedError`),
never a mix. Readers of format 2 take every path from the manifest, so atlases with and
without generations read the same: the format version stays 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from catalog.blocks import STORED_DTYPES, part_infos, read_block_table
from catalog.checks import MAX_MANIFEST_BYTES, check_manifest
from catalog.index_file import check_index_file
from catalog.paths import safe_name
from catalog.remote_index import read_list_directory
from catalog.vector_index import Sample
from catalog.errors import AtlasCorruptError, AtlasNotFoundError
from catalog.provenance import sha256_file
from catalog.storage import ATLAS_INDEX, Store, open_store
from catalog.tables import atomic_path

__all__ = [
    "ATLAS_INDEX",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "dataset_name",
    "file_record",
    "list_datasets",
    "read_manifest",
    "stac_collection",
    "validate_dataset",
    "write_atlas_index",
    "write_json",
]

FORMAT_NAME = "hexatlas"
FORMAT_VERSION = 2
FORMATS = ("parquet", "zarr")  # the faces a build can write; parquet (the store) always
MANIFEST = "manifest.json"
STAC = "collection.json"
BUILD_DIR = "_build"
# where hexatlas before generations built an --overwrite rebuild; a leftover one is removed
REBUILD_DIR = "_build.rebuild"
# a generation's mark in a file name: part-<key>.g<g>.parquet, res=<r>.g<g>.faiss, res=<r>.g<g>.zarr/...
# a file being written, never renamed into place by a killed build (catalog.tables.atomic_path,
# LocalStore.staged_dir): not the dataset's, and swept by the next build
_STAGING = re.compile(r"(^|/)\.[^/]+\.tmp$|\.tmpdir/")
_GENERATION = re.compile(r"\.g(\d+)\.(?:parquet|blocks|faiss|lists|sample|npy|zarr|onnx)(?:/|$)")


def dataset_name(model: str) -> str:
    """Directory name for a model's dataset: the model name with unsafe characters replaced."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("._") or "model"


def _g(generation: int) -> str:
    return f".g{generation}" if generation else ""


def part_relpath(res: int, shard_key: str, generation: int = 0) -> str:
    return f"data/res={res}/part-{shard_key}{_g(generation)}.parquet"


def blocks_relpath(res: int, shard_key: str, generation: int = 0) -> str:
    return f"blocks/res={res}/part-{shard_key}{_g(generation)}.blocks"


def zarr_relpath(res: int, generation: int = 0) -> str:
    return f"zarr/res={res}{_g(generation)}.zarr"


def index_relpath(res: int, generation: int = 0) -> str:
    return f"index/res={res}{_g(generation)}.faiss"


def lists_relpath(res: int, generation: int = 0) -> str:
    """An IVF index's list directory: each inverted list's offset, bytes and CRC-32 (remote search reads lists)."""
    return f"index/res={res}{_g(generation)}.lists"


def sample_relpath(res: int, generation: int = 0) -> str:
    """An IVF index's sample of cells with their vectors (the seeds of a filtered search)."""
    return f"index/res={res}{_g(generation)}.sample"


def land_relpath(res: int, generation: int = 0) -> str:
    return f"land/res={res}{_g(generation)}.npy"


def overview_relpath(res: int, generation: int = 0) -> str:
    """One overview level of the map (:mod:`catalog.colors`); ``manifest["overview"]`` lists them."""
    return f"overview/res={res}{_g(generation)}.npy"


def encoder_relpath(generation: int = 0) -> str:
    """The exported encoder (ONNX); ``manifest["encoder_onnx"]`` describes it (or why a dataset has none)."""
    return f"encoder/model{_g(generation)}.onnx"


def generation_of(manifest: dict[str, Any]) -> int:
    """The generation a manifest publishes: 0 for a first build (and atlases from before generations)."""
    return int(manifest.get("generation", 0))


def file_generation(rel: str) -> int:
    """The generation whose name a dataset file carries (0: none)."""
    match = _GENERATION.search(rel)
    return int(match[1]) if match else 0


def shard_key_of(part_path: str) -> str:
    """The shard key in a part file's path (``data/res=5/part-<key>[.g<g>].parquet``)."""
    stem = Path(part_path).name[len("part-"):].removesuffix(".parquet")
    return re.sub(r"\.g\d+$", "", stem)


def building_generation(store: Store) -> int | None:
    """The generation an unfinished build (a rebuild in progress) is writing, if any."""
    path = f"{BUILD_DIR}/build.json"
    if not store.exists(path):
        return None
    try:
        return int(store.read_json(path).get("generation", 0))
    except (OSError, ValueError, AttributeError):
        return None


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temporary file, fsync, rename)."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def file_record(root: Path, relpath: str, *, local: Path | None = None) -> dict[str, Any]:
    """``{"path", "bytes", "sha256"}`` of a file under ``root``.

    ``local``: where the bytes are now, when that is not ``root / relpath`` yet (a staged
    file about to be published to object storage).
    """
    path = local if local is not None else root / relpath
    return {"path": relpath, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def list_datasets(atlas: str | Path | Store) -> list[str]:
    """Names of the finished datasets (one per model) in an atlas directory or ``s3://`` prefix,
    or those an HTTP(S)/Hub atlas root's ``atlas.json`` lists (HTTP cannot list folders)."""
    store = open_store(atlas)
    if not store.root_exists():
        if not store.listable:
            raise AtlasNotFoundError(
                f"no atlas at {str(store)!r}: neither {MANIFEST} (a dataset) nor {ATLAS_INDEX} (an atlas root) is "
                f"there. Give the URL of a dataset folder or of a root published by 'hexatlas publish'")
        raise AtlasNotFoundError(f"no atlas at {str(store)!r}: not a directory (or an empty prefix)")
    names = [name for name in store.subdirs() if store.child(name).exists(MANIFEST)]
    if not store.is_local:  # a remote listing names folders of the cache's mirror: one safe segment each
        for name in names:
            safe_name(name, field="a dataset's name", where=str(store))
    return names


def write_atlas_index(atlas: str | Path | Store) -> list[str]:
    """Write an atlas root's ``atlas.json``, the list of its finished datasets, which is how a
    reader finds them over HTTP(S), where folders cannot be listed. Returns the names."""
    store = open_store(atlas)
    names = list_datasets(store)
    store.write_json(ATLAS_INDEX, {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "datasets": names})
    return names


def read_manifest(dataset_dir: str | Path | Store, *, data: bytes | None = None) -> dict[str, Any]:
    """Read and check a dataset's manifest (a local directory, an ``s3://`` prefix, an HTTP(S)
    or Hub folder); ``data``: its bytes, when the caller has read them already.

    Raises
    ------
    AtlasNotFoundError
        The directory does not exist (nothing under the prefix).
    AtlasCorruptError
        No manifest (an unfinished build), unreadable JSON, or another format or version.
    """
    store = open_store(dataset_dir)
    if data is None and not store.exists(MANIFEST):
        if not store.root_exists():
            raise AtlasNotFoundError(f"no atlas dataset at {str(store)!r}")
        unfinished = store.exists(f"{BUILD_DIR}/build.json")
        hint = " (a build is unfinished: run the same 'hexatlas build' again to resume)" if unfinished else ""
        raise AtlasCorruptError(f"{str(store)!r} has no {MANIFEST}{hint}")
    where = f"{store}/{MANIFEST}"
    try:
        data = store.read_bytes(MANIFEST, limit=MAX_MANIFEST_BYTES) if data is None else data
        if len(data) > MAX_MANIFEST_BYTES:
            raise ValueError(f"larger than the {MAX_MANIFEST_BYTES >> 20} MiB a manifest may have")
        manifest = json.loads(data)
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        raise AtlasCorruptError(f"cannot read {where!r}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise AtlasCorruptError(f"{where!r} is not a hexatlas manifest")
    if manifest.get("format_version") == 1:
        raise AtlasCorruptError(
            f"{where!r} is a format-1 atlas (three copies of the embeddings, read by decoding whole "
            f"resolutions); this hexatlas reads format {FORMAT_VERSION}. Rebuild it with this version: "
            "run the same 'hexatlas build' with --overwrite (its build arguments are in the manifest)"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise AtlasCorruptError(
            f"{where!r} has format version {manifest.get('format_version')!r}; this hexatlas reads "
            f"version {FORMAT_VERSION}. Rebuild the atlas or install a matching hexatlas"
        )
    return check_manifest(manifest, where)


def validate_dataset(dataset_dir: str | Path | Store) -> list[str]:
    """Recompute every file's size and checksum and every resolution's row count.

    Works on local directories and ``s3://`` prefixes alike (objects are streamed, not
    downloaded to disk). Files of a rebuild in progress (the generation ``_build/`` is
    writing, above the published one) are not the dataset's yet and are not reported, nor
    are the temporary files of a killed write (swept by the next build).

    Returns
    -------
    list of str
        One line per problem (missing, extra or altered file, wrong count); empty when valid.
    """
    import pyarrow.parquet as pq

    store = open_store(dataset_dir)
    manifest = read_manifest(store)
    problems = []
    listed = {rec["path"]: rec for rec in manifest["files"]}
    building = building_generation(store)
    if building is not None and building <= generation_of(manifest):
        building = None  # published: what is left is the old generation's files, to be deleted
    if store.listable:
        present = {
            rel: size for rel, size in store.files().items()
            if rel not in (MANIFEST, STAC) and not rel.split("/")[0].startswith(BUILD_DIR)  # _build/, _build.lock
            and (building is None or file_generation(rel) != building) and not _STAGING.search(rel)
        }
    else:  # over HTTP: the files the manifest lists, as the server sizes them (extra files cannot be seen)
        present = {}
        for rel in listed:
            with contextlib.suppress(FileNotFoundError):
                present[rel] = store.size(rel)
    for rel in sorted(set(listed) - set(present)):
        problems.append(f"missing file: {rel}")
    for rel in sorted(set(present) - set(listed)):
        problems.append(f"extra file: {rel}" + (" (left by a rebuild killed after it was published: run the same "
                                                 "'hexatlas build' again to finish)" if file_generation(rel)
                                                < generation_of(manifest) else ""))
    for rel in sorted(set(listed) & set(present)):
        rec = listed[rel]
        if present[rel] != rec["bytes"]:
            problems.append(f"altered file (size {present[rel]} != {rec['bytes']}): {rel}")
        elif store.sha256(rel) != rec["sha256"]:
            problems.append(f"altered file (sha256 differs): {rel}")
    dim, itemsize = manifest["provenance"]["dim"], STORED_DTYPES[manifest["precision"]].itemsize
    for res, info in manifest["resolutions"].items():
        rows = 0
        for part in part_infos(info, listed):
            rel = part.path
            if rel in present and part.blocks in present and not any(part.blocks in p for p in problems):
                try:
                    with store.open_input(rel) as fh:
                        in_file = pq.ParquetFile(fh).metadata.num_rows
                    read_block_table(store.read_bytes(part.blocks, limit=part.blocks_bytes), part.blocks, part, dim,
                                     itemsize)
                except AtlasCorruptError as exc:
                    problems.append(str(exc))
                    continue
                except Exception as exc:  # noqa: BLE001 - any unreadable file is a problem to report
                    problems.append(f"unreadable part ({type(exc).__name__}): {rel}")
                    continue
                if in_file != part.rows:
                    problems.append(f"{rel}: {in_file} rows, the manifest {part.rows}")
                rows += in_file
        paths = [p for part in info["parts"] for p in (part["path"], part["blocks"])]
        if rows != info["cells"] and not any(rel in p for p in problems for rel in paths):
            problems.append(f"resolution {res}: {rows} rows in its parts, manifest says {info['cells']}")
        land = (info.get("land") or {}).get("path")
        if land in present and not any(land in p for p in problems):
            with store.open_input(land) as fh:
                try:
                    version = np.lib.format.read_magic(fh)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(fh)
                except ValueError as exc:
                    shape, dtype = str(exc), None
            if dtype != np.dtype("<u8") or shape != (info["land"]["cells"],):
                problems.append(f"{land}: not a table of the {info['land']['cells']:,} land cells (uint64) its "
                                f"manifest says ({dtype}, {shape})")
        index = info["index"]["path"]
        if index in present and not any(index in p for p in problems):
            with store.open_input(index) as fh:
                def read_at(offset: int, size: int, fh: Any = fh) -> bytes:
                    fh.seek(offset)
                    return fh.read(size)

                try:
                    layout = check_index_file(read_at, present[index], info["index"], dim, info["cells"], index)
                    lists = info["index"].get("lists")
                    if lists in present and not any(lists in p for p in problems):
                        read_list_directory(store.read_bytes(lists, limit=listed[lists]["bytes"]), layout, lists)
                    sample = info["index"].get("sample")
                    if sample in present and not any(sample in p for p in problems):
                        Sample.parse(store.read_bytes(sample, limit=listed[sample]["bytes"]), dim, sample)
                except AtlasCorruptError as exc:
                    problems.append(str(exc))
    return problems + _check_overview_files(store, manifest, present, problems)


def _npy_header(store: Store, rel: str) -> tuple[Any, Any]:
    """(shape, dtype) from a .npy file's header, or (the error, None)."""
    with store.open_input(rel) as fh:
        try:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(fh)
        except ValueError as exc:
            return str(exc), None
    return shape, dtype


def _check_overview_files(store: Store, manifest: dict[str, Any], present: dict[str, int],
                          problems: list[str]) -> list[str]:
    """Each overview level's file holds the cells (and colours) its manifest entry says."""
    from catalog.colors import OVERVIEW_DTYPE

    found = []
    for level, entry in sorted((manifest.get("overview") or {}).get("levels", {}).items(), key=lambda kv: int(kv[0])):
        rel = entry["path"]
        if rel in present and not any(rel in p for p in problems):
            shape, dtype = _npy_header(store, rel)
            if dtype != OVERVIEW_DTYPE or shape != (entry["cells"],):
                found.append(f"{rel}: not the {entry['cells']:,} cells and colours of overview level {level} its "
                             f"manifest says ({dtype}, {shape})")
    return found


def stac_collection(manifest: dict[str, Any]) -> dict[str, Any]:
    """A STAC 1.0 Collection describing one dataset, with one asset per file kind and resolution."""
    prov = manifest["provenance"]
    assets: dict[str, Any] = {}
    for res, info in sorted(manifest["resolutions"].items(), key=lambda kv: int(kv[0])):
        assets[f"parquet-res{res}"] = {
            "href": f"./data/res={res}/", "type": "application/vnd.apache.parquet",
            "title": f"Embeddings at H3 resolution {res} (Parquet, hive-partitioned by res)", "roles": ["data"],
        }
        if info.get("zarr"):
            assets[f"zarr-res{res}"] = {
                "href": f"./{info['zarr']}", "type": "application/vnd+zarr",
                "title": f"Embeddings at H3 resolution {res} (Zarr, xdggs h3)", "roles": ["data"],
            }
        if info.get("index"):
            assets[f"index-res{res}"] = {
                "href": f"./{info['index']['path']}", "type": "application/octet-stream",
                "title": f"FAISS cosine index at resolution {res}", "roles": ["metadata"],
            }
    if (manifest.get("encoder_onnx") or {}).get("path"):
        assets["encoder-onnx"] = {
            "href": f"./{manifest['encoder_onnx']['path']}", "type": "application/octet-stream",
            "title": "The location encoder as ONNX: inputs lat, lon (float64 degrees), output embedding",
            "roles": ["metadata"],
        }
    created = manifest["created"]
    region = manifest["build"].get("region")
    bbox = region["bbox"] if region else [-180.0, -90.0, 180.0, 90.0]
    where = f" (cells touching the region {bbox})" if region else ""  # west > east: across the antimeridian
    fidelity = {res: info["fidelity"] for res, info in manifest["resolutions"].items() if info.get("fidelity")}
    return {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": f"hexatlas-{manifest['dataset']}",
        "title": f"{prov['model']} location embeddings on the H3 grid",
        "description": (
            f"{prov['model']} embeddings ({prov['dim']}-d, {manifest['precision']}) evaluated at H3 cell centres, "
            f"resolutions {', '.join(sorted(manifest['resolutions'], key=int))}"
            f"{' (cells touching land only)' if manifest['build']['land_only'] else ''}"
            f"{where}. Model: {prov['paper']}."
        ),
        "license": "other",
        "extent": {
            "spatial": {"bbox": [list(bbox)]},
            "temporal": {"interval": [[created, created]]},
        },
        "providers": [{"name": "hexatlas", "roles": ["processor"]}],
        "summaries": {
            "h3:resolution": sorted(int(r) for r in manifest["resolutions"]),
            "embedding:dim": [prov["dim"]],
            "embedding:model": [prov["model"]],
        },
        "links": [{"rel": "describedby", "href": f"./{MANIFEST}", "type": "application/json"}],
        "assets": assets,
        "hexatlas:provenance": prov,
        # per resolution: the atlas against its encoder at seeded random points (see the manifest)
        "hexatlas:fidelity": fidelity,
    }
