"""The GPU build benchmark: SatCLIP L=40 (random weights) and GeoCLIP over land, end to end.

Run by ``benchmarks/gpu/run.sh`` in one device call (``README.md`` beside this says how).
Per model: the land cells (once, shared by both models), the build on the device with
seconds per stage, GPU utilisation sampled by ``nvidia-smi`` meanwhile, the encoder's own
rate on device-resident inputs (its ceiling), and a seeded sample of the stored cells checked
against a CPU evaluation within the stored precision. The figures go to ``OUT/gpu-run.json``,
rewritten after every step, so a run cut short keeps what it measured.

``python -m benchmarks.gpu.run --device cpu --resolutions 0-2`` is the dry run of the same path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

TARGET_S = 120  # per model, resolutions 0-7 on land, on one H200
TARGET_BUSY = 0.90  # the encoder's share of the build
STAGES = ("enumerate", "encode", "write", "index", "fidelity")
SATCLIP_MODEL = "satclip-vit16-l40"
CHECK_RULES = {
    "float16": "stored value within one float16 step of the CPU's float32 value, the step taken at the larger "
               "of the value's magnitude and its row's rms",
    "int8": "stored code within one of the CPU's code (the atlas's quantisation)",
    "float32": "stored value within 1e-4 of the larger of the CPU value's magnitude and its row's rms",
}


class GpuSampler:
    """``nvidia-smi`` in the background: (time, utilisation %, memory MiB, power W) samples."""

    QUERY = "utilization.gpu,memory.used,power.draw"

    def __init__(self, log: Path | None, interval_ms: int = 200) -> None:
        self.samples: list[tuple[float, float, float, float]] = []
        self.available = shutil.which("nvidia-smi") is not None
        self._log = log
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self.interval_ms = interval_ms

    def __enter__(self) -> GpuSampler:
        if self.available:
            self._proc = subprocess.Popen(
                ["nvidia-smi", f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits", f"--loop-ms={self.interval_ms}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        log = open(self._log, "w") if self._log else None  # noqa: SIM115 - closed below, after the loop
        try:
            if log:
                log.write(f"unix_time,{self.QUERY}\n")
            for line in self._proc.stdout:
                now = time.time()
                try:
                    util, mem, power = (float(v) if v.strip() not in ("[N/A]", "N/A") else float("nan")
                                        for v in line.split(",")[:3])
                except ValueError:
                    continue
                self.samples.append((now, util, mem, power))
                if log:
                    log.write(f"{now:.3f},{line.strip()}\n")
        finally:
            if log:
                log.close()

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def window(self, start: float, stop: float) -> dict[str, Any]:
        """Utilisation between two ``time.time()`` stamps: mean, median, share of samples >= 90%."""
        if not self.available:
            return {"available": False, "why": "no nvidia-smi on this machine"}
        picked = np.array([s for s in self.samples if start <= s[0] <= stop], dtype=np.float64).reshape(-1, 4)
        if not len(picked):
            return {"available": True, "samples": 0}
        util = picked[:, 1]
        return {"available": True, "samples": len(picked), "interval_ms": self.interval_ms,
                "mean_util_pct": round(float(np.nanmean(util)), 1),
                "median_util_pct": round(float(np.nanmedian(util)), 1),
                "share_ge_90pct": round(float(np.mean(util >= 90)), 3),
                "max_memory_mib": round(float(np.nanmax(picked[:, 2])), 0),
                "mean_power_w": round(float(np.nanmean(picked[:, 3])), 1)}


class Report:
    """``gpu-run.json``, written again after every step."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path, self.data = path, {"meta": meta, "land": None, "models": {}, "status": "running"}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=_jsonable) + "\n")
        tmp.replace(self.path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


def machine(device: str) -> dict[str, Any]:
    import torch

    meta: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "numpy": np.__version__, "cpus": os.cpu_count(), "device": device,
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        meta.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    from importlib.metadata import PackageNotFoundError, version

    for name in ("faiss-cpu", "h3", "global-land-mask", "pyarrow", "onnxruntime"):
        try:
            meta[name] = version(name)
        except PackageNotFoundError:
            meta[name] = None
    return meta


def estimate_bytes(cells: int, dim: int, itemsize: int) -> int:
    """Upper estimate of a dataset's size: embeddings, cell ids, index (~10%), Parquet's overhead."""
    return int(cells * (dim * itemsize + 8) * 1.15)


def choose_precision(asked: str, cells: int, dim: int, work: Path) -> tuple[str, dict[str, Any]]:
    """``auto``: float16 when its estimated size fits in 85% of the free disk, else int8."""
    free = shutil.disk_usage(work).free
    sizes = {p: estimate_bytes(cells, dim, n) for p, n in (("float16", 2), ("int8", 1), ("float32", 4))}
    chosen = asked
    if asked == "auto":
        chosen = "float16" if sizes["float16"] < 0.85 * free else "int8"
    return chosen, {"free_disk_gb": round(free / 1e9, 1), "estimated_gb": round(sizes[chosen] / 1e9, 1)}


def encoder_ceiling(encoder: Any, points: int) -> dict[str, Any]:
    """Cells/s of the network alone: batches already on the device, the result left there."""
    import torch

    gen = torch.Generator().manual_seed(0)
    lat = (torch.rand(points, generator=gen, dtype=torch.float64) * 180 - 90).to(encoder.device)
    lon = (torch.rand(points, generator=gen, dtype=torch.float64) * 360 - 180).to(encoder.device)
    bs = encoder.batch_size
    sync = torch.cuda.synchronize if encoder.device.type == "cuda" else (lambda: None)
    encoder.encode_tensor(lat[:bs], lon[:bs])  # warm-up: kernels, workspace
    sync()
    start = time.perf_counter()
    for i in range(0, points, bs):
        encoder.encode_tensor(lat[i:i + bs], lon[i:i + bs])
    sync()
    seconds = time.perf_counter() - start
    return {"points": points, "batch_size": bs, "seconds": round(seconds, 3), "cells_per_s": round(points / seconds)}


def stage_figures(seconds: dict[str, float], cells: int, fidelity_points: int, resolutions: int) -> dict[str, Any]:
    """Seconds and cells/s of the reported stages (write and index are summed over the writer
    threads, so their seconds are thread-seconds, and their rate is per thread)."""
    out = {}
    for stage in STAGES:
        s = seconds.get(stage)
        if s is None:
            continue
        n = fidelity_points * resolutions if stage == "fidelity" else cells
        out[stage] = {"seconds": round(s, 2), "cells_per_s": round(n / s) if s > 0 else None,
                      **({"points": n} if stage == "fidelity" else {})}
    return out


def encoder_idle(seconds: dict[str, float], wall: float) -> dict[str, Any]:
    """The encoder thread's busy and idle time: waiting for a shard's cells (enumerate) or for
    the writer to take the last one (write), and the build outside the shard loop."""
    busy = seconds.get("encode", 0.0)
    waits = seconds.get("wait enumerate", 0.0) + seconds.get("wait write", 0.0)
    loop = busy + waits
    return {"encode_s": round(busy, 2), "wait_enumerate_s": round(seconds.get("wait enumerate", 0.0), 2),
            "wait_write_s": round(seconds.get("wait write", 0.0), 2),
            "idle_in_shard_loop_s": round(waits, 2), "idle_outside_shard_loop_s": round(max(wall - loop, 0.0), 2),
            "busy_share_of_shard_loop": round(busy / loop, 3) if loop else None,
            "busy_share_of_build": round(busy / wall, 3) if wall else None}


def check_against_cpu(dataset: Path, model: str, checkpoint: str, resolutions: tuple[int, ...],
                      per_res: int) -> dict[str, Any]:
    """A seeded sample of each resolution's stored cells against the encoder evaluated on the
    CPU at the same centres, stored the same way (:data:`CHECK_RULES`;
    :func:`tests.data.stored_precision.tolerance`)."""
    from builder.encode import Quantizer
    from builder.encoders import load_encoder
    from builder.grid import cell_centers
    from builder.landmask import land_cells
    from catalog.blocks import STORED_DTYPES, ResolutionReader, part_infos
    from catalog.manifest import read_manifest
    from catalog.storage import open_store
    from tests.data.stored_precision import tolerance

    start = time.perf_counter()
    manifest = read_manifest(dataset)
    precision, quantization = manifest["precision"], manifest.get("quantization")
    files = {f["path"]: f for f in manifest["files"]}
    cpu = load_encoder(model, checkpoint=checkpoint, device="cpu")
    store = open_store(dataset)
    rng = np.random.default_rng(7)
    per: dict[str, Any] = {}
    worst, passed = 0.0, True
    for res in resolutions:
        info = manifest["resolutions"][str(res)]
        kept = land_cells(res)
        cells = np.sort(rng.choice(kept, size=min(per_res, len(kept)), replace=False))
        reader = ResolutionReader(store, part_infos(info, files), cpu.dim, precision, str(dataset))
        stored = np.zeros((len(cells), cpu.dim), STORED_DTYPES[precision])
        found = reader.gather(cells, stored)
        lat, lon = cell_centers(cells)
        exact = cpu.encode(lat=lat, lon=lon)
        got, want = stored[found], exact[found]
        if precision == "int8":
            cpu_stored = Quantizer(**quantization).encode(want)
            err = np.abs(got.astype(np.int16) - cpu_stored.astype(np.int16)).astype(np.float64)
            units = err  # in codes
        else:
            cpu_stored = want.astype(STORED_DTYPES[precision])
            err = np.abs(got.astype(np.float64) - want)
            units = err / tolerance(want, precision)
        ok = bool(found.all()) and bool((units <= 1.0).all())
        max_units = float(units.max()) if units.size else 0.0
        per[str(res)] = {"cells": len(cells), "found": int(found.sum()),
                         "max_abs_error": float(err.max()) if err.size else 0.0,
                         "max_error_in_steps": round(max_units, 3),
                         "identical_share": round(float((got == cpu_stored).mean()), 4) if got.size else None,
                         "pass": ok}
        worst, passed = max(worst, max_units), passed and ok
    return {"precision": precision, "rule": CHECK_RULES[precision],
            "per_resolution": per, "max_error_in_steps": round(worst, 3), "pass": passed,
            "seconds": round(time.perf_counter() - start, 2)}


def dataset_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_model(name: str, args: argparse.Namespace, report: Report, sampler: GpuSampler) -> None:
    from builder.build import build
    from builder.encoders import load_encoder
    from builder.fidelity import FIDELITY_POINTS
    from builder.grid import parse_resolutions

    resolutions = parse_resolutions(args.resolutions)
    entry: dict[str, Any] = {"status": "running"}
    report.data["models"][name] = entry
    if name == "satclip":
        from tests.data.satclip_checkpoint import make_checkpoint

        model = SATCLIP_MODEL
        checkpoint = str(make_checkpoint(args.work / "satclip-l40.ckpt", legendre_polys=40, seed=0))
        entry["weights"] = "random (tests/data/satclip_checkpoint.py, L=40, seed 0)"
    else:
        model, checkpoint = "geoclip", str(args.geoclip_weights)
        entry["weights"] = f"geoclip 1.3.0 location encoder ({checkpoint})"
    t0 = time.perf_counter()
    encoder = load_encoder(model, checkpoint=checkpoint, device=args.device, batch_size=args.batch_size)
    entry["load_s"] = round(time.perf_counter() - t0, 2)
    precision, disk = choose_precision(args.precision, report.data["land"]["total"], encoder.dim, args.work)
    entry.update(model=model, dim=encoder.dim, precision=precision, disk=disk, batch_size=encoder.batch_size,
                 encoder_device=str(encoder.device))
    report.save()
    print(f"[{name}] building {model} r{args.resolutions} on land, {precision}, on {encoder.device} "
          f"(batch {encoder.batch_size}; {disk['free_disk_gb']} GB free, ~{disk['estimated_gb']} GB needed)", flush=True)

    output = args.work / f"atlas-{name}"
    shutil.rmtree(output, ignore_errors=True)
    w0, t0 = time.time(), time.perf_counter()
    summary = build(model, resolutions=args.resolutions, output=output, checkpoint=checkpoint, land_only=True,
                    precision=precision, progress=False, encoder=encoder)
    wall = time.perf_counter() - t0
    w1 = time.time()
    cells = sum(summary.cells.values())
    seconds = dict(summary.seconds)
    entry.update(
        build_s=round(wall, 2), cells=cells, cells_by_resolution={str(r): n for r, n in sorted(summary.cells.items())},
        bytes=summary.bytes, cells_per_s=round(cells / wall), stage_seconds={k: round(v, 2) for k, v in seconds.items()},
        stages=stage_figures(seconds, cells, FIDELITY_POINTS, len(resolutions)), encoder_idle=encoder_idle(seconds, wall),
        gpu_utilisation={"build": sampler.window(w0, w1)},
    )
    # the land listing counted in, as a build on its own pays it (here both builds share one)
    end_to_end = entry["load_s"] + wall + report.data["land"]["seconds"]
    busy = entry["encoder_idle"]["busy_share_of_build"]
    entry["target"] = {"seconds": TARGET_S, "busy_share": TARGET_BUSY, "end_to_end_s": round(end_to_end, 2),
                       "met": end_to_end <= TARGET_S and busy is not None and busy >= TARGET_BUSY}
    report.save()
    print(f"[{name}] built {summary}", flush=True)
    rates = ", ".join(f"{stage} {f['cells_per_s']:,} {'points' if stage == 'fidelity' else 'cells'}/s"
                      for stage, f in entry["stages"].items() if f["cells_per_s"] is not None)
    print(f"[{name}] per stage: {rates}", flush=True)
    print(f"[{name}] {cells:,} cells in {wall:.1f} s ({cells / wall:,.0f} cells/s); encoder "
          f"{entry['encoder_idle']['busy_share_of_build']} busy over the build, "
          f"{entry['encoder_idle']['busy_share_of_shard_loop']} over the shard loop; "
          f"GPU {entry['gpu_utilisation']['build'].get('mean_util_pct', 'n/a')} % mean", flush=True)

    import torch

    if encoder.device.type == "cuda":
        entry["torch_peak_memory_gib"] = round(torch.cuda.max_memory_allocated(encoder.device) / 2**30, 2)
    w0 = time.time()
    entry["encoder_ceiling"] = encoder_ceiling(encoder, args.ceiling_points)
    entry["gpu_utilisation"]["ceiling"] = sampler.window(w0, time.time())
    del encoder
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next model's build gets the memory back
    report.save()
    print(f"[{name}] encoder alone: {entry['encoder_ceiling']['cells_per_s']:,} cells/s", flush=True)

    entry["cpu_check"] = check_against_cpu(Path(summary.dataset), model, checkpoint, resolutions, args.sample)
    entry["disk_bytes"] = dataset_bytes(Path(summary.dataset))
    check = entry["cpu_check"]
    print(f"[{name}] CPU check {'passed' if check['pass'] else 'FAILED'}: worst {check['max_error_in_steps']} "
          f"steps of {check['precision']} over {args.sample} cells a resolution", flush=True)
    if not args.keep:
        shutil.rmtree(output, ignore_errors=True)
    entry["status"] = "done"
    report.save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the run) or cpu (the dry run)")
    parser.add_argument("--resolutions", default="0-7")
    parser.add_argument("--models", default="satclip,geoclip", help="in this order; each is reported when done")
    parser.add_argument("--precision", default="auto", choices=["auto", "float16", "int8", "float32"],
                        help="auto: float16 when it fits the disk, else int8")
    parser.add_argument("--batch-size", type=int, default=None, help="points per forward pass (default the encoder's)")
    parser.add_argument("--geoclip-weights", type=Path, default=Path("benchmarks/gpu/carry/geoclip_location_encoder.pth"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/hexatlas-gpu"), help="where the atlases are built")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="where gpu-run.json goes")
    parser.add_argument("--sample", type=int, default=2048, help="cells a resolution checked against the CPU")
    parser.add_argument("--ceiling-points", type=int, default=None, help="points for the encoder-alone rate")
    parser.add_argument("--keep", action="store_true", help="keep the atlases (default: removed once checked)")
    args = parser.parse_args(argv)
    models = [n.strip() for n in args.models.split(",") if n.strip()]
    if not models or set(models) - {"satclip", "geoclip"}:
        parser.error(f"--models {args.models!r}: a comma-separated list of satclip and geoclip")
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.ceiling_points is None:
        args.ceiling_points = 1 << 22 if args.device.startswith("cuda") else 1 << 13

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("this torch sees no CUDA GPU: run with --device cpu for the dry run", file=sys.stderr)
        return 2
    from builder.grid import parse_resolutions
    from builder.landmask import land_cells

    report = Report(args.out / "gpu-run.json", machine(args.device) | {"argv": sys.argv[1:]})
    report.save()
    status = 0
    with GpuSampler(args.out / "gpu-util.csv") as sampler:
        try:
            # Listed once and cached: both builds (and the checks) use the same land cells.
            t0 = time.perf_counter()
            counts = {str(r): len(land_cells(r)) for r in parse_resolutions(args.resolutions)}
            report.data["land"] = {"seconds": round(time.perf_counter() - t0, 2), "cells": counts,
                                   "total": sum(counts.values())}
            report.save()
            print(f"land cells: {sum(counts.values()):,} in {report.data['land']['seconds']} s", flush=True)
            for name in models:
                try:
                    run_model(name, args, report, sampler)
                except Exception as exc:  # noqa: BLE001 - the next model is still measured
                    traceback.print_exc()
                    report.data["models"].setdefault(name, {})["status"] = f"failed: {type(exc).__name__}: {exc}"
                    report.save()
                    if not args.keep:  # the disk is the next model's
                        shutil.rmtree(args.work / f"atlas-{name}", ignore_errors=True)
                    status = 1
                    continue
                if not report.data["models"][name]["cpu_check"]["pass"]:
                    status = 1
            report.data["status"] = "done" if status == 0 else "done, with failures"
        except KeyboardInterrupt:  # run.sh's timeout: keep what was measured
            report.data["status"] = "interrupted (time limit)"
            status = 124
        except Exception as exc:
            report.data["status"] = f"failed: {type(exc).__name__}: {exc}"
            report.save()
            raise
        finally:
            report.data["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            report.save()
    print(f"wrote {report.path}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
