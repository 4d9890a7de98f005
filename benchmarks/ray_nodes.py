"""A Ray cluster that loses a node at size (issue 25): ``python -m benchmarks --only ray_nodes``.

The toy encoder's globe at resolution 7 (98,825,162 cells; ``$HEXATLAS_BENCH_RES``; 4 with
``--quick``), built in fresh processes of this checkout: by the local executor on this
machine's cores, then by a cluster of a head node with no CPUs (the driver's) and two worker
nodes of one CPU each (``ray.cluster_utils.Cluster``: a raylet each, as ``ray start`` makes
them), one worker node killed (its raylet and workers, SIGKILL) when a third of the local
build's time has passed. Reported: each build's wall time and cells/s, each driver's peak RSS
(its own process: the raylets and workers are others), and whether every part, block table
and index file has the same sha256 in both manifests. About 2 GB of disk per build under
``$HEXATLAS_BENCH_DIR`` (default: a temporary folder), deleted after; ~30 minutes on 2 cores.
The same at resolutions 0-3, with the kill inside a shard: tests/builder/test_ray_nodes.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from benchmarks._common import Row
from benchmarks.scale import _run

REPO = Path(__file__).resolve().parents[1]
TOY = "tests.data.toy_encoder:load"

_LOCAL = """
import resource
from builder.build import build
start = time.perf_counter()
summary = build(P["model"], resolutions=str(P["res"]), output=P["out"], device="cpu", progress=False)
emit(cells=sum(summary.cells.values()), seconds=time.perf_counter() - start,
     driver_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

_CLUSTER = """
import logging, resource, threading
import ray
from ray.cluster_utils import Cluster
from builder.build import build
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
done = []
def run():
    try:
        done.append(build(P["model"], resolutions=str(P["res"]), output=P["out"], device="cpu", progress=False,
                          executor="ray"))
    except BaseException as exc:
        done.append(exc)
runner = threading.Thread(target=run)
start = time.perf_counter()
runner.start()
runner.join(P["kill_after"])
killed_at = time.perf_counter() - start if runner.is_alive() else None
if killed_at is not None:
    cluster.remove_node(workers[1], allow_graceful=False)
runner.join()
seconds = time.perf_counter() - start
alive = sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU"))
ray.shutdown()
cluster.shutdown()
if isinstance(done[0], BaseException):
    raise done[0]
emit(cells=sum(done[0].cells.values()), seconds=seconds, killed_at=killed_at, alive=alive,
     driver_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def run(quick: bool = False) -> list[Row]:
    from catalog.manifest import read_manifest

    res = 4 if quick else int(os.environ.get("HEXATLAS_BENCH_RES", "7"))
    work = Path(os.environ.get("HEXATLAS_BENCH_DIR") or tempfile.mkdtemp(prefix="hexatlas-ray-nodes-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        local, local_rss = _run(_LOCAL, code=REPO, scratch=work, model=TOY, res=res, out=str(work / "local"))
        cluster, _ = _run(_CLUSTER, code=REPO, scratch=work, model=TOY, res=res, out=str(work / "ray"),
                          kill_after=local["seconds"] / 3)

        def digests(root: Path) -> dict[str, str]:
            return {r["path"]: r["sha256"] for r in read_manifest(root / "toy")["files"]
                    if r["path"].startswith(("data/", "blocks/", "index/"))}

        ours, theirs = digests(work / "ray"), digests(work / "local")
        same = sum(ours.get(path) == digest for path, digest in theirs.items())
    finally:
        shutil.rmtree(work / "local", ignore_errors=True)
        shutil.rmtree(work / "ray", ignore_errors=True)
        if not os.environ.get("HEXATLAS_BENCH_DIR"):
            shutil.rmtree(work, ignore_errors=True)
    label = f"toy globe res {res} ({local['cells']:,} cells)"
    killed = (f"a worker node killed at {cluster['killed_at']:.0f} s, {cluster['alive']} of 2 left"
              if cluster["killed_at"] is not None else "finished before the kill")
    return [
        Row("ray nodes", f"{label}: cluster of 2 one-CPU nodes, {killed}; files equal to the local build's: "
            f"{same}/{len(theirs)} (and {len(ours)} in all)", cluster["cells"] / cluster["seconds"], "cells/s",
            f"local executor, same cores (peak RSS {local_rss / 1e9:.2f} GB)", local["cells"] / local["seconds"],
            "finishes, equal file for file"),
        Row("ray nodes", f"{label}: driver's peak RSS, cluster build", cluster["driver_rss"] / 1e9, "GB",
            "local build's process", local["driver_rss"] / 1e9, ""),
    ]
