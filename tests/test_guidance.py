import pytest
import torch
import torch.nn.functional as F

from medlsdm.diffusion.guidance import guided_model, null_condition, scale_from_reference
from medlsdm.models.denoisers import SemanticUNet


def _net():
    return SemanticUNet(2, num_classes=3, base_channels=8, channel_mult=(1, 2), attention_levels=(1,),
                        label_channels=8, label_hidden=(8,), label_downsample=(1, 2, 2), spade_hidden=8).eval()


def _inputs(batch=2):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 2, 4, 4, 4, generator=gen)
    label = F.one_hot(torch.randint(0, 3, (batch, 4, 8, 8), generator=gen), 3).permute(0, 4, 1, 2, 3).float()
    return x, torch.tensor([3, 40][:batch]), label


class Counting:
    """A model function that records its calls' batch sizes."""

    def __init__(self, net):
        self.net, self.batches = net, []

    def __call__(self, x, t, cond):
        self.batches.append(x.shape[0])
        return self.net(x, t, cond)


@torch.no_grad()
def test_batched_guidance_equals_two_forwards():
    net, (x, t, label) = _net(), _inputs()
    w = 2.5
    out_c, out_n = net(x, t, label), net(x, t, torch.zeros_like(label))
    expected = out_n + w * (out_c - out_n)
    model = Counting(net)
    batched = guided_model(model, w)(x, t, label)
    assert model.batches == [4]                       # one forward on the doubled batch
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-5)
    model.batches.clear()
    separate = guided_model(model, w, batched=False)(x, t, label)
    assert model.batches == [2, 2]
    torch.testing.assert_close(separate, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched, out_c, atol=1e-3)        # guidance changed something


@torch.no_grad()
def test_scale_one_is_conditional_and_zero_is_null():
    net, (x, t, label) = _net(), _inputs()
    model = Counting(net)
    torch.testing.assert_close(guided_model(model, 1.0)(x, t, label), net(x, t, label))
    assert model.batches == [2]                       # a single conditional pass
    torch.testing.assert_close(guided_model(net, 0.0)(x, t, label), net(x, t, torch.zeros_like(label)))


def test_unconditional_call_passes_through():
    calls = []

    def model(x, t, cond):
        calls.append(cond)
        return x * 2

    x = torch.ones(1, 1, 2, 2, 2)
    torch.testing.assert_close(guided_model(model, 3.0)(x, torch.tensor([1]), None), x * 2)
    assert calls == [None]


def test_reference_scale_mapping_and_null_condition():
    assert scale_from_reference(1.5) == pytest.approx(2.5)      # eps_c + 1.5 (eps_c - eps_null)
    label = _inputs()[2]
    null = null_condition(label)
    assert null.shape == label.shape and not null.any()


def test_guidance_formula_on_plain_functions():
    def model(x, t, cond):
        return cond.sum(dim=1, keepdim=True) + 0 * x            # out_cond = 1, out_null = 0 for one-hot

    x, t, label = _inputs()
    out = guided_model(model, 2.5)(torch.zeros(2, 1, 4, 8, 8), t, label)
    torch.testing.assert_close(out, torch.full_like(out, 2.5))  # 0 + 2.5 * (1 - 0)
