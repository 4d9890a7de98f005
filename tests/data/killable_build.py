"""``hexatlas build`` in small shards, stopping before each step that publishes or deletes a
file, for the tests that kill a build (tests/builder/test_kill.py).

Run as ``python -m tests.data.killable_build BUILD-ARGUMENTS...``. Shards are made small
(``SHARD_CELLS``, from resolution 1 on), so a build of resolutions 0-2 has 22 of them. With
``HEXATLAS_STEPS=1`` each step is announced on stdout as ``@@step <phase> <path>`` and the
build waits for a line on stdin before taking it, so that the test can SIGKILL it exactly
there (it writes a line to let it go on). The phases: ``write`` (a file is about to be
written), ``shard``, ``index``, ``zarr``, ``land`` (a written file is about to be renamed
into place: data/blocks, the index, a Zarr chunk or store, land flags), ``record`` (a done
record), ``state``, ``manifest``, ``stac``, ``delete`` (an old generation's file, after a
rebuild's manifest) and ``cleanup`` (``_build/`` removed).

``HEXATLAS_TEST_LAND_CACHE=DIR`` keeps the land flags of each resolution (computed by
:func:`builder.landmask.land_cells` the first time, from a 933 MB mask) in ``DIR``, so the
many short runs of a kill test do not each load the mask.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

SHARD_CELLS = 7**3

_lock = threading.Lock()


def phase(rel: str) -> str:
    top = rel.split("/")[0]
    if rel == "manifest.json":
        return "manifest"
    if rel == "collection.json":
        return "stac"
    if rel.startswith("_build/done/"):
        return "record"
    if rel == "_build/build.json":
        return "state"
    if rel.startswith("_build/index/"):
        return "index"
    return {"data": "shard", "blocks": "shard", "index": "index", "zarr": "zarr", "land": "land"}.get(top, "other")


def step(kind: str, rel: str) -> None:
    """Announce a step and wait for the test's go-ahead (one line on stdin)."""
    with _lock:
        sys.stdout.write(f"@@step {kind} {rel}\n")
        sys.stdout.flush()
        if not sys.stdin.readline():  # the test has gone: stop here
            os._exit(3)


def install() -> None:
    import builder.grid
    from catalog.storage import LocalStore

    builder.grid.SINGLE_SHARD_MAX_RES = 0
    builder.grid.SHARD_CELLS = SHARD_CELLS
    if os.environ.get("HEXATLAS_TEST_LAND_CACHE"):
        _cache_land(os.environ["HEXATLAS_TEST_LAND_CACHE"])
    if os.environ.get("HEXATLAS_STEPS") != "1":
        return
    staged, staged_dir, delete, delete_tree = (LocalStore.staged, LocalStore.staged_dir, LocalStore.delete,
                                               LocalStore.delete_tree)

    @contextlib.contextmanager
    def announced_staged(self, rel):
        step("write", rel)
        with staged(self, rel) as tmp:
            yield tmp
            step(phase(rel), rel)  # written and settled; the rename comes next

    @contextlib.contextmanager
    def announced_dir(self, rel):
        step("write", rel)
        with staged_dir(self, rel) as tmp:
            yield tmp
            step(phase(rel), rel)

    def announced_delete(self, rel):
        step("delete", rel)
        delete(self, rel)

    def announced_tree(self, rel="", *, keep=()):
        if rel == "_build":
            step("cleanup", rel)
        delete_tree(self, rel, keep=keep)

    LocalStore.staged, LocalStore.staged_dir = announced_staged, announced_dir
    LocalStore.delete, LocalStore.delete_tree = announced_delete, announced_tree


def _cache_land(folder: str) -> None:
    from pathlib import Path

    import numpy as np

    import builder.landmask

    real = builder.landmask.land_cells

    def cached(res: int) -> np.ndarray:
        path = Path(folder) / f"res={res}.npy"
        if path.is_file():
            return np.load(path)
        cells = real(res)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, cells)
        os.replace(tmp, path)
        return cells

    builder.landmask.land_cells = cached


if __name__ == "__main__":
    install()
    from catalog.cli import main

    sys.exit(main(["build", *sys.argv[1:]]))
