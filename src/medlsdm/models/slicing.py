"""2D slices of 3D volumes (B, C, D, H, W): the axis names and the slice pickers used by the
VQ-GAN's losses (LPIPS and the 2D discriminator on random slices) and by the LPIPS metric."""

from __future__ import annotations

from typing import Sequence

import torch

from medlsdm.data.geometry import MODEL_AXES, spatial_axis
from medlsdm.errors import ConfigError

AXES = {name: 2 + spatial_axis(name) for name in MODEL_AXES}   # tensor dimension in (B, C, D, H, W)


def axis_dim(name) -> int:
    """The tensor dimension of a slice axis name, or a ConfigError."""
    if name not in AXES:
        raise ConfigError(f"slice axis must be one of {sorted(AXES)}, got {name!r}")
    return AXES[name]


def extract_slices(x: torch.Tensor, n: int, axes: Sequence[str] = ("D",),
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` random 2D slices per volume of ``x`` (B, C, D, H, W) -> (B*n, C, P, Q).

    One axis is drawn (from ``axes``: "D" gives (H, W) slices, "H" gives (D, W), "W" gives (D, H))
    for the whole call, so that slices of non-cubic volumes stack; then ``n`` slice indices per
    volume. Calls with equally seeded generators pick the same slices (real and fake alike).
    """
    if x.ndim != 5:
        raise ValueError(f"extract_slices expects (B, C, D, H, W), got shape {tuple(x.shape)}")
    dims = [axis_dim(a) for a in axes]
    dim = dims[int(torch.randint(len(dims), (1,), generator=generator))]
    index = torch.randint(x.shape[dim], (x.shape[0], int(n)), generator=generator).to(x.device)
    return slices_at(x, index, dim)


def slices_at(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Slices ``index`` (B, n) of each volume along spatial ``dim`` (2, 3 or 4) -> (B*n, C, P, Q)."""
    moved = x.movedim(dim, 2)  # (B, C, S, P, Q)
    batch = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    picked = moved[batch, :, index]  # advanced indices first: (B, n, C, P, Q)
    return picked.reshape(-1, *picked.shape[2:])
