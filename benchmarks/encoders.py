"""Encoder throughput (issue 2): points/s per model and dtype against same-run baselines;
and the exported encoder that ``exact=True`` runs (onnxruntime) against torch (issue 14).

Baselines:
- SatCLIP: the naive per-harmonic float64 evaluation the official code does
  (``tests.data.satclip_reference``), on the same random-weight checkpoint.
- every model: the bare matrix-multiply cost of its layers (the same addmm chain on random
  inputs, no features, no activations): the floor a fused implementation approaches.
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import Row, best_rate
from builder.encoders import load_encoder

BATCH = 4096


def _points(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(-90, 90, n), rng.uniform(-180, 180, n)


def bare_matmul_rate(chains: list[list[tuple[int, int]]], dtype: torch.dtype, *, batch: int = BATCH,
                     batches: int = 8) -> float:
    """Points/s of just the layers' matrix multiplies (with bias), chained as in the model.

    Each chain feeds its output to its next layer, like the model's data flow, in
    ``nn.Linear``'s (out, in) layout (the fastest on CPU BLAS): no features, no activations.
    """
    gen = torch.Generator().manual_seed(0)
    weights = [[(torch.randn(o, i, generator=gen).to(dtype), torch.randn(o, generator=gen).to(dtype)) for i, o in chain]
               for chain in chains]
    inputs = [torch.randn(batch, chain[0][0], generator=gen).to(dtype) for chain in chains]

    def run() -> None:
        with torch.inference_mode():
            for _ in range(batches):
                for x, layers in zip(inputs, weights):
                    for w, b in layers:
                        x = torch.nn.functional.linear(x, w, b)

    return best_rate(run, batch * batches)


def encode_rate(encoder, n: int) -> float:
    lat, lon = _points(n)
    return best_rate(lambda: encoder.encode(lat=lat, lon=lon, batch_size=BATCH), n)


def satclip_rows(quick: bool = False) -> list[Row]:
    from tests.data import satclip_reference
    from tests.data.satclip_checkpoint import make_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for legendre, target in ((10, ">= 60,000 points/s (float32)"), (40, ">= 25,000 points/s (float32)")):
            path = make_checkpoint(Path(tmp) / f"l{legendre}.ckpt", legendre_polys=legendre)
            ckpt = torch.load(path, weights_only=True)
            n_naive = (4_000 if legendre == 40 else 20_000) // (4 if quick else 1)
            lat, lon = _points(n_naive)
            naive = best_rate(partial(satclip_reference.embed, lat, lon, ckpt), n_naive, repeats=1)
            shapes = [[(legendre**2, 256), (256, 256), (256, 256)]]
            for dtype in ("float32", "bfloat16", "float64"):
                enc = load_encoder(f"satclip-vit16-l{legendre}", checkpoint=path, device="cpu", dtype=dtype)
                rate = encode_rate(enc, 50_000 if quick else 200_000)
                case = f"SatCLIP L={legendre} {dtype}"
                rows.append(Row("encode", case, rate, "pts/s", "naive per-harmonic (float64)", naive,
                                target if dtype == "float32" else ""))
                bare = bare_matmul_rate(shapes, getattr(torch, dtype))
                rows.append(Row("encode", case, rate, "pts/s", "bare matmul of its layers", bare))
    return rows


def geoclip_rows(quick: bool = False) -> list[Row]:
    rows = []
    capsule = [(512, 1024), (1024, 1024), (1024, 1024), (1024, 512)]
    for dtype in ("float32", "bfloat16"):
        enc = load_encoder("geoclip", device="cpu", dtype=dtype)
        rate = encode_rate(enc, 20_000 if quick else 60_000)
        bare = bare_matmul_rate([capsule] * 3, getattr(torch, dtype), batches=4)
        rows.append(Row("encode", f"GeoCLIP {dtype}", rate, "pts/s", "bare matmul of its layers", bare,
                        "within 15% of bare matmul" if dtype == "float32" else ""))
    return rows


def exact_rows(quick: bool = False) -> list[Row]:
    """``exact=True``'s encoder (the exported ONNX model in onnxruntime, as :mod:`query.exact` runs it)
    against the torch encoder it was exported from, float32, CPU, on the same 10,000 points."""
    import hashlib

    from builder.export import export_onnx
    from query.exact import ExactEncoder
    from tests.data.satclip_checkpoint import make_checkpoint

    n = 2_000 if quick else 10_000
    lat, lon = _points(n, seed=1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        encoders = [(f"SatCLIP L={lvl}", load_encoder(f"satclip-vit16-l{lvl}", device="cpu",
                                                    checkpoint=make_checkpoint(Path(tmp) / f"l{lvl}.ckpt", legendre_polys=lvl)))
                    for lvl in (10, 40)]
        encoders.append(("GeoCLIP", load_encoder("geoclip", device="cpu")))
        for label, enc in encoders:
            model, info = export_onnx(enc)
            if model is None:
                raise RuntimeError(f"{label}: {info['reason']}")
            path = Path(tmp) / f"{enc.name}.onnx"
            path.write_bytes(model)
            exact = ExactEncoder(path, {**info, "sha256": hashlib.sha256(model).hexdigest()}, str(path))
            rate = best_rate(lambda e=exact: e.encode(lat, lon), n)
            torch_rate = best_rate(lambda e=enc: e.encode(lat=lat, lon=lon, batch_size=BATCH), n)
            diff = float(np.abs(exact.encode(lat, lon) - enc.encode(lat=lat, lon=lon)).max())
            rows.append(Row("exact", f"{label} onnxruntime, {n:,} points (max diff {diff:.1g})", rate, "pts/s",
                            "torch encoder (float32)", torch_rate))
    return rows


def run(quick: bool = False) -> list[Row]:
    return satclip_rows(quick) + geoclip_rows(quick) + exact_rows(quick)
