"""Hostile atlases: what a stranger's atlas may name or claim is refused, through every entry point.

Each case is a small toy atlas (resolutions 0-1: parts, block tables, a flat index, land
flags and the exported encoder) with one thing altered as a hostile publisher would alter
it, the manifest's sha256s and sizes recomputed where they would be (the publisher writes
them too). Each is opened as a local folder and over HTTP from the tests' nginx, and must be
refused with the named error before anything outside the atlas is read or written. Index
and ONNX cases run in a child process, so that a crash in C++ would show as a signal.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import query
from catalog.cli import main
from catalog.errors import AtlasCorruptError, HexatlasError, UnsafeAtlasError
from catalog.manifest import write_atlas_index
from tests.data.http_server import nginx

TOY = "tests.data.toy_encoder:load"
OUTSIDE = "pwned-by-atlas"  # a folder name no code may create outside the cache


def _manifest(ds: Path) -> dict:
    return json.loads((ds / "manifest.json").read_text())


def _save(ds: Path, manifest: dict, *, reseal: bool = True) -> None:
    """Write ``manifest``; with ``reseal``, its files' sizes and sha256s as they now are (a
    publisher's own manifest always matches its files)."""
    if reseal:
        for rec in manifest["files"]:
            path = ds / rec["path"]
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                rec["bytes"], rec["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        onnx = manifest.get("encoder_onnx") or {}
        if onnx.get("path"):
            onnx["sha256"] = next(r["sha256"] for r in manifest["files"] if r["path"] == onnx["path"])
    (ds / "manifest.json").write_text(json.dumps(manifest))


def _res1(m: dict) -> dict:
    return m["resolutions"]["1"]


def _set_path(field: str, value: str) -> Callable[[Path], None]:
    """Point one path field (and its files record) at ``value``."""
    def mutate(ds: Path) -> None:
        m = _manifest(ds)
        r1 = _res1(m)
        old = {"part": lambda: r1["parts"][0]["path"], "blocks": lambda: r1["parts"][0]["blocks"],
               "index": lambda: r1["index"]["path"], "land": lambda: r1["land"]["path"],
               "encoder": lambda: m["encoder_onnx"]["path"], "zarr": lambda: None}[field]()
        if field == "part":
            r1["parts"][0]["path"] = value
        elif field == "blocks":
            r1["parts"][0]["blocks"] = value
        elif field == "index":
            r1["index"]["path"] = value
        elif field == "land":
            r1["land"]["path"] = value
        elif field == "encoder":
            m["encoder_onnx"]["path"] = value
        else:
            r1["zarr"] = value
        for rec in m["files"]:
            if rec["path"] == old:
                rec["path"] = value
        _save(ds, m, reseal=False)
    return mutate


def _edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(ds: Path) -> None:
        m = _manifest(ds)
        change(m)
        _save(ds, m, reseal=False)
    return mutate


def _rewrite(rel_of: Callable[[dict], str], change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    """Alter one file's bytes and reseal the manifest (the publisher's sha256 matches)."""
    def mutate(ds: Path) -> None:
        m = _manifest(ds)
        path = ds / rel_of(m)
        path.write_bytes(change(path.read_bytes()))
        _save(ds, m)
    return mutate


def _blocks_table(change: Callable[[np.ndarray], np.ndarray]) -> Callable[[bytes], bytes]:
    def rewrite(data: bytes) -> bytes:
        import io

        table = np.load(io.BytesIO(data))
        out = io.BytesIO()
        np.save(out, change(table.copy()), allow_pickle=True)
        return out.getvalue()
    return rewrite


def _offsets_past_end(t: np.ndarray) -> np.ndarray:
    t["values_offset"][-1] += 1 << 20
    return t


def _offset_that_wraps(t: np.ndarray) -> np.ndarray:
    t["values_offset"][0] = np.uint64(2 ** 64 - 8)  # plus its rows' bytes wraps to a small number
    return t


def _rows_too_many(t: np.ndarray) -> np.ndarray:
    t["rows"][0] += 1 << 20
    return t


def _index_header(offset: int, value: bytes) -> Callable[[bytes], bytes]:
    return lambda data: data[:offset] + value + data[offset + len(value):]


def _ivf_index(ds: Path, lie: bool) -> None:
    """Replace res 1's flat index by an IVF-PQ one FAISS wrote for its cells (``lie``: its list
    sizes then claim one cell more in the first list and one fewer in the last)."""
    import struct

    import faiss

    m = _manifest(ds)
    atlas = query.open(ds)
    cells = np.sort(np.asarray(atlas.sql("SELECT cell FROM embeddings WHERE res = 1").column("cell")))
    vectors = atlas._data(None, 1).vectors(cells.astype(np.uint64))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = faiss.index_factory(4, "IVF8,PQ2", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add_with_ids(vectors, cells.astype(np.int64))
    data = bytearray(faiss.serialize_index(index).tobytes())
    if lie:
        at = data.index(b"ilar") + 4 + 16 + 4 + 8  # the first list's size
        struct.pack_into("<Q", data, at, struct.unpack_from("<Q", data, at)[0] + 1)
    r1 = _res1(m)
    (ds / r1["index"]["path"]).write_bytes(bytes(data))
    r1["index"].update(type="IVF8,PQ2", exact=False, nlist=8, nprobe=8, rerank=4, expand=True)
    _save(ds, m)


def _onnx(change: Callable[[object], None], extra: Callable[[Path], None] | None = None) -> Callable[[Path], None]:
    def mutate(ds: Path) -> None:
        import onnx

        m = _manifest(ds)
        path = ds / m["encoder_onnx"]["path"]
        model = onnx.load(str(path))
        change(model)
        path.write_bytes(model.SerializeToString())
        if extra:
            extra(ds)
        _save(ds, m)
    return mutate


def _external_data(model: object) -> None:
    from onnx import TensorProto

    tensor = model.graph.initializer[0]  # type: ignore[attr-defined]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../../../../../etc/hostname"


def _custom_domain(model: object) -> None:
    model.graph.node[0].domain = "com.example.evil"  # type: ignore[attr-defined]


def _symlink(rel_of: Callable[[dict], str], *, folder: bool = False) -> Callable[[Path], None]:
    """Move a file (or its folder) outside the dataset and link it back: same bytes, outside."""
    def mutate(ds: Path) -> None:
        rel = rel_of(_manifest(ds))
        src = ds / rel
        if folder:
            src = src.parent
        outside = ds.parent.parent / f"outside-{ds.parent.name}" / src.name
        outside.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src, outside)
        src.symlink_to(outside, target_is_directory=folder)
    return mutate


@dataclass(frozen=True)
class Case:
    name: str
    mutate: Callable[[Path], None]
    error: type[Exception] = UnsafeAtlasError
    match: str = "refusing"
    use: str | None = None  # None: refused when opened; else the operation that reads the file
    remote: bool = True  # also served over HTTP
    child: bool = False  # run in a subprocess (C++ readers)


_EXPLOIT = f"../../../../../../../../tmp/{OUTSIDE}/res=1.faiss"
CASES = [
    # every path field: traversal, absolute, backslash, percent-escape, NUL, drive letter, wrong folder
    Case("index-traversal", _set_path("index", _EXPLOIT)),
    Case("part-traversal", _set_path("part", "data/res=1/../../../outside.parquet")),
    Case("part-absolute", _set_path("part", "/etc/passwd")),
    Case("blocks-backslash", _set_path("blocks", "blocks\\res=1\\part-all.blocks")),
    Case("encoder-percent", _set_path("encoder", "encoder/%2e%2e/%2e%2e/model.onnx")),
    Case("part-nul", _set_path("part", "data/res=1/part-all\x00.parquet")),
    Case("land-drive", _set_path("land", "C:/Windows/land.npy")),
    Case("land-control", _set_path("land", "land/res=1\n.npy")),
    Case("zarr-dotdot", _set_path("zarr", "zarr/..")),
    Case("index-wrong-folder", _set_path("index", "data/res=1/index.faiss")),
    Case("part-other-resolution", _set_path("part", "data/res=0/part-other.parquet")),
    Case("files-traversal", _edit(lambda m: m["files"].append({"path": "../x", "bytes": 1, "sha256": "0" * 64}))),
    Case("part-not-listed", _edit(lambda m: m["files"].pop(next(i for i, r in enumerate(m["files"])
                                                                  if r["path"].startswith("data/res=1/")))),
         AtlasCorruptError, "not in the manifest's files list"),
    # numbers before memory
    Case("cells-beyond-h3", _edit(lambda m: _res1(m).update(cells=10 ** 12)), AtlasCorruptError, "integer from"),
    Case("rows-inconsistent", _edit(lambda m: _res1(m)["parts"][0].update(rows=100)), AtlasCorruptError,
         "rows its parts hold"),
    Case("dim-huge", _edit(lambda m: m["provenance"].update(dim=10 ** 9)), AtlasCorruptError, "provenance.dim"),
    Case("part-bytes-huge", _edit(lambda m: next(r for r in m["files"] if r["path"].startswith("data/res=1"))
                                  .update(bytes=1 << 49)), AtlasCorruptError, "what its counts imply"),
    Case("block-rows", _edit(lambda m: _res1(m).update(block_rows=1 << 30)), AtlasCorruptError, "block_rows"),
    Case("cells-of-another-resolution", _edit(lambda m: _res1(m)["parts"][0].update(first_cell=0x8001fffffffffff)),
         AtlasCorruptError, "resolution 1"),
    Case("precision-unknown", _edit(lambda m: m.update(precision="float64")), AtlasCorruptError, "precision"),
    Case("int8-without-quantization", _edit(lambda m: m.update(precision="int8")), AtlasCorruptError,
         "quantization"),
    Case("nlist-huge", _edit(lambda m: _res1(m)["index"].update(type="IVF99999999,PQ2", exact=False,
                                                                 nlist=99999999, nprobe=1)),
         AtlasCorruptError, "nlist"),
    Case("nprobe-placed-above-nprobe", _edit(lambda m: _res1(m)["index"].update(type="IVF8,PQ2", exact=False, nlist=8,
                                                                              nprobe=2, nprobe_placed=3)),
         AtlasCorruptError, "nprobe_placed"),
    Case("resolutions-a-list", _edit(lambda m: m.update(resolutions=[1, 2])), AtlasCorruptError, "not an object"),
    Case("part-without-rows", _edit(lambda m: _res1(m)["parts"][0].pop("rows")), AtlasCorruptError, "rows"),
    Case("manifest-too-large", lambda ds: (ds / "manifest.json").write_bytes(
        (ds / "manifest.json").read_bytes()[:-1] + b" " * (65 << 20) + b"}"), AtlasCorruptError, "bytes",
         remote=False),
    Case("manifest-nested-deep", lambda ds: (ds / "manifest.json").write_text(
        json.dumps({**_manifest(ds), "deep": None})[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"),
         AtlasCorruptError, "cannot read"),
    # block tables: checked against their part before a read is sized or placed from them
    Case("blocks-offset-past-part", _rewrite(lambda m: _res1(m)["parts"][0]["blocks"],
                                             _blocks_table(_offsets_past_end)),
         AtlasCorruptError, "past the end of its part", use="lookup"),
    Case("blocks-offset-wraps", _rewrite(lambda m: _res1(m)["parts"][0]["blocks"], _blocks_table(_offset_that_wraps)),
         AtlasCorruptError, "past the end of its part", use="lookup"),
    Case("blocks-rows-too-many", _rewrite(lambda m: _res1(m)["parts"][0]["blocks"], _blocks_table(_rows_too_many)),
         AtlasCorruptError, "rows", use="lookup"),
    Case("blocks-pickle", _rewrite(lambda m: _res1(m)["parts"][0]["blocks"],
                                   _blocks_table(lambda t: np.array([{"a": 1}], dtype=object))),
         AtlasCorruptError, "not a block table", use="lookup"),
    Case("land-float", _rewrite(lambda m: _res1(m)["land"]["path"],
                                lambda d: _npy(np.zeros(_land_cells(d), np.float64))),
         AtlasCorruptError, "not the", use="land"),
    # FAISS indexes: parsed and checked before FAISS sees them (in a child process)
    Case("index-dimension-lies", _rewrite(lambda m: _res1(m)["index"]["path"], _index_header(4, b"\x00\x04\x00\x00")),
         AtlasCorruptError, "not the index its manifest describes", use="similar", child=True),
    Case("index-count-lies", _rewrite(lambda m: _res1(m)["index"]["path"],
                                      _index_header(8, (10 ** 15).to_bytes(8, "little"))),
         AtlasCorruptError, "not the index", use="similar", child=True),
    Case("index-truncated", _rewrite(lambda m: _res1(m)["index"]["path"], lambda d: d[: len(d) // 2]),
         AtlasCorruptError, "past the end", use="similar", child=True),
    Case("index-trailing-bytes", _rewrite(lambda m: _res1(m)["index"]["path"], lambda d: d + b"\x00" * 64),
         AtlasCorruptError, "after the index's end", use="similar", child=True),
    Case("index-other-type", _rewrite(lambda m: _res1(m)["index"]["path"], _index_header(0, b"IxHe")),
         AtlasCorruptError, "not the index", use="similar", child=True),
    Case("index-ivf-list-sizes-lie", lambda ds: _ivf_index(ds, lie=True), AtlasCorruptError, "list sizes",
         use="similar", child=True),
    # the exported encoder: nothing but its own bytes and ONNX's operators (in a child process)
    Case("onnx-external-data", _onnx(_external_data), UnsafeAtlasError, "external data", use="exact", child=True),
    Case("onnx-custom-domain", _onnx(_custom_domain), UnsafeAtlasError, "com.example.evil", use="exact", child=True),
    # links that leave the dataset (a local concern: a server serves bytes, not links)
    Case("part-symlink-outside", _symlink(lambda m: _res1(m)["parts"][0]["path"]), UnsafeAtlasError,
         "leads outside", use="lookup", remote=False),
    Case("index-folder-symlink-outside", _symlink(lambda m: _res1(m)["index"]["path"], folder=True),
         UnsafeAtlasError, "leads outside", use="similar", remote=False),
]


def _npy(array: np.ndarray) -> bytes:
    import io

    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def _land_cells(data: bytes) -> int:
    import io

    return len(np.load(io.BytesIO(data)))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Root folder: ``clean/`` and one folder per case, each an atlas root holding ``toy/``."""
    from builder.build import build

    root = tmp_path_factory.mktemp("hostile")
    build(TOY, resolutions="0-1", output=root / "clean", device="cpu", progress=False)
    for case in CASES + [Case("ivf-honest", lambda ds: _ivf_index(ds, lie=False))]:
        shutil.copytree(root / "clean", root / case.name, symlinks=True)
        case.mutate(root / case.name / "toy")
    for name, datasets in (("names-traversal", ["../../etc"]), ("names-percent", ["%2e%2e"]),
                           ("names-nested", ["a/b"])):
        shutil.copytree(root / "clean", root / name)
        (root / name / "atlas.json").write_text(json.dumps({"format": "hexatlas", "format_version": 2,
                                                            "datasets": datasets}))
    return root


@pytest.fixture(scope="module")
def served(hostile):
    with nginx(hostile) as base:
        yield f"{base}/atlas"


def _op(atlas: query.Atlas, use: str | None) -> object:
    if use in (None, "lookup"):
        return atlas.lookup([48.85, -33.9], [2.35, 18.4], res=1)
    if use == "similar":
        return atlas.similar(lat=48.85, lon=2.35, res=1, k=5)
    if use == "exact":
        return atlas.lookup([48.85], [2.35], exact=True)
    if use == "land":
        return atlas.land_flags(np.array([0x81003ffffffffff], np.uint64), res=1)
    raise AssertionError(use)


def _no_escape() -> None:
    assert not Path("/tmp", OUTSIDE).exists(), "a hostile atlas wrote outside the cache"


def test_a_clean_atlas_and_an_honest_ivf_index_open(hostile, served) -> None:
    for where in (hostile / "clean", f"{served}/clean", hostile / "ivf-honest", f"{served}/ivf-honest/toy"):
        atlas = query.open(where)
        for use in ("lookup", "similar", "exact", "land"):
            _op(atlas, use)
        assert len(atlas.similar(lat=48.85, lon=2.35, res=1, k=5)) == 5
    assert main(["validate", str(hostile / "ivf-honest")]) == 0


OPEN_CASES = [c for c in CASES if c.use is None]


@pytest.mark.parametrize("case", OPEN_CASES, ids=[c.name for c in OPEN_CASES])
def test_refused_when_opened_through_every_entry_point(case, hostile, served, capsys, tmp_path) -> None:
    local = hostile / case.name
    places = [local, local / "toy"] + ([f"{served}/{case.name}", f"{served}/{case.name}/toy"] if case.remote else [])
    for where in places:
        with pytest.raises(case.error, match=case.match):
            query.open(where)
    capsys.readouterr()
    commands = [["info", str(local)], ["validate", str(local)], ["lookup", str(local), "--lat", "1", "--lon", "2"],
                ["similar", str(local), "--lat", "1", "--lon", "2"], ["sql", str(local), "SELECT 1"],
                ["serve", str(local), "--port", "1"], ["publish", str(local), "s3://hexatlas-nowhere/x"]]
    points = tmp_path / "points.csv"
    points.write_text("lat,lon\n1,2\n")
    commands.append(["join", str(local), "--input", str(points), "--output", str(tmp_path / "out.parquet")])
    if case.remote:
        commands += [["info", f"{served}/{case.name}"], ["validate", f"{served}/{case.name}/toy"],
                     ["serve", f"{served}/{case.name}", "--port", "1"]]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err, (argv, err)
    _no_escape()


def test_dataset_names_in_atlas_json_are_checked(served) -> None:
    for name in ("names-traversal", "names-percent", "names-nested"):
        with pytest.raises(UnsafeAtlasError, match="dataset folder name"):
            query.open(f"{served}/{name}")


USE_CASES = [c for c in CASES if c.use is not None and not c.child]


@pytest.mark.parametrize("case", USE_CASES, ids=[c.name for c in USE_CASES])
def test_refused_when_the_file_is_read(case, hostile, served) -> None:
    from fastapi.testclient import TestClient

    from query.server import create_app

    places = [hostile / case.name] + ([f"{served}/{case.name}"] if case.remote else [])
    for where in places:
        atlas = query.open(where)
        with pytest.raises(case.error, match=case.match):
            _op(atlas, case.use)
    if case.use == "lookup":  # (SQL reads the part as Parquet: the block table plays no part there)
        client = TestClient(create_app(query.open(hostile / case.name)))
        answer = client.get("/v1/lookup", params={"lat": 48.85, "lon": 2.35, "res": 1})
        assert answer.status_code == 500 and case.match in answer.json()["detail"]
    assert main(["validate", str(hostile / case.name)]) != 0
    _no_escape()


CHILD_CASES = [c for c in CASES if c.child]
CHILD = """
import json, sys
import query
from tests.query.test_hostile import _op
out = []
for where, use in json.loads(sys.argv[1]):
    try:
        _op(query.open(where), use)
        out.append(["answered", ""])
    except Exception as exc:
        out.append([type(exc).__name__, str(exc)])
print(json.dumps(out))
"""


def test_indexes_and_models_are_checked_before_cpp_reads_them(hostile, served) -> None:
    jobs, expected = [], []
    for case in CHILD_CASES:
        for where in [str(hostile / case.name)] + ([f"{served}/{case.name}"] if case.remote else []):
            jobs.append([where, case.use])
            expected.append(case)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, f"the reader died (status {run.returncode}): {run.stderr[-2000:]}"
    for (kind, message), case, (where, _) in zip(json.loads(run.stdout.splitlines()[-1]), expected, jobs):
        assert kind in {t.__name__ for t in case.error.__mro__ if issubclass(t, HexatlasError)} and \
            case.match in message, (case.name, where, kind, message)
    _no_escape()


def test_a_downloaded_index_stays_in_the_cache(hostile, served, monkeypatch) -> None:
    """The issue's exploit, had the manifest check not refused it: the download's final path
    is checked on its own (a mirror whose folder links outside is refused)."""
    cache = Path(os.environ["HEXATLAS_CACHE"])
    atlas = query.open(f"{served}/clean/toy")
    mirror = atlas._mirrors["toy"]
    mirror.mkdir(parents=True, exist_ok=True)
    outside = cache.parent / f"{OUTSIDE}-cache-escape"
    outside.mkdir(exist_ok=True)
    shutil.rmtree(mirror / "index", ignore_errors=True)
    (mirror / "index").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafeAtlasError, match="leads outside"):
        atlas.similar(lat=48.85, lon=2.35, res=1)
    assert not any(outside.iterdir())


def test_a_server_sending_more_than_it_should_is_refused(hostile, tmp_path) -> None:
    """A manifest larger than a reader expects is not read whole, over HTTP too."""
    big = tmp_path / "big" / "toy"
    shutil.copytree(hostile / "clean" / "toy", big)
    (big / "manifest.json").write_bytes(b"{" + b" " * (65 << 20) + b"}")
    with nginx(tmp_path / "big") as base, pytest.raises(AtlasCorruptError, match="bytes a reader expects"):
        query.open(f"{base}/atlas/toy")


def test_random_manifest_mutations_open_or_raise_a_hexatlas_error(hostile, tmp_path_factory) -> None:
    """Whatever a manifest's fields hold, opening it (and using what opened) works or raises a
    HexatlasError: never a KeyError, TypeError or a crash."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    ds = tmp_path_factory.mktemp("mutated") / "toy"
    shutil.copytree(hostile / "clean" / "toy", ds)
    clean = _manifest(ds)
    leaves = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=True),
                       st.text(max_size=20), st.sampled_from(["../x", "/etc/passwd", "data/res=1/a.parquet", "IVF8,PQ2"]),
                       st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))

    def paths(value: object, prefix: tuple = ()) -> list[tuple]:
        out = [prefix]
        if isinstance(value, dict):
            for key, item in value.items():
                out += paths(item, (*prefix, key))
        elif isinstance(value, list):
            for i, item in enumerate(value[:3]):
                out += paths(item, (*prefix, i))
        return out

    all_paths = [p for p in paths(clean) if p]

    @hypothesis.given(st.lists(st.tuples(st.sampled_from(all_paths), leaves, st.booleans()), min_size=1, max_size=3))
    def check(changes) -> None:
        m = copy.deepcopy(clean)
        for path, value, delete in changes:
            target = m
            try:
                for key in path[:-1]:
                    target = target[key]
                if delete and isinstance(target, dict):
                    target.pop(path[-1], None)
                else:
                    target[path[-1]] = value
            except (KeyError, IndexError, TypeError):
                continue
        (ds / "manifest.json").write_text(json.dumps(m))
        try:
            atlas = query.open(ds)
            atlas.info()
            atlas.lookup([48.85], [2.35], on_invalid="null")
            atlas.similar(lat=48.85, lon=2.35, k=3)
        except HexatlasError:
            pass

    check()
    _no_escape()
