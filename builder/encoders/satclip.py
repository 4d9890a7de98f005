"""SatCLIP location encoders (Klemmer et al.): spherical harmonics followed by a SIREN.

Weights are the released Lightning checkpoints ``microsoft/SatCLIP-<vision>-L<L>`` on the
Hugging Face Hub, resolved through ``huggingface_hub`` (download when online, its cache
offline) or given as a local file. Only the location encoder is read from them; the
hyper-parameters (L, width, depth, output size) come from the file itself.

Accuracy against the official implementation: the features are evaluated stably (see
:mod:`builder.encoders._harmonics`), while the official code loses precision near the poles
at L = 40. The two agree to 1e-4 everywhere at L = 10 and where |lat| <= 45 at L = 40; near
the poles at L = 40 ours is the exact value and the official one is off by up to ~3e-2.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import torch

from builder.encoders._base import Encoder, load_weights
from builder.encoders._harmonics import trig_coefficients
from catalog.errors import CheckpointError, WeightsNotFoundError
from catalog.provenance import Provenance, sha256_file

__all__ = ["SatCLIPLocationEncoder", "hub_location", "load"]

_PREFIX = "model.location.nnet."
_VARIANT = re.compile(r"satclip-(resnet18|resnet50|vit16)-l(10|40)")
_HUB_NAMES = {"resnet18": "ResNet18", "resnet50": "ResNet50", "vit16": "ViT16"}
_LICENCE = "MIT"
_PAPER = (
    "Klemmer, Rolf, Robinson, Mackey, Russwurm: SatCLIP: Global, General-Purpose Location "
    "Embeddings with Satellite Imagery, AAAI 2025 (arXiv:2311.17179)"
)


class SatCLIPLocationEncoder(torch.nn.Module):
    """SatCLIP's location encoder: L*L spherical-harmonic features -> SIREN -> linear.

    ``forward(lat, lon)`` takes float64 degree tensors of shape (b,) and returns a (b, dim)
    tensor in the module's dtype. The angle tables are computed in float64 and cast; the
    first layer's w0 = 30 is folded into its weights and bias (exact up to rounding).

    Parameters
    ----------
    legendre_polys : int
        L, the number of Legendre degrees (features = L*L).
    weights : list of (weight, bias) tensor pairs
        The SIREN layers in order (first has w0 = 30, the rest w0 = 1), then the final
        linear layer, in ``torch.nn.Linear`` layout (out, in).
    """

    def __init__(self, legendre_polys: int, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.legendre_polys = int(legendre_polys)
        coeffs, phi_index = trig_coefficients(self.legendre_polys)
        self.register_buffer("coeffs", torch.from_numpy(coeffs))
        self.register_buffer("phi_index", torch.from_numpy(phi_index))
        *siren, (last_w, last_b) = weights
        # Stored transposed so each layer is one addmm with contiguous operands.
        self.siren_w = torch.nn.ParameterList()
        self.siren_b = torch.nn.ParameterList()
        for i, (w, b) in enumerate(siren):
            w0 = 30.0 if i == 0 else 1.0
            self.siren_w.append(torch.nn.Parameter((w.double() * w0).T.contiguous(), requires_grad=False))
            self.siren_b.append(torch.nn.Parameter(b.double() * w0, requires_grad=False))
        self.last_w = torch.nn.Parameter(last_w.double().T.contiguous(), requires_grad=False)
        self.last_b = torch.nn.Parameter(last_b.double(), requires_grad=False)

    def angle_table(self, angle: torch.Tensor) -> torch.Tensor:
        """``[cos(k a) for k < L] + [sin(k a) for 0 < k < L]``: float64, shape (b, 2L-1)."""
        ka = angle[:, None] * torch.arange(self.legendre_polys, dtype=torch.float64, device=angle.device)
        return torch.cat([torch.cos(ka), torch.sin(ka[:, 1:])], dim=1)

    def features(self, lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
        """The L*L harmonic features, shape (b, L*L), in the module's dtype."""
        dtype = self.coeffs.dtype
        theta = torch.deg2rad(lat.to(torch.float64) + 90.0)
        phi = torch.deg2rad(lon.to(torch.float64) + 180.0)
        t_theta = self.angle_table(theta).to(dtype)
        t_phi = self.angle_table(phi).to(dtype)
        return (t_theta @ self.coeffs).mul_(t_phi.index_select(1, self.phi_index))

    def forward(self, lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
        x = self.features(lat, lon)
        for w, b in zip(self.siren_w, self.siren_b):
            x = torch.addmm(b, x, w).sin_()
        return torch.addmm(self.last_b, x, self.last_w)


def hub_location(variant: str) -> tuple[str, str]:
    """Hub repository and file name of a released checkpoint, e.g. for "satclip-vit16-l40"."""
    match = _VARIANT.fullmatch(variant)
    if match is None:
        raise CheckpointError(f"{variant!r} is not a released SatCLIP variant (satclip-<vision>-l<10|40>)")
    vision, legendre = match.groups()
    return f"microsoft/SatCLIP-{_HUB_NAMES[vision]}-L{legendre}", f"{variant}.ckpt"


def _download(variant: str) -> tuple[Path, str, str | None]:
    """Resolve a released checkpoint through huggingface_hub: Hub when online, cache offline."""
    repo_id, filename = hub_location(variant)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise WeightsNotFoundError(
            f"{variant} weights come from the Hugging Face Hub, which needs huggingface_hub: "
            "pip install 'hexatlas[build]'; or pass checkpoint=PATH (CLI: --checkpoint PATH)"
        ) from None
    try:
        # The cache first: no network round trip (and no retries) when the file is there.
        path = Path(hf_hub_download(repo_id=repo_id, filename=filename, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: fall through to the download
        path = None
    try:
        path = path or Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except Exception as exc:  # noqa: BLE001 - the hub raises many types for "not available"
        raise WeightsNotFoundError(
            f"cannot get {filename} from the Hugging Face Hub repo {repo_id} and it is not in the "
            f"local Hub cache ({type(exc).__name__}). On a connected machine run "
            f"`hf download {repo_id} {filename}` (and copy the cache, or set HF_HUB_CACHE), or "
            "pass checkpoint=PATH (CLI: --checkpoint PATH)"
        ) from None
    # Cache paths look like .../snapshots/<commit>/<file>: the commit is the revision.
    revision = path.parent.name if path.parent.parent.name == "snapshots" else None
    return path, f"hf://{repo_id}/{filename}", revision


def _hyper_parameters(ckpt: Any, what: str) -> dict[str, Any]:
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(
            f"{what} is not a SatCLIP checkpoint: expected a Lightning checkpoint dict with "
            "'state_dict' and 'hyper_parameters'"
        )
    hparams = dict(ckpt.get("hyper_parameters") or {})
    le_type = hparams.get("le_type", "sphericalharmonics")
    pe_type = hparams.get("pe_type", "siren")
    if le_type != "sphericalharmonics" or pe_type != "siren":
        raise CheckpointError(
            f"{what} has le_type={le_type!r}, pe_type={pe_type!r}; hexatlas implements the released "
            "SatCLIP models (le_type='sphericalharmonics', pe_type='siren')"
        )
    return hparams


def _siren_weights(state: dict[str, Any], what: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    def pair(key: str) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            w, b = state[f"{_PREFIX}{key}.weight"], state[f"{_PREFIX}{key}.bias"]
        except KeyError as exc:
            raise CheckpointError(
                f"{what} lacks the SatCLIP location-encoder tensor {exc.args[0]!r} "
                f"(expected keys {_PREFIX}layers.<i>.weight|bias and {_PREFIX}last_layer.*)"
            ) from None
        if not (isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor)) or w.ndim != 2 or b.shape != w.shape[:1]:
            raise CheckpointError(f"{what}: {_PREFIX}{key} has malformed weight/bias shapes")
        return w, b

    n_layers = len({k for k in state if re.fullmatch(re.escape(_PREFIX) + r"layers\.\d+\.weight", k)})
    if n_layers == 0:
        pair("layers.0")  # raises the missing-key error
    layers = [pair(f"layers.{i}") for i in range(n_layers)] + [pair("last_layer")]
    for i, ((w_prev, _), (w, _)) in enumerate(itertools.pairwise(layers)):
        if w.shape[1] != w_prev.shape[0]:
            raise CheckpointError(f"{what}: layer {i + 1} takes {w.shape[1]} inputs but layer {i} gives {w_prev.shape[0]}")
    return layers


def load(
    *,
    variant: str = "satclip-vit16-l40",
    checkpoint: str | Path | None = None,
    device: Any = "auto",
    dtype: Any = None,
    batch_size: int | None = None,
    trust_checkpoint: bool = False,
) -> Encoder:
    """Load a SatCLIP location encoder.

    Parameters
    ----------
    variant : str
        ``satclip-{resnet18,resnet50,vit16}-l{10,40}``: which released checkpoint to resolve
        when ``checkpoint`` is None, and the model name recorded in the provenance.
    checkpoint : path, optional
        A local checkpoint in the released layout.
    device, dtype, batch_size, trust_checkpoint
        As for :func:`builder.encoders.load_encoder`.

    Raises
    ------
    WeightsNotFoundError
        Not on disk, not in the Hub cache, and the Hub is unreachable.
    UnsafeCheckpointError
        The file needs arbitrary unpickling and ``trust_checkpoint`` is False.
    CheckpointError
        Not a readable SatCLIP checkpoint, or its L does not match ``variant``.
    """
    if checkpoint is None:
        path, source, revision = _download(variant)
    else:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"SatCLIP checkpoint {str(path)!r} does not exist or is not a file")
        source, revision = str(path.resolve()), None
    what = f"SatCLIP checkpoint {str(path)!r}"
    ckpt = load_weights(path, what=what, trust_checkpoint=trust_checkpoint)
    hparams = _hyper_parameters(ckpt, what)
    layers = _siren_weights(ckpt["state_dict"], what)

    legendre = int(hparams.get("legendre_polys", round(layers[0][0].shape[1] ** 0.5)))
    if layers[0][0].shape[1] != legendre * legendre:
        raise CheckpointError(
            f"{what}: legendre_polys={legendre} needs {legendre * legendre} inputs but the first layer takes "
            f"{layers[0][0].shape[1]}"
        )
    expected_l = int(variant.rsplit("-l", 1)[1])
    if legendre != expected_l:
        fits = f"satclip-{variant.split('-')[1]}-l{legendre}"
        raise CheckpointError(f"{what} has L={legendre} but model {variant!r} has L={expected_l}; use --model {fits}")
    if hparams.get("harmonics_calculation", "analytic") != "analytic":
        raise CheckpointError(
            f"{what} uses harmonics_calculation={hparams['harmonics_calculation']!r}; only the released "
            "'analytic' convention is implemented"
        )
    dim = int(layers[-1][0].shape[0])
    config = {
        "legendre_polys": legendre,
        "capacity": int(layers[0][0].shape[0]),
        "num_hidden_layers": len(layers) - 1,
        "embed_dim": dim,
        "harmonics_calculation": str(hparams.get("harmonics_calculation", "analytic")),
    }
    provenance = Provenance(
        model=variant, dim=dim, source=source, revision=revision, sha256=sha256_file(path),
        coordinate_order="lon,lat", licence=_LICENCE, paper=_PAPER, config=config,
    )
    module = SatCLIPLocationEncoder(legendre, layers)
    return Encoder(module, provenance=provenance, device=device, dtype=dtype, batch_size=batch_size)

