"""A build killed at any moment, then run again, ends as if it had never been interrupted;
readers of an atlas being rebuilt see the old or the new dataset, never a mix; a full disk
stops a build cleanly and it resumes once there is space.

The builds run as ``hexatlas build`` in subprocesses (tests/data/killable_build.py: small
shards, 22 at resolutions 0-2, and each step that publishes or deletes a file announced and
held until the test lets it go), and are stopped with a real SIGKILL: at a chosen step (a
part file written but not renamed, the index, the manifest, an old generation's file being
deleted...) or at a random moment. The default run kills 4 times; the ``slow`` test 24+.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from catalog.manifest import read_manifest, validate_dataset

TOY = "tests.data.toy_encoder:load"
ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--model", TOY, "--resolutions", "0-2", "--device", "cpu", "--no-progress", "--formats", "zarr"]
PHASES = ("shard", "index", "zarr", "land", "record", "manifest", "delete", "cleanup")


class Killer:
    """Runs the build in a subprocess and SIGKILLs it at a step or a moment."""

    def __init__(self, folder: Path) -> None:
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "HEXATLAS_TEST_LAND_CACHE": str(folder / "land-cache")}
        self.log = folder / "build.log"
        self.kills: Counter[str] = Counter()  # by phase ("time" for the moments)

    def run(self, out: Path, precision: str, *, overwrite: bool = False, at: tuple[str, int] | None = None,
            after_s: float | None = None) -> list[tuple[str, str]]:
        """One build; killed at the ``n``-th step of phase ``at = (phase, n)`` of this run, or
        ``after_s`` seconds in. Returns the steps it took (a killed run's last one is where it
        died); a run that is not killed must succeed."""
        argv = [sys.executable, "-m", "tests.data.killable_build", *ARGS, "--output", str(out),
                "--precision", precision, *(["--overwrite"] if overwrite else [])]
        env = {**self.env, "HEXATLAS_STEPS": "0" if after_s is not None else "1"}
        steps: list[tuple[str, str]] = []
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=log)
            if after_s is not None:
                try:
                    proc.wait(timeout=after_s)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    self.kills["time"] += 1
                    return [("time", f"{after_s:.2f} s")]
                proc.stdout.read()
            else:
                seen: Counter[str] = Counter()
                for line in proc.stdout:
                    if not line.startswith(b"@@step "):
                        continue
                    kind, rel = line.decode().rstrip("\n").split(maxsplit=2)[1:]
                    steps.append((kind, rel))
                    if at is not None and kind == at[0] and seen[kind] == at[1]:
                        proc.send_signal(signal.SIGKILL)  # while it waits at this very step
                        proc.wait()
                        self.kills[kind] += 1
                        return steps
                    seen[kind] += 1
                    proc.stdin.write(b"\n")
                    proc.stdin.flush()
            proc.stdin.close()
            code = proc.wait()
        assert code == 0, f"{argv[3:]} failed ({code}): {self.log.read_text()[-1500:]}"
        return steps


def _plain(rel: str) -> str:
    return re.sub(r"\.g\d+(?=\.(parquet|blocks|faiss|npy|zarr|onnx)(/|$))", "", rel)


def contents(dataset: Path) -> dict[str, str]:
    """sha256 of every file the manifest lists, by its path without the generation."""
    return {_plain(r["path"]): r["sha256"] for r in read_manifest(dataset)["files"]}


def assert_same(dataset: Path, reference: Path) -> None:
    """Valid, the files of the reference byte for byte, and the same cells and embeddings."""
    assert validate_dataset(dataset) == []
    assert contents(dataset) == contents(reference)
    assert not (dataset / "_build").exists() and not list(dataset.rglob("*.tmp*"))
    got, want = read_manifest(dataset), read_manifest(reference)
    for res in ("0", "1", "2"):
        a = pq.read_table([str(dataset / p["path"]) for p in got["resolutions"][res]["parts"]])
        b = pq.read_table([str(reference / p["path"]) for p in want["resolutions"][res]["parts"]])
        np.testing.assert_array_equal(a.column("cell").to_numpy(), b.column("cell").to_numpy())
        assert a.column("embedding").equals(b.column("embedding"))


def answers(dataset: Path) -> np.ndarray:
    """What the published dataset answers at every resolution-2 cell centre."""
    import h3.api.numpy_int as h3i

    import query
    from catalog.cells import cells_to_latlng

    cells = np.concatenate([h3i.cell_to_children(c, 2) for c in h3i.get_res0_cells()]).astype(np.uint64)
    lat, lon = cells_to_latlng(np.sort(cells))
    return query.open(dataset).lookup(lat, lon, res=2)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Uninterrupted builds, float32 and float16, with the steps each took."""
    folder = tmp_path_factory.mktemp("kill")
    killer = Killer(folder)
    refs = {}
    for precision in ("float32", "float16"):
        out = folder / f"ref-{precision}"
        start = time.perf_counter()
        steps = killer.run(out, precision)
        refs[precision] = {"dataset": out / "toy", "steps": steps, "seconds": time.perf_counter() - start,
                           "answers": answers(out / "toy")}
    return folder, refs


def rebuild_steps(folder: Path, refs: dict) -> tuple[list[tuple[str, str]], float]:
    """The steps and seconds of an uninterrupted --overwrite rebuild (float16 to float32)."""
    start = time.perf_counter()
    out = folder / "rebuild-probe"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(refs["float16"]["dataset"].parent, out)
    steps = Killer(folder).run(out, "float32", overwrite=True)
    assert_same(out / "toy", refs["float32"]["dataset"])
    return steps, time.perf_counter() - start


def test_the_steps_cover_every_phase(references) -> None:
    _, refs = references
    fresh = Counter(kind for kind, _ in refs["float32"]["steps"])
    assert fresh["shard"] == 2 * 22 and fresh["manifest"] == 1 and fresh["index"] == 3 and fresh["zarr"] == 3
    assert fresh["land"] == 3 and fresh["record"] > 22 and fresh["cleanup"] == 1


def _check_published(dataset: Path, refs: dict, allowed: tuple[str, ...]) -> None:
    """Between kills of a rebuild the published dataset answers as one of the references."""
    got = answers(dataset)
    assert any(np.array_equal(got, refs[p]["answers"]) for p in allowed)


def test_killed_four_times_then_resumed_ends_as_if_never_interrupted(references, tmp_path) -> None:
    folder, refs = references
    rng = random.Random(17)
    killer = Killer(folder)
    out = tmp_path / "atlas"
    # a fresh build: killed while publishing a shard, then while publishing an index
    killer.run(out, "float32", at=("shard", rng.randrange(48)))
    assert not (out / "toy" / "manifest.json").exists()
    killer.run(out, "float32", at=("index", rng.randrange(3)))
    assert not (out / "toy" / "manifest.json").exists()
    killer.run(out, "float32")
    assert_same(out / "toy", refs["float32"]["dataset"])
    # an --overwrite rebuild to float16: killed with its manifest written but not renamed, then
    # while deleting the old generation
    steps = killer.run(out, "float16", overwrite=True, at=("manifest", 0))
    assert steps[-1] == ("manifest", "manifest.json")
    assert validate_dataset(out / "toy") == [] and read_manifest(out / "toy")["precision"] == "float32"
    _check_published(out / "toy", refs, ("float32",))
    killer.run(out, "float16", overwrite=True, at=("delete", rng.randrange(40)))
    assert read_manifest(out / "toy")["precision"] == "float16"  # published; the old files are going
    _check_published(out / "toy", refs, ("float16",))
    steps = killer.run(out, "float16", overwrite=True)  # the same command: it finishes the swap
    kinds = [kind for kind, _ in steps]  # its collection.json rewritten, old files deleted, no more
    assert set(kinds) == {"write", "stac", "delete", "cleanup"} and kinds[-1] == "cleanup"
    assert_same(out / "toy", refs["float16"]["dataset"])
    assert sum(killer.kills.values()) == 4


@pytest.mark.slow
def test_killed_at_random_steps_and_moments(references, tmp_path) -> None:
    """24 kills or more: each scenario (a fresh build, or an --overwrite rebuild of the other
    precision) is killed one to three times, at a random step of a random phase or at a
    random moment, then run to completion and compared with the uninterrupted build.
    ``HEXATLAS_KILL_SEED`` picks other kills (default 1717)."""
    folder, refs = references
    rng = random.Random(int(os.environ.get("HEXATLAS_KILL_SEED", "1717")))
    killer = Killer(folder)
    refs = {**refs}
    refs["rebuild_steps"], refs["rebuild_seconds"] = rebuild_steps(folder, refs)
    kinds = [kind for kind, _ in refs["rebuild_steps"]]
    assert kinds.count("delete") > 40 and kinds.index("delete") > kinds.index("manifest")
    scenarios = 0
    while sum(killer.kills.values()) < 24:
        scenarios += 1
        out = tmp_path / f"s{scenarios}"
        precision = rng.choice(("float32", "float16"))
        rebuild = rng.random() < 0.5
        if rebuild:
            other = "float16" if precision == "float32" else "float32"
            shutil.copytree(refs[other]["dataset"].parent, out)
            full, seconds = refs["rebuild_steps"], refs["rebuild_seconds"]
        else:
            other, full, seconds = None, refs[precision]["steps"], refs[precision]["seconds"]
        counts = Counter(kind for kind, _ in full)
        finished = False
        for _ in range(rng.randint(1, 3)):
            kills = sum(killer.kills.values())
            if rng.random() < 0.3:
                killer.run(out, precision, overwrite=rebuild, after_s=rng.uniform(0.5, seconds))
            else:
                phase = rng.choice([p for p in PHASES if counts[p]])
                killer.run(out, precision, overwrite=rebuild, at=(phase, rng.randrange(counts[phase])))
            if sum(killer.kills.values()) == kills:  # it got to the end first
                finished = True
                break
            if rebuild:  # the published dataset, between kills: the old one or the new one
                _check_published(out / "toy", refs, (other, precision))
        if not finished:
            killer.run(out, precision, overwrite=rebuild)  # the same command: it resumes
        assert_same(out / "toy", refs[precision]["dataset"])
    print(f"\n{sum(killer.kills.values())} kills in {scenarios} scenarios, all resumed to identical "
          f"atlases: {dict(sorted(killer.kills.items()))}")
    assert len(killer.kills) >= 6  # the kills landed in many phases


def test_readers_during_rebuilds_see_the_old_or_the_new_dataset(references, tmp_path) -> None:
    """A process looking cells up in a loop while --overwrite swaps the dataset twice sees
    float16 or float32 answers, at times an AtlasChangedError (after which it reopens),
    nothing else."""
    folder, refs = references
    killer = Killer(folder)
    out = tmp_path / "atlas"
    shutil.copytree(refs["float16"]["dataset"].parent, out)
    stop, report = tmp_path / "stop", tmp_path / "report.json"
    reader = subprocess.Popen([sys.executable, "-m", "tests.data.lookup_loop", str(out),
                               str(refs["float16"]["dataset"]), str(refs["float32"]["dataset"]), str(stop),
                               str(report), "5"], cwd=ROOT, env=killer.env)
    try:
        time.sleep(3.0)  # it has started answering
        for precision in ("float32", "float16"):
            killer.run(out, precision, overwrite=True, after_s=120)
        time.sleep(0.5)
    finally:
        stop.touch()
        assert reader.wait(timeout=60) == 0
    seen = json.loads(report.read_text())
    print(f"\nreader during 2 rebuilds: {seen}")
    assert seen["errors"] == {} and "mix" not in seen["answers"]
    assert seen["answers"].get("a", 0) > 0 and seen["answers"].get("b", 0) > 0  # it saw both datasets
    assert_same(out / "toy", refs["float16"]["dataset"])


# ------------------------------------------------------------------------------------ disk full

@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 400 KB mounted for the test (root only); yields (mount point, resize)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)

    try:
        yield mount, resize
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _small_shards(monkeypatch) -> None:
    import builder.grid
    from tests.data.killable_build import SHARD_CELLS

    monkeypatch.setattr(builder.grid, "SINGLE_SHARD_MAX_RES", 0)
    monkeypatch.setattr(builder.grid, "SHARD_CELLS", SHARD_CELLS)


def _nothing_half_published(dataset: Path) -> None:
    """No temporary left, no manifest of the new build, and each part file there is whole."""
    assert not list(dataset.rglob("*.tmp")) and not list(dataset.rglob("*.tmpdir"))
    for part in dataset.glob("data/res=*/part-*.parquet"):
        assert pq.read_metadata(part).num_rows > 0


def test_a_full_disk_stops_the_build_cleanly_and_it_resumes(small_disk, references, monkeypatch) -> None:
    from builder.build import build
    from catalog.errors import StorageError

    mount, resize = small_disk
    _, refs = references
    _small_shards(monkeypatch)
    with pytest.raises(StorageError, match=r"no space left on device at .*: free space .* run the same build again "
                                           "to resume") as caught:
        build(TOY, resolutions="0-2", output=mount, device="cpu", precision="float32", formats="zarr",
              progress=False)
    assert isinstance(caught.value, OSError)
    dataset = mount / "toy"
    assert not (dataset / "manifest.json").exists()
    _nothing_half_published(dataset)
    resize("16m")
    summary = build(TOY, resolutions="0-2", output=mount, device="cpu", precision="float32", formats="zarr",
                    progress=False)
    assert summary.resumed_shards > 0
    assert_same(dataset, refs["float32"]["dataset"])
    # a rebuild that fills the disk: the published dataset stays as it was, and readable
    filler = mount / "filler"
    free = shutil.disk_usage(mount).free
    filler.write_bytes(b"\0" * (free - 300_000))
    with pytest.raises(StorageError, match="no space left on device"):
        build(TOY, resolutions="0-2", output=mount, device="cpu", precision="float16", formats="zarr",
              progress=False, overwrite=True)
    _nothing_half_published(dataset)
    assert validate_dataset(dataset) == [] and read_manifest(dataset)["precision"] == "float32"
    np.testing.assert_array_equal(answers(dataset), refs["float32"]["answers"])
    filler.unlink()
    build(TOY, resolutions="0-2", output=mount, device="cpu", precision="float16", formats="zarr", progress=False,
          overwrite=True)
    assert_same(dataset, refs["float16"]["dataset"])


def test_a_full_disk_is_one_line_from_the_cli(small_disk, references, tmp_path) -> None:
    mount, _ = small_disk
    folder, _ = references
    done = subprocess.run([sys.executable, "-m", "tests.data.killable_build", *ARGS, "--output", str(mount)],
                          cwd=ROOT, env=Killer(folder).env, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no space left on device at" in done.stderr, done.stderr


# ------------------------------------------------------------------------ an atlas opened before

def test_an_atlas_opened_before_a_rebuild_says_so_and_reopens(tmp_path) -> None:
    """What it has open answers as before; a file it must open now is gone: AtlasChangedError,
    then reopen() reads the new dataset. The server answers 503 once and serves the new one."""
    from fastapi.testclient import TestClient

    import query
    from builder.build import build
    from catalog.errors import AtlasChangedError
    from query.server import create_app

    build(TOY, resolutions="0-1", output=tmp_path, device="cpu", precision="float16", progress=False)
    before = query.open(tmp_path)
    old0 = before.lookup(lat=[10.0], lon=[20.0], res=0)
    client = TestClient(create_app(query.open(tmp_path)))
    assert client.get("/v1/lookup", params={"lat": 10, "lon": 20, "res": 0}).status_code == 200
    build(TOY, resolutions="0-1", output=tmp_path, device="cpu", precision="float32", progress=False, overwrite=True)
    np.testing.assert_array_equal(before.lookup(lat=[10.0], lon=[20.0], res=0), old0)  # its part is open
    with pytest.raises(AtlasChangedError, match=r"rebuilt while it was open \(generation 0, now 1\): "
                                                r"blocks/res=1/part-all.blocks is gone\. Open it again"):
        before.lookup(lat=[10.0], lon=[20.0], res=1)
    with pytest.raises(AtlasChangedError):
        before.similar(lat=10.0, lon=20.0, res=1, k=3)
    after = before.reopen()
    new1 = after.lookup(lat=[10.0], lon=[20.0], res=1)
    assert after.info()["toy"]["precision"] == "float32"
    assert after.sql("SELECT count(*) AS n FROM embeddings").column("n")[0].as_py() == 122 + 842
    # the server: the request that found the files gone is answered 503 (send it again), then the new atlas
    params = {"lat": 10, "lon": 20, "res": 1}
    first = client.get("/v1/lookup", params=params)
    assert first.status_code == 503 and first.json()["error"] == "AtlasChangedError"
    again = client.get("/v1/lookup", params=params)
    assert again.status_code == 200
    np.testing.assert_allclose(again.json()["embedding"], new1[0], rtol=1e-6)
