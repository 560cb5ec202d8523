"""The VQ-GAN's discriminators: a 2D PatchGAN on random slices and a 3D PatchGAN on the volume
(Med-LSDM / TATS: both ndf 64, 3 layers, BatchNorm), on ``monai.networks.nets.PatchDiscriminator``,
which returns every layer's features (the last one being the patch logits) for feature matching.
"""

from __future__ import annotations

import torch
from monai.networks.nets import PatchDiscriminator

from medlsdm.errors import MedlsdmError


class PatchGAN(PatchDiscriminator):
    """MONAI's PatchDiscriminator with a clear error for inputs too small for its depth (MONAI
    fails inside a convolution). Same modules, so the same state-dict keys."""

    def __init__(self, spatial_dims: int, in_channels: int, channels: int = 64, layers: int = 3,
                 norm: str | tuple = "BATCH"):
        super().__init__(spatial_dims=spatial_dims, channels=channels, in_channels=in_channels,
                         num_layers_d=layers, norm=norm)
        self.spatial_dims = spatial_dims

    @property
    def min_size(self) -> int:
        # `layers` stride-2 k4 p1 convs halve (floor) each axis; the two final k4 p1 stride-1 convs
        # remove one voxel each, and at least one must remain: size // 2**layers >= 3.
        return 3 * 2**self.num_layers_d

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != self.spatial_dims + 2 or min(x.shape[2:]) < self.min_size:
            raise MedlsdmError(f"{self.spatial_dims}D discriminator with {self.num_layers_d} layers needs inputs "
                               f"of at least {self.min_size} voxels per axis, got shape {tuple(x.shape)}; "
                               f"lower loss.disc_layers or use larger patches")
        return super().forward(x)


def build_discriminators(in_channels: int, channels: int = 64, layers: int = 3,
                         norm: str | tuple = "BATCH") -> tuple[PatchGAN, PatchGAN]:
    """(2D slice discriminator, 3D volume discriminator)."""
    return (PatchGAN(2, in_channels, channels, layers, norm), PatchGAN(3, in_channels, channels, layers, norm))
