"""Exact embeddings: the atlas's own encoder, exported to ONNX by the build, run with ONNX Runtime.

A cell's stored embedding is the encoder's value at the cell centre; ``exact=True`` asks
for the value at the point itself. The build stores the encoder that made the atlas as
``encoder/model.onnx`` (:mod:`builder.export`; inputs ``lat``, ``lon`` float64 degrees,
output ``embedding``), checked against the torch module before it was kept. Here it is run
with ``onnxruntime`` (``pip install 'hexatlas[exact]'``), never with torch. The file's
bytes are checked against the manifest's sha256, then read as a protobuf message by
:func:`check_onnx` (no onnx package needed) before the session is made from those same
bytes: a model that would load other files (tensors with external data) or call operators
outside ONNX's standard domains and its own functions is refused, so that running an
atlas's encoder reads nothing but its bytes and runs nothing but ONNX operators.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from catalog.errors import AtlasCorruptError, MissingDependencyError, UnsafeAtlasError

__all__ = ["BATCH", "ExactEncoder", "check_onnx", "unavailable_reason"]

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
        check_onnx(data, where)
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


# ------------------------------------------------------------ the model, read before it is loaded
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
_MAX_DEPTH = 32  # graphs nest through node attributes (If, Loop, Scan)
# protobuf field numbers (onnx.proto3): the messages that hold nodes, tensors and graphs
_MODEL = {"opset_import": 8, "graph": 7, "training_info": 20, "functions": 25}
_GRAPH = {"node": 1, "initializer": 5, "sparse_initializer": 15}
_NODE = {"attribute": 5, "domain": 7}
_ATTRIBUTE = {"t": 5, "g": 6, "tensors": 10, "graphs": 11, "sparse_tensor": 22, "sparse_tensors": 23}
_TENSOR = {"external_data": 13, "data_location": 14}
_FUNCTION = {"node": 7, "opset_import": 9, "domain": 10}


def _fields(data: memoryview, where: str) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message; length-delimited values as views."""
    out, pos, n = [], 0, len(data)

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= n or shift > 63:
                raise AtlasCorruptError(f"{where} is not an ONNX model (a truncated or overlong varint)")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < n:
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            out.append((number, wire, varint()))
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            out.append((number, wire, None))
        elif wire == 2:
            size = varint()
            if pos + size > n:
                raise AtlasCorruptError(f"{where} is not an ONNX model (a field runs past its message)")
            out.append((number, wire, data[pos:pos + size]))
            pos += size
        else:
            raise AtlasCorruptError(f"{where} is not an ONNX model (protobuf wire type {wire})")
    if pos != n:
        raise AtlasCorruptError(f"{where} is not an ONNX model (a field runs past its message)")
    return out


def check_onnx(data: bytes, where: str) -> None:
    """Refuse an ONNX model that reads other files or calls non-standard operators.

    Walks the model's protobuf (graph, functions, training graphs, and every graph nested
    in a node's attributes): any tensor with external data, and any node or opset whose
    domain is neither ONNX's (``""``, ``ai.onnx``, ``ai.onnx.ml``) nor one of the model's
    own functions, raises :class:`UnsafeAtlasError`; bytes that are not such a message
    raise :class:`AtlasCorruptError`.
    """
    model = _fields(memoryview(data), where)
    allowed = set(STANDARD_DOMAINS)
    for f, w, v in model:  # the model's own functions are called by their domain
        if f == _MODEL["functions"] and w == 2:
            allowed.update(bytes(gv).decode("utf-8", "replace") for g, gw, gv in _fields(v, where)
                           if g == _FUNCTION["domain"] and gw == 2)

    def domain(value: Any, what: str) -> None:
        name = bytes(value).decode("utf-8", "replace")
        if name not in allowed:
            raise UnsafeAtlasError(f"{where}: the exported encoder uses operators of domain {name!r} ({what}), "
                                   "outside ONNX's standard ones; refusing to load it (hexatlas exports only "
                                   "standard operators)")

    def tensor(value: memoryview) -> None:
        for f, w, v in _fields(value, where):
            if (f == _TENSOR["external_data"] and w == 2) or (f == _TENSOR["data_location"] and w == 0 and v):
                raise UnsafeAtlasError(f"{where}: the exported encoder keeps a tensor in another file (external "
                                       "data); refusing to load it, as it would read outside the atlas")

    def sparse(value: memoryview) -> None:
        for f, w, v in _fields(value, where):
            if f in (1, 2) and w == 2:  # values, indices
                tensor(v)

    def graph(value: memoryview, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise AtlasCorruptError(f"{where}: graphs nested more than {_MAX_DEPTH} deep")
        for f, w, v in _fields(value, where):
            if w != 2:
                continue
            if f == _GRAPH["node"]:
                node(v, depth)
            elif f == _GRAPH["initializer"]:
                tensor(v)
            elif f == _GRAPH["sparse_initializer"]:
                sparse(v)

    def node(value: memoryview, depth: int) -> None:
        for f, w, v in _fields(value, where):
            if f == _NODE["domain"] and w == 2:
                domain(v, "a node")
            elif f == _NODE["attribute"] and w == 2:
                for a, aw, av in _fields(v, where):
                    if aw != 2:
                        continue
                    if a in (_ATTRIBUTE["t"], _ATTRIBUTE["tensors"]):
                        tensor(av)
                    elif a in (_ATTRIBUTE["g"], _ATTRIBUTE["graphs"]):
                        graph(av, depth + 1)
                    elif a in (_ATTRIBUTE["sparse_tensor"], _ATTRIBUTE["sparse_tensors"]):
                        sparse(av)

    def opsets(value: memoryview) -> None:
        for f, w, v in _fields(value, where):
            if f == 1 and w == 2:
                domain(v, "an opset import")

    for f, w, v in model:
        if w != 2:
            continue
        if f == _MODEL["opset_import"]:
            opsets(v)
        elif f == _MODEL["graph"]:
            graph(v, 0)
        elif f == _MODEL["training_info"]:
            for g, gw, gv in _fields(v, where):
                if g in (1, 2) and gw == 2:  # initialization, algorithm
                    graph(gv, 0)
        elif f == _MODEL["functions"]:
            for g, gw, gv in _fields(v, where):
                if g == _FUNCTION["node"] and gw == 2:
                    node(gv, 0)
                elif g == _FUNCTION["opset_import"] and gw == 2:
                    opsets(gv)
