"""The atlas format: directory layout, the manifest, validation and a STAC export.

An atlas is a directory holding one dataset per model::

    ATLAS/
      <model>/
        manifest.json                       # written last: a dataset without it is unfinished
        collection.json                     # STAC Collection describing the dataset
        parquet/res=<r>/shard=<key>/part-0.parquet
        zarr/res=<r>.zarr/                  # xarray/xdggs: embedding(cell_ids, dim)
        index/res=<r>.faiss                 # cosine index, ids = cells
        _build/                             # resume state while a build runs; removed at the end

Only the standard library is needed here, so both the builder and the query layer use it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from catalog.errors import AtlasCorruptError, AtlasNotFoundError
from catalog.provenance import sha256_file
from catalog.tables import atomic_path

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "dataset_name",
    "file_record",
    "list_datasets",
    "read_manifest",
    "stac_collection",
    "validate_dataset",
    "write_json",
]

FORMAT_NAME = "hexatlas"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STAC = "collection.json"
BUILD_DIR = "_build"


def dataset_name(model: str) -> str:
    """Directory name for a model's dataset: the model name with unsafe characters replaced."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("._") or "model"


def parquet_relpath(res: int, shard_key: str) -> str:
    return f"parquet/res={res}/shard={shard_key}/part-0.parquet"


def zarr_relpath(res: int) -> str:
    return f"zarr/res={res}.zarr"


def index_relpath(res: int) -> str:
    return f"index/res={res}.faiss"


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temporary file, fsync, rename)."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def file_record(root: Path, relpath: str) -> dict[str, Any]:
    """``{"path", "bytes", "sha256"}`` of a file under ``root``."""
    path = root / relpath
    return {"path": relpath, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def list_datasets(atlas: str | Path) -> list[str]:
    """Names of the finished datasets (one per model) in an atlas directory."""
    root = Path(atlas)
    if not root.is_dir():
        raise AtlasNotFoundError(f"no atlas at {str(root)!r}: not a directory")
    return sorted(p.name for p in root.iterdir() if (p / MANIFEST).is_file())


def read_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    """Read and check a dataset's manifest.

    Raises
    ------
    AtlasNotFoundError
        The directory does not exist.
    AtlasCorruptError
        No manifest (an unfinished build), unreadable JSON, or another format or version.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise AtlasNotFoundError(f"no atlas dataset at {str(root)!r}")
    path = root / MANIFEST
    if not path.is_file():
        hint = " (a build is unfinished: run the same 'hexatlas build' again to resume)" if (root / BUILD_DIR).exists() else ""
        raise AtlasCorruptError(f"{str(root)!r} has no {MANIFEST}{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AtlasCorruptError(f"cannot read {str(path)!r}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise AtlasCorruptError(f"{str(path)!r} is not a hexatlas manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise AtlasCorruptError(
            f"{str(path)!r} has format version {manifest.get('format_version')!r}; this hexatlas reads "
            f"version {FORMAT_VERSION}. Rebuild the atlas or install a matching hexatlas"
        )
    return manifest


def validate_dataset(dataset_dir: str | Path) -> list[str]:
    """Recompute every file's size and checksum and every resolution's row count.

    Returns
    -------
    list of str
        One line per problem (missing, extra or altered file, wrong count); empty when valid.
    """
    import pyarrow.parquet as pq

    root = Path(dataset_dir)
    manifest = read_manifest(root)
    problems = []
    listed = {rec["path"]: rec for rec in manifest["files"]}
    present = {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.name not in (MANIFEST, STAC)
        and not any(part.startswith(BUILD_DIR) for part in p.relative_to(root).parts)  # _build/, _build.lock
    }
    for rel in sorted(set(listed) - present):
        problems.append(f"missing file: {rel}")
    for rel in sorted(present - set(listed)):
        problems.append(f"extra file: {rel}")
    for rel in sorted(set(listed) & present):
        rec, path = listed[rel], root / rel
        if path.stat().st_size != rec["bytes"]:
            problems.append(f"altered file (size {path.stat().st_size} != {rec['bytes']}): {rel}")
        elif sha256_file(path) != rec["sha256"]:
            problems.append(f"altered file (sha256 differs): {rel}")
    for res, info in manifest["resolutions"].items():
        rows = 0
        for rel in info["parquet"]:
            if (root / rel).is_file():
                try:
                    rows += pq.ParquetFile(root / rel).metadata.num_rows
                except Exception as exc:  # noqa: BLE001 - any unreadable file is a problem to report
                    problems.append(f"unreadable Parquet file ({type(exc).__name__}): {rel}")
        if rows != info["cells"] and not any(rel in p for p in problems for rel in info["parquet"]):
            problems.append(f"resolution {res}: {rows} rows in Parquet, manifest says {info['cells']}")
    return problems


def stac_collection(manifest: dict[str, Any]) -> dict[str, Any]:
    """A STAC 1.0 Collection describing one dataset, with one asset per file kind and resolution."""
    prov = manifest["provenance"]
    assets: dict[str, Any] = {}
    for res, info in sorted(manifest["resolutions"].items(), key=lambda kv: int(kv[0])):
        assets[f"parquet-res{res}"] = {
            "href": f"./parquet/res={res}/", "type": "application/vnd.apache.parquet",
            "title": f"Embeddings at H3 resolution {res} (hive-partitioned Parquet)", "roles": ["data"],
        }
        assets[f"zarr-res{res}"] = {
            "href": f"./{info['zarr']}", "type": "application/vnd+zarr",
            "title": f"Embeddings at H3 resolution {res} (Zarr, xdggs h3)", "roles": ["data"],
        }
        if info.get("index"):
            assets[f"index-res{res}"] = {
                "href": f"./{info['index']['path']}", "type": "application/octet-stream",
                "title": f"FAISS cosine index at resolution {res}", "roles": ["metadata"],
            }
    created = manifest["created"]
    return {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": f"hexatlas-{manifest['dataset']}",
        "title": f"{prov['model']} location embeddings on the H3 grid",
        "description": (
            f"{prov['model']} embeddings ({prov['dim']}-d, {manifest['precision']}) evaluated at H3 cell centres, "
            f"resolutions {', '.join(sorted(manifest['resolutions'], key=int))}"
            f"{' (cells touching land only)' if manifest['build']['land_only'] else ''}. Model: {prov['paper']}."
        ),
        "license": "other",
        "extent": {
            "spatial": {"bbox": [[-180.0, -90.0, 180.0, 90.0]]},
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
    }
