"""The VQ-GAN: shapes for per-axis downsampling and odd sizes, the SPADE decoder's use of the
label map, gradients through the codebook, weights round trip, and configuration errors."""

import pytest
import torch

from medlsdm.errors import ConfigError, MedlsdmError
from medlsdm.models.autoencoder import VQGAN, level_strides

TINY = dict(channels=(4, 8, 8), num_res_blocks=(1, 1), latent_channels=3, num_codes=32)


def _onehot(labels: torch.Tensor, k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels.long(), k).movedim(-1, 1).float()


@pytest.mark.parametrize("downsample, shape, latent", [
    ((4, 4, 4), (16, 16, 16), (4, 4, 4)),
    ((2, 4, 4), (16, 16, 16), (8, 4, 4)),
    ((2, 2, 2), (16, 16, 16), (8, 8, 8)),
    ((1, 2, 2), (16, 16, 16), (16, 8, 8)),
    ((4, 4, 4), (20, 18, 22), (5, 5, 6)),
    ((2, 4, 4), (20, 18, 22), (10, 5, 6)),
])
def test_shapes(downsample, shape, latent):
    model = VQGAN(downsample=downsample, **TINY)
    x = torch.rand(2, 1, *shape) * 2 - 1
    assert model.latent_shape(shape) == (3, *latent)
    assert model.latent_shape(x.shape) == (3, *latent)
    z_e = model.encode(x)
    assert z_e.shape == (2, 3, *latent)
    x_rec, loss, info = model(x)
    assert x_rec.shape == x.shape
    assert x_rec.abs().max() <= 1.0 and loss.ndim == 0
    assert info["indices"].shape == (2, *latent)
    assert 1.0 <= info["perplexity"].item() <= 32


def test_level_strides_per_axis():
    assert level_strides([4, 4, 4]) == [(2, 2, 2), (2, 2, 2)]
    assert level_strides([2, 4, 4]) == [(2, 2, 2), (1, 2, 2)]
    assert level_strides([1, 2, 8]) == [(1, 2, 2), (1, 1, 2), (1, 1, 2)]


def test_odd_size_is_padded_by_replication_and_cropped_back():
    model = VQGAN(downsample=(4, 4, 4), **TINY).eval()
    x = torch.rand(1, 1, 20, 18, 22) * 2 - 1
    padded = model._pad(x)
    assert padded.shape[2:] == (20, 20, 24)
    assert torch.equal(padded[:, :, :, 18:, :22], x[:, :, :, 17:18].expand(-1, -1, -1, 2, -1))  # replicated edge
    with torch.no_grad():
        z_q, _, _ = model.quantize(model.encode(x))
        full = model.decode(z_q)
        cropped = model.decode(z_q, out_shape=(20, 18, 22))
    assert full.shape[2:] == (20, 20, 24)
    assert torch.equal(cropped, full[:, :, :20, :18, :22])
    with pytest.raises(MedlsdmError, match="cannot decode"):
        model.decode(z_q, out_shape=(16, 18, 22))


def test_multichannel_images():
    model = VQGAN(in_channels=4, downsample=(2, 2, 2), **TINY)
    x = torch.rand(1, 4, 16, 16, 16) * 2 - 1
    assert model(x)[0].shape == x.shape
    with pytest.raises(MedlsdmError, match=r"\(B, 4, D, H, W\)"):
        model.encode(x[:, :1])


def test_spade_decoder_follows_the_label_map():
    k = 3
    model = VQGAN(downsample=(2, 2, 2), decoder="spade", num_classes=k, spade_hidden=8, **TINY).eval()
    x = torch.rand(1, 1, 20, 18, 22) * 2 - 1
    labels_a = torch.zeros(1, 20, 18, 22, dtype=torch.long)
    labels_a[:, 5:15, 4:12, 6:16] = 1
    labels_b = labels_a.clone()
    labels_b[:, 2:10, 10:18, 2:8] = 2
    with torch.no_grad():
        z_q, _, _ = model.quantize(model.encode(x))
        out_a = model.decode(z_q, label=_onehot(labels_a, k))  # out_shape from the label map
        out_a2 = model.decode(z_q, label=_onehot(labels_a, k), out_shape=(20, 18, 22))
        out_b = model.decode(z_q, label=_onehot(labels_b, k))
    assert out_a.shape == x.shape
    assert torch.equal(out_a, out_a2)
    assert (out_a - out_b).abs().max() > 1e-3  # (not local: GroupNorm statistics are global)
    with pytest.raises(MedlsdmError, match="needs a label map"):
        model.decode(z_q)
    with pytest.raises(MedlsdmError, match="expected one-hot"):
        model.decode(z_q, label=_onehot(labels_a, 2))
    x_rec, _, _ = model(x, label=_onehot(labels_a, k))
    assert x_rec.shape == x.shape


def test_plain_decoder_needs_no_label():
    model = VQGAN(downsample=(2, 2, 2), **TINY).eval()
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        z_q, _, _ = model.quantize(model.encode(x))
        assert torch.equal(model.decode(z_q), model.decode(z_q, label=None))
        assert model(x)[0].shape == x.shape


def test_gradient_reaches_the_encoder_through_the_codebook():
    model = VQGAN(downsample=(2, 2, 2), commitment=0.0, attention=True, **TINY).train()
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    x_rec, vq_loss, _ = model(x)
    (x_rec - x).abs().mean().backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0
    assert all(not b.requires_grad for b in model.quantizer.buffers())


def test_weights_round_trip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = VQGAN(downsample=(2, 2, 2), **TINY).train()
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    model(x)  # initialises and updates the codebook
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "ae.safetensors")
    loaded = VQGAN(downsample=(2, 2, 2), **TINY)
    loaded.load_state_dict(load_file(tmp_path / "ae.safetensors"))
    assert bool(loaded.quantizer.initialized)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(x)[0], loaded(x)[0])


def test_configuration_errors():
    with pytest.raises(ConfigError, match="powers of two"):
        VQGAN(downsample=(3, 4, 4), **TINY)
    with pytest.raises(ConfigError, match="at least one axis"):
        VQGAN(downsample=(1, 1, 1), **TINY)
    with pytest.raises(ConfigError, match="model.channels needs 4"):
        VQGAN(downsample=(8, 8, 8), **TINY)
    with pytest.raises(ConfigError, match="num_classes"):
        VQGAN(decoder="spade", **TINY)
    with pytest.raises(ConfigError, match="model.decoder"):
        VQGAN(decoder="unet", **TINY)


def test_interpolating_decoder_builds_in_no_checkerboard():
    """A flat latent decodes to a flat image with nearest + convolution upsampling (away from the
    zero-padded borders), at initialisation, before any training; stride-2 transposed
    convolutions give even and odd voxels different kernel taps: a 2-voxel pattern."""
    z = torch.ones(1, TINY["latent_channels"], 16, 16, 16)
    spread = {}
    for mode in ("interpolate", "transposed"):
        torch.manual_seed(0)
        ae = VQGAN(downsample=(4, 4, 4), upsample=mode, **TINY).eval()
        with torch.no_grad():
            spread[mode] = float(ae.decode(z)[0, 0, 24:-24, 24:-24, 24:-24].std())
    assert spread["interpolate"] < 1e-5 < 1e-2 < spread["transposed"], spread


def test_upsample_option_is_checked_and_old_configurations_mean_transposed():
    with pytest.raises(ConfigError, match="upsample"):
        VQGAN(upsample="pixelshuffle", **TINY)
    old = VQGAN(upsample=None, **TINY)   # a sidecar written before the option
    assert old.upsample_mode == "transposed"
    assert isinstance(old.decoder.levels[0].upsample, torch.nn.ConvTranspose3d)
