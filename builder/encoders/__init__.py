"""Location encoders: a registry of models that map (lat, lon) to embeddings.

``list_encoders()`` imports nothing heavy; ``load_encoder(name)`` imports torch and the one
model module it needs. Besides the built-in models, a user's own encoder plugs in through
the ``hexatlas.encoders`` entry-point group or a ``"package.module:callable"`` name; the
callable takes ``checkpoint=``, ``device=`` and ``dtype=`` keywords and returns an
:class:`Encoder` (or any object with ``name``, ``dim``, ``provenance`` and ``encode``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from catalog.errors import UnknownEncoderError
from catalog.provenance import Provenance

if TYPE_CHECKING:
    from pathlib import Path

    from builder.encoders._base import Encoder

__all__ = ["Encoder", "EncoderSpec", "list_encoders", "load_encoder"]

ENTRY_POINT_GROUP = "hexatlas.encoders"


@dataclass(frozen=True)
class EncoderSpec:
    """A registered model: its name, dimension, a one-line summary and its loader."""

    name: str
    dim: int
    summary: str
    loader: str  # "module:function", imported only when the model is loaded
    options: tuple[tuple[str, Any], ...] = ()


def _satclip(vision: str, legendre: int) -> EncoderSpec:
    name = f"satclip-{vision}-l{legendre}"
    return EncoderSpec(
        name, 256, f"SatCLIP {vision} L={legendre} (Microsoft, Sentinel-2)", "builder.encoders.satclip:load",
        (("variant", name),),
    )


_REGISTRY: dict[str, EncoderSpec] = {
    spec.name: spec
    for spec in [
        EncoderSpec("geoclip", 512, "GeoCLIP location encoder (weights from the geoclip 1.3.0 wheel)",
                    "builder.encoders.geoclip:load"),
        *(_satclip(v, lvl) for v in ("resnet18", "resnet50", "vit16") for lvl in (10, 40)),
        EncoderSpec("satclip", 256, "alias of satclip-vit16-l40, the recommended SatCLIP",
                    "builder.encoders.satclip:load", (("variant", "satclip-vit16-l40"),)),
    ]
}


def list_encoders() -> list[str]:
    """Names of all available encoders: built-in and entry-point plugins, sorted.

    A ``"module:callable"`` name is also accepted by :func:`load_encoder` but not listed.
    """
    plugins = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(set(_REGISTRY) | plugins)


def encoder_spec(name: str) -> EncoderSpec | None:
    """The built-in registry entry for ``name``, or None for plugins and unknown names."""
    return _REGISTRY.get(name)


def _resolve_plugin(name: str) -> Any:
    eps = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if eps:
        return eps[0].load()
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UnknownEncoderError(f"cannot import encoder module {module_name!r}: {exc}") from None
        try:
            return getattr(module, attr)
        except AttributeError:
            raise UnknownEncoderError(f"module {module_name!r} has no callable {attr!r}") from None
    raise UnknownEncoderError(
        f"unknown encoder {name!r}; choose one of {', '.join(list_encoders())}, "
        "or give 'package.module:callable' for your own"
    )


def load_encoder(
    name: str,
    *,
    checkpoint: str | Path | None = None,
    device: Any = "auto",
    dtype: Any = None,
    batch_size: int | None = None,
    trust_checkpoint: bool = False,
) -> Encoder:
    """Load a location encoder by name.

    Parameters
    ----------
    name : str
        A name from :func:`list_encoders`, or ``"package.module:callable"``.
    checkpoint : str or Path, optional
        Local weights file; otherwise the model's published weights are resolved (Hub
        download or cache for SatCLIP, the installed ``geoclip`` wheel for GeoCLIP).
    device : {"auto", "cpu", "cuda", ...}
        ``"auto"`` uses CUDA when torch sees a GPU.
    dtype : {None, "float32", "float64", "float16", "bfloat16"}
        Compute dtype of the network; None means float32.
    batch_size : int, optional
        Default points per forward pass.
    trust_checkpoint : bool
        Allow a checkpoint that needs full unpickling (which can run code from the file).
        Off by default: checkpoints load with ``torch.load(weights_only=True)``.

    Raises
    ------
    UnknownEncoderError, CheckpointError, WeightsNotFoundError, WeightsChecksumError,
    MissingDependencyError
    """
    from builder.encoders._base import require_torch

    require_torch()
    spec = _REGISTRY.get(name)
    if spec is not None:
        module_name, _, func = spec.loader.partition(":")
        loader = getattr(importlib.import_module(module_name), func)
        return loader(
            checkpoint=checkpoint, device=device, dtype=dtype, batch_size=batch_size,
            trust_checkpoint=trust_checkpoint, **dict(spec.options),
        )
    factory = _resolve_plugin(name)
    encoder = factory(checkpoint=checkpoint, device=device, dtype=dtype)
    missing = [a for a in ("name", "dim", "provenance", "encode") if not hasattr(encoder, a)]
    if missing or not isinstance(encoder.provenance, Provenance):
        raise UnknownEncoderError(
            f"encoder factory {name!r} returned {type(encoder).__name__}, which lacks "
            f"{', '.join(missing) or 'a catalog.Provenance'}; return a builder.encoders.Encoder"
        )
    if batch_size is not None and hasattr(encoder, "batch_size"):
        encoder.batch_size = batch_size
    return encoder


def __getattr__(attr: str) -> Any:
    # Encoder lives with torch-touching code; import it only when asked for.
    if attr == "Encoder":
        from builder.encoders._base import Encoder

        return Encoder
    raise AttributeError(attr)
