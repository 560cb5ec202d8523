"""medlsdm: 3D semantic medical image synthesis with latent diffusion conditioned on label maps."""

__version__ = "0.1.0"
