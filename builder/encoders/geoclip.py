"""GeoCLIP's location encoder (Vivanco Cepeda et al., NeurIPS 2023), with its trained weights.

The weights ship inside the ``geoclip`` 1.3.0 wheel. They are located through the
installed distribution's file list (``importlib.metadata``), never by importing ``geoclip``,
whose package imports transformers and torchvision; they can also be read straight out of
the wheel file. The shipped file's sha256 is checked.

The model: Equal Earth projection of (lat, lon), then three capsules (random Fourier
features at sigma 2^0, 2^4, 2^8, an MLP 512 -> 1024 -> 1024 -> 1024 with ReLU, a head
1024 -> 512), summed. Projection and Fourier angles are computed in float64 (the angles reach
thousands of radians at sigma 2^8, where float32 would lose three digits); the MLPs run
in the compute dtype, the three capsules as one batched matrix product per layer.
"""

from __future__ import annotations

import io
import math
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import torch

from builder.encoders._base import Encoder, load_weights
from catalog.errors import CheckpointError, WeightsChecksumError, WeightsNotFoundError
from catalog.provenance import Provenance, sha256_file

__all__ = ["GeoCLIPLocationEncoder", "load", "shipped_weights"]

VERSION = "1.3.0"
WEIGHTS_MEMBER = "geoclip/model/weights/location_encoder_weights.pth"
WEIGHTS_SHA256 = "94b80ae3af89fca78539e129dd2929d321247f5ceeeb0a31bc2c31041a253394"
SIGMAS = (2.0**0, 2.0**4, 2.0**8)
_LAYERS = ("capsule.1", "capsule.3", "capsule.5", "head.0")
_PAPER = (
    "Vivanco Cepeda, Nayak, Shah: GeoCLIP: Clip-Inspired Alignment between Locations and Images for "
    "Effective Worldwide Geo-localization, NeurIPS 2023 (arXiv:2309.16020)"
)
_INSTALL = f"pip install --no-deps geoclip=={VERSION}"

# Equal Earth projection constants, and GeoCLIP's scale factor.
_A1, _A2, _A3, _A4 = 1.340264, -0.081106, 0.000893, 0.003796
_SF = 66.50336


def _asin(x: torch.Tensor) -> torch.Tensor:
    """``asin`` of |x| <= sqrt(3)/2 from float32 ``asin`` and two Newton steps in ``x``'s dtype.

    ONNX Runtime has no float64 Asin kernel; this form exports with the float64 precision
    intact (each step squares the relative error: 1e-7, 1e-14, rounding), so the exported
    model (:mod:`builder.onnx_export`) computes what this module does.
    """
    theta = torch.asin(x.float()).to(x.dtype)
    for _ in range(2):
        theta = theta - (torch.sin(theta) - x) / torch.cos(theta)
    return theta


def equal_earth(lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
    """GeoCLIP's scaled Equal Earth projection: degrees (b,) -> (b, 2) in the inputs' dtype."""
    lat_r, lon_r = torch.deg2rad(lat), torch.deg2rad(lon)
    theta = _asin(math.sqrt(3.0) / 2.0 * torch.sin(lat_r))
    t2 = theta * theta
    t6 = t2 * t2 * t2
    x = 2.0 * math.sqrt(3.0) * lon_r * torch.cos(theta) / (3.0 * (9.0 * _A4 * t6 * t2 + 7.0 * _A3 * t6 + 3.0 * _A2 * t2 + _A1))
    y = theta * (_A4 * t6 * t2 + _A3 * t6 + _A2 * t2 + _A1)
    return torch.stack((x, y), dim=1) * (_SF / 180.0)


class GeoCLIPLocationEncoder(torch.nn.Module):
    """GeoCLIP location encoder; ``forward(lat, lon)``: float64 degrees (b,) -> (b, 512).

    Parameters
    ----------
    state : dict of str to torch.Tensor
        The released state dict (``LocEnc<i>.capsule.0.b``, ``LocEnc<i>.capsule.{1,3,5}``,
        ``LocEnc<i>.head.0``, for i = 0, 1, 2).
    """

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        # Fourier matrices (3, 2, 256) scaled by 2 pi, kept float64 (see _apply).
        rff = torch.stack([state[f"LocEnc{i}.capsule.0.b"].double().T for i in range(3)]) * (2 * math.pi)
        self.register_buffer("rff", rff)
        # Per capsule, the MLP in nn.Linear layout (out, in): the fastest CPU matmul layout.
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleList(torch.nn.Linear(1, 1) for _ in _LAYERS) for _ in range(3)
        )
        for i, capsule in enumerate(self.layers):
            for layer, linear in zip(_LAYERS, capsule):
                linear.weight = torch.nn.Parameter(state[f"LocEnc{i}.{layer}.weight"].clone(), requires_grad=False)
                linear.bias = torch.nn.Parameter(state[f"LocEnc{i}.{layer}.bias"].clone(), requires_grad=False)

    def _apply(self, fn: Any, recurse: bool = True) -> GeoCLIPLocationEncoder:
        rff = self.rff
        super()._apply(fn, recurse)
        # Follow device moves but never a dtype cast: the angles need float64.
        self.rff = rff.to(device=self.rff.device, dtype=torch.float64)
        return self

    def fourier_features(self, lat: torch.Tensor, lon: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[cos, sin] of the Fourier angles: (3, b, 512) in ``dtype``."""
        xy = equal_earth(lat.to(torch.float64), lon.to(torch.float64))
        angles = torch.matmul(xy, self.rff)  # (3, b, 256), float64
        # Reduce exactly in float64 (angles reach ~1e4 rad), then evaluate the functions in
        # the compute dtype (at least float32), 8x cheaper than float64 trigonometry.
        reduced = torch.remainder(angles, 2 * math.pi).to(torch.promote_types(dtype, torch.float32))
        if torch.onnx.is_in_onnx_export():  # the exporter cannot trace writes into slices of ``out``
            return torch.cat([torch.cos(reduced), torch.sin(reduced)], dim=-1).to(dtype)
        out = torch.empty(*reduced.shape[:2], 512, dtype=reduced.dtype, device=reduced.device)
        torch.cos(reduced, out=out[..., :256])
        torch.sin(reduced, out=out[..., 256:])
        return out.to(dtype)

    def forward(self, lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
        head_dtype = self.layers[0][0].weight.dtype
        features = self.fourier_features(lat, lon, head_dtype)
        out = None
        for capsule, x in zip(self.layers, features):
            *hidden, head = capsule
            for linear in hidden:
                x = torch.nn.functional.linear(x, linear.weight, linear.bias).relu_()
            if out is None:
                out = torch.nn.functional.linear(x, head.weight, head.bias)
            else:  # accumulate the capsule sum inside the GEMM
                out.addmm_(x, head.weight.t()).add_(head.bias)
        return out


def shipped_weights() -> Path:
    """Path of the weights file inside the installed ``geoclip`` wheel (not imported).

    Raises
    ------
    WeightsNotFoundError
        ``geoclip`` is not installed or lacks the file.
    """
    try:
        dist = distribution("geoclip")
    except PackageNotFoundError:
        raise WeightsNotFoundError(
            f"GeoCLIP's trained weights ship in the geoclip wheel, which is not installed; run: {_INSTALL} "
            "(or pass checkpoint= the .pth file or the geoclip wheel)"
        ) from None
    path = Path(dist.locate_file(WEIGHTS_MEMBER))
    if not path.is_file():
        raise WeightsNotFoundError(
            f"the installed geoclip {dist.version} has no {WEIGHTS_MEMBER}; reinstall: "
            f"pip install --force-reinstall --no-deps geoclip=={VERSION}"
        )
    return path


def _read_source(checkpoint: str | Path | None) -> tuple[Any, str, str | None, str, str]:
    """Returns (file or bytes, source, revision, sha256, name for errors)."""
    if checkpoint is None:
        path = shipped_weights()
        digest = sha256_file(path)
        if digest != WEIGHTS_SHA256:
            raise WeightsChecksumError(
                f"{path} has sha256 {digest}, expected {WEIGHTS_SHA256} (geoclip {VERSION}): the file is altered or "
                f"from another release; reinstall: pip install --force-reinstall --no-deps geoclip=={VERSION}"
            )
        return path, f"pypi:geoclip=={VERSION}/{WEIGHTS_MEMBER}", VERSION, digest, str(path)
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"GeoCLIP checkpoint {str(path)!r} does not exist or is not a file")
    if zipfile.is_zipfile(path) and path.suffix == ".whl":
        with zipfile.ZipFile(path) as whl:
            try:
                data = whl.read(WEIGHTS_MEMBER)
            except KeyError:
                raise WeightsNotFoundError(f"{path} is a wheel without {WEIGHTS_MEMBER}; use the geoclip {VERSION} wheel") from None
        import hashlib

        digest = hashlib.sha256(data).hexdigest()
        if digest != WEIGHTS_SHA256:
            raise WeightsChecksumError(
                f"{WEIGHTS_MEMBER} in {path} has sha256 {digest}, expected {WEIGHTS_SHA256}; use the geoclip {VERSION} wheel"
            )
        return io.BytesIO(data), f"{path.resolve()}!{WEIGHTS_MEMBER}", VERSION, digest, f"{path}!{WEIGHTS_MEMBER}"
    digest = sha256_file(path)
    revision = VERSION if digest == WEIGHTS_SHA256 else None
    return path, str(path.resolve()), revision, digest, str(path)


def _check_state(state: Any, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict):
        raise CheckpointError(f"{what} is not a GeoCLIP location-encoder state dict")
    expected = {f"LocEnc{i}.capsule.0.b": (256, 2) for i in range(3)}
    for i in range(3):
        for layer, (n_in, n_out) in zip(_LAYERS, ((512, 1024), (1024, 1024), (1024, 1024), (1024, 512))):
            expected[f"LocEnc{i}.{layer}.weight"] = (n_out, n_in)
            expected[f"LocEnc{i}.{layer}.bias"] = (n_out,)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state)
                   if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise CheckpointError(f"{what} is not a GeoCLIP location-encoder state dict ({'; '.join(parts)})")
    return state


def load(
    *,
    checkpoint: str | Path | None = None,
    device: Any = "auto",
    dtype: Any = None,
    batch_size: int | None = None,
    trust_checkpoint: bool = False,
) -> Encoder:
    """Load GeoCLIP's location encoder.

    Parameters
    ----------
    checkpoint : path, optional
        None: the file shipped in the installed ``geoclip`` 1.3.0 wheel (sha256-checked).
        A ``.whl``: that wheel's file (sha256-checked). Any other file: a state dict of the
        same architecture (e.g. your own fine-tuned GeoCLIP), recorded with its own digest.

    Raises
    ------
    WeightsNotFoundError, WeightsChecksumError, CheckpointError, UnsafeCheckpointError
    """
    source, label, revision, digest, what = _read_source(checkpoint)
    state = _check_state(load_weights(source, what=what, trust_checkpoint=trust_checkpoint), what)
    provenance = Provenance(
        model="geoclip", dim=512, source=label, revision=revision, sha256=digest, coordinate_order="lat,lon",
        licence="MIT", paper=_PAPER,
        config={"sigmas": list(SIGMAS), "rff_features": 256, "hidden": 1024, "equal_earth_sf": _SF},
    )
    return Encoder(GeoCLIPLocationEncoder(state), provenance=provenance, device=device, dtype=dtype,
                   batch_size=batch_size)
