"""The optimisers of both stages: Adam / AdamW with PyTorch's fused implementation where it
exists (one pass over parameters, gradients and moments instead of a loop of element-wise ops;
about a sixth of a latent-denoiser train step on the CPU here, benchmarks/speed.md). Its updates
equal the loop implementation's up to float rounding."""

from __future__ import annotations

import torch


def _fused_ok(params) -> bool:
    devices = {p.device.type for group in params for p in (group["params"] if isinstance(group, dict) else [group])}
    return bool(devices) and devices <= {"cpu", "cuda"}


def adam(params, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0, decoupled: bool = False):
    """Adam (``decoupled``: AdamW) over a list of parameters or parameter groups."""
    params = list(params)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return cls(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=_fused_ok(params) or None)
