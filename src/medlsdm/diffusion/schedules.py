"""Discrete-time Gaussian diffusion: noise schedules and the algebra between x0, epsilon and v.

Notation (Ho et al. 2020; Nichol & Dhariwal 2021; Salimans & Ho 2022 for v):

    a_t   = alphas_cumprod[t] = prod_{s<=t} (1 - beta_s)        (signal power at step t)
    x_t   = sqrt(a_t) * x0 + sqrt(1 - a_t) * eps,  eps ~ N(0, I)
    v     = sqrt(a_t) * eps - sqrt(1 - a_t) * x0

A network predicts one of ``"epsilon"``, ``"x0"`` or ``"v"``; given x_t the other two follow
linearly. Timesteps are integers 0..T-1 (t = 0 is the least noisy step). Coefficients are computed
in float64 and cast to the sample's dtype only where they are used.

A :class:`NoiseSchedule` can be *respaced* to a subset of its timesteps (improved-DDPM /
DDIM respacing): the subset keeps the same ``a_t`` values, its betas are recomputed as
``1 - a_{t_i} / a_{t_{i-1}}``, and ``schedule.timesteps[i]`` is the original timestep the network
was trained with, which is what the network must be given.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from medlsdm.errors import ConfigError

PREDICTIONS = ("epsilon", "x0", "v")
SCHEDULES = ("cosine", "linear")


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ConfigError(f"diffusion.prediction must be one of {', '.join(PREDICTIONS)}, not {prediction!r}")
    return prediction


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal (2021) eq. 17: abar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2),
    beta_t = 1 - abar(t+1)/abar(t), clipped at ``max_beta`` (the last steps would reach 1)."""
    def abar(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return np.array([min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)], dtype=np.float64)


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al. (2020): betas evenly spaced from beta_start to beta_end. Those values are for
    T = 1000; as in improved-DDPM they are scaled by 1000/T so the total noise added (and the
    final signal level, a_T ~ 4e-5) does not depend on T."""
    scale = 1000.0 / T
    return np.linspace(beta_start * scale, beta_end * scale, T, dtype=np.float64)


def timestep_grid(T: int, steps: int | None, spacing: str = "time",
                  alphas_cumprod: np.ndarray | None = None) -> np.ndarray:
    """Ascending, unique integer timesteps for a sampler with ``steps`` network evaluations.

    ``"time"``: evenly spaced from 0 to T-1, both included (improved-DDPM respacing; including
    T-1 starts from the noisiest level the network was trained on). ``"logsnr"``: evenly spaced in
    lambda = log(sqrt(a_t / (1 - a_t))) between the end points (Lu et al. 2022 for low-resolution
    data), each mapped to the nearest trained timestep. Duplicates after rounding are dropped,
    so fewer than ``steps`` may come back when steps is close to T.
    """
    if steps is None or steps >= T:
        return np.arange(T)
    if steps < 1:
        raise ConfigError(f"sampling.steps must be >= 1, got {steps}")
    if steps == 1:
        return np.array([T - 1])
    if spacing == "time":
        grid = np.linspace(0, T - 1, steps)
    elif spacing == "logsnr":
        if alphas_cumprod is None:
            raise ValueError("logsnr spacing needs alphas_cumprod")
        lam = 0.5 * np.log(alphas_cumprod / (1 - alphas_cumprod))      # decreasing in t
        targets = np.linspace(lam[0], lam[-1], steps)
        grid = np.interp(targets[::-1], lam[::-1], np.arange(T)[::-1])  # np.interp needs increasing x
    else:
        raise ConfigError(f"sampling.spacing must be 'time' or 'logsnr', not {spacing!r}")
    return np.unique(np.round(grid).astype(np.int64))


class NoiseSchedule:
    """Betas and cumulative alphas of a discrete diffusion of ``T`` steps.

    ``NoiseSchedule(T, kind="cosine")`` (Med-LSDM: T=500 cosine) or ``kind="linear"``; ``betas``
    gives an explicit schedule (used by :meth:`respace`). Attributes (float64 tensors, length
    ``len(schedule)``): ``betas``, ``alphas`` (1 - beta), ``alphas_cumprod`` (a_t),
    ``alphas_cumprod_prev`` (a_{t-1}, 1 at the first step); ``timesteps`` (int64): the network's
    timestep for each entry (0..T-1 unless respaced); ``num_train_timesteps``: the T the network
    was trained with.
    """

    def __init__(self, T: int = 1000, kind: str = "cosine", s: float = 0.008, beta_start: float = 1e-4,
                 beta_end: float = 0.02, betas: Sequence[float] | None = None,
                 timesteps: Sequence[int] | None = None, num_train_timesteps: int | None = None):
        if betas is None:
            T = int(T)
            if T < 1:
                raise ConfigError(f"diffusion.timesteps must be >= 1, got {T}")
            if kind == "cosine":
                betas = cosine_betas(T, s)
            elif kind == "linear":
                betas = linear_betas(T, beta_start, beta_end)
            else:
                raise ConfigError(f"diffusion.schedule must be one of {', '.join(SCHEDULES)}, not {kind!r}")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must be a 1-D sequence in (0, 1)")
        self.kind = kind
        alphas_cumprod = np.cumprod(1.0 - betas)
        self.betas = torch.from_numpy(betas)
        self.alphas = torch.from_numpy(1.0 - betas)
        self.alphas_cumprod = torch.from_numpy(alphas_cumprod)
        self.alphas_cumprod_prev = torch.from_numpy(np.concatenate([[1.0], alphas_cumprod[:-1]]))
        n = len(betas)
        steps = np.arange(n) if timesteps is None else np.asarray(timesteps)
        self.timesteps = torch.as_tensor(steps, dtype=torch.int64)
        if len(self.timesteps) != n:
            raise ValueError("timesteps and betas differ in length")
        self.num_train_timesteps = int(num_train_timesteps or n)

    def __len__(self) -> int:
        return len(self.betas)

    @property
    def T(self) -> int:
        return len(self.betas)

    def __repr__(self) -> str:
        return f"NoiseSchedule(kind={self.kind!r}, steps={len(self)}, trained_T={self.num_train_timesteps})"

    # -- respacing ---------------------------------------------------------------------------
    def respace(self, steps: int | None = None, spacing: str = "time",
                timesteps: Sequence[int] | None = None) -> "NoiseSchedule":
        """The schedule restricted to a subset of timesteps (``steps`` of them chosen by
        :func:`timestep_grid`, or explicit ``timesteps`` of this schedule): a_t kept, betas
        recomputed as beta_i = 1 - a_{t_i} / a_{t_{i-1}} (improved-DDPM ``space_timesteps``)."""
        if timesteps is None:
            timesteps = timestep_grid(len(self), steps, spacing, self.alphas_cumprod.numpy())
        idx = np.asarray(sorted(set(int(t) for t in timesteps)), dtype=np.int64)
        if idx[0] < 0 or idx[-1] >= len(self):
            raise ValueError(f"timesteps must lie in 0..{len(self) - 1}")
        acp = self.alphas_cumprod.numpy()[idx]
        acp_prev = np.concatenate([[1.0], acp[:-1]])
        return NoiseSchedule(betas=1.0 - acp / acp_prev, kind=self.kind, timesteps=self.timesteps.numpy()[idx],
                             num_train_timesteps=self.num_train_timesteps)

    # -- coefficients --------------------------------------------------------------------------
    def _at(self, values: torch.Tensor, t, like: torch.Tensor) -> torch.Tensor:
        """values[t] (float64 table, t an int or a (B,) index tensor) as a tensor broadcastable to
        ``like`` (B, C, ...), in like's dtype and device."""
        t = torch.as_tensor(t, dtype=torch.long).to("cpu")
        out = values[t].to(device=like.device, dtype=like.dtype)
        return out.reshape(-1, *([1] * (like.ndim - 1))) if out.ndim else out

    def signal(self, t, like: torch.Tensor) -> torch.Tensor:
        """sqrt(a_t): how much of x0 is left in x_t."""
        return self._at(self.alphas_cumprod.sqrt(), t, like)

    def sigma(self, t, like: torch.Tensor) -> torch.Tensor:
        """sqrt(1 - a_t): the noise standard deviation in x_t."""
        return self._at((1.0 - self.alphas_cumprod).sqrt(), t, like)

    def log_snr(self) -> torch.Tensor:
        """lambda_t = log(sqrt(a_t) / sqrt(1 - a_t)) for every entry (float64), decreasing in t."""
        return 0.5 * (torch.log(self.alphas_cumprod) - torch.log1p(-self.alphas_cumprod))

    # -- forward process and prediction-type algebra ------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps."""
        return self.signal(t, x0) * x0 + self.sigma(t, x0) * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t, prediction: str) -> torch.Tensor:
        """What a network of the given prediction type should output for (x0, eps, t)."""
        check_prediction(prediction)
        if prediction == "epsilon":
            return noise
        if prediction == "x0":
            return x0
        return self.signal(t, x0) * noise - self.sigma(t, x0) * x0          # v

    def predict_x0(self, x_t: torch.Tensor, t, model_output: torch.Tensor, prediction: str) -> torch.Tensor:
        check_prediction(prediction)
        a, b = self.signal(t, x_t), self.sigma(t, x_t)
        if prediction == "epsilon":
            return (x_t - b * model_output) / a            # x0 = (x_t - sqrt(1-a) eps) / sqrt(a)
        if prediction == "x0":
            return model_output
        return a * x_t - b * model_output                  # x0 = sqrt(a) x_t - sqrt(1-a) v

    def predict_eps(self, x_t: torch.Tensor, t, model_output: torch.Tensor, prediction: str) -> torch.Tensor:
        check_prediction(prediction)
        a, b = self.signal(t, x_t), self.sigma(t, x_t)
        if prediction == "epsilon":
            return model_output
        if prediction == "x0":
            return (x_t - a * model_output) / b            # eps = (x_t - sqrt(a) x0) / sqrt(1-a)
        return b * x_t + a * model_output                  # eps = sqrt(1-a) x_t + sqrt(a) v

    def eps_from_x0(self, x_t: torch.Tensor, t, x0: torch.Tensor) -> torch.Tensor:
        """The noise consistent with x_t and an (e.g. clipped) x0 estimate."""
        return self.predict_eps(x_t, t, x0, "x0")

    # -- reverse process ---------------------------------------------------------------------
    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x0) (Ho et al. eq. 6-7), t an index of this
        (possibly respaced) schedule:
            mean = beta_t sqrt(a_{t-1}) / (1 - a_t) * x0 + (1 - a_{t-1}) sqrt(alpha_t) / (1 - a_t) * x_t
            var  = beta_t (1 - a_{t-1}) / (1 - a_t)        (0 at the first step)."""
        b, acp, prev = self.betas, self.alphas_cumprod, self.alphas_cumprod_prev
        c_x0 = self._at(b * prev.sqrt() / (1 - acp), t, x_t)
        c_xt = self._at((1 - prev) * self.alphas.sqrt() / (1 - acp), t, x_t)
        var = self._at(b * (1 - prev) / (1 - acp), t, x_t)
        return c_x0 * x0 + c_xt * x_t, var
