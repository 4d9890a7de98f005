"""Seeded SatCLIP checkpoints in the released layout, with random weights.

The released files are PyTorch Lightning checkpoints; the location encoder sits under
``model.location.nnet.*`` beside the vision encoder. These fixtures reproduce that layout
(with a tiny stand-in vision tensor) so the loader is tested on what it will meet.

Run ``python -m tests.data.satclip_checkpoint OUT.ckpt --legendre 10`` to write one by hand.
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path
from typing import Any

import torch


def siren_state(
    *, legendre_polys: int, capacity: int = 256, num_hidden_layers: int = 2, embed_dim: int = 256, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Location-encoder tensors with SIREN's initialisation (float32), keyed as released."""
    gen = torch.Generator().manual_seed(seed)
    widths = [legendre_polys**2] + [capacity] * num_hidden_layers
    state: dict[str, torch.Tensor] = {}

    def uniform(shape: tuple[int, ...], bound: float) -> torch.Tensor:
        return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).mul(bound).float()

    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        # SIREN init: U(-1/n, 1/n) for the first layer, U(-sqrt(6/n)/w0, ...) after it (w0 = 1).
        bound = 1.0 / n_in if i == 0 else math.sqrt(6.0 / n_in)
        state[f"model.location.nnet.layers.{i}.weight"] = uniform((n_out, n_in), bound)
        state[f"model.location.nnet.layers.{i}.bias"] = uniform((n_out,), 1.0 / math.sqrt(n_in))
    bound = math.sqrt(6.0 / capacity)
    state["model.location.nnet.last_layer.weight"] = uniform((embed_dim, capacity), bound)
    state["model.location.nnet.last_layer.bias"] = uniform((embed_dim,), 1.0 / math.sqrt(capacity))
    return state


def make_checkpoint(
    path: str | Path,
    *,
    legendre_polys: int = 10,
    capacity: int = 256,
    num_hidden_layers: int = 2,
    embed_dim: int = 256,
    seed: int = 0,
    extra_hparams: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint shaped like ``satclip-<vision>-l<L>.ckpt`` and return its path."""
    state = siren_state(
        legendre_polys=legendre_polys, capacity=capacity, num_hidden_layers=num_hidden_layers,
        embed_dim=embed_dim, seed=seed,
    )
    state["model.visual.conv1.weight"] = torch.zeros(8, 13, 3, 3)
    state["model.logit_scale"] = torch.tensor(math.log(1 / 0.07))
    hparams = {
        "embed_dim": embed_dim, "image_resolution": 224, "vision_layers": "moco_resnet50",
        "vision_width": 768, "vision_patch_size": 32, "in_channels": 13,
        "le_type": "sphericalharmonics", "pe_type": "siren", "frequency_num": 16, "max_radius": 260,
        "min_radius": 1, "legendre_polys": legendre_polys, "harmonics_calculation": "analytic",
        "sh_embedding_dims": 32, "learning_rate": 1e-4, "weight_decay": 0.01,
        "num_hidden_layers": num_hidden_layers, "capacity": capacity,
        **(extra_hparams or {}),
    }
    ckpt = {
        "epoch": 499, "global_step": 100_000, "pytorch-lightning_version": "2.0.2",
        "state_dict": state, "hyper_parameters": hparams,
        "loops": {}, "callbacks": {}, "optimizer_states": [], "lr_schedulers": [],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--legendre", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_checkpoint(args.output, legendre_polys=args.legendre, seed=args.seed))


if __name__ == "__main__":
    main()
