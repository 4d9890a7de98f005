"""Atlases in object storage: build to s3://, validate there, open and query from there.

The server is moto's S3 server on loopback (tests/data/s3_server.py).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.parquet as pq
import pytest

from builder.build import build
from builder.grid import cell_count
from catalog.cli import main
from catalog.errors import (
    AtlasChangedError,
    AtlasCorruptError,
    AtlasNotFoundError,
    InvalidArgumentError,
    StorageError,
)
from catalog.manifest import list_datasets, read_manifest, validate_dataset
from catalog.storage import LocalStore, ObjectStore, open_store
from tests.data.faults import crash_on_shard_write
from tests.data.s3_server import BUCKET, s3_server

TOY = "tests.data.toy_encoder:load"
URI = f"s3://{BUCKET}/atlases/one"


@pytest.fixture(scope="module")
def s3():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def built(s3, tmp_path_factory):
    """The same toy build, once to a local directory and once to S3."""
    local = tmp_path_factory.mktemp("local")
    build(TOY, resolutions="0-1", output=local, device="cpu", precision="float32", progress=False)
    summary = build(TOY, resolutions="0-1", output=URI, device="cpu", precision="float32", progress=False)
    return local, summary


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HEXATLAS_CACHE", str(tmp_path / "cache"))


def test_build_to_s3_writes_the_same_files_as_a_local_build(built) -> None:
    local, summary = built
    assert summary.dataset == f"{URI}/toy" and summary.cells == {0: 122, 1: 842}
    store = open_store(f"{URI}/toy")
    assert isinstance(store, ObjectStore)
    remote_files = set(store.files())
    local_files = set(LocalStore(local / "toy").files()) - {"_build.lock"}  # the local flock file
    assert remote_files == local_files  # no _build/, no temporaries left behind
    assert "manifest.json" in remote_files and not any(f.startswith("_build") for f in remote_files)
    remote_manifest, local_manifest = read_manifest(store), read_manifest(local / "toy")
    parquet_digests = {r["path"]: r["sha256"] for r in remote_manifest["files"] if r["path"].endswith(".parquet")}
    assert parquet_digests == {r["path"]: r["sha256"] for r in local_manifest["files"] if r["path"].endswith(".parquet")}
    assert remote_manifest["build"]["output"] == URI
    fs, root = store.filesystem()
    table = pq.read_table(f"{root}/data/res=1/part-all.parquet", filesystem=fs)
    assert table.num_rows == cell_count(1) and len(np.unique(table.column("cell").to_numpy())) == cell_count(1)
    assert list_datasets(URI) == ["toy"]


def test_validate_on_s3_names_altered_missing_and_extra_objects(built, capsys) -> None:
    assert validate_dataset(f"{URI}/toy") == []
    assert main(["validate", URI]) == 0
    assert capsys.readouterr().out.strip() == f"{URI}/toy: ok"
    # a copy of the dataset under another prefix, then damaged
    src, dst = open_store(f"{URI}/toy"), open_store(f"s3://{BUCKET}/damaged/toy")
    for rel in src.files():
        with dst.staged(rel) as tmp:
            tmp.write_bytes(src.read_bytes(rel))
    assert validate_dataset(dst) == []
    data = bytearray(dst.read_bytes("data/res=1/part-all.parquet"))
    data[100] ^= 0xFF  # inside the first block's cell ids
    with dst.staged("data/res=1/part-all.parquet") as tmp:
        tmp.write_bytes(bytes(data))
    dst.delete("blocks/res=0/part-all.blocks")
    with dst.staged("data/res=0/stray.parquet") as tmp:
        tmp.write_bytes(b"x")
    problems = validate_dataset(dst)
    assert "altered file (sha256 differs): data/res=1/part-all.parquet" in problems
    assert "missing file: blocks/res=0/part-all.blocks" in problems
    assert "extra file: data/res=0/stray.parquet" in problems
    assert main(["validate", f"s3://{BUCKET}/damaged"]) == 1
    assert "altered file" in capsys.readouterr().out
    # the query layer checks each block it reads against its checksum, and names what is missing
    import query

    atlas = query.open(f"s3://{BUCKET}/damaged")
    with pytest.raises(AtlasCorruptError, match="part-all.parquet: block 0 .* does not match its checksum.*validate"):
        atlas.lookup([0.0], [0.0], res=1)
    with pytest.raises(AtlasCorruptError, match="part-all.blocks is missing; run 'hexatlas validate"):
        atlas.lookup([0.0], [0.0], res=0)


def test_query_open_s3_matches_the_local_atlas(built, tmp_path) -> None:
    import query

    local, _ = built
    remote, near = query.open(URI), query.open(local)
    assert remote.models == ["toy"] and remote.resolutions() == [0, 1]
    assert remote.info()["toy"]["path"] == f"{URI}/toy"
    rng = np.random.default_rng(1)
    lat, lon = rng.uniform(-80, 80, 50), rng.uniform(-180, 180, 50)
    for res in (0, 1):
        np.testing.assert_array_equal(remote.lookup(lat, lon, res=res), near.lookup(lat, lon, res=res))
        np.testing.assert_array_equal(remote.lookup(lat, lon, res=res, interpolate=True),
                                      near.lookup(lat, lon, res=res, interpolate=True))
    assert not (tmp_path / "cache" / "remote").exists()  # lookups read blocks in place: nothing downloaded
    from catalog import blocks

    reads, real = [], blocks._RemoteBytes.read
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(blocks._RemoteBytes, "read", lambda self, offset, size: reads.append(size) or real(self, offset, size))
        one = query.open(URI).lookup([48.85], [2.35], res=1)
    np.testing.assert_array_equal(one, near.lookup([48.85], [2.35], res=1))
    assert len(reads) == 1 and sum(reads) <= blocks.BLOCK_BYTES + 8 * blocks.MAX_BLOCK_ROWS  # a block: one read
    counts = remote.sql("SELECT res, count(*) AS n FROM embeddings GROUP BY res ORDER BY res").to_pydict()
    assert counts == {"res": [0, 1], "n": [122, 842]}
    assert remote.similar(lat=10.0, lon=20.0, k=5).equals(near.similar(lat=10.0, lon=20.0, k=5))
    # the (flat) index was fetched whole into the cache, keyed by the manifest; the SQL view's
    # parts too, unless DuckDB's httpfs reads them in place
    mirrors = list((tmp_path / "cache" / "remote").glob("*/toy"))
    assert len(mirrors) == 1
    fetched = sorted(p.relative_to(mirrors[0]).as_posix() for p in mirrors[0].rglob("*") if p.is_file())
    from query.sql import httpfs_extension

    parts = [] if httpfs_extension() else ["data/res=0/part-all.parquet", "data/res=1/part-all.parquet"]
    assert fetched == [*parts, "index/res=1.faiss"]
    # the dataset prefix itself opens too, and `hexatlas info` reads it
    assert query.open(f"{URI}/toy").models == ["toy"]
    assert main(["info", URI]) == 0


def test_interrupted_build_on_s3_resumes(s3, monkeypatch) -> None:
    uri = f"s3://{BUCKET}/resume"
    restore = crash_on_shard_write(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(TOY, resolutions="0-2", output=uri, device="cpu", progress=False)
    with pytest.raises(AtlasCorruptError, match="unfinished: run the same 'hexatlas build' again"):
        read_manifest(f"{uri}/toy")
    restore()
    summary = build(TOY, resolutions="0-2", output=uri, device="cpu", progress=False)
    assert summary.resumed_shards == 2 and summary.cells == {r: cell_count(r) for r in (0, 1, 2)}
    fs, root = open_store(f"{uri}/toy").filesystem()
    for res in (0, 1, 2):
        cells = pq.read_table(f"{root}/data/res={res}", columns=["cell"], filesystem=fs).column("cell").to_numpy()
        assert len(cells) == len(np.unique(cells)) == cell_count(res)
    assert validate_dataset(f"{uri}/toy") == []
    # a finished dataset is not clobbered; --overwrite replaces it
    with pytest.raises(InvalidArgumentError, match="already holds a finished toy dataset"):
        build(TOY, resolutions="0", output=uri, device="cpu", progress=False)
    import query

    before = query.open(uri)
    answer = before.lookup(lat=[10.0], lon=[20.0], res=2)
    build(TOY, resolutions="0", output=uri, device="cpu", progress=False, overwrite=True)
    # the rebuild wrote generation 1 beside generation 0, swapped the manifest, then deleted generation 0
    assert set(open_store(f"{uri}/toy").files("data")) == {"data/res=0/part-all.g1.parquet"}
    assert validate_dataset(f"{uri}/toy") == [] and not open_store(f"{uri}/toy").files("_build")
    # an atlas opened before: what it has read stays the old answers; a part it must fetch now is gone
    np.testing.assert_array_equal(before.lookup(lat=[10.0], lon=[20.0], res=2), answer)
    with pytest.raises(AtlasChangedError, match=r"rebuilt while it was open \(generation 0, now 1\).*Open it again"):
        before.lookup(lat=[10.0], lon=[20.0], res=1)
    assert before.reopen().resolutions() == [0]


def test_endpoint_variable_for_s3_takes_precedence(s3, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert open_store(f"s3://{BUCKET}").root_exists()


def test_storage_errors_say_what_to_fix(s3, monkeypatch) -> None:
    import query

    with pytest.raises(InvalidArgumentError, match="scheme 'gs' is not supported; use a local path, s3://BUCKET/PREFIX, https://HOST/PATH or hf://"):
        open_store("gs://bucket/atlas")
    with pytest.raises(InvalidArgumentError, match="names no bucket"):
        open_store("s3://")
    with pytest.raises(AtlasNotFoundError, match="no atlas at 's3://hexatlas-test/nothing-here'"):
        query.open(f"s3://{BUCKET}/nothing-here")
    assert main(["validate", f"s3://{BUCKET}/nothing-here"]) == 2
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StorageError, match="cannot read s3://hexatlas-test/x/manifest.json: .*Could not connect.*AWS_ENDPOINT_URL"):
        query.open(f"s3://{BUCKET}/x")


@pytest.mark.skipif(not hasattr(__import__("os"), "fdatasync"), reason="no fdatasync here")
def test_a_local_file_is_on_disk_before_it_is_published(tmp_path, monkeypatch) -> None:
    import os

    synced, real = [], os.fdatasync

    def recording(fd):
        synced.append((os.fstat(fd).st_ino, (tmp_path / "a" / "b.bin").exists()))
        return real(fd)

    monkeypatch.setattr(os, "fdatasync", recording)
    with open_store(tmp_path).staged("a/b.bin") as tmp:
        tmp.write_bytes(b"x" * 100)
        inode = tmp.stat().st_ino
        assert synced == []
    assert synced == [(inode, False)]  # the staged file, synced while not yet published
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"x" * 100


def test_exact_lookup_from_s3_fetches_the_model_once_checked(built, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import query

    local, _ = built
    lat, lon = [48.85, -33.9, 0.0], [2.35, 18.4, 179.99]
    remote = query.open(URI)
    np.testing.assert_array_equal(remote.lookup(lat, lon, exact=True), query.open(local).lookup(lat, lon, exact=True))
    fetched = [p.relative_to(tmp_path / "cache").as_posix() for p in (tmp_path / "cache").rglob("model.onnx")]
    assert len(fetched) == 1 and fetched[0].endswith("toy/encoder/model.onnx")
    model = tmp_path / "cache" / fetched[0]
    model.write_bytes(model.read_bytes()[:-1] + b"\0")  # the cached copy altered: refused, not run
    with pytest.raises(AtlasCorruptError, match="sha256"):
        query.open(URI).lookup(lat, lon, exact=True)


def test_an_unpublished_directory_is_removed_until_late_writes_stop(tmp_path) -> None:
    """A write still in flight after the error (zarr's own I/O tasks) can make the staged
    directory again just after its first removal: it is removed until it stays gone."""
    import threading
    import time

    store = LocalStore(tmp_path)

    def late_write() -> None:
        time.sleep(0.15)
        (tmp_path / "z.zarr.tmpdir" / "c").mkdir(parents=True, exist_ok=True)

    writer = threading.Thread(target=late_write)
    with pytest.raises(OSError, match="disk full"), store.staged_dir("z.zarr") as tmp:
        (tmp / "chunk").write_bytes(b"x")
        writer.start()
        raise OSError("disk full")
    writer.join()
    assert not (tmp_path / "z.zarr.tmpdir").exists() and not (tmp_path / "z.zarr").exists()
