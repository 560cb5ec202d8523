"""Samplers for discrete-time diffusion models: ancestral DDPM, DDIM and DPM-Solver++(2M).

Each sampler is a small object (diffusers-style) built on a respaced :class:`NoiseSchedule`:
``sampler.timesteps`` lists the network timesteps in sampling order (noisiest first) and
``sampler.step(model_output, k, x_t, generator)`` turns the network's output at position ``k``
into the next, less noisy sample. :func:`sample` drives one of them with classifier-free
guidance, a seeded ``torch.Generator`` for every random draw, a progress bar and a callback.

All three work for epsilon-, x0- and v-prediction networks (the output is converted to an x0
estimate and the matching noise by :meth:`NoiseSchedule.predict_x0`) and can clip x0.

Respacing (``steps`` < T): the network is evaluated only at ``steps`` of its T trained
timesteps; the sampler uses the same a_t there and the betas between them
(``NoiseSchedule.respace``), as in improved-DDPM and DDIM. With ``steps=None`` all T are used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from medlsdm.diffusion.guidance import guided_model
from medlsdm.diffusion.schedules import NoiseSchedule, check_prediction
from medlsdm.errors import ConfigError

SAMPLERS = ("ddpm", "ddim", "dpm++")
DPM_NAMES = ("dpm++", "dpmpp", "dpm-solver++")


@dataclass
class StepOutput:
    prev: torch.Tensor      # the next sample (x at the next, less noisy timestep; the result after the last step)
    x0: torch.Tensor        # the x0 estimate this step used


def _randn(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, drawn on the generator's device so one seed
    gives the same numbers whatever device the model runs on."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _clip_value(clip_x0) -> float | None:
    """``clip_x0``: False/None (no clipping), True (x0 in [-1, 1]) or a positive bound c ([-c, c])."""
    if clip_x0 is None or clip_x0 is False:
        return None
    if clip_x0 is True:
        return 1.0
    value = float(clip_x0)
    if value <= 0:
        raise ConfigError(f"clip_x0 must be True, False or a positive bound, got {clip_x0!r}")
    return value


class Sampler:
    """Common part: the respaced schedule and the x0 / epsilon estimates of one step."""

    name = ""

    def __init__(self, schedule: NoiseSchedule, steps: int | None = None, prediction: str = "epsilon",
                 clip_x0=False, spacing: str = "time"):
        self.schedule = schedule.respace(steps, spacing)
        self.prediction = check_prediction(prediction)
        self.clip = _clip_value(clip_x0)

    def __len__(self) -> int:
        return len(self.schedule)

    @property
    def timesteps(self) -> torch.Tensor:
        """Network timesteps in sampling order (descending), one per step."""
        return self.schedule.timesteps.flip(0)

    def index(self, k: int) -> int:
        """Index into the respaced schedule of sampling position k."""
        return len(self.schedule) - 1 - int(k)

    def estimates(self, model_output: torch.Tensor, i: int, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from the network output; with clipping, eps is recomputed from the clipped
        x0 so that x_t = sqrt(a) x0 + sqrt(1-a) eps still holds."""
        s = self.schedule
        x0 = s.predict_x0(x_t, i, model_output, self.prediction)
        if self.clip is None:
            return x0, s.predict_eps(x_t, i, model_output, self.prediction)
        x0 = x0.clamp(-self.clip, self.clip)
        return x0, s.eps_from_x0(x_t, i, x0)

    def reset(self) -> None:
        """Forget state kept between steps (multistep solvers)."""

    def step(self, model_output: torch.Tensor, k: int, x_t: torch.Tensor,
             generator: torch.Generator | None = None) -> StepOutput:
        """One step from x_t (step k of the grid) to the next sample; each sampler defines it."""
        raise NotImplementedError(f"{type(self).__name__} does not define step()")


class DDPMSampler(Sampler):
    """Ancestral sampling (Ho et al. 2020): x_{t-1} ~ q(x_{t-1} | x_t, x0_hat), the posterior with
    its variance beta_t (1 - a_{t-1}) / (1 - a_t) (the 'fixed small' choice); no noise at the
    last step, which returns the posterior mean = x0_hat."""

    name = "ddpm"

    def step(self, model_output, k, x_t, generator=None) -> StepOutput:
        i = self.index(k)
        x0, _ = self.estimates(model_output, i, x_t)
        mean, var = self.schedule.posterior(x0, x_t, i)
        if i == 0:
            return StepOutput(mean, x0)
        return StepOutput(mean + var.sqrt() * _randn(x_t, generator), x0)


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, eq. 12), with a = a_t and a' = a_{t_prev}:
        x_prev = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma z,
        sigma  = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a').
    eta = 0 is deterministic; eta = 1 is ancestral sampling on the respaced schedule."""

    name = "ddim"

    def __init__(self, schedule, steps=None, prediction="epsilon", clip_x0=False, spacing="time", eta: float = 0.0):
        super().__init__(schedule, steps, prediction, clip_x0, spacing)
        self.eta = float(eta)
        if self.eta < 0:
            raise ConfigError(f"sampling.eta must be >= 0, got {eta}")

    def step(self, model_output, k, x_t, generator=None) -> StepOutput:
        i = self.index(k)
        x0, eps = self.estimates(model_output, i, x_t)
        a = float(self.schedule.alphas_cumprod[i])
        a_prev = float(self.schedule.alphas_cumprod_prev[i])
        sigma = self.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        prev = a_prev ** 0.5 * x0 + max(1 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
        if sigma > 0:
            prev = prev + sigma * _randn(x_t, generator)
        return StepOutput(prev, x0)


class DPMSolverPlusPlusSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): a multistep solver of the diffusion ODE on
    the data prediction D = x0_hat, in lambda = log(alpha / sigma) with alpha = sqrt(a_t),
    sigma = sqrt(1 - a_t). From s to t, h = lambda_t - lambda_s:
        x_t = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) D
    first step (no history): D = x0_hat(s) (DPM-Solver++(1) = DDIM);
    later steps: r = h_prev / h, D = (1 + 1/(2r)) x0_hat(s) - 1/(2r) x0_hat(s_prev).
    The last step goes from the smallest trained timestep to sigma = 0 ('final denoise'), where
    the first-order update is x = x0_hat. ``spacing="logsnr"`` spaces the steps evenly in lambda.
    """

    name = "dpm++"

    def __init__(self, schedule, steps=None, prediction="epsilon", clip_x0=False, spacing="time"):
        super().__init__(schedule, steps, prediction, clip_x0, spacing)
        self.lambdas = self.schedule.log_snr()
        self.reset()

    def reset(self) -> None:
        self._prev_x0: torch.Tensor | None = None
        self._prev_h: float | None = None

    def step(self, model_output, k, x_t, generator=None) -> StepOutput:
        i = self.index(k)
        if k == 0:
            self.reset()
        x0, _ = self.estimates(model_output, i, x_t)
        if i == 0:                                   # final denoise to sigma = 0
            self.reset()
            return StepOutput(x0, x0)
        a_s, a_t = float(self.schedule.alphas_cumprod[i]), float(self.schedule.alphas_cumprod[i - 1])
        h = float(self.lambdas[i - 1] - self.lambdas[i])
        if self._prev_x0 is None:
            d = x0
        else:
            r = self._prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * self._prev_x0
        sigma_ratio = ((1 - a_t) / (1 - a_s)) ** 0.5
        prev = sigma_ratio * x_t - a_t ** 0.5 * math.expm1(-h) * d
        self._prev_x0, self._prev_h = x0, h
        return StepOutput(prev, x0)


def make_sampler(sampler: str, schedule: NoiseSchedule, steps: int | None = None, prediction: str = "epsilon",
                 clip_x0=False, eta: float = 0.0, spacing: str = "time") -> Sampler:
    """A sampler object by name ('ddpm' | 'ddim' | 'dpm++')."""
    if sampler == "ddpm":
        return DDPMSampler(schedule, steps, prediction, clip_x0, spacing)
    if sampler == "ddim":
        return DDIMSampler(schedule, steps, prediction, clip_x0, spacing, eta=eta)
    if sampler in DPM_NAMES:
        return DPMSolverPlusPlusSampler(schedule, steps, prediction, clip_x0, spacing)
    raise ConfigError(f"sampling.sampler must be one of {', '.join(SAMPLERS)}, not {sampler!r}")


def _device_of(model_fn, cond, generator) -> torch.device:
    if cond is not None:
        return cond.device
    if isinstance(model_fn, torch.nn.Module):
        for p in model_fn.parameters():
            return p.device
    return generator.device if generator is not None else torch.device("cpu")


@torch.no_grad()
def sample(model_fn: Callable, shape, cond: torch.Tensor | None, schedule: NoiseSchedule, sampler: str = "ddpm",
           steps: int | None = None, eta: float = 0.0, guidance: float = 1.0, prediction: str = "epsilon",
           clip_x0=False, generator: torch.Generator | None = None, callback: Callable | None = None,
           progress: bool = True, spacing: str | None = None, x_T: torch.Tensor | None = None,
           batched_guidance: bool = True) -> torch.Tensor:
    """Draw samples ``shape = (B, C, D, H, W)`` from ``model_fn(x_t, t, cond)``.

    - ``cond``: the condition for the whole batch (one-hot label maps, (B, K, ...)), or None.
      Models whose ``conditioning`` attribute is ``"none"`` get None and no guidance.
    - ``sampler``: 'ddpm' (ancestral), 'ddim' (``eta``: 0 deterministic) or 'dpm++'
      (DPM-Solver++(2M)); ``steps``: network evaluations (None: all T); ``spacing``: 'time' or
      'logsnr' placement of the respaced steps (None: 'logsnr' for dpm++, 'time' otherwise;
      with the cosine schedule's steep end, the second-order solver gains most from logSNR steps).
    - ``guidance``: classifier-free guidance scale w (1: conditional only, one pass per step;
      the reference's 1.5 is w = 2.5, see :mod:`medlsdm.diffusion.guidance`).
    - ``clip_x0``: clip the x0 estimate to [-1, 1] (True) or [-c, c] (a number c); right for
      data in [-1, 1] (pixel space, min-max scaled latents), wrong for std-scaled latents.
    - ``generator``: every random draw (initial noise, DDPM/DDIM noise) comes from it: the same
      seed gives the same output (bit-identical on CPU). ``x_T``: start from this noise instead.
    - ``callback(k, x, x0)`` after every step k (0-based) with the new sample and the step's x0
      estimate (previews, denoising animations); ``progress``: tqdm bar.
    Returns the final sample (the model's data space).
    """
    if getattr(model_fn, "conditioning", None) == "none":
        cond = None
    if spacing is None:
        spacing = "logsnr" if sampler in DPM_NAMES else "time"
    stepper = make_sampler(sampler, schedule, steps, prediction, clip_x0, eta, spacing)
    fn = guided_model(model_fn, 1.0 if cond is None else guidance, batched=batched_guidance)
    device = _device_of(model_fn, cond, generator)
    shape = tuple(int(s) for s in shape)
    if x_T is None:
        x = _randn(torch.empty(shape, device=device), generator)
    else:
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
        x = x_T.to(device=device, dtype=torch.float32)
    timesteps = stepper.timesteps.tolist()
    if progress:
        from tqdm.auto import tqdm

        timesteps = tqdm(timesteps, desc=f"{stepper.name} sampling", leave=False)
    stepper.reset()
    for k, t in enumerate(timesteps):
        t_batch = torch.full((shape[0],), int(t), device=device, dtype=torch.long)
        out = stepper.step(fn(x, t_batch, cond), k, x, generator)
        x = out.prev
        if callback is not None:
            callback(k, x, out.x0)
    return x
