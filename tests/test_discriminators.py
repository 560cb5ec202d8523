"""Discriminators (shapes, features, size check), slice extraction, and the GAN losses."""

import pytest
import torch

from medlsdm.errors import ConfigError, MedlsdmError
from medlsdm.models.discriminators import build_discriminators
from medlsdm.models.slicing import extract_slices
from medlsdm.models.losses import (adaptive_weight, adversarial_weight, discriminator_loss,
                                   feature_matching_loss, generator_loss)


def test_discriminator_shapes_and_features():
    d2, d3 = build_discriminators(in_channels=2, channels=8, layers=2)
    feats2 = d2(torch.randn(3, 2, 24, 32))
    feats3 = d3(torch.randn(1, 2, 12, 16, 20))
    # initial conv + `layers` convs + final conv, the last being the patch logits
    assert len(feats2) == len(feats3) == 4
    assert [f.shape[1] for f in feats2] == [8, 16, 32, 1]
    assert feats2[-1].shape == (3, 1, 4, 6)  # 24 -> 12 -> 6 -> 5 -> 4
    assert feats3[-1].shape == (1, 1, 1, 2, 3)
    with pytest.raises(MedlsdmError, match="at least 12 voxels"):
        d3(torch.randn(1, 2, 11, 16, 16))


def test_default_discriminators_match_the_reference_size():
    _, d3 = build_discriminators(in_channels=1)
    assert sum(p.numel() for p in d3.parameters()) == pytest.approx(11.05e6, rel=0.01)


def test_extract_slices_stack_and_repeat_with_a_seed():
    x = torch.randn(2, 3, 6, 8, 10)
    shapes = {"D": (8, 10), "H": (6, 10), "W": (6, 8)}
    for axis, plane in shapes.items():
        s = extract_slices(x, 4, axes=(axis,), generator=torch.Generator().manual_seed(1))
        assert s.shape == (8, 3, *plane)
    a = extract_slices(x, 2, axes=("D", "H", "W"), generator=torch.Generator().manual_seed(5))
    b = extract_slices(x.clone(), 2, axes=("D", "H", "W"), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # each slice is a real slice of its own volume
    s = extract_slices(x, 3, axes=("D",), generator=torch.Generator().manual_seed(2))
    for i in range(6):
        volume = x[i // 3]
        assert any(torch.equal(s[i], volume[:, d]) for d in range(6))
    with pytest.raises(ConfigError, match="slice axis"):
        extract_slices(x, 1, axes=("Z",))


def test_hinge_and_least_squares_signs():
    high, low = torch.full((2, 1, 4, 4), 2.0), torch.full((2, 1, 4, 4), -2.0)
    for kind in ("hinge", "least_squares"):
        good = discriminator_loss(high, low, kind)  # real scored high, fake low
        bad = discriminator_loss(low, high, kind)
        assert good < bad
        assert generator_loss(high, kind) < generator_loss(low, kind)
    assert discriminator_loss(high, low, "hinge") == 0.0  # margins met
    assert discriminator_loss(torch.zeros(1), torch.zeros(1), "hinge") == pytest.approx(1.0)
    assert generator_loss(torch.tensor([0.5, 1.5]), "hinge") == pytest.approx(-1.0)
    assert discriminator_loss(torch.ones(3), torch.zeros(3), "least_squares") == 0.0
    assert generator_loss(torch.ones(3), "least_squares") == 0.0
    with pytest.raises(ConfigError, match="loss.gan"):
        generator_loss(high, "wasserstein")


def test_feature_matching():
    real = [torch.randn(1, 4, 5, 5, requires_grad=True), torch.randn(1, 1, 2, 2, requires_grad=True)]
    assert feature_matching_loss([r.detach() for r in real], real) == 0.0
    fake = [r.detach() + 1.0 for r in real]
    fake[0].requires_grad_()
    loss = feature_matching_loss(fake, real)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert fake[0].grad is not None and real[0].grad is None  # real features are targets only


def test_adversarial_weighting():
    assert adversarial_weight(99, 100) == 0.0
    assert adversarial_weight(100, 100, weight=0.5) == 0.5
    assert adversarial_weight(104, 100, warmup=10) == pytest.approx(0.5)
    assert adversarial_weight(500, 100, warmup=10) == 1.0
    w = torch.nn.Parameter(torch.ones(3))
    rec, adv = (w * 4).sum(), (w * 2).sum()
    assert adaptive_weight(rec, adv, w).item() == pytest.approx(2.0, rel=1e-3)
