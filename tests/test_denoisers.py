import pytest
import torch
import torch.nn.functional as F

from medlsdm.errors import ConfigError, MedlsdmError
from medlsdm.models.layers import InPlaneConv3d
from medlsdm.models.denoisers import (DENOISER_DEFAULTS, ConcatUNet, LabelEncoder, SemanticUNet, spade_norm,
                                      UnconditionalUNet, build_denoiser)

TINY = dict(base_channels=8, channel_mult=(1, 2), attention_levels=(1,), attention_head_dim=4)


def onehot(labels, k):
    return F.one_hot(labels, k).permute(0, 4, 1, 2, 3).float()


def semantic(variant="pseudo3d", **kw):
    args = dict(in_channels=4, num_classes=3, label_channels=8, label_hidden=(8, 16), label_downsample=(2, 4, 4),
                spade_hidden=8, variant=variant, **TINY)
    args.update(kw)
    return SemanticUNet(**args)


def _random_label(shape, k=3, seed=0):
    return onehot(torch.randint(0, k, shape, generator=torch.Generator().manual_seed(seed)), k)


@pytest.mark.parametrize("variant", ["pseudo3d", "3d"])
@pytest.mark.parametrize("label_shape,latent_shape", [((8, 32, 32), (4, 8, 8)),
                                                      ((6, 20, 24), (3, 5, 6)),     # odd latent sizes
                                                      ((5, 19, 24), (3, 5, 6))])    # label not a multiple of the factor
def test_semantic_output_shapes(variant, label_shape, latent_shape):
    net = semantic(variant)
    x = torch.randn(2, 4, *latent_shape)
    out = net(x, torch.tensor([1, 300]), _random_label((2, *label_shape)))
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("variant", ["pseudo3d", "3d"])
def test_semantic_output_depends_on_label_map_and_time(variant):
    net = semantic(variant).eval()
    x, t = torch.randn(1, 4, 4, 8, 8), torch.tensor([100])
    a = net(x, t, _random_label((1, 8, 32, 32), seed=1))
    b = net(x, t, _random_label((1, 8, 32, 32), seed=2))
    null = net(x, t, torch.zeros(1, 3, 8, 32, 32))
    scale = a.abs().mean()
    assert (a - b).abs().mean() > 1e-3 * scale and (a - null).abs().mean() > 1e-3 * scale
    c = net(x, torch.tensor([400]), _random_label((1, 8, 32, 32), seed=1))
    assert (a - c).abs().mean() > 1e-3 * scale


def test_gradients_reach_label_encoder_and_middle_time_embedding():
    net = semantic()
    out = net(torch.randn(2, 4, 4, 8, 8), torch.tensor([5, 50]), _random_label((2, 8, 32, 32)))
    out.square().mean().backward()
    first_conv = net.label_encoder.layers[0]
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    for block in net.mid.blocks:                       # the reference's middle blocks had no time embedding
        assert block.emb.weight.grad.abs().sum() > 0
        assert block.norm1.gamma.weight.grad.abs().sum() > 0      # SPADE in the middle block


def test_null_condition_encodes_to_zero_and_spade_reduces_to_groupnorm():
    enc = LabelEncoder(3, 8, (2, 4, 4), hidden=(8, 16))
    zero = enc(torch.zeros(2, 3, 8, 16, 16))
    assert zero.shape == (2, 8, 4, 4, 4) and not zero.any()
    norm = spade_norm(16, 8, hidden=8)
    x = torch.randn(2, 16, 4, 4, 4)
    expected = norm.norm(x) * (1 + norm.gamma.bias.view(1, -1, 1, 1, 1)) + norm.beta.bias.view(1, -1, 1, 1, 1)
    torch.testing.assert_close(norm(x, zero), expected)


def test_null_samples_skip_the_label_encoder_without_changing_the_output():
    net = semantic().eval()
    label = _random_label((3, 8, 32, 32))
    label[1] = 0
    x, t = torch.randn(3, 4, 4, 8, 8), torch.tensor([3, 30, 300])
    with torch.enable_grad():
        full = net(x, t, label).detach()               # with grad: every sample through the encoder
    with torch.no_grad():
        fast = net(x, t, label)                        # without grad: null sample skipped
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)


def test_pseudo3d_mixes_slices_through_order_aware_depth_attention():
    """Swapping slices 0 and 1 leaves GroupNorm statistics unchanged, so without depth attention
    ((1,3,3) kernels only) slice 3's output is unchanged and slices 0/1 swap. Depth attention with
    a relative position bias sees the order and changes slice 3."""
    x, t = torch.randn(1, 4, 4, 8, 8), torch.tensor([10])
    swapped = x[:, :, [1, 0, 2, 3]]
    torch.manual_seed(0)
    plain = UnconditionalUNet(in_channels=4, depth_attention=False, **TINY).eval()
    a, b = plain(x, t), plain(swapped, t)
    torch.testing.assert_close(b[:, :, 3], a[:, :, 3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b[:, :, 0], a[:, :, 1], atol=1e-5, rtol=1e-5)
    net = UnconditionalUNet(in_channels=4, depth_attention=True, **TINY).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("relative_bias"):
                p.normal_()
    assert (net(swapped, t)[:, :, 3] - net(x, t)[:, :, 3]).abs().max() > 1e-4


def test_concat_unet_drops_background_and_depends_on_mask():
    net = ConcatUNet(in_channels=2, num_classes=3, **{**TINY, "channel_mult": (1, 2, 2)}).eval()
    assert net.conv_in.in_channels == 2 + 3 - 1 and net.conditioning == "concat"
    x, t = torch.randn(1, 2, 6, 10, 12), torch.tensor([7])
    mask = _random_label((1, 6, 10, 12), seed=1)
    out = net(x, t, mask)
    assert out.shape == x.shape                        # multi-channel output, odd sizes
    assert (out - net(x, t, _random_label((1, 6, 10, 12), seed=2))).abs().max() > 1e-4
    altered_background = mask.clone()
    altered_background[:, 0] = 7.0                     # only the background channel differs
    torch.testing.assert_close(net(x, t, altered_background), out)
    with pytest.raises(MedlsdmError, match="one-hot mask"):
        net(x, t, mask[:, :2])


def test_unconditional_unet_ignores_condition():
    net = UnconditionalUNet(in_channels=4, **TINY).eval()
    x, t = torch.randn(1, 4, 4, 8, 8), torch.tensor([10])
    torch.testing.assert_close(net(x, t), net(x, t, torch.ones(1, 3, 4, 8, 8)))
    assert net.conditioning == "none" and not any("label" in n or "gamma" in n for n, _ in net.named_parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, label = torch.randn(1, 4, 4, 8, 8), torch.tensor([20]), _random_label((1, 8, 32, 32))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        net = semantic(gradient_checkpointing=ckpt)
        net(x, t, label).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_wrong_label_map_is_a_clear_error():
    net = semantic()
    with pytest.raises(MedlsdmError, match="does not fit a latent"):
        net(torch.randn(1, 4, 4, 8, 8), torch.tensor([1]), _random_label((1, 8, 16, 16)))
    with pytest.raises(MedlsdmError, match="one-hot label map"):
        net(torch.randn(1, 4, 4, 8, 8), torch.tensor([1]), _random_label((1, 8, 32, 32), k=2))


def test_build_denoiser_kinds_and_errors():
    tiny = {"base_channels": 8, "channel_mult": [1, 2], "attention_levels": [1], "attention_head_dim": 4,
            "num_classes": 3, "in_channels": 2, "label_channels": 8, "label_hidden": [8], "spade_hidden": 8}
    kinds = {"semantic": SemanticUNet, "concat": ConcatUNet, "unconditional": UnconditionalUNet}
    for kind, cls in kinds.items():
        net = build_denoiser({**tiny, "kind": kind})
        assert type(net) is cls and net.conditioning in ("spade", "concat", "none")
    assert set(DENOISER_DEFAULTS) >= set(tiny) | {"kind", "variant"}
    with pytest.raises(ConfigError, match="unknown denoiser option"):
        build_denoiser({**tiny, "chanels": 4})
    with pytest.raises(ConfigError, match="denoiser.kind"):
        build_denoiser({**tiny, "kind": "transformer"})
    with pytest.raises(ConfigError, match="attention_levels"):
        build_denoiser({**tiny, "attention_levels": [5]})
    with pytest.raises(ConfigError, match="num_classes"):
        build_denoiser({**tiny, "num_classes": None})
    with pytest.raises(ConfigError, match="label_downsample"):
        build_denoiser({**tiny, "label_downsample": [3, 4, 4]})


@pytest.mark.parametrize("kernel,stride", [((1, 3, 3), (1, 1, 1)), ((1, 3, 3), (1, 2, 2)), ((1, 1, 1), (1, 1, 1)),
                                           ((3, 3, 3), (1, 1, 1)), ((3, 3, 3), (2, 2, 2))])
def test_conv3d_batch_one_slice_path_matches_nn_conv3d(kernel, stride):
    """The batch-1 in-plane path (conv2d over slices) gives nn.Conv3d's output and gradients."""
    torch.manual_seed(0)
    ours = InPlaneConv3d(5, 7, kernel, stride, padding=tuple(k // 2 for k in kernel))
    reference = torch.nn.Conv3d(5, 7, kernel, stride, padding=tuple(k // 2 for k in kernel))
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(1, 5, 6, 10, 12, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = ours(x), reference(x_ref)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, reference.bias.grad, rtol=1e-4, atol=1e-4)
    two = torch.randn(2, 5, 6, 10, 12)                 # batch >= 2: plain nn.Conv3d
    torch.testing.assert_close(ours(two), reference(two))


def test_in_plane_conv_refuses_depth_padding_with_a_depth_one_kernel():
    with pytest.raises(ValueError, match="depth padding"):
        InPlaneConv3d(4, 4, (1, 3, 3), padding=1)
    conv = InPlaneConv3d(4, 4, (1, 3, 3), padding=(0, 1, 1))
    assert conv.in_plane and not InPlaneConv3d(4, 4, (1, 3, 3), stride=(2, 1, 1), padding=(0, 1, 1)).in_plane
