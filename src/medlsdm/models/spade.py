"""Normalisation layers of the VQ-GAN: GroupNorm and SPADE-GroupNorm (label-map conditioned).

SPADE (Park et al. 2019, "Semantic Image Synthesis with Spatially-Adaptive Normalization"):
``x -> GN(x) * (1 + gamma(m)) + beta(m)`` where ``GN`` has no affine parameters and gamma, beta
are convolutions of the one-hot label map ``m`` nearest-resized to the feature map's size.
The block itself is ``monai.networks.blocks.SPADE``; the only difference from the Med-LSDM
reference is MONAI's LeakyReLU(0.01) after the shared convolution where the reference has ReLU.
"""

from __future__ import annotations

import math

import torch
from monai.networks.blocks import SPADE
from torch import nn


def group_count(channels: int, groups: int) -> int:
    """The largest group count <= ``groups`` that divides ``channels`` (32 groups do not fit 16
    or 48 channels; small test networks use 4-8 channels)."""
    return math.gcd(int(channels), int(groups)) or 1


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    # eps 1e-6 as in the TATS / taming VQ-GAN encoders the reference derives from.
    return nn.GroupNorm(group_count(channels, groups), channels, eps=1e-6, affine=True)


class SPADEGroupNorm(nn.Module):
    """GroupNorm without affine parameters, modulated by a one-hot label map ``(B, K, *spatial)``
    at any resolution (it is nearest-resized to the input's spatial size)."""

    def __init__(self, channels: int, label_channels: int, hidden: int = 128, groups: int = 8,
                 kernel_size: int = 3, spatial_dims: int = 3):
        super().__init__()
        self.label_channels = int(label_channels)
        self.spade = SPADE(label_nc=self.label_channels, norm_nc=channels, kernel_size=kernel_size,
                           spatial_dims=spatial_dims, hidden_channels=hidden, norm="GROUP",
                           norm_params={"num_groups": group_count(channels, groups), "affine": False})

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.spade(x, label.to(x.dtype))
