"""Atlases read over HTTP and from the Hub's URL layout, in place, from a real server on loopback.

The server is Debian's nginx (tests/data/http_server.py: Range, ETag, keep-alive as a web
server answers them); faults come from a proxy between reader and server
(tests/data/fault_proxy.py). Every result is compared with the same atlas read locally.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest

import query
from catalog import blocks
from catalog.cli import main
from catalog.errors import (
    AtlasChangedError,
    AtlasCorruptError,
    AtlasNotFoundError,
    InvalidArgumentError,
    StorageError,
)
from catalog.manifest import read_manifest, validate_dataset, write_atlas_index
from tests.data.fault_proxy import FaultProxy
from tests.data.http_server import HUB_COMMIT, HUB_REPO, nginx

TOY = "tests.data.toy_encoder:load"
RUN_BOUND = blocks.BLOCK_BYTES + 8 * blocks.MAX_BLOCK_ROWS  # one block's two runs, at most


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A toy atlas of two datasets (the second a copy under another name), res 0-3."""
    from builder.build import build

    root = tmp_path_factory.mktemp("served")
    build(TOY, resolutions="0-3", output=root, device="cpu", progress=False)
    shutil.copytree(root / "toy", root / "toy-copy")
    assert write_atlas_index(root) == ["toy", "toy-copy"]
    return root


@pytest.fixture(scope="module")
def server(local):
    with nginx(local) as base:
        yield base


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setenv("HEXATLAS_HTTP_BACKOFF", "0.01")
    monkeypatch.setenv("HEXATLAS_HTTP_ATTEMPTS", "6")


def _points(n, seed):
    rng = np.random.default_rng(seed)
    return np.degrees(np.arcsin(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)


def test_an_https_atlas_answers_as_the_local_one(local, server, capsys) -> None:
    remote, near = query.open(f"{server}/atlas"), query.open(local)
    assert remote.models == ["toy", "toy-copy"] and remote.resolutions("toy") == [0, 1, 2, 3]
    lat, lon = _points(300, 1)
    for res in (0, 2, 3):
        np.testing.assert_array_equal(remote.lookup(lat, lon, res=res, model="toy"),
                                      near.lookup(lat, lon, res=res, model="toy"))
    np.testing.assert_array_equal(remote.lookup(lat, lon, interpolate=True, model="toy-copy"),
                                  near.lookup(lat, lon, interpolate=True, model="toy-copy"))
    assert remote.similar(lat=10.0, lon=20.0, k=5, model="toy").equals(near.similar(lat=10.0, lon=20.0, k=5, model="toy"))
    counts = remote.sql("SELECT res, count(*) AS n FROM embeddings_toy GROUP BY res ORDER BY res").to_pydict()
    assert counts == {"res": [0, 1, 2, 3], "n": [122, 842, 5882, 41162]}
    source = remote.info()["toy"]["source"]
    assert source["url"] == f"{server}/atlas/toy" and source["etag"]
    assert source["manifest_sha256"] == __import__("hashlib").sha256((local / "toy" / "manifest.json").read_bytes()).hexdigest()
    assert main(["info", f"{server}/atlas/toy"]) == 0
    assert f"read from {server}/atlas/toy, ETag " in capsys.readouterr().out
    assert main(["validate", f"{server}/atlas"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{server}/atlas/toy: ok", f"{server}/atlas/toy-copy: ok"]
    assert main(["lookup", f"{server}/atlas", "--model", "toy", "--lat", "48.85", "--lon", "2.35", "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)[0]["embedding"]
    np.testing.assert_allclose(got, near.lookup([48.85], [2.35], model="toy")[0], atol=1e-6)


def test_bytes_on_the_wire_stay_within_the_formats_bound(local, server) -> None:
    with FaultProxy(server) as proxy:
        atlas = query.open(f"{proxy.url}/atlas/toy")
        opened = proxy.requests
        assert opened == 1  # the GET of manifest.json: opening reads nothing else
        proxy.reset_counts()
        lat, lon = np.array([48.85]), np.array([2.35])
        np.testing.assert_array_equal(atlas.lookup(lat, lon, res=3), query.open(local).lookup(lat, lon, res=3, model="toy"))
        ranges = [e for e in proxy.log if e[2] and e[2] != "bytes=0-0"]  # not the one-byte size probes
        assert len(ranges) == 1 and ranges[0][4] <= RUN_BOUND  # one block: its cell ids and values, one request
        blocks_table = (local / "toy" / "blocks" / "res=3" / "part-all.blocks").stat().st_size
        assert proxy.bytes <= RUN_BOUND + blocks_table  # plus the part's block table, read once
        for n, seed in ((100, 5), (1000, 6)):
            proxy.reset_counts()
            lat, lon = _points(n, seed)
            atlas2 = query.open(f"{proxy.url}/atlas/toy")
            np.testing.assert_array_equal(atlas2.lookup(lat, lon, res=3), query.open(local).lookup(lat, lon, res=3, model="toy"))
            table = np.load(local / "toy" / "blocks" / "res=3" / "part-all.blocks")
            from catalog.cells import latlng_to_cells

            hit = np.unique(np.searchsorted(table["first_cell"], latlng_to_cells(lat, lon, 3), side="right") - 1)
            # a block's cell ids, the page header between its runs, its values (float16 x 4): one request
            entry = table[hit]
            expected = int(sum(entry["values_offset"] + entry["rows"] * 4 * 2 - entry["cells_offset"]))
            ranges = [e for e in proxy.log if e[2] and e[2] != "bytes=0-0"]  # not the one-byte size probes
            assert len(ranges) == len(hit) and sum(e[4] for e in ranges) == expected
            assert expected <= len(hit) * RUN_BOUND


def test_reader_threads_share_kept_alive_connections(local, server) -> None:
    with FaultProxy(server) as proxy:
        atlas = query.open(f"{proxy.url}/atlas")
        lat, lon = _points(2000, 9)
        for model in ("toy", "toy-copy"):  # each reads all 11 blocks of res 3 with a pool of reader threads
            atlas.lookup(lat, lon, res=3, model=model)
        assert proxy.requests > 25 and proxy.connections <= 12, (proxy.requests, proxy.connections)


def test_the_hub_layout_pins_the_commit_it_first_read(local, server, monkeypatch) -> None:
    with FaultProxy(server) as proxy:
        monkeypatch.setenv("HF_ENDPOINT", proxy.url)
        atlas = query.open(f"hf://datasets/{HUB_REPO}")
        assert atlas.models == ["toy", "toy-copy"]
        lat, lon = _points(50, 2)
        np.testing.assert_array_equal(atlas.lookup(lat, lon, model="toy"), query.open(local).lookup(lat, lon, model="toy"))
        source = atlas.info()["toy"]["source"]
        assert source["revision"] == "main" and source["commit"] == HUB_COMMIT
        resolves = [e[1] for e in proxy.log if "/resolve/" in e[1]]
        assert "/resolve/main/" in resolves[0] and all(f"/resolve/{HUB_COMMIT}/" in p for p in resolves[1:])
        # each file's redirect is followed to the "CDN" (nginx itself: another host:port, absolute Location)
        # and its final URL reused, so the proxy in front of the Hub sees each file resolved once or twice
        assert not any(p.startswith("/cdn/") for _, p, *_ in proxy.log)
        assert len(resolves) < len({p for p in resolves}) * 3
        pinned = query.open(f"hf://datasets/{HUB_REPO}@{HUB_COMMIT}/toy")
        assert pinned.models == ["toy"] and pinned.info()["toy"]["source"]["revision"] == HUB_COMMIT
        np.testing.assert_array_equal(pinned.lookup(lat, lon), query.open(local).lookup(lat, lon, model="toy"))
        with pytest.raises(AtlasNotFoundError, match=r"no atlas at 'hf://datasets/.*@no-such-branch'.*atlas.json"):
            query.open(f"hf://datasets/{HUB_REPO}@no-such-branch")
    with pytest.raises(InvalidArgumentError, match="only Hub datasets hold atlases"):
        query.open("hf://models/org/name")
    with pytest.raises(InvalidArgumentError, match="names no dataset repository"):
        query.open("hf://datasets/org")


def test_transient_faults_are_retried_and_answers_stay_exact(local, server) -> None:
    lat, lon = _points(400, 3)
    near = query.open(local)
    rates = {"reset": 0.1, "503": 0.1, "429": 0.1, "truncate": 0.1, "flip": 0.1}
    with FaultProxy(server, rates=rates, seed=5) as proxy:  # a seed under which every fault occurs
        atlas = query.open(f"{proxy.url}/atlas")
        for res in (1, 2, 3):
            np.testing.assert_array_equal(atlas.lookup(lat, lon, res=res, model="toy"),
                                          near.lookup(lat, lon, res=res, model="toy"))
        assert atlas.similar(lat=0.0, lon=0.0, k=3, model="toy").equals(near.similar(lat=0.0, lon=0.0, k=3, model="toy"))
        assert set(proxy.faults) == set(rates) and sum(proxy.faults.values()) >= 5, proxy.faults
        session = atlas._datasets["toy"][0].session
        assert session.retries + session.reconnects >= sum(proxy.faults.values()) - proxy.faults["flip"]


def test_bytes_changed_where_they_are_stored_give_a_named_error(local, server, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HEXATLAS_CACHE", str(tmp_path))  # the index is fetched, not found in the cache
    with FaultProxy(server, corrupt=("data/res%3D3/",)) as proxy:
        atlas = query.open(f"{proxy.url}/atlas/toy")
        with pytest.raises(AtlasCorruptError, match=r"part-all.parquet: block \d+ .*does not match its checksum"):
            atlas.lookup([48.85], [2.35], res=3)
        with pytest.raises(AtlasCorruptError, match="does not match its checksum"):  # again: never an answer
            atlas.lookup([48.85], [2.35], res=3)
        np.testing.assert_array_equal(atlas.lookup([48.85], [2.35], res=2),
                                      query.open(local).lookup([48.85], [2.35], res=2, model="toy"))
    with FaultProxy(server, corrupt=("index/",)) as proxy:
        with pytest.raises(AtlasCorruptError, match="res=3.faiss does not match the sha256 in its manifest"):
            query.open(f"{proxy.url}/atlas/toy").similar(lat=1.0, lon=1.0, k=3)


def test_a_file_replaced_under_a_reader_is_named(local, server, tmp_path) -> None:
    served = local / "toy-copy" / "data" / "res=3" / "part-all.parquet"
    atlas = query.open(f"{server}/atlas/toy-copy")
    first = atlas.lookup([48.85], [2.35], res=3)
    original = served.read_bytes()
    try:
        time.sleep(1.1)  # nginx's ETag is mtime-size: a new second makes a new one
        served.write_bytes(original)  # republished (here: the same bytes, a new version)
        with pytest.raises(AtlasChangedError, match=r"changed while it was being read \(ETag .*Open it again"):
            atlas.lookup([-45.0], [170.0], res=3)  # another block of the same file
        np.testing.assert_array_equal(query.open(f"{server}/atlas/toy-copy").lookup([48.85], [2.35], res=3), first)
    finally:
        served.write_bytes(original)


def test_failures_that_persist_end_in_a_clear_error(server, monkeypatch) -> None:
    monkeypatch.setenv("HEXATLAS_HTTP_ATTEMPTS", "3")
    with FaultProxy(server, rates={"503": 1.0}, max_faults=None) as proxy:
        with pytest.raises(StorageError, match=r"cannot read http://127.0.0.1:\d+/atlas/manifest.json: HTTP 503 Service "
                                               r"Unavailable, after 3 attempts in .*try again"):
            query.open(f"{proxy.url}/atlas")
        assert proxy.requests == 3
    with FaultProxy(server, rates={"reset": 1.0}, max_faults=None) as proxy:
        with pytest.raises(StorageError, match=r"ConnectionResetError.*after 3 attempts"):
            query.open(f"{proxy.url}/atlas")
    with pytest.raises(StorageError, match="ConnectionRefusedError"):
        query.open("http://127.0.0.1:9/atlas")
    assert main(["info", "http://127.0.0.1:9/atlas"]) == 2
    with pytest.raises(AtlasNotFoundError, match="neither manifest.json .* nor atlas.json"):
        query.open(f"{server}/atlas/nothing-here")


def test_http_atlases_are_read_only(server) -> None:
    from builder.build import build

    with pytest.raises(InvalidArgumentError, match="read-only here: build to a local directory or s3:// and publish"):
        build(TOY, resolutions="0", output=f"{server}/atlas", device="cpu", progress=False)
    assert validate_dataset(f"{server}/atlas/toy") == []
    assert read_manifest(f"{server}/atlas/toy")["dataset"] == "toy"
    assert os.environ.get("HF_ENDPOINT") is None


class _RepoOnDisk:
    """The Hub's repository API as ``hexatlas publish`` uses it, kept in a local folder that the
    test's nginx then serves in the Hub's layout: what publish commits is read back through
    ``hf://`` exactly as a user would read it from the Hub."""

    def __init__(self, root, **_: object) -> None:
        self.root, self.commits = root, []

    def create_repo(self, repo_id, **_: object) -> None:
        assert repo_id == HUB_REPO

    def repo_info(self, repo_id, **_: object):
        return type("Info", (), {"sha": HUB_COMMIT})()

    def list_repo_files(self, repo_id, **_: object) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())

    def create_commit(self, repo_id, *, operations, parent_commit, **_: object):
        from huggingface_hub import CommitOperationAdd

        assert parent_commit == HUB_COMMIT  # made on top of the commit it listed
        for op in operations:
            dest = self.root / op.path_in_repo
            if isinstance(op, CommitOperationAdd):
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = op.path_or_fileobj
                dest.write_bytes(src if isinstance(src, bytes) else open(src, "rb").read())
            else:
                dest.unlink()
        self.commits.append([op.path_in_repo for op in operations])
        return type("CommitInfo", (), {"oid": HUB_COMMIT})()


def test_an_atlas_published_to_the_hub_reads_back_in_place(local, tmp_path, monkeypatch) -> None:
    hub = pytest.importorskip("huggingface_hub")
    from catalog.upload import publish

    repo = _RepoOnDisk(tmp_path / "repo")
    repo.root.mkdir()
    (repo.root / "toy").mkdir()
    (repo.root / "toy" / "stale.bin").write_bytes(b"from an earlier publish")  # not in the new manifest
    monkeypatch.setattr(hub, "HfApi", lambda **kw: repo)
    with nginx(repo.root) as base:
        monkeypatch.setenv("HF_ENDPOINT", base)
        summary = publish(local / "toy", f"hf://datasets/{HUB_REPO}")
        assert summary.commit == HUB_COMMIT and len(repo.commits) == 1
        files = {r["path"] for r in read_manifest(local / "toy")["files"]}
        assert {p.relative_to(repo.root / "toy").as_posix() for p in (repo.root / "toy").rglob("*") if p.is_file()} \
            == files | {"manifest.json", "collection.json"}  # the stale file deleted in the same commit
        assert json.loads((repo.root / "atlas.json").read_text())["datasets"] == ["toy"]
        assert "hexatlas lookup hf://datasets/" in (repo.root / "README.md").read_text()
        atlas = query.open(f"hf://datasets/{HUB_REPO}")
        lat, lon = _points(40, 7)
        np.testing.assert_array_equal(atlas.lookup(lat, lon), query.open(local).lookup(lat, lon, model="toy"))
        assert atlas.info()["toy"]["source"]["commit"] == HUB_COMMIT
        assert validate_dataset(f"hf://datasets/{HUB_REPO}/toy") == []
