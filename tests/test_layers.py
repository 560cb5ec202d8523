"""The shared layers (models.layers) and the speed/memory options of the networks: the one
SPADE-GroupNorm against the two implementations it replaces (MONAI's SPADE block in the VQ-GAN,
the denoiser's hand-written one), old state-dict keys, the shipped demo weights' outputs against
those recorded with the code before (commit d8b91bc), SPADE modulation in slabs, activation
checkpointing, shared label features and (1, 3, 3) SPADE kernels, and bf16 autocast on CPU."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import SPADE

from medlsdm.models.autoencoder import VQGAN
from medlsdm.models.denoisers import SemanticUNet, spade_norm
from medlsdm.models.layers import SPADEGroupNorm

TINY = dict(channels=(4, 8, 8), num_res_blocks=(1, 2), latent_channels=3, num_codes=32)
DEMO = Path(__file__).resolve().parents[1] / "src" / "medlsdm" / "weights" / "demo"
RECORDED = Path(__file__).parent / "data" / "demo_outputs.npz"


def _onehot(labels: torch.Tensor, k: int) -> torch.Tensor:
    return F.one_hot(labels.long(), k).movedim(-1, 1).float()


def _blocky_label(shape, k=4, seed=0, block=3):
    coarse = torch.randint(0, k, (1, 1, *(-(-s // block) for s in shape)), generator=torch.Generator().manual_seed(seed))
    full = coarse.repeat_interleave(block, 2).repeat_interleave(block, 3).repeat_interleave(block, 4)
    return _onehot(full[:, 0, : shape[0], : shape[1], : shape[2]], k)


def _monai_keys(state: dict) -> dict:
    """This class's keys written the way MONAI's SPADE block (inside the old wrapper) named them."""
    rename = {"shared.conv.": "spade.mlp_shared.conv.", "gamma.": "spade.mlp_gamma.conv.", "beta.": "spade.mlp_beta.conv."}
    out = {}
    for key, value in state.items():
        new = next((b + key[len(a):] for a, b in rename.items() if key.startswith(a)), key)
        out[new] = value
    return out


def test_vqgan_spade_norm_equals_monai_spade_block_and_loads_its_keys():
    torch.manual_seed(0)
    block = SPADE(label_nc=4, norm_nc=16, kernel_size=3, spatial_dims=3, hidden_channels=12, norm="GROUP",
                  norm_params={"num_groups": 8, "affine": False})
    ours = SPADEGroupNorm(16, 4, hidden=12, groups=8, normalize_modulation=True)
    missing, unexpected = ours.load_state_dict({"spade." + k: v for k, v in block.state_dict().items()})
    assert not missing and not unexpected
    x, label = torch.randn(2, 16, 6, 8, 10), _blocky_label((12, 16, 20))
    label = torch.cat([label, _blocky_label((12, 16, 20), seed=1)])
    assert torch.equal(ours(x, label), block(x, label))        # bit for bit, label resized inside


def test_denoiser_spade_norm_equals_the_former_formula_and_zero_condition_reduces_to_groupnorm():
    torch.manual_seed(0)
    norm = spade_norm(32, 6, hidden=8)
    state = {("shared.0." + k[len("shared.conv."):] if k.startswith("shared.conv.") else k): v
             for k, v in norm.state_dict().items()}                # the former Sequential's keys
    again = spade_norm(32, 6, hidden=8)
    again.load_state_dict(state)
    x, f = torch.randn(1, 32, 3, 6, 6), torch.randn(1, 6, 3, 6, 6)
    h = F.relu(F.conv3d(f, state["shared.0.weight"], None, padding=(0, 1, 1)))
    gamma = F.conv3d(h, state["gamma.weight"], state["gamma.bias"], padding=(0, 1, 1))
    beta = F.conv3d(h, state["beta.weight"], state["beta.bias"], padding=(0, 1, 1))
    expected = F.group_norm(x, 32, eps=1e-6) * (1 + gamma) + beta
    torch.testing.assert_close(again(x, f), expected, rtol=1e-5, atol=1e-5)
    zero = torch.zeros_like(f)
    torch.testing.assert_close(again(x, zero), F.group_norm(x, 32, eps=1e-6) * (1 + again.gamma.bias.view(1, -1, 1, 1, 1))
                               + again.beta.bias.view(1, -1, 1, 1, 1))


@pytest.fixture
def one_thread():
    """The recorded outputs were computed on 1 thread without flushing subnormals; the thread
    count changes how convolutions split their sums, hence the last bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(False)
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


@pytest.mark.skipif(not RECORDED.is_file(), reason="recorded outputs missing")
def test_shipped_demo_weights_give_the_outputs_recorded_before(one_thread):
    """Bit for bit: the denoiser and the SPADE decoder of the shipped demo model on fixed inputs,
    against tests/data/demo_outputs.npz (tools/record_demo_outputs.py, run when the shipped decoder
    changed, with code that gave the outputs commit d8b91bc recorded for the previous weights bit
    for bit)."""
    from medlsdm.inference import load_model

    rec = np.load(RECORDED)
    for name in ("autoencoder", "diffusion"):
        sha = hashlib.sha256((DEMO / f"{name}.safetensors").read_bytes()).hexdigest()
        if sha != str(rec[f"sha_{name}"]):
            pytest.skip(f"the demo {name} weights changed since the outputs were recorded")
    model = load_model(DEMO)
    label = _onehot(torch.as_tensor(rec["label"])[:, 0], 4)
    z = torch.as_tensor(rec["z"])
    with torch.no_grad():
        eps = model.denoiser(z, torch.tensor([250]), label)
        image = model.autoencoder.decode(model.autoencoder.quantize(z)[0], label, out_shape=label.shape[2:])
        np.testing.assert_array_equal(eps.numpy(), rec["denoiser"])
        np.testing.assert_array_equal(image.numpy(), rec["image"])
        model.autoencoder.set_spade_slab(3)                      # slabs: the same image within float rounding
        np.testing.assert_allclose(model.autoencoder.decode(model.autoencoder.quantize(z)[0], label,
                                                            out_shape=label.shape[2:]).numpy(),
                                   rec["image"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernel", [3, (1, 3, 3)])
@pytest.mark.parametrize("instance", [True, False])
def test_spade_modulation_in_slabs_equals_whole_volume_values_and_gradients(kernel, instance):
    torch.manual_seed(0)
    whole = SPADEGroupNorm(8, 4, hidden=6, groups=4, kernel=kernel, normalize_modulation=instance)
    slabs = SPADEGroupNorm(8, 4, hidden=6, groups=4, kernel=kernel, normalize_modulation=instance, slab=3)
    slabs.load_state_dict(whole.state_dict())
    x = torch.randn(1, 8, 11, 6, 7, requires_grad=True)
    label = _blocky_label((11, 6, 7), seed=2, block=2)
    a, b = whole(x, label), slabs(x, label)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(a)
    grads_a = torch.autograd.grad((a * g).sum(), [x, *whole.parameters()])
    grads_b = torch.autograd.grad((b * g).sum(), [x, *slabs.parameters()])
    for ga, gb in zip(grads_a, grads_b):
        # Sums over slabs run in another order; the gamma/beta biases before an instance norm
            # have a true gradient of 0, so both sides are rounding noise there.
            torch.testing.assert_close(gb, ga, rtol=1e-3, atol=1e-3)
    # from shared label features (one convolution less, so a halo of one kernel reach)
    feats = torch.randn(1, 6, 11, 6, 7)
    shared_whole = SPADEGroupNorm(8, 4, hidden=6, groups=4, kernel=kernel, own_features=False)
    shared_slabs = SPADEGroupNorm(8, 4, hidden=6, groups=4, kernel=kernel, own_features=False, slab=4)
    shared_slabs.load_state_dict(shared_whole.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(shared_slabs(x, features=feats), shared_whole(x, features=feats),
                                   rtol=1e-5, atol=1e-5)


def test_vqgan_decode_in_slabs_equals_full_decode():
    torch.manual_seed(0)
    model = VQGAN(downsample=(2, 4, 4), decoder="spade", num_classes=4, spade_hidden=8, **TINY).eval()
    label = _blocky_label((18, 12, 16), seed=3)
    with torch.no_grad():
        z = model.quantize(model.encode(torch.rand(1, 1, 18, 12, 16) * 2 - 1))[0]
        full = model.decode(z, label)
        model.set_spade_slab(4)
        tiled = model.decode(z, label)
    assert tiled.shape == full.shape == (1, 1, 18, 12, 16)
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("decoder", ["plain", "spade"])
def test_checkpointing_gives_the_same_loss_and_gradients(decoder):
    torch.manual_seed(0)
    kw = dict(downsample=(2, 2, 2), decoder=decoder, num_classes=4, spade_hidden=8, **TINY)
    plain, ckpt = VQGAN(**kw), VQGAN(checkpointing=True, spade_slab=3, **kw)
    ckpt.load_state_dict(plain.state_dict())
    x, label = torch.rand(1, 1, 10, 8, 12) * 2 - 1, _blocky_label((10, 8, 12), seed=4)
    plain.quantizer.eval(), ckpt.quantizer.eval()             # no codebook update: same codes in both
    losses = []
    for model in (plain, ckpt):
        rec, vq, _ = model(x, label)
        loss = (rec - x).abs().mean() + vq
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_cheaper_spade_variants_are_smaller_and_still_follow_the_label_map():
    kw = dict(downsample=(2, 2, 2), decoder="spade", num_classes=4, spade_hidden=16, **TINY)
    count = lambda m: sum(p.numel() for p in m.decoder.parameters())  # noqa: E731
    base = VQGAN(**kw)
    for variant in (VQGAN(spade_kernel=(1, 3, 3), **kw), VQGAN(spade_shared=True, **kw),
                    VQGAN(spade_shared=True, spade_kernel=(1, 3, 3), spade_instance_norm=False, **kw)):
        assert count(variant) < count(base)
        variant.eval()
        z = torch.randn(1, 3, 5, 4, 6)
        a, b = _blocky_label((10, 8, 12), seed=5), _blocky_label((10, 8, 12), seed=6)
        with torch.no_grad():
            assert (variant.decode(z, a) - variant.decode(z, b)).abs().mean() > 1e-3
        variant.train()
        variant.decode(z, a).square().mean().backward()
        first = variant.decoder.label_features or variant.decoder.levels[0].blocks[0].norm1.shared
        assert first.conv.weight.grad.abs().sum() > 0


def test_training_in_bf16_autocast_runs_on_cpu():
    """The GPU mixed-precision path (Lightning's bf16-mixed is torch.autocast): both networks'
    forward and backward run and stay close to fp32 (CPU bf16 is slow here, hence tiny sizes)."""
    torch.manual_seed(0)
    ae = VQGAN(downsample=(2, 2, 2), decoder="spade", num_classes=3, spade_hidden=8, spade_slab=4,
               checkpointing=True, **TINY)
    x, label = torch.rand(1, 1, 8, 8, 8) * 2 - 1, _blocky_label((8, 8, 8), k=3, seed=7)
    ae.quantizer.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rec16, vq16, info16 = ae(x, label)
        loss16 = (rec16.float() - x).abs().mean() + vq16
    loss16.backward()
    assert rec16.dtype == torch.bfloat16 and torch.isfinite(loss16)
    assert all(torch.isfinite(p.grad).all() for p in ae.parameters() if p.grad is not None)
    with torch.no_grad():
        # The same codes decoded in fp32 (bf16 encoder outputs may flip a near-tie code).
        rec32 = ae.decode(ae.quantizer.lookup(info16["indices"]), label)
    assert (rec16.float() - rec32).abs().max() < 0.1

    from medlsdm.diffusion.objective import diffusion_loss
    from medlsdm.diffusion.schedules import NoiseSchedule

    net = SemanticUNet(in_channels=3, num_classes=3, base_channels=8, channel_mult=(1, 2), attention_levels=(1,),
                       attention_head_dim=4, label_channels=4, label_hidden=(4, 4), label_downsample=(2, 2, 2),
                       spade_hidden=8, gradient_checkpointing=True)
    schedule = NoiseSchedule(50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = diffusion_loss(net, torch.randn(1, 3, 4, 4, 4), label, schedule, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
