import json

import pytest
import torch

from medlsdm.diffusion.scaling import LatentScaler
from medlsdm.errors import ConfigError


def _latents():
    gen = torch.Generator().manual_seed(0)
    offsets = torch.tensor([3.0, -2.0, 0.5]).view(1, 3, 1, 1, 1)
    spreads = torch.tensor([0.1, 4.0, 1.0]).view(1, 3, 1, 1, 1)
    return torch.randn(6, 3, 4, 8, 8, generator=gen) * spreads + offsets


def test_std_mode_gives_zero_mean_unit_std_per_channel():
    z = _latents()
    scaler = LatentScaler("std").fit(z)
    x = scaler.scale(z)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3, 4)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3, 4), unbiased=False), torch.ones(3), atol=1e-5, rtol=0)
    # the sampler's x0 bound is the largest |scaled value| of the fitting data
    assert scaler.x0_clip == pytest.approx(float(x.abs().max()), rel=1e-5)
    assert LatentScaler.from_dict(scaler.state_dict()).x0_clip == pytest.approx(scaler.x0_clip)


@pytest.mark.parametrize("mode", ["std", "minmax"])
def test_scale_unscale_round_trip_and_unbatched(mode):
    z = _latents()
    scaler = LatentScaler(mode).fit(z)
    torch.testing.assert_close(scaler.unscale(scaler.scale(z)), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scaler.scale(z[0]), scaler.scale(z)[0])      # (C, D, H, W) works too


def test_fit_on_iterable_equals_fit_on_tensor():
    z = _latents()
    a = LatentScaler("std").fit(z)
    b = LatentScaler("std").fit(iter([z[:2], z[2], z[3:]]))   # batches and single volumes mixed
    assert a.mean == pytest.approx(b.mean, rel=1e-9)
    assert a.std == pytest.approx(b.std, rel=1e-9)


def test_minmax_maps_range_to_unit_interval():
    scaler = LatentScaler("minmax").fit_range(-3.0, 5.0)
    torch.testing.assert_close(scaler.scale(torch.tensor([-3.0, 1.0, 5.0]).view(1, 3, 1, 1, 1)).flatten(),
                               torch.tensor([-1.0, 0.0, 1.0]))
    z = _latents()
    fitted = LatentScaler("minmax").fit(z)
    x = fitted.scale(z)
    assert x.min().item() == pytest.approx(-1.0) and x.max().item() == pytest.approx(1.0)
    assert fitted.x0_clip == 1.0


@pytest.mark.parametrize("mode", ["std", "minmax"])
def test_state_round_trip_through_json(mode):
    z = _latents()
    scaler = LatentScaler(mode).fit(z)
    restored = LatentScaler.from_dict(json.loads(json.dumps(scaler.state_dict())))
    torch.testing.assert_close(restored.scale(z), scaler.scale(z))
    assert restored.state_dict() == scaler.state_dict()


def test_errors():
    with pytest.raises(ConfigError, match="latent.scaling"):
        LatentScaler("robust")
    with pytest.raises(RuntimeError, match="before fit"):
        LatentScaler("std").scale(torch.zeros(1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match="channels"):
        LatentScaler("std").fit(_latents()).scale(torch.zeros(1, 2, 2, 2, 2))
    with pytest.raises(ConfigError, match="not valid"):
        LatentScaler.from_dict({"mode": "std", "mean": [0.0]})
    with pytest.raises(ConfigError, match="minmax"):
        LatentScaler("std").fit_range(0, 1)


def test_constant_channel_does_not_divide_by_zero():
    z = _latents()
    z[:, 0] = 1.5
    x = LatentScaler("std").fit(z).scale(z)
    assert torch.isfinite(x).all() and x[:, 0].abs().max() < 1e-3
