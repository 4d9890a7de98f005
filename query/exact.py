"""Exact embeddings: the atlas's own encoder, exported to ONNX by the build, run with ONNX Runtime.

A cell's stored embedding is the encoder's value at the cell centre; ``exact=True`` asks
for the value at the point itself. The build stores the encoder that made the atlas as
``encoder/model.onnx`` (:mod:`builder.export`; inputs ``lat``, ``lon`` float64 degrees,
output ``embedding``), checked against the torch module before it was kept. Here it is run
with ``onnxruntime`` (``pip install 'hexatlas[exact]'``), never with torch. The file's
bytes are checked against the manifest's sha256 before the session is made from those same
bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from catalog.errors import AtlasCorruptError, MissingDependencyError

__all__ = ["BATCH", "ExactEncoder", "unavailable_reason"]

BATCH = 4096  # points per run: GeoCLIP's hidden layers hold 3 x 4096 x 1024 floats (50 MB)
INSTALL = "pip install 'hexatlas[exact]'"


def unavailable_reason(name: str, manifest: dict[str, Any]) -> str | None:
    """Why dataset ``name`` cannot give exact embeddings, or None when it can."""
    info = manifest.get("encoder_onnx", ...)
    if info is ...:
        return (f"the {name} dataset was built before hexatlas stored its encoder; rebuild it "
                "(the same 'hexatlas build' with --overwrite) for exact=True, or use the cell embeddings")
    if not info or not info.get("path"):
        reason = (info or {}).get("reason") or "no reason recorded"
        return f"the {name} dataset has no exported encoder ({reason}); exact=False gives the cell embeddings"
    return None


def require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError(
            f"exact embeddings run the atlas's exported encoder with onnxruntime, which this install lacks: {INSTALL}"
        ) from None
    return onnxruntime


class ExactEncoder:
    """One dataset's exported encoder, ready to run (thread-safe: ONNX Runtime sessions are).

    Parameters
    ----------
    path : Path
        The local ``encoder/model.onnx`` (a remote dataset's is fetched whole first).
    info : dict
        The manifest's ``encoder_onnx`` entry: ``sha256``, ``output`` and the input names.
    where : str
        How to name the file in errors.
    """

    def __init__(self, path: Path, info: dict[str, Any], where: str) -> None:
        ort = require_onnxruntime()
        data = Path(path).read_bytes()
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise AtlasCorruptError(f"{where} does not match the sha256 in its manifest; run 'hexatlas validate' "
                                    "on the dataset (and rebuild it if the file was altered)")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initialisers are not the user's
        self.session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
        self.dim = int(info["output"]["shape"][1])
        self.output = info["output"]["name"]
        self.inputs = [spec["name"] for spec in info["inputs"]]

    def encode(self, lat: NDArray[np.float64], lon: NDArray[np.float64]) -> NDArray[np.float32]:
        """Embeddings at valid points.

        Parameters
        ----------
        lat, lon : numpy.ndarray, float64, shape (n,)
            Degrees, already validated.

        Returns
        -------
        numpy.ndarray, float32, shape (n, dim)
        """
        out = np.empty((lat.size, self.dim), dtype=np.float32)
        for start in range(0, lat.size, BATCH):
            stop = min(start + BATCH, lat.size)
            feed = dict(zip(self.inputs, (np.ascontiguousarray(lat[start:stop], dtype=np.float64),
                                          np.ascontiguousarray(lon[start:stop], dtype=np.float64))))
            result = self.session.run([self.output], feed)[0]
            if result.shape != (stop - start, self.dim):
                raise AtlasCorruptError(f"the exported encoder returned shape {result.shape}, expected "
                                        f"{(stop - start, self.dim)}")
            out[start:stop] = result
        return out
