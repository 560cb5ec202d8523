"""Classifier-free guidance (Ho & Salimans 2022) with the all-zero label map as null condition.

Convention here (the standard one): ``out = out_null + w * (out_cond - out_null)``.
``w = 1`` is the conditional model alone (one network pass), ``w = 0`` the unconditional one,
``w > 1`` pushes away from the null prediction.

The Med-LSDM reference writes ``eps = eps_c + s * (eps_c - eps_null)`` with ``s = 1.5``; that is
the same formula with ``w = 1 + s``, so the reference's setting is ``w = 2.5``
(:func:`scale_from_reference`). The reference never dropped the condition in training, so its
null branch was untrained; here :func:`medlsdm.diffusion.objective.diffusion_loss` trains it.

The guided combination is applied to the raw network output whatever the prediction type
(epsilon, x0 or v): the conversions between them are affine in the output with weights that sum
to one here, so guiding eps, x0 or v gives the same result.
"""

from __future__ import annotations

from typing import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def scale_from_reference(s: float) -> float:
    """The guidance scale ``w`` of this module for the reference's ``s`` (1.5 -> 2.5)."""
    return 1.0 + float(s)


def null_condition(cond: torch.Tensor) -> torch.Tensor:
    """The null condition: an all-zero one-hot label map of the same shape (no class anywhere)."""
    return torch.zeros_like(cond)


def guided_model(model_fn: ModelFn, scale: float, null_cond: torch.Tensor | None = None,
                 batched: bool = True) -> ModelFn:
    """``(x_t, t, cond) -> out_null + scale * (out_cond - out_null)``.

    ``batched``: the conditional and null passes run as one forward on a doubled batch (one
    kernel launch per layer, best on GPUs); ``False`` runs two forwards (half the activation
    memory). ``scale == 1`` or ``cond is None`` (unconditional models) calls the model once.
    ``null_cond`` defaults to zeros like ``cond``.
    """
    scale = float(scale)

    def guided(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None or scale == 1.0:
            return model_fn(x_t, t, cond)
        null = null_condition(cond) if null_cond is None else null_cond.expand_as(cond).to(cond)
        if scale == 0.0:
            return model_fn(x_t, t, null)
        if batched:
            out = model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, null]))
            out_cond, out_null = out.chunk(2)
        else:
            out_cond, out_null = model_fn(x_t, t, cond), model_fn(x_t, t, null)
        return out_null + scale * (out_cond - out_null)

    return guided
