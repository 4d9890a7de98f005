"""Export: the build's encoder as ONNX, so the query layer computes exact embeddings without torch.

The encoder's own torch module (the one that produced the stored embeddings) is exported
with ``torch.onnx.export`` (its TorchScript-based exporter, opset 17: fast and offline) and
stored in the dataset as ``encoder/model.onnx``, weights inside. The graph takes two float64
inputs ``lat`` and ``lon`` (degrees, shape (n,), n dynamic) and returns ``embedding``,
float32 (n, dim) (float64 for a float64 build): the values the builder stores before it
casts or quantizes them. The inputs are float64 because the encoders compute their angle
features in float64 (GeoCLIP's Fourier angles reach thousands of radians).

Before it is kept, the exported model is run with ONNX Runtime on 2,000 check points
(uniform on the sphere, plus poles, the antimeridian and the equator) and compared with the
torch module: it ships only when the largest absolute difference is at most
``PARITY_TOLERANCE``, and the measured difference is recorded in the manifest. An encoder
that cannot be exported (a plugin object without a torch module, an operator the exporter
lacks, a float16 build, no onnxruntime at build time) builds without it; the manifest then
records why, which ``exact=True`` queries repeat.
"""

from __future__ import annotations

import copy
import inspect
import io
import logging
import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from builder.encoders._base import Encoder

__all__ = ["OPSET", "PARITY_TOLERANCE", "export_onnx"]

log = logging.getLogger(__name__)

OPSET = 17
PARITY_TOLERANCE = 1e-4  # max abs difference to the torch module over the check points
CHECK_POINTS = 2000


def check_points() -> tuple[np.ndarray, np.ndarray]:
    """Seeded (lat, lon) in degrees, float64: uniform on the sphere plus the awkward places."""
    rng = np.random.default_rng(14)
    n = CHECK_POINTS - 12
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    lon = rng.uniform(-180, 180, n)
    edge_lat = np.array([90, -90, 89.999, -89.999, 0, 0, 0, 0, 45, -45, 60, -60], dtype=np.float64)
    edge_lon = np.array([0, 0, 179.9, -179.9, 180, -180, 0, 179.9999, 180, -180, 90, -90], dtype=np.float64)
    return np.concatenate([lat, edge_lat]), np.concatenate([lon, edge_lon])


def _refused(reason: str) -> tuple[None, dict[str, Any]]:
    log.warning("the encoder is not stored for exact lookups: %s", reason)
    return None, {"path": None, "reason": reason}


def _register_symbolics() -> None:
    """Teach the TorchScript exporter ``aten::deg2rad`` (a multiply), which it lacks."""
    import torch
    from torch.onnx import register_custom_op_symbolic

    def deg2rad(g: Any, x: Any) -> Any:
        return g.op("Mul", x, g.op("Constant", value_t=torch.tensor(math.pi / 180.0, dtype=torch.float64)))

    register_custom_op_symbolic("aten::deg2rad", deg2rad, OPSET)


def export_onnx(encoder: Encoder) -> tuple[bytes | None, dict[str, Any]]:
    """The encoder as an ONNX model and its manifest record, or None and the reason it is not.

    Returns
    -------
    (bytes or None, dict)
        The serialized model and ``{"opset", "inputs", "output", "licence", "weights_sha256",
        "exporter", "parity"}`` (the caller adds ``path``, ``sha256`` and ``bytes`` once the
        file is written); or None and ``{"path": None, "reason": why}``.
    """
    module = getattr(encoder, "module", None)
    try:
        import torch
    except ImportError:  # pragma: no cover - a build always has torch
        return _refused("torch is not installed")
    if not isinstance(module, torch.nn.Module):
        return _refused(f"encoder {encoder.name!r} is a {type(encoder).__name__} without a torch module "
                        "(a plugin that returns a builder.encoders.Encoder wrapping its nn.Module can be exported)")
    dtype = getattr(encoder, "dtype", torch.float32)
    if dtype not in (torch.float32, torch.float64):
        return _refused(f"the build computed in {str(dtype).removeprefix('torch.')}; the encoder is exported from "
                        "float32 or float64 builds only (build with the default compute dtype)")
    try:
        import onnxruntime as ort
    except ImportError:
        return _refused("onnxruntime was not installed at build time, so the export could not be checked; "
                        "pip install 'hexatlas[build]' and rebuild")
    # A CPU copy: the build's module may live on a GPU, and exporting must not disturb it.
    cpu = copy.deepcopy(module).to("cpu").eval()
    sample = (torch.tensor([10.0, -20.0, 30.0], dtype=torch.float64), torch.tensor([1.0, 120.0, -170.0], dtype=torch.float64))
    buffer = io.BytesIO()
    kwargs: dict[str, Any] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    try:
        _register_symbolics()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes are not the user's
            torch.onnx.export(cpu, sample, buffer, input_names=["lat", "lon"], output_names=["embedding"],
                              dynamic_axes={"lat": {0: "n"}, "lon": {0: "n"}, "embedding": {0: "n"}},
                              opset_version=OPSET, do_constant_folding=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any exporter failure means: no exact model, say why
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return _refused(f"torch.onnx.export failed on {encoder.name!r} ({type(exc).__name__}: {first[:300]})")
    model = buffer.getvalue()
    lat, lon = check_points()
    with torch.no_grad():
        expected = cpu(torch.from_numpy(lat), torch.from_numpy(lon)).double().numpy()
    try:
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        got = session.run(["embedding"], {"lat": lat, "lon": lon})[0]
    except Exception as exc:  # noqa: BLE001 - a model the runtime cannot run is not shipped
        return _refused(f"ONNX Runtime cannot run the exported {encoder.name!r} ({type(exc).__name__}: "
                        f"{str(exc).strip()[:300]})")
    if got.shape != expected.shape:
        return _refused(f"the exported model returns shape {got.shape}, the torch module {expected.shape}")
    diff = float(np.max(np.abs(got.astype(np.float64) - expected))) if got.size else 0.0
    if not diff <= PARITY_TOLERANCE:
        return _refused(f"the exported model differs from the torch module by up to {diff:.3g} "
                        f"(tolerance {PARITY_TOLERANCE:g}) on the check points")
    out_dtype = str(got.dtype)
    provenance = encoder.provenance
    record = {
        "opset": OPSET,
        "inputs": [{"name": "lat", "dtype": "float64", "shape": ["n"], "unit": "degrees"},
                   {"name": "lon", "dtype": "float64", "shape": ["n"], "unit": "degrees"}],
        "output": {"name": "embedding", "dtype": out_dtype, "shape": ["n", int(encoder.dim)]},
        "licence": provenance.licence,
        "weights_sha256": provenance.sha256,
        "exporter": f"torch {torch.__version__} torch.onnx.export (TorchScript)",
        "parity": {"max_abs_diff": diff, "tolerance": PARITY_TOLERANCE, "points": int(lat.size),
                   "runtime": f"onnxruntime {ort.__version__}"},
    }
    return model, record
