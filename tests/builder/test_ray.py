"""The Ray executor: same atlas as a local build, killed tasks retried, failed runs resumed.

One local Ray instance (2 CPUs) serves the module. Faults are injected through an encoder
plugin defined here (``faulty``): its checkpoint argument names a control directory whose
files tell the worker to die once or to fail, so the driver's arguments (and therefore the
build's identity) stay the same between the faulty run and the resumed one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from builder.build import build
from builder.grid import cell_count
from catalog.cli import main
from catalog.errors import AtlasCorruptError, BuildFailedError, InvalidArgumentError, MissingDependencyError
from catalog.manifest import read_manifest, validate_dataset
from tests.data.faults import crash_on_shard_write
from tests.data.toy_encoder import ToyModule
from tests.data.toy_encoder import load as load_toy

ray = pytest.importorskip("ray")

TOY = "tests.data.toy_encoder:load"
FAULTY = "tests.builder.test_ray:faulty"
REPO = Path(__file__).resolve().parents[2]


class _FaultyModule(ToyModule):
    """The toy encoder, plus faults read from files in ``control`` at every call."""

    def __init__(self, control: str) -> None:
        super().__init__()
        self.control = Path(control)

    def forward(self, lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
        if lat.numel() > cell_count(1):  # only the res-2 shard has batches this large
            if (self.control / "kill-once").exists():
                try:  # the first worker to get here claims the fault and dies like a kill -9
                    os.close(os.open(self.control / "killed", os.O_CREAT | os.O_EXCL))
                    os._exit(1)
                except FileExistsError:
                    pass
            if (self.control / "fail").exists():
                raise ValueError("injected fault in the res-2 shard")
        return super().forward(lat, lon)


def faulty(*, checkpoint=None, device="auto", dtype=None):
    from builder.encoders import Encoder

    toy = load_toy(device=device, dtype=dtype)
    return Encoder(_FaultyModule(checkpoint), provenance=toy.provenance, device=device, dtype=dtype)


@pytest.fixture(scope="module")
def ray_cluster():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from tests.data.s3_server import s3_server

    # The S3 variables are set before Ray starts, so that its workers inherit them (on a
    # cluster, each node's environment provides them); PYTHONPATH lets workers import the
    # test plugins (on a cluster: install the plugin on every node).
    with s3_server() as endpoint:
        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
        try:
            yield endpoint
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The local executor's atlas, resolutions 0-2."""
    out = tmp_path_factory.mktemp("local")
    build(TOY, resolutions="0-2", output=out, device="cpu", precision="float32", progress=False)
    return out / "toy"


def _contents(dataset, res, filesystem=None):
    table = pq.read_table(f"{dataset}/data/res={res}", filesystem=filesystem)
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    return table.column("cell").to_numpy(), emb


def _assert_same_atlas(dataset, reference, filesystem=None) -> None:
    for res in (0, 1, 2):
        cells, emb = _contents(dataset, res, filesystem)
        ref_cells, ref_emb = _contents(reference, res)
        assert len(cells) == len(np.unique(cells)) == cell_count(res)
        np.testing.assert_array_equal(cells, ref_cells)
        np.testing.assert_array_equal(emb, ref_emb)


def test_ray_build_is_identical_to_a_local_build(ray_cluster, reference, tmp_path) -> None:
    summary = build(TOY, resolutions="0-2", output=tmp_path, device="cpu", precision="float32", progress=False,
                    executor="ray")
    assert summary.cells == {r: cell_count(r) for r in (0, 1, 2)}
    _assert_same_atlas(tmp_path / "toy", reference)
    assert validate_dataset(tmp_path / "toy") == []
    manifest, ref_manifest = read_manifest(tmp_path / "toy"), read_manifest(reference)
    assert manifest["build"]["executor"] == "ray" and "shards (ray, wall)" in manifest["timings_s"]
    shard_digests = {r["path"]: r["sha256"] for r in manifest["files"] if r["path"].endswith(".parquet")}
    assert shard_digests == {r["path"]: r["sha256"] for r in ref_manifest["files"] if r["path"].endswith(".parquet")}
    assert not (tmp_path / "toy" / "_build").exists()


def test_ray_tasks_add_their_shards_to_the_index(ray_cluster, tmp_path, monkeypatch) -> None:
    import builder.index
    from tests.data.recall import approximate_above, few_recall_queries

    few_recall_queries(monkeypatch)
    approximate_above(monkeypatch, 1000, 4)
    # the first setting tried is kept (the 4-d toy's recall would climb the whole ladder): the
    # lists the tasks add are the point here, and the tuning is the driver's, tested elsewhere
    monkeypatch.setattr(builder.index, "RECALL_TARGET", 0.0)
    build(TOY, resolutions="2", output=tmp_path / "local", device="cpu", progress=False)

    def not_here(*args):
        raise AssertionError("the driver encoded a shard into the index")

    monkeypatch.setattr(builder.index, "add_shard", not_here)  # the tasks, in their own processes, do
    build(TOY, resolutions="2", output=tmp_path / "ray", device="cpu", progress=False, executor="ray")
    info = read_manifest(tmp_path / "ray" / "toy")["resolutions"]["2"]["index"]
    assert not info["exact"] and info["recall_at_10"] > 0
    index = "toy/index/res=2.faiss"
    assert (tmp_path / "ray" / index).read_bytes() == (tmp_path / "local" / index).read_bytes()


def test_ray_build_to_s3(ray_cluster, reference) -> None:
    from catalog.storage import open_store
    from tests.data.s3_server import BUCKET

    uri = f"s3://{BUCKET}/ray"
    summary = build(TOY, resolutions="0-2", output=uri, device="cpu", precision="float32", progress=False,
                    executor="ray")
    assert summary.dataset == f"{uri}/toy"
    fs, root = open_store(f"{uri}/toy").filesystem()
    _assert_same_atlas(root, reference, fs)
    assert validate_dataset(f"{uri}/toy") == []


def test_a_killed_task_is_retried_without_duplicates(ray_cluster, reference, tmp_path) -> None:
    control = tmp_path / "control"
    control.mkdir()
    (control / "kill-once").touch()
    summary = build(FAULTY, checkpoint=str(control), resolutions="0-2", output=tmp_path / "atlas", device="cpu",
                    precision="float32", batch_size=8192, progress=False, executor="ray")
    assert (control / "killed").exists()  # a worker really died mid-shard
    assert summary.cells == {r: cell_count(r) for r in (0, 1, 2)}
    _assert_same_atlas(tmp_path / "atlas" / "toy", reference)
    assert validate_dataset(tmp_path / "atlas" / "toy") == []


def test_failed_shards_are_named_and_the_build_resumes(ray_cluster, reference, tmp_path) -> None:
    control = tmp_path / "control"
    control.mkdir()
    (control / "fail").touch()
    args = {"checkpoint": str(control), "resolutions": "0-2", "output": tmp_path / "atlas", "device": "cpu",
                "precision": "float32", "batch_size": 8192, "progress": False, "executor": "ray"}
    with pytest.raises(BuildFailedError, match=r"1 of 3 shards failed .*res=2/shard=all.*injected fault in the res-2 "
                                               r"shard.*The 2 finished shards are kept.*run the same build again"):
        build(FAULTY, **args)
    dataset = tmp_path / "atlas" / "toy"
    with pytest.raises(AtlasCorruptError, match="unfinished"):
        read_manifest(dataset)
    assert sorted(p.name for p in (dataset / "_build" / "done").iterdir()) == [
        "res=0_shard=all.json", "res=1_shard=all.json"]
    (control / "fail").unlink()  # the cause is fixed: the same command resumes
    summary = build(FAULTY, **args)
    assert summary.resumed_shards == 2
    _assert_same_atlas(dataset, reference)
    assert validate_dataset(dataset) == []


def test_resume_across_executors(ray_cluster, reference, tmp_path, monkeypatch) -> None:
    """A local build interrupted after two shards, finished by Ray (and the other way round works alike)."""
    restore = crash_on_shard_write(monkeypatch, 3, "driver killed")
    with pytest.raises(RuntimeError, match="driver killed"):
        build(TOY, resolutions="0-2", output=tmp_path, device="cpu", precision="float32", progress=False)
    restore()
    summary = build(TOY, resolutions="0-2", output=tmp_path, device="cpu", precision="float32", progress=False,
                    executor="ray")
    assert summary.resumed_shards == 2
    _assert_same_atlas(tmp_path / "toy", reference)


def test_an_encoder_object_reaches_the_workers(ray_cluster, reference, tmp_path) -> None:
    summary = build(encoder=load_toy(device="cpu"), resolutions="0-2", output=tmp_path, precision="float32",
                    progress=False, executor="ray")
    assert summary.cells[2] == cell_count(2)
    _assert_same_atlas(tmp_path / "toy", reference)


def test_cli_executor_options(ray_cluster, reference, tmp_path, capsys) -> None:
    argv = ["build", "--model", TOY, "--resolutions", "0-2", "--precision", "float32", "--output", str(tmp_path),
            "--device", "cpu", "--no-progress", "--executor", "ray"]
    assert main(argv) == 0
    assert "6,846 cells" in capsys.readouterr().err
    _assert_same_atlas(tmp_path / "toy", reference)
    assert main(["build", "--model", TOY, "--output", str(tmp_path / "b"), "--ray-address", "auto"]) == 2
    assert "needs executor='ray' (--executor ray)" in capsys.readouterr().err


def test_one_gpu_per_task_where_there_are_gpus() -> None:
    from builder.executors import task_resources

    assert task_resources({"CPU": 16.0, "GPU": 4.0}, "auto") == {"num_gpus": 1}
    assert task_resources({"CPU": 16.0, "GPU": 4.0}, "cuda") == {"num_gpus": 1}
    assert task_resources({"CPU": 16.0, "GPU": 4.0}, "cpu") == {"num_cpus": 1}
    assert task_resources({"CPU": 2.0}, "auto") == {"num_cpus": 1}
    with pytest.raises(InvalidArgumentError, match="has no GPUs; add GPU workers or use --device auto"):
        task_resources({"CPU": 2.0}, "cuda")


@pytest.mark.slow
def test_sigkill_of_the_ray_driver_then_resume(tmp_path) -> None:
    """The driver process killed while tasks run; the same command finishes the build."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "atlas"
    argv = [sys.executable, "-m", "catalog.cli", "build", "--model", TOY, "--resolutions", "0,5", "--output",
            str(out), "--device", "cpu", "--no-progress", "--executor", "ray"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = out / "toy" / "_build" / "done"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(done.glob("res=5_*.json")) if done.is_dir() else []) < 1:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "toy" / "manifest.json").exists()
    before = len(list(done.glob("res=*.json")))
    assert before >= 1
    result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert f"{before} shards reused" in result.stderr
    cells = pq.read_table(out / "toy" / "data/res=5", columns=["cell"]).column("cell").to_numpy()
    assert len(cells) == len(np.unique(cells)) == cell_count(5)
    assert validate_dataset(out / "toy") == []


def test_errors_without_ray_and_for_unknown_executors(monkeypatch) -> None:
    import sys

    from builder.executors import require_ray

    with pytest.raises(InvalidArgumentError, match="unknown executor 'dask'; choose one of local, ray"):
        build(TOY, resolutions="0", output="unused", executor="dask")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'hexatlas\[ray\]'"):
        require_ray()
