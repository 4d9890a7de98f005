"""The S3 build lock (conditional writes on moto's server) and ``hexatlas publish``.

moto's S3 server (5.x) honours ``If-None-Match: *`` on PutObject, answering 412 to the
second writer, as AWS S3 does; the lock is tested there. Publishing to the Hub is not run
against a server here (there is no Hub server to run offline): its dataset card is tested,
and reading the Hub's URL layout is tested in tests/query/test_remote.py.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import threading

import numpy as np
import pytest

import query
from builder.build import build
from catalog.cli import main
from catalog.errors import AtlasBusyError, AtlasCorruptError, InvalidArgumentError
from catalog.lock import LOCK_NAME, s3_lock
from catalog.manifest import read_manifest, validate_dataset
from catalog.upload import dataset_card, publish
from catalog.storage import ObjectStore, open_store
from tests.data.faults import crash_on_shard_write
from tests.data.s3_server import BUCKET, s3_server

TOY = "tests.data.toy_encoder:load"


@pytest.fixture(scope="module")
def s3():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    root = tmp_path_factory.mktemp("to-publish")
    build(TOY, resolutions="0-2", output=root, device="cpu", progress=False)
    return root


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HEXATLAS_CACHE", str(tmp_path / "cache"))


def _lock_body(uri):
    return json.loads(open_store(uri).read_bytes(LOCK_NAME))


def test_a_second_build_is_refused_while_one_holds_the_lock(s3) -> None:
    uri = f"s3://{BUCKET}/locked/toy"
    with s3_lock(uri) as record:
        held = _lock_body(uri)
        assert held["token"] == record["token"] and held["host"] == socket.gethostname() and held["pid"] > 0
        with pytest.raises(AtlasBusyError, match=rf"another build holds the lock on {uri}: pid \d+ on .*since .*--break-lock"):
            build(TOY, resolutions="0", output=f"s3://{BUCKET}/locked", device="cpu", progress=False)
        assert not open_store(uri).exists("manifest.json")
    assert not open_store(uri).exists(LOCK_NAME)  # released
    build(TOY, resolutions="0", output=f"s3://{BUCKET}/locked", device="cpu", progress=False)
    assert validate_dataset(uri) == [] and not open_store(uri).exists(LOCK_NAME)


def test_exactly_one_of_racing_builders_gets_the_lock(s3) -> None:
    uri = f"s3://{BUCKET}/race/toy"
    barrier, won, lost, release = threading.Barrier(8), [], [], threading.Event()

    def contender(i):
        barrier.wait()
        try:
            with s3_lock(uri):
                won.append(i)
                release.wait(10)
        except AtlasBusyError:
            lost.append(i)
        if len(lost) == 7:
            release.set()

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(won) == 1 and len(lost) == 7


def test_a_lock_left_by_a_dead_build_is_reported_with_how_to_clear_it(s3, capsys) -> None:
    uri = f"s3://{BUCKET}/stale/toy"
    dead = subprocess.Popen(["true"])
    dead.wait()
    with open_store(uri).staged(LOCK_NAME) as tmp:
        tmp.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "2026-01-01T00:00:00+00:00",
                                   "command": "hexatlas build --output s3://x", "token": "old"}))
    with pytest.raises(AtlasBusyError, match=rf"pid {dead.pid} on .*that process is gone from this host, so the lock is "
                                             rf"stale.*--break-lock, or delete {uri}/{LOCK_NAME}"):
        build(TOY, resolutions="0", output=f"s3://{BUCKET}/stale", device="cpu", progress=False)
    assert main(["build", "--model", TOY, "--resolutions", "0", "--output", f"s3://{BUCKET}/stale", "--device", "cpu",
                 "--no-progress"]) == 2
    assert "lock is stale" in capsys.readouterr().err
    build(TOY, resolutions="0", output=f"s3://{BUCKET}/stale", device="cpu", progress=False, break_lock=True)
    assert validate_dataset(uri) == [] and not open_store(uri).exists(LOCK_NAME)


def test_publish_to_s3_is_what_was_built_and_resumes(s3, atlas, monkeypatch) -> None:
    dest = f"s3://{BUCKET}/published"
    real, calls = ObjectStore._upload, {"n": 0}

    def failing(self, local, rel):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("simulated network loss")
        return real(self, local, rel)

    monkeypatch.setattr("catalog.upload.UPLOAD_THREADS", 1)  # the failure falls after three uploads
    monkeypatch.setattr(ObjectStore, "_upload", failing)
    with pytest.raises(OSError, match="simulated network loss"):
        publish(atlas, dest, progress=False)
    with pytest.raises(AtlasCorruptError, match="has no manifest.json"):  # not published: readers refuse it
        read_manifest(f"{dest}/toy")
    monkeypatch.setattr(ObjectStore, "_upload", real)
    summary = publish(atlas, dest, progress=False)
    files = len(read_manifest(atlas / "toy")["files"])
    assert summary.datasets == {"toy": "uploaded"} and 3 <= summary.skipped_files < files
    assert summary.files == files - summary.skipped_files + 2  # and the STAC collection and manifest
    assert validate_dataset(f"{dest}/toy") == [] and not open_store(f"{dest}/toy").exists(LOCK_NAME)
    assert json.loads(open_store(dest).read_bytes("atlas.json"))["datasets"] == ["toy"]
    lat, lon = np.array([48.85, -33.87]), np.array([2.35, 151.21])
    np.testing.assert_array_equal(query.open(dest).lookup(lat, lon), query.open(atlas).lookup(lat, lon))
    again = publish(atlas, dest, progress=False)
    assert again.datasets == {"toy": "unchanged"} and again.files == 0
    assert main(["publish", str(atlas), dest, "--no-progress"]) == 0


def test_publish_refuses_an_unfinished_or_invalid_atlas(s3, atlas, tmp_path, monkeypatch, capsys) -> None:
    restore = crash_on_shard_write(monkeypatch, 2)
    with pytest.raises(RuntimeError):
        build(TOY, resolutions="0-1", output=tmp_path / "half", device="cpu", progress=False)
    restore()
    with pytest.raises(AtlasCorruptError, match="has unfinished builds \\(toy\\)"):
        publish(tmp_path / "half", f"s3://{BUCKET}/nope")
    with pytest.raises(AtlasCorruptError, match="has no manifest.json .*unfinished"):
        publish(tmp_path / "half" / "toy", f"s3://{BUCKET}/nope")
    import shutil

    shutil.copytree(atlas, tmp_path / "bad")
    part = tmp_path / "bad" / "toy" / "data" / "res=1" / "part-all.parquet"
    data = bytearray(part.read_bytes())
    data[200] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(AtlasCorruptError, match=r"refusing to publish .*not valid \(1 problem, first: altered file "
                                                r"\(sha256 differs\): data/res=1/part-all.parquet\).*hexatlas validate"):
        publish(tmp_path / "bad", f"s3://{BUCKET}/nope")
    assert not open_store(f"s3://{BUCKET}/nope").root_exists()  # refused before a byte moved
    with pytest.raises(InvalidArgumentError, match="cannot publish to 'https://example.org/a'"):
        publish(atlas, "https://example.org/a")
    assert main(["publish", str(tmp_path / "bad"), f"s3://{BUCKET}/nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hexatlas publish: error: refusing to publish") and err.count("\n") == 1


def test_the_dataset_card_says_what_is_published_and_how_to_query_it(atlas) -> None:
    manifest = read_manifest(atlas / "toy")
    manifest["resolutions"]["2"]["fidelity"] = {"mean_cosine": 0.9987, "points": 2000}
    card = dataset_card({"toy": manifest}, "org/toy-atlas")
    assert card.startswith("---\nlicense: mit\n") and "- h3" in card
    assert "**Model**: toy, 4-d" in card and "MIT" in card and "float16" in card
    assert "| 0 | 122 | 1 |" in card and "| 2 | 5,882 | 1 |" in card
    assert "mean_cosine 0.9987, points 2000" in card.splitlines()[[i for i, line in enumerate(card.splitlines())
                                                                 if line.startswith("| 2 |")][0]]
    assert "hexatlas lookup hf://datasets/org/toy-atlas --lat 48.8566 --lon 2.3522 --res 0 --model toy" in card
    assert 'query.open("hf://datasets/org/toy-atlas")' in card


def test_publishing_to_an_unreachable_hub_is_one_clear_error(atlas, monkeypatch, capsys) -> None:
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    assert main(["publish", str(atlas), "hf://datasets/org/toy-atlas"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hexatlas publish: error: cannot publish to hf://datasets/org/toy-atlas: ") and \
        "Connection refused" in err and "publish again" in err and err.count("\n") == 1
    with pytest.raises(InvalidArgumentError, match="publish to a Hub dataset"):
        publish(atlas, "hf://models/org/x")
