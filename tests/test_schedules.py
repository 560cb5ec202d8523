import math

import numpy as np
import pytest
import torch

from medlsdm.diffusion.schedules import NoiseSchedule, cosine_betas, timestep_grid
from medlsdm.errors import ConfigError


def _abar(u, s=0.008):
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_alphas_cumprod_strictly_decreasing_in_unit_interval(kind):
    acp = NoiseSchedule(500, kind=kind).alphas_cumprod
    assert acp.dtype == torch.float64
    assert torch.all(acp[1:] < acp[:-1])
    assert torch.all((acp > 0) & (acp < 1))


def test_cosine_matches_closed_form_and_endpoints():
    T = 500
    sched = NoiseSchedule(T, kind="cosine")
    # Telescoping product: a_t = abar((t+1)/T) / abar(0) while no beta is clipped.
    unclipped = int((sched.betas < 0.999).sum())
    t = np.arange(unclipped)
    expected = np.array([_abar((i + 1) / T) / _abar(0) for i in t])
    np.testing.assert_allclose(sched.alphas_cumprod.numpy()[t], expected, rtol=1e-10)
    assert sched.alphas_cumprod[0] > 0.9999          # almost clean at t = 0
    assert sched.alphas_cumprod[-1] < 1e-6           # pure noise at t = T-1
    assert sched.betas.max().item() == pytest.approx(0.999)   # the clip is in force at the end
    assert float(cosine_betas(T)[0]) == pytest.approx(1 - _abar(1 / T) / _abar(0))


def test_linear_schedule_scaled_to_T():
    # DDPM values are for T = 1000; scaled by 1000/T the final signal level does not depend on T.
    a1000 = NoiseSchedule(1000, kind="linear").alphas_cumprod[-1].item()
    a250 = NoiseSchedule(250, kind="linear").alphas_cumprod[-1].item()
    assert NoiseSchedule(1000, kind="linear").betas[0].item() == pytest.approx(1e-4)
    assert a1000 == pytest.approx(4.04e-5, rel=0.05)
    assert a250 == pytest.approx(a1000, rel=0.2)


def test_q_sample_statistics():
    sched = NoiseSchedule(300)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.full((20000, 1, 1, 1, 1), 0.7)
    for t in (0, 50, 150, 299):
        a = sched.alphas_cumprod[t].item()
        x_t = sched.q_sample(x0, torch.full((20000,), t), torch.randn(x0.shape, generator=gen))
        assert x_t.mean().item() == pytest.approx(math.sqrt(a) * 0.7, abs=0.02)
        assert x_t.std().item() == pytest.approx(math.sqrt(1 - a), rel=0.03, abs=2e-3)


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_prediction_conversions_round_trip(prediction):
    sched = NoiseSchedule(500)
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(6, 2, 3, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 10, 100, 250, 400, 480])
    x_t = sched.q_sample(x0, t, eps)
    out = sched.target(x0, eps, t, prediction)
    torch.testing.assert_close(sched.predict_x0(x_t, t, out, prediction), x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sched.predict_eps(x_t, t, out, prediction), eps, rtol=1e-6, atol=1e-6)


def test_v_definition():
    sched = NoiseSchedule(100)
    x0, eps, t = torch.randn(3, 1, 2, 2, 2), torch.randn(3, 1, 2, 2, 2), torch.tensor([5, 50, 90])
    a = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(sched.target(x0, eps, t, "v"), a.sqrt() * eps - (1 - a).sqrt() * x0)


def test_respace_keeps_alphas_and_recomputes_betas():
    sched = NoiseSchedule(500)
    sub = sched.respace(50)
    assert len(sub) == 50
    assert sub.timesteps[0].item() == 0 and sub.timesteps[-1].item() == 499
    torch.testing.assert_close(sub.alphas_cumprod, sched.alphas_cumprod[sub.timesteps])
    torch.testing.assert_close(torch.cumprod(1 - sub.betas, 0), sub.alphas_cumprod)
    assert sub.num_train_timesteps == 500
    full = sched.respace(None)
    torch.testing.assert_close(full.betas, sched.betas)


def test_logsnr_grid_is_uniform_in_lambda():
    sched = NoiseSchedule(1000, kind="linear")
    grid = timestep_grid(1000, 20, "logsnr", sched.alphas_cumprod.numpy())
    assert grid[0] == 0 and grid[-1] == 999 and len(grid) == 20 and np.all(np.diff(grid) > 0)
    lam = sched.log_snr().numpy()[grid]
    steps = np.diff(lam)
    assert steps.std() / abs(steps.mean()) < 0.1
    assert not np.allclose(grid, timestep_grid(1000, 20, "time"), atol=5)


def test_posterior_last_step_is_x0_without_noise():
    sched = NoiseSchedule(200).respace(10)
    x0, x_t = torch.randn(2, 1, 2, 2, 2), torch.randn(2, 1, 2, 2, 2)
    mean, var = sched.posterior(x0, x_t, 0)
    torch.testing.assert_close(mean, x0)
    assert float(var) == 0.0
    # Posterior mean of a middle step, written out (Ho et al. eq. 7).
    i = 5
    a, ap, b = (float(v[i]) for v in (sched.alphas_cumprod, sched.alphas_cumprod_prev, sched.betas))
    mean, var = sched.posterior(x0, x_t, i)
    torch.testing.assert_close(mean, b * math.sqrt(ap) / (1 - a) * x0 + (1 - ap) * math.sqrt(1 - b) / (1 - a) * x_t)
    assert float(var) == pytest.approx(b * (1 - ap) / (1 - a))


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="schedule"):
        NoiseSchedule(10, kind="quadratic")
    with pytest.raises(ConfigError, match="prediction"):
        NoiseSchedule(10).predict_x0(torch.zeros(1, 1), 0, torch.zeros(1, 1), "score")
