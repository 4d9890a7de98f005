"""Similar-place search on a remote atlas reads its IVF-PQ index in place: the trained parts
once, then only the inverted lists a search probes, each checked against its CRC-32."""

from __future__ import annotations

import json

import numpy as np
import pytest

import query
from catalog.errors import AtlasCorruptError
from catalog.manifest import validate_dataset
from tests.data.fault_proxy import FaultProxy
from tests.data.http_server import nginx
from tests.data.recall import approximate_above, few_recall_queries
from tests.data.satclip_checkpoint import make_checkpoint

MODEL = "satclip-vit16-l10"


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """SatCLIP L=10 (256-d) at resolutions 1-2, res 2 (5,882 cells) with an IVF-PQ index."""
    from builder import index
    from builder.build import build

    root = tmp_path_factory.mktemp("ivf")
    ckpt = make_checkpoint(root / "l10.ckpt", legendre_polys=10)
    with pytest.MonkeyPatch.context() as patch:
        approximate_above(patch, 1000, 256)
        patch.setattr(index, "RECALL_TARGET", 0.0)  # keep the IVF index whatever its recall
        few_recall_queries(patch)
        build(MODEL, checkpoint=str(ckpt), resolutions="1-2", output=root / "atlas", device="cpu", progress=False)
    return root / "atlas"


@pytest.fixture(scope="module")
def server(local):
    with nginx(local) as base:
        yield base


def _queries(atlas):
    cells = atlas.similar(lat=10.0, lon=20.0, res=2, k=3).column("cell").to_pylist()
    vector = atlas.lookup([48.85, -33.9], [2.35, 18.4], res=2).mean(axis=0)
    return [{"lat": 48.85, "lon": 2.35}, {"lat": -12.0, "lon": -77.0, "k": 50}, {"cell": f"{cells[1]:x}"},
            {"vector": vector}, {"lat": 35.0, "lon": 139.0, "exclude_within_km": 500}]


def test_the_build_writes_a_list_directory(local) -> None:
    manifest = json.loads(next(local.glob("*/manifest.json")).read_text())
    info = manifest["resolutions"]["2"]["index"]
    assert not info["exact"] and info["lists"] == "index/res=2.lists"
    assert "lists" not in manifest["resolutions"]["1"]["index"]  # a flat index has no lists
    assert info["lists"] in {r["path"] for r in manifest["files"]}
    assert info["sample"] == "index/res=2.sample" and info["sample"] in {r["path"] for r in manifest["files"]}
    assert validate_dataset(next(local.glob("*/"))) == []


def _republish(ds, rel: str, table) -> dict:
    """Replace the dataset's file ``rel`` by ``table`` (.npy) as a publisher would, its size and
    sha256 in the manifest to match; returns the manifest."""
    import hashlib

    with open(ds / rel, "wb") as fh:
        np.save(fh, table)
    manifest = json.loads((ds / "manifest.json").read_text())
    data = (ds / rel).read_bytes()
    for rec in manifest["files"]:
        if rec["path"] == rel:
            rec["sha256"], rec["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (ds / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_a_sample_that_lies_or_leads_outside_is_refused(local, tmp_path) -> None:
    import shutil

    from catalog.errors import UnsafeAtlasError

    shutil.copytree(local, tmp_path / "copy")
    ds = next((tmp_path / "copy").glob("*/"))
    table = np.load(ds / "index/res=2.sample")
    manifest = _republish(ds, "index/res=2.sample", np.array(table["vector"], np.float32))  # another row type
    with nginx(tmp_path / "copy") as base:
        far = query.open(f"{base}/atlas")
        assert len(far.similar(lat=48.85, lon=2.35, res=2)) == 10  # unfiltered: never read
        with pytest.raises(AtlasCorruptError, match="not cells with 256-d vectors"):
            far.similar(lat=48.85, lon=2.35, res=2, exclude_within_km=500)
    assert any("not cells with 256-d vectors" in p for p in validate_dataset(ds))
    manifest["resolutions"]["2"]["index"]["sample"] = "../../outside.sample"
    (ds / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsafeAtlasError, match="index.sample"):
        query.open(tmp_path / "copy")


def test_remote_search_reads_lists_in_place_and_answers_as_local(local, server) -> None:
    near = query.open(local)
    with FaultProxy(server) as proxy:
        far = query.open(f"{proxy.url}/atlas")
        for i, q in enumerate(_queries(near)):
            a, b = near.similar(res=2, **q), far.similar(res=2, **q)
            assert a.column("cell").to_pylist() == b.column("cell").to_pylist(), q
            np.testing.assert_array_equal(a.column("score").to_numpy(), b.column("score").to_numpy())
            if i == 3:  # the unfiltered searches probe some lists (a filtered one probes 4x more)
                searched, info = far._index(None, 2)
                assert 0 < searched.lists_read == len(searched._loaded) < searched.layout.nlist
        index_reads = [e for e in proxy.log if "res%3D2.faiss" in e[1]]
        assert all(e[2] for e in index_reads)  # every read a range: the size probe, the head, lists
        assert searched.lists_read == len(searched._loaded)
        lists = int(searched.directory["bytes"][list(searched._loaded)].sum())
        assert sum(e[4] for e in index_reads) == 1 + info["head_bytes"] + lists  # each probed list read once
        assert not (far._mirrors[far.models[0]] / "index" / "res=2.faiss").exists()  # nothing downloaded


def test_a_damaged_list_is_read_again_then_refused(local, server) -> None:
    near = query.open(local)
    with FaultProxy(server, rates={"flip": 0.3, "reset": 0.1, "503": 0.1}, seed=4) as proxy:
        far = query.open(f"{proxy.url}/atlas")
        for q in _queries(near):
            assert near.similar(res=2, **q).column("cell").to_pylist() == far.similar(res=2, **q).column("cell").to_pylist()
        assert proxy.faults["flip"] > 0
    with FaultProxy(server, corrupt=(".faiss",), max_faults=None) as proxy:
        far = query.open(f"{proxy.url}/atlas")
        with pytest.raises(AtlasCorruptError, match="(CRC-32|do not match their sha256)"):
            far.similar(lat=48.85, lon=2.35, res=2)


def test_a_list_directory_that_lies_is_refused(local, tmp_path) -> None:
    import shutil

    from catalog.remote_index import LIST_DIRECTORY_DTYPE

    shutil.copytree(local, tmp_path / "copy")
    ds = next((tmp_path / "copy").glob("*/"))
    table = np.load(ds / "index/res=2.lists")
    assert table.dtype == LIST_DIRECTORY_DTYPE
    table["offset"][3] += 1
    _republish(ds, "index/res=2.lists", table)
    with nginx(tmp_path / "copy") as base, pytest.raises(AtlasCorruptError, match="does not describe the lists"):
        query.open(f"{base}/atlas").similar(lat=48.85, lon=2.35, res=2)
    assert any("does not describe the lists" in p for p in validate_dataset(ds))


def test_serve_over_a_remote_atlas_searches_in_place(local, server) -> None:
    from fastapi.testclient import TestClient

    from query.server import create_app

    far = query.open(f"{server}/atlas")
    answer = TestClient(create_app(far)).get("/v1/similar", params={"lat": 48.85, "lon": 2.35, "res": 2, "k": 5})
    assert answer.status_code == 200 and len(answer.json()["results"]) == 5
    assert far._index(None, 2)[0].lists_read > 0
    assert not (far._mirrors[far.models[0]] / "index" / "res=2.faiss").exists()


def test_an_ivf_entry_without_rerank_searches_with_the_formats_default(local, tmp_path) -> None:
    """``rerank`` is optional in the manifest (checked with a default of 1): a search of an
    index entry without it uses 1, as the manifest check does, not a KeyError."""
    import shutil

    shutil.copytree(local, tmp_path / "copy")
    ds = next((tmp_path / "copy").glob("*/"))
    manifest = json.loads((ds / "manifest.json").read_text())
    manifest["resolutions"]["2"]["index"]["rerank"] = 1
    (ds / "manifest.json").write_text(json.dumps(manifest))
    expected = query.open(tmp_path / "copy").similar(lat=35.0, lon=139.0, res=2, exclude_within_km=500)
    del manifest["resolutions"]["2"]["index"]["rerank"]
    (ds / "manifest.json").write_text(json.dumps(manifest))
    got = query.open(tmp_path / "copy").similar(lat=35.0, lon=139.0, res=2, exclude_within_km=500)
    assert got.column("cell").to_pylist() == expected.column("cell").to_pylist()


def test_a_query_with_a_place_probes_the_lists_the_build_chose_for_it(local, tmp_path, monkeypatch) -> None:
    """A lat/lon or cell query probes the manifest's ``nprobe_placed`` lists, locally and
    remotely; a vector query probes ``nprobe``."""
    import shutil

    from catalog import vector_index

    shutil.copytree(local, tmp_path / "copy")
    ds = next((tmp_path / "copy").glob("*/"))
    manifest = json.loads((ds / "manifest.json").read_text())
    manifest["resolutions"]["2"]["index"].update(nprobe=4, nprobe_placed=1)
    (ds / "manifest.json").write_text(json.dumps(manifest))
    probed, candidates = [], vector_index._candidates

    def counted(index, query, want, keep, nprobe=None):
        probed.append(nprobe or index.nprobe)
        return candidates(index, query, want, keep, nprobe)

    monkeypatch.setattr(vector_index, "_candidates", counted)
    near = query.open(tmp_path / "copy")
    vector = near.lookup([48.85], [2.35], res=2)[0]
    near.similar(lat=48.85, lon=2.35, res=2)
    near.similar(cell=int(near.similar(lat=10.0, lon=20.0, res=2, k=1).column("cell")[0].as_py()), res=2)
    near.similar(vector=vector, res=2)
    assert probed == [1, 1, 1, 4]
    with nginx(tmp_path / "copy") as base:
        far = query.open(f"{base}/atlas")
        far.similar(lat=48.85, lon=2.35, res=2)
        searched, _ = far._index(None, 2)
        assert searched.lists_read == 1  # the one list a placed query probes, nothing more
        far.similar(vector=vector, res=2)
        assert searched.lists_read >= 4
    assert probed[4:] == [1, 4]
