"""The names an atlas gives, checked: relative paths inside the format's layout, dataset
folder names, and local paths that must stay in their folder once links are followed.

Used where a name enters: the manifest's paths by :func:`catalog.checks.check_manifest`,
dataset names by :func:`catalog.manifest.list_datasets`, local reads by
:class:`catalog.storage.LocalStore` and downloads by the query layer's cache. A violation is
an :class:`~catalog.errors.UnsafeAtlasError` naming the field and the value.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from catalog.errors import UnsafeAtlasError

__all__ = ["inside", "safe_name", "safe_relpath"]

_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=-]{0,254}")
_ZARR_V2 = frozenset({".zattrs", ".zarray", ".zgroup", ".zmetadata"})  # a Zarr v2 store's metadata files
# where each kind of file lives in a dataset (``{r}``: its resolution) and how its name ends
_LAYOUT = {"part": ("data/res={r}/", ".parquet"), "blocks": ("blocks/res={r}/", ".blocks"),
           "index": ("index/", ".faiss"), "land": ("land/", ".npy"), "zarr": ("zarr/", ".zarr"),
           "encoder": ("encoder/", ".onnx"), "lists": ("index/", ".lists"),
           "sample": ("index/", ".sample"), "overview": ("overview/", ".npy")}
_TOP = ("data/", "blocks/", "index/", "land/", "encoder/", "zarr/", "overview/")


def _refuse(where: str, field: str, value: Any, why: str) -> UnsafeAtlasError:
    shown = repr(value) if len(repr(value)) <= 120 else repr(value)[:117] + "..."
    return UnsafeAtlasError(f"{where}: {field} = {shown} {why}; refusing to open this atlas (its publisher "
                            "must fix it: hexatlas writes no such name)")


def safe_relpath(path: Any, *, field: str, where: str, kind: str | None = None, res: int | None = None) -> str:
    """``path`` if it is a safe relative path inside the format's layout, else :class:`UnsafeAtlasError`.

    ``kind`` (``part``, ``blocks``, ``index``, ``lists``, ``sample``, ``land``, ``zarr``, ``encoder``,
    ``overview``) and ``res`` narrow it to where that kind of file lives; without them any of the layout's folders.
    """
    if not isinstance(path, str) or not path:
        raise _refuse(where, field, path, "is not a path")
    segments = path.split("/")
    bad = next((s for s in segments if not _SEGMENT.fullmatch(s) and s not in _ZARR_V2), None)
    if bad is not None:
        why = ("is absolute" if path.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", path)
               else f"has the segment {bad!r} (only letters, digits and ._=- are allowed, not starting with a dot: "
                    "no '..', '.', empty segments, backslashes, '%' escapes or control characters)")
        raise _refuse(where, field, path, why)
    if kind is None:
        if not path.startswith(_TOP) or len(segments) < 2:
            raise _refuse(where, field, path, f"is outside the dataset's layout ({', '.join(_TOP)})")
        return path
    folder, suffix = _LAYOUT[kind]
    folder = folder.format(r=res)
    if not path.startswith(folder) or not path.endswith(suffix) or len(segments) != folder.count("/") + 1:
        raise _refuse(where, field, path, f"is not where the format keeps it ({folder}<name>{suffix})")
    return path


def safe_name(name: Any, *, field: str, where: str) -> str:
    """A dataset's name (one folder) if safe, else :class:`UnsafeAtlasError`."""
    if not isinstance(name, str) or not _SEGMENT.fullmatch(name):
        raise _refuse(where, field, name, "is not a dataset folder name (letters, digits and ._=-, not starting "
                                          "with a dot)")
    return name


def inside(folder: Path, path: Path, *, where: str) -> Path:
    """``path`` resolved (every link followed) if it lies in ``folder`` resolved, else
    :class:`UnsafeAtlasError`: a link in an atlas must not lead a reader out of it."""
    base = Path(os.path.realpath(folder))
    real = Path(os.path.realpath(path))
    if real != base and base not in real.parents:
        raise UnsafeAtlasError(
            f"{where}: {path} leads outside {folder} (to {real}, through a symbolic link); refusing to read it. "
            "Copy the files into the dataset folder instead of linking them")
    return real
