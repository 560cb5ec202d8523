"""Scaling autoencoder latents to the range a diffusion model expects, and back.

Two modes:

- ``"std"`` (default): per-channel mean and standard deviation measured over the cached training
  latents; ``scale(z) = (z - mean) / std``, so the diffused data has unit variance per channel
  (what the noise schedule assumes; the LDM practice of Rombach et al. 2022).
- ``"minmax"``: the Med-LSDM reference: one global min/max (of the codebook) mapped to [-1, 1];
  ``scale(z) = 2 (z - min) / (max - min) - 1``. Latents of real data often fill a small part
  of that range, so their variance after scaling can be far below 1.

Tensors are volumes ``(B, C, D, H, W)`` or ``(C, D, H, W)``: the channel axis is ``ndim - 4``.
The state is a small JSON-serialisable dict (stored in the diffusion model's sidecar).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from medlsdm.errors import ConfigError

MODES = ("std", "minmax")
_MIN_STD = 1e-6         # a constant (dead) channel would otherwise divide by zero


def _channel_axis(z: torch.Tensor) -> int:
    if z.ndim not in (4, 5):
        raise ValueError(f"latents must be (B, C, D, H, W) or (C, D, H, W), got shape {tuple(z.shape)}")
    return z.ndim - 4


class LatentScaler:
    """``LatentScaler(mode="std")``; :meth:`fit` (or :meth:`fit_range` for minmax) before use."""

    def __init__(self, mode: str = "std"):
        if mode not in MODES:
            raise ConfigError(f"latent.scaling must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.mean: list[float] | None = None
        self.std: list[float] | None = None
        self.min: float | None = None
        self.max: float | None = None
        self.bound: float | None = None   # std mode: largest |scaled value| seen in fitting

    @property
    def fitted(self) -> bool:
        return self.mean is not None if self.mode == "std" else self.min is not None

    @property
    def x0_clip(self) -> float | None:
        """The bound for the samplers' ``clip_x0`` that fits this scaling: 1.0 for minmax
        (scaled data lie in [-1, 1]); for std the largest |scaled value| of the fitting data.

        Clipping x0 matters for epsilon-prediction with the cosine schedule: at the first steps
        sqrt(alpha_bar) is ~1e-2 or smaller, so a small error in eps becomes a huge x0 estimate
        and unclipped few-step samplers diverge (seen on the demo model: sample std ~1e3).
        """
        return 1.0 if self.mode == "minmax" else self.bound

    # -- fitting -----------------------------------------------------------------------------
    def fit(self, latents: torch.Tensor | Iterable[torch.Tensor]) -> "LatentScaler":
        """Measure the statistics over a tensor of latents or an iterable of them (each
        (B, C, D, H, W) or (C, D, H, W)); accumulated in float64, one pass."""
        items = [latents] if isinstance(latents, torch.Tensor) else latents
        count, total, total_sq, lo, hi = 0, None, None, float("inf"), float("-inf")
        ch_lo, ch_hi = None, None
        for z in items:
            z = torch.as_tensor(z).detach().to("cpu", torch.float64)
            axis = _channel_axis(z)
            flat = z.movedim(axis, 0).reshape(z.shape[axis], -1)
            if total is not None and flat.shape[0] != total.shape[0]:
                raise ValueError(f"latents with {flat.shape[0]} channels after {total.shape[0]}")
            total = flat.sum(1) if total is None else total + flat.sum(1)
            total_sq = flat.square().sum(1) if total_sq is None else total_sq + flat.square().sum(1)
            count += flat.shape[1]
            lo, hi = min(lo, float(flat.min())), max(hi, float(flat.max()))
            ch_lo = flat.min(1).values if ch_lo is None else torch.minimum(ch_lo, flat.min(1).values)
            ch_hi = flat.max(1).values if ch_hi is None else torch.maximum(ch_hi, flat.max(1).values)
        if count == 0:
            raise ValueError("no latents to fit the scaler on")
        if self.mode == "std":
            mean = total / count
            var = (total_sq / count - mean.square()).clamp_min(0.0)
            self.mean = mean.tolist()
            std = var.sqrt().clamp_min(_MIN_STD)
            self.std = std.tolist()
            self.bound = float(torch.maximum((ch_lo - mean).abs(), (ch_hi - mean).abs()).div(std).max())
        else:
            self.fit_range(lo, hi)
        return self

    def fit_range(self, minimum: float, maximum: float) -> "LatentScaler":
        """minmax mode: set the range mapped to [-1, 1] (the reference: the codebook's min/max)."""
        if self.mode != "minmax":
            raise ConfigError("fit_range is for latent.scaling 'minmax'")
        minimum, maximum = float(minimum), float(maximum)
        if not maximum > minimum:
            raise ValueError(f"minmax scaling needs max > min, got [{minimum}, {maximum}]")
        self.min, self.max = minimum, maximum
        return self

    # -- use -----------------------------------------------------------------------------------
    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(offset, spread) broadcastable to z: z_scaled = (z - offset) / spread."""
        if not self.fitted:
            raise RuntimeError("LatentScaler used before fit()")
        if self.mode == "minmax":
            half = (self.max - self.min) / 2
            return (torch.tensor(self.min + half, dtype=z.dtype, device=z.device),
                    torch.tensor(half, dtype=z.dtype, device=z.device))
        axis = _channel_axis(z)
        if z.shape[axis] != len(self.mean):
            raise ValueError(f"scaler fitted on {len(self.mean)} channels, got latents of shape {tuple(z.shape)}")
        view = [1] * z.ndim
        view[axis] = -1
        mean = torch.tensor(self.mean, dtype=z.dtype, device=z.device).reshape(view)
        std = torch.tensor(self.std, dtype=z.dtype, device=z.device).reshape(view)
        return mean, std

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder latent -> diffusion space."""
        offset, spread = self._stats(z)
        return (z - offset) / spread

    def unscale(self, x: torch.Tensor) -> torch.Tensor:
        """Diffusion space -> encoder latent."""
        offset, spread = self._stats(x)
        return x * spread + offset

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if not self.fitted:
            raise RuntimeError("LatentScaler.state_dict() before fit()")
        if self.mode == "std":
            return {"mode": "std", "mean": list(self.mean), "std": list(self.std), "bound": self.bound}
        return {"mode": "minmax", "min": self.min, "max": self.max}

    @classmethod
    def from_dict(cls, state: Mapping) -> "LatentScaler":
        try:
            scaler = cls(state["mode"])
            if scaler.mode == "std":
                scaler.mean = [float(v) for v in state["mean"]]
                scaler.std = [max(float(v), _MIN_STD) for v in state["std"]]
                scaler.bound = float(state["bound"]) if state.get("bound") is not None else None
                if len(scaler.mean) != len(scaler.std):
                    raise ValueError("mean and std differ in length")
            else:
                scaler.fit_range(state["min"], state["max"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"latent scaler state {dict(state)!r} is not valid ({exc})") from None
        return scaler
