"""The denoising training objective, with condition dropout for classifier-free guidance.

For each sample of the batch: t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(a_t) x0 + sqrt(1-a_t) eps,
and the network output is compared (L1 as in Med-LSDM / Med-DDPM / medicaldiffusion, or L2) with
the target of its prediction type (eps, x0 or v = sqrt(a_t) eps - sqrt(1-a_t) x0).

Condition dropout (Ho & Salimans 2022): each sample's condition is replaced by the null condition
(an all-zero one-hot label map) with probability ``cond_drop_prob``, independently per sample,
so the same network also learns the unconditional prediction that guidance needs. The Med-LSDM
reference skipped this and guided with an untrained null branch.
"""

from __future__ import annotations

from typing import Callable

import torch

from medlsdm.diffusion.guidance import null_condition
from medlsdm.diffusion.schedules import NoiseSchedule, check_prediction
from medlsdm.errors import ConfigError

LOSSES = ("l1", "l2")


def _draw(generator: torch.Generator | None, device: torch.device, fn, *args, **kwargs) -> torch.Tensor:
    """A random draw from ``generator`` (on its device) moved to ``device``; the global RNG if None."""
    where = generator.device if generator is not None else device
    return fn(*args, generator=generator, device=where, **kwargs).to(device)


def drop_condition(cond: torch.Tensor, prob: float, null_cond: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cond with dropped samples replaced by null, boolean mask of dropped samples (B,))``."""
    if not 0.0 <= prob <= 1.0:
        raise ConfigError(f"diffusion.cond_drop_prob must be in [0, 1], got {prob}")
    drop = _draw(generator, cond.device, torch.rand, cond.shape[0]) < prob
    null = null_condition(cond) if null_cond is None else null_cond.expand_as(cond).to(cond)
    keep = (~drop).reshape(-1, *([1] * (cond.ndim - 1)))
    return torch.where(keep, cond, null), drop


def diffusion_loss(model_fn: Callable, x0: torch.Tensor, cond: torch.Tensor | None, schedule: NoiseSchedule,
                   prediction: str = "epsilon", loss: str = "l1", cond_drop_prob: float = 0.1,
                   null_cond: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Mean denoising loss of ``model_fn(x_t, t, cond)`` on a batch ``x0`` (B, C, ...).

    ``cond``: the batch's condition (one-hot label maps) or None (unconditional models, no
    dropout). ``null_cond``: the dropped-out condition (default zeros like ``cond``).
    ``generator``: seeds t, noise and dropout; ``t``/``noise`` may be given explicitly (tests,
    validation at fixed noise levels). Returns a scalar tensor.
    """
    check_prediction(prediction)
    if loss not in LOSSES:
        raise ConfigError(f"diffusion.loss must be one of {', '.join(LOSSES)}, not {loss!r}")
    batch = x0.shape[0]
    if t is None:
        t = _draw(generator, x0.device, torch.randint, 0, len(schedule), (batch,))
    if noise is None:
        noise = _draw(generator, x0.device, torch.randn, x0.shape, dtype=x0.dtype)
    if cond is not None and cond_drop_prob > 0:
        cond, _ = drop_condition(cond, cond_drop_prob, null_cond, generator)
    x_t = schedule.q_sample(x0, t, noise)
    # A respaced schedule would be indexed by position; the network always sees trained timesteps.
    output = model_fn(x_t, schedule.timesteps.to(x0.device)[t], cond)
    target = schedule.target(x0, noise, t, prediction)
    err = output.float() - target.float()
    return err.abs().mean() if loss == "l1" else err.square().mean()
