"""Why format 2's layout (``--only layout``): in-place Parquet blocks against a Zarr v3 sharded store.

The same synthetic resolution (sorted random cells, 256-d float16, like SatCLIP) is stored
two ways: as format-2 part files (:mod:`catalog.blocks`: plain Parquet, uncompressed PLAIN
pages of one 512-cell block per row group, plus a block table) and as a Zarr v3 store with
the sharding codec (shards of 65,536 cells, inner chunks of 512 cells, uncompressed; a
``cell_ids`` array beside ``embedding``), read with zarr-python. Measured in the same run:
bytes on disk, write rate, a single random lookup (p50, warm), and 100,000 random lookups
(warm). The Zarr reader is given the cell -> row mapping for free (a sorted cell array in
memory, which format 2 never holds): it is timed only for reading the rows, so it is the
lower bound of a real Zarr reader. A zstd-compressed Parquet file of the same data shows
what compression would save.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import Row, p50

DIM = 256


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def run(quick: bool = False) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zarr
    from zarr.codecs import BytesCodec, ShardingCodec

    from catalog.blocks import PartInfo, ResolutionReader, embedding_column, write_part
    from catalog.storage import LocalStore

    n = 200_000 if quick else 2_000_000
    rng = np.random.default_rng(0)
    cells = np.sort(rng.choice(1 << 50, n, replace=False).astype(np.uint64))
    values = rng.standard_normal((n, DIM)).astype(np.float16)
    wanted = rng.choice(cells, 100_000)
    single = [rng.choice(cells, 1) for _ in range(200)]
    case = f"{n:,} cells of {DIM}-d float16"
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="hexatlas-layout-") as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        write_part(tmp / "part.parquet", tmp / "part.blocks", cells, values, metadata={})
        f2_write = n / (time.perf_counter() - start)
        info = PartInfo("part.parquet", "part.blocks", n, int(cells[0]), int(cells[-1]),
                        (tmp / "part.parquet").stat().st_size,
                        hashlib.sha256((tmp / "part.blocks").read_bytes()).hexdigest(),
                        (tmp / "part.blocks").stat().st_size)
        reader = ResolutionReader(LocalStore(tmp), [info], DIM, "float16", str(tmp))
        out = np.empty((len(wanted), DIM), np.float32)
        reader.gather(wanted, out)  # warm: blocks checked once
        f2_many = len(wanted) / p50(lambda: reader.gather(wanted, out), 3)
        one = np.empty((1, DIM), np.float32)
        f2_one = p50(lambda: [reader.gather(c, one) for c in single], 3) / len(single)

        start = time.perf_counter()
        group = zarr.open_group(str(tmp / "z.zarr"), mode="w", zarr_format=3)
        shard = ShardingCodec(chunk_shape=(512, DIM), codecs=[BytesCodec()])
        emb = group.create_array("embedding", shape=(n, DIM), dtype="float16", chunks=(65536, DIM),
                                 serializer=shard, compressors=None)
        ids = group.create_array("cell_ids", shape=(n,), dtype="uint64", chunks=(65536,),
                                 serializer=ShardingCodec(chunk_shape=(512,), codecs=[BytesCodec()]),
                                 compressors=None)
        emb[:] = values
        ids[:] = cells
        zarr_write = n / (time.perf_counter() - start)
        emb = zarr.open_array(str(tmp / "z.zarr" / "embedding"), mode="r")

        def zarr_gather(targets: np.ndarray) -> np.ndarray:
            idx = np.searchsorted(cells, targets)  # given for free: format 2 finds rows itself
            order = np.argsort(idx)
            got = emb.get_orthogonal_selection((idx[order], slice(None)))
            return got

        zarr_gather(wanted[:1000])
        zarr_many = len(wanted) / p50(lambda: zarr_gather(wanted), 2 if quick else 3)
        zarr_one = p50(lambda: [zarr_gather(c) for c in single], 3) / len(single)

        table = pa.table({"cell": pa.array(cells), "embedding": embedding_column(values)})
        pq.write_table(table, tmp / "zstd.parquet", compression="zstd", row_group_size=8192)
        raw = n * DIM * 2
        for label, path in (("format 2 (Parquet blocks + block table)", [tmp / "part.parquet", tmp / "part.blocks"]),
                            ("Zarr v3 sharded (embedding + cell_ids)", [tmp / "z.zarr"]),
                            ("Parquet, zstd (not readable in place)", [tmp / "zstd.parquet"])):
            rows.append(Row("layout: bytes per cell", f"{label}, {case}", sum(map(_size, path)) / n, "B",
                            "raw embedding", raw / n))
        rows.append(Row("layout: write", f"format 2, {case}", f2_write, "cells/s", "Zarr v3 sharded", zarr_write))
        rows.append(Row("layout: 1 random lookup, p50 warm", f"format 2 (cell -> row included), {case}",
                        f2_one * 1e3, "ms", "Zarr v3 sharded (row given)", zarr_one * 1e3))
        rows.append(Row("layout: 100,000 random lookups, warm", f"format 2 (cell -> row included), {case}",
                        f2_many, "pts/s", "Zarr v3 sharded (row given)", zarr_many))
    return rows
