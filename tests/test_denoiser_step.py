"""The denoiser's training step (forward + backward) against recorded values: the shipped demo
denoiser on fixed inputs, batch 1 (the CPU fast paths: convolutions over slices, the label
encoder in slice layout) and batch 2 (one null label map: the generic paths), output, loss and
every parameter's gradient (its norm and first elements). And the fast paths against the generic
ones on a small random network.

First recorded with the code before the denoiser's speed changes (commit 5f4b235, the older tree
on PYTHONPATH); when the demo weights change, re-recorded for the new weights with code that
passes the previous recording (so the chain back to 5f4b235 holds):

    python tests/test_denoiser_step.py tests/data/denoiser_step_demo.npz
"""

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

DEMO = Path(__file__).resolve().parents[1] / "src" / "medlsdm" / "weights" / "demo"
RECORDED = Path(__file__).parent / "data" / "denoiser_step_demo.npz"
HEAD = 64  # first gradient elements recorded per parameter


def _blocky_label(shape, k=4, seed=0, block=3):
    coarse = torch.randint(0, k, (1, *(-(-s // block) for s in shape)), generator=torch.Generator().manual_seed(seed))
    full = coarse.repeat_interleave(block, 1).repeat_interleave(block, 2).repeat_interleave(block, 3)
    return F.one_hot(full[:, : shape[0], : shape[1], : shape[2]], k).movedim(-1, 1).float()


def _inputs(batch: int):
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 8, 8, 16, 16, generator=gen)
    target = torch.randn(batch, 8, 8, 16, 16, generator=gen)
    t = torch.tensor([250, 40][:batch])
    label = _blocky_label((32, 64, 64))
    if batch == 2:
        label = torch.cat([label, torch.zeros_like(label)])
    return x, t, label, target


def _step(net, batch: int) -> dict:
    """Output, L1 loss and gradients of one training forward + backward."""
    net.train()
    net.zero_grad(set_to_none=True)
    x, t, label, target = _inputs(batch)
    out = net(x, t, label)
    loss = (out - target).abs().mean()
    loss.backward()
    rec = {f"out{batch}": out.detach().numpy(), f"loss{batch}": loss.detach().numpy()}
    for name, p in net.named_parameters():
        g = p.grad.flatten()
        rec[f"gnorm{batch}/{name}"] = g.norm().numpy()
        rec[f"ghead{batch}/{name}"] = g[:HEAD].numpy()
    return rec


def _demo_denoiser():
    from medlsdm.inference import load_model

    return load_model(DEMO).denoiser.requires_grad_(True)   # loaded for sampling: frozen


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(not RECORDED.is_file(), reason="recorded values missing")
@pytest.mark.parametrize("batch", [1, 2])
def test_demo_denoiser_training_step_equals_the_recorded_one(one_thread, batch):
    rec = np.load(RECORDED)
    sha = hashlib.sha256((DEMO / "diffusion.safetensors").read_bytes()).hexdigest()
    if sha != str(rec["sha_diffusion"]):
        pytest.skip("the demo diffusion weights changed since the values were recorded")
    got = _step(_demo_denoiser(), batch)
    names = [k for k in rec.files if k.endswith(str(batch)) or f"{batch}/" in k]
    assert set(names) == set(got), "parameter names changed"
    for key in names:
        # The forward is the same computation (bit for bit on 1 thread); gradients may differ in
        # the last bits where a sum runs in another order.
        np.testing.assert_allclose(got[key], rec[key], rtol=1e-4, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(got[f"out{batch}"], rec[f"out{batch}"])


def _generic(net):
    """The same network through the generic paths only (PyTorch's conv3d, the label encoder's
    layers one after the other)."""
    from medlsdm.models.layers import InPlaneConv3d

    for m in net.modules():
        if isinstance(m, InPlaneConv3d):
            m.in_plane = False
    net.label_encoder.fast = False
    return net


@pytest.mark.parametrize("factors,mult", [((4, 4, 4), (1, 2)), ((1, 4, 4), (1, 2)), ((2, 4, 4), (1, 2, 2)),
                                          ((4, 2, 1), (1, 2, 2))])
def test_fast_paths_equal_the_generic_paths_with_gradients(factors, mult):
    """Latent planes of 4 x 4 (two levels) or 8 x 8 (three): the deepest level on 2 x 2 planes."""
    import copy

    from medlsdm.models.denoisers import SemanticUNet

    torch.manual_seed(0)
    net = SemanticUNet(in_channels=4, num_classes=3, base_channels=8, channel_mult=mult, attention_levels=(1,),
                       label_channels=4, label_hidden=(8, 8, 16), label_downsample=factors, spade_hidden=8)
    slow = _generic(copy.deepcopy(net))
    plane = 2 ** (len(mult) + 0)
    shape = (2 * factors[0] + 1, plane * factors[1], plane * factors[2] - 1)          # padded inside
    label = _blocky_label(shape, k=3, block=2)
    latent = tuple(-(-s // f) for s, f in zip(shape, factors))
    x, t = torch.randn(1, 4, *latent), torch.tensor([7])
    outs = []
    for model in (net, slow):
        out = model(x, t, label)
        out.square().mean().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(net.named_parameters(), slow.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kernel,stride,plane", [((1, 1, 1), (1, 1, 1), (3, 5)), ((1, 3, 3), (1, 1, 1), (2, 2)),
                                                 ((1, 3, 3), (1, 2, 2), (2, 2)), ((1, 3, 3), (1, 1, 1), (1, 2)),
                                                 ((1, 3, 3), (1, 2, 2), (4, 4))])
def test_in_plane_convolution_equals_conv3d_with_gradients(kernel, stride, plane):
    from medlsdm.models.layers import same_conv

    torch.manual_seed(0)
    fast = same_conv(6, 5, kernel, stride)
    slow = same_conv(6, 5, kernel, stride)
    slow.load_state_dict(fast.state_dict())
    slow.in_plane = False
    x = torch.randn(1, 6, 3, *plane)
    grads = []
    for conv in (fast, slow):
        xx = x.clone().requires_grad_()
        out = conv(xx)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        grads.append((out.detach(), xx.grad, conv.weight.grad, conv.bias.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():                               # the forward is the one of before, bit for bit
        assert torch.equal(fast(x), grads[0][0])


if __name__ == "__main__":
    torch.set_num_threads(1)
    values = {"sha_diffusion": hashlib.sha256((DEMO / "diffusion.safetensors").read_bytes()).hexdigest()}
    net = _demo_denoiser()
    for b in (1, 2):
        values.update(_step(net, b))
    np.savez_compressed(sys.argv[1], **values)
    print(f"{sys.argv[1]}: {len(values)} arrays")


def test_keep_freed_memory_is_the_stage2_default_and_allocation_still_works():
    from medlsdm.training.diffusion import _defaults

    assert _defaults()["trainer"]["keep_freed_memory"] is True
    code = ("import torch; from medlsdm.training.allocator import keep_freed_memory as k; ok = k(); "
            "x = [torch.ones(2 ** 24) for _ in range(3)]; del x; y = torch.zeros(2 ** 25); "
            "print(ok, float(y.sum()))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    ok, total = out.stdout.split()
    assert total == "0.0"
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert ok == "True"
