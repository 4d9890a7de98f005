"""A Ray cluster of separate nodes (a raylet each, one CPU each) that loses a worker node in the
middle of a build: the build finishes and its files equal a local build's, file for file.

The node is killed while one of its workers is inside a shard (an encoder plugin defined here
stalls there until the test has killed it), so the shard really is lost with the node and run
again on the node that is left. The same at resolution 7: ``python -m benchmarks --only
ray_nodes``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from builder.build import build
from builder.grid import cell_count
from catalog.manifest import read_manifest, validate_dataset
from tests.data.toy_encoder import ToyModule
from tests.data.toy_encoder import load as load_toy

ray = pytest.importorskip("ray")

STALLING = "tests.builder.test_ray_nodes:stalling"
REPO = Path(__file__).resolve().parents[2]


class _StallingModule(ToyModule):
    """The toy encoder; while ``control/stall`` exists, the first worker to encode the res-3
    shard (in one batch: batch_size > its 41,162 cells) writes its node's id to ``control/stalled`` and waits there (to be killed)."""

    def __init__(self, control: str) -> None:
        super().__init__()
        self.control = Path(control)

    def forward(self, lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
        if lat.numel() > cell_count(2) and (self.control / "stall").exists():
            try:
                fd = os.open(self.control / "stalled", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, ray.get_runtime_context().get_node_id().encode())
                os.close(fd)
                while (self.control / "stall").exists():
                    time.sleep(0.05)
        return super().forward(lat, lon)


def stalling(*, checkpoint=None, device="auto", dtype=None):
    from builder.encoders import Encoder

    toy = load_toy(device=device, dtype=dtype)
    return Encoder(_StallingModule(checkpoint), provenance=toy.provenance, device=device, dtype=dtype)


def _digests(dataset: Path) -> dict[str, str]:
    """sha256 of every part, block table and index file, from the manifest (checked by validate)."""
    return {r["path"]: r["sha256"] for r in read_manifest(dataset)["files"]
            if r["path"].startswith(("data/", "blocks/", "index/"))}


@pytest.mark.slow
def test_a_build_survives_losing_a_worker_node(tmp_path) -> None:
    from ray.cluster_utils import Cluster

    control = tmp_path / "control"
    control.mkdir()
    build(STALLING, checkpoint=str(control), resolutions="0-3", output=tmp_path / "local", device="cpu",
          batch_size=65536, progress=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the driver's node runs no shard
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
        (control / "stall").touch()
        done: list[object] = []

        def run() -> None:
            try:
                done.append(build(STALLING, checkpoint=str(control), resolutions="0-3", output=tmp_path / "ray",
                                  device="cpu", batch_size=65536, progress=False, executor="ray"))
            except BaseException as exc:  # noqa: BLE001 - shown by the assertion below
                done.append(exc)

        runner = threading.Thread(target=run)
        runner.start()
        deadline = time.monotonic() + 180
        while not (control / "stalled").exists() and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (control / "stalled").exists(), f"no worker reached the res-3 shard: {done}"
        node_id = (control / "stalled").read_text()
        victim = next(n for n in workers if n.node_id == node_id)
        cluster.remove_node(victim, allow_graceful=False)  # its raylet and workers killed: SIGKILL
        (control / "stall").unlink()  # the shard's second run, on the node left, goes through
        runner.join(300)
        assert not runner.is_alive() and done, "the build did not finish after losing a node"
        assert not isinstance(done[0], BaseException), done[0]
        deadline = time.monotonic() + 60  # the cluster notices the loss within its health checks
        while any(n["Alive"] for n in ray.nodes() if n["NodeID"] == node_id) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(n["Alive"] for n in ray.nodes() if n["NodeID"] == node_id), "the killed node is still alive"
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert validate_dataset(tmp_path / "ray" / "toy") == []
    assert done[0].cells == {r: cell_count(r) for r in range(4)}
    assert _digests(tmp_path / "ray" / "toy") == _digests(tmp_path / "local" / "toy")
    assert read_manifest(tmp_path / "ray" / "toy")["build"]["executor"] == "ray"
