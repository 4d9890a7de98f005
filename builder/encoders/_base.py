"""The :class:`Encoder` wrapper shared by every location encoder.

An encoder is a ``torch.nn.Module`` whose ``forward(lat, lon)`` takes two float64 tensors
in degrees, shape (b,), and returns a (b, dim) tensor in the module's compute dtype. The
module computes its angle-dependent features in float64 and casts them itself, so the
compute dtype (float32 by default) only touches the network. This wrapper adds what every
encoder shares: validation, device and dtype choice, batching and provenance.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import TYPE_CHECKING, Any

import numpy as np

from catalog.coords import as_coordinates
from catalog.errors import (
    CheckpointError,
    InvalidArgumentError,
    MissingDependencyError,
    UnsafeCheckpointError,
)
from catalog.provenance import Provenance

if TYPE_CHECKING:
    import torch
    from numpy.typing import ArrayLike, NDArray

__all__ = ["Encoder", "load_weights", "require_torch", "resolve_device", "resolve_dtype", "retain_freed_memory"]

_DTYPES = ("float32", "float64", "float16", "bfloat16")
_OUT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def require_torch() -> None:
    """Raise :class:`MissingDependencyError` with the install line when torch is absent."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "encoding needs PyTorch, which this install lacks; run: pip install 'hexatlas[build]' "
            "(on a machine without a GPU, first: pip install torch --index-url "
            "https://download.pytorch.org/whl/cpu)"
        ) from None


def retain_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of handing it back to the kernel.

    CPU inference frees and allocates the same tens of MB every batch. With glibc's
    defaults the top of the heap is given back (trimmed) and blocks of a few MB go to mmap,
    so each batch faults in fresh zeroed pages: SatCLIP L=40 on a 2-core VM ran 1.25x
    faster with these settings (PyTorch's CPU tuning guide suggests a caching allocator,
    jemalloc or tcmalloc, for the same reason). Process-wide, applied once; at most 256 MiB
    of freed memory stays with the process. Left alone when the environment already sets
    glibc's malloc (``MALLOC_*_`` variables, ``GLIBC_TUNABLES``) and off glibc.

    Returns whether the settings are in effect.
    """
    global _RETAINING
    if _RETAINING is None:
        _RETAINING = False
        user_set = any(k.startswith("MALLOC_") for k in os.environ) or "malloc" in os.environ.get("GLIBC_TUNABLES", "")
        if platform.libc_ver()[0] == "glibc" and not user_set:
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):
                return False
            # M_TRIM_THRESHOLD (-1), M_MMAP_THRESHOLD (-3; 32 MiB is the most every glibc takes)
            _RETAINING = bool(mallopt(-1, 256 << 20)) and bool(mallopt(-3, 32 << 20))
    return _RETAINING


_RETAINING: bool | None = None


def resolve_device(device: Any = "auto") -> torch.device:
    """Map ``"auto"`` to CUDA when available, else CPU; validate anything else."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(
            f"device {device!r} was asked for but this torch build sees no CUDA GPU; "
            "use device='auto' or 'cpu', or install a CUDA build of torch"
        )
    return dev


def resolve_dtype(dtype: Any = None) -> torch.dtype:
    """Map None/str/torch.dtype to a torch floating dtype (float32 by default)."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype
    if name not in _DTYPES:
        raise InvalidArgumentError(f"unsupported dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return getattr(torch, name)


def load_weights(source: Any, *, what: str, trust_checkpoint: bool = False) -> Any:
    """``torch.load`` a weights file safely onto the CPU.

    Parameters
    ----------
    source : path or binary file object
    what : str
        How to name the file in errors (usually its path).
    trust_checkpoint : bool
        Allow full unpickling, which can run code embedded in the file. Only for files
        from a source you trust.

    Raises
    ------
    UnsafeCheckpointError
        The file needs arbitrary unpickling and ``trust_checkpoint`` is False.
    CheckpointError
        The file is not a readable torch file.
    """
    import pickle

    import torch

    try:
        return torch.load(source, map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as exc:
        if trust_checkpoint:
            raise CheckpointError(f"{what} is not a readable PyTorch file: {exc}") from None
        # torch raises UnpicklingError both for disallowed globals and for garbage; tell them apart.
        if "global" in str(exc).lower():  # "Unsupported global" / "not an allowed global"
            raise UnsafeCheckpointError(
                f"{what} contains objects that a safe load (weights_only=True) refuses, and unpickling "
                "them could run code from the file. If you trust where it came from, pass "
                "trust_checkpoint=True (CLI: --trust-checkpoint)"
            ) from None
        raise CheckpointError(f"{what} is not a readable PyTorch file: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - torch's unpickler fails on garbage with any type
        raise CheckpointError(f"{what} is not a readable PyTorch file ({type(exc).__name__}: {exc})") from None


class Encoder:
    """A loaded location encoder: maps (lat, lon) in degrees to embeddings.

    Use :func:`builder.encoders.load_encoder` rather than constructing this directly.

    Attributes
    ----------
    name : str
        Registry name of the model.
    dim : int
        Embedding dimension.
    provenance : Provenance
        Where the weights came from.
    device : torch.device
    dtype : torch.dtype
        Compute dtype of the network.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        provenance: Provenance,
        device: Any = "auto",
        dtype: Any = None,
        batch_size: int | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.provenance = provenance
        self.name = provenance.model
        self.dim = provenance.dim
        self.module = module.to(device=self.device, dtype=self.dtype).eval()
        self.module.requires_grad_(False)
        self.batch_size = batch_size or (65536 if self.device.type == "cuda" else 4096)
        if self.device.type == "cpu":
            retain_freed_memory()

    def __repr__(self) -> str:
        return f"Encoder({self.name!r}, dim={self.dim}, device={self.device}, dtype={self.dtype})"

    @property
    def output_dtype(self) -> np.dtype:
        """numpy dtype of :meth:`encode` results: float64 for float64 models, else float32."""
        return np.dtype(np.float64 if str(self.dtype) == "torch.float64" else np.float32)

    def encode_tensor(self, lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
        """Encode one batch already on the device; no validation, no batching.

        Parameters
        ----------
        lat, lon : torch.Tensor, float64, shape (b,)
            Degrees, on ``self.device``.

        Returns
        -------
        torch.Tensor, shape (b, dim), in the compute dtype, on the device.
        """
        import torch

        with torch.inference_mode():
            return self.module(lat, lon)

    def encode(self, *, lat: ArrayLike, lon: ArrayLike, batch_size: int | None = None,
               out: NDArray[Any] | None = None) -> NDArray[Any]:
        """Embed coordinates.

        Parameters
        ----------
        lat, lon : array-like of float, shape (n,) or scalars
            Degrees, WGS84. Keyword-only so the order can never be mixed up.
        batch_size : int, optional
            Points per forward pass; defaults to 4096 on CPU and 65536 on CUDA.
        out : numpy.ndarray, optional
            Where to write the result: C-contiguous, shape (n, dim), float16, float32 or
            float64 (each batch is cast as it is copied out, with no full-size intermediate).

        Returns
        -------
        numpy.ndarray, shape (n, dim)
            ``out`` when given; else float32 (float64 when the encoder was loaded with
            ``dtype="float64"``).

        Raises
        ------
        InvalidCoordinateError
            If any coordinate is NaN, infinite or out of range, or lengths differ.
        InvalidArgumentError
            If ``batch_size`` is not positive or ``out`` does not fit.
        """
        import torch

        lat_a, lon_a = as_coordinates(lat=lat, lon=lon)
        bs = int(batch_size or self.batch_size)
        if bs <= 0:
            raise InvalidArgumentError(f"batch_size must be positive, got {batch_size}")
        n = lat_a.size
        if out is None:
            out = np.empty((n, self.dim), dtype=self.output_dtype)
        elif (out.shape != (n, self.dim) or out.dtype not in _OUT_DTYPES or not out.flags.c_contiguous
              or not out.flags.writeable):
            raise InvalidArgumentError(
                f"out must be a writeable C-contiguous float16/float32/float64 array of shape {(n, self.dim)}, "
                f"got {out.dtype} {out.shape}"
            )
        out_t = torch.from_numpy(out)
        pin = self.device.type == "cuda"
        for start in range(0, n, bs):
            stop = min(start + bs, n)
            lat_t = torch.from_numpy(lat_a[start:stop])
            lon_t = torch.from_numpy(lon_a[start:stop])
            if pin:
                lat_t, lon_t = lat_t.pin_memory(), lon_t.pin_memory()
            emb = self.encode_tensor(
                lat_t.to(self.device, non_blocking=pin), lon_t.to(self.device, non_blocking=pin)
            )
            if pin and emb.dtype != out_t.dtype:
                emb = emb.to(out_t.dtype)  # cast on the GPU: float16 halves the transfer
            out_t[start:stop].copy_(emb)
        return out
