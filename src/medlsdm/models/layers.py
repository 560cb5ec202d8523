"""Layers shared by the VQ-GAN and the denoisers: GroupNorm, SPADE-GroupNorm (label-map
conditioned) and a 3D convolution with a fast path for in-plane kernels.

SPADE (Park et al. 2019, "Semantic Image Synthesis with Spatially-Adaptive Normalization"):
``x -> GN(x) * (1 + gamma(m)) + beta(m)`` where ``GN`` has no affine parameters and
``gamma``, ``beta`` are convolutions of ``ReLU(conv(m))``, ``m`` being the conditioning map (a
one-hot label map for the VQ-GAN decoder, a learned label encoding for the denoiser)
nearest-resized to the feature map's size. One class serves both networks; what differs is
configuration: the VQ-GAN decoder's kernels (3x3x3 by default, as MONAI's ``SPADE`` block it
was first built on; (1, 3, 3) as the Med-LSDM reference), its shared convolution's bias and
LeakyReLU(0.01), GroupNorm eps 1e-5 and 8 groups, and gamma and beta instance-normalised over
the volume (MONAI's block does that through its ``Convolution``'s default norm; kept by default
so that trained decoders give the same images, ``normalize_modulation``); the denoiser's (1, 3, 3) kernels,
no shared bias (a zero condition then gives exactly ``GN(x) * (1 + b_gamma) + b_beta``), ReLU,
eps 1e-6 and 32 groups.

Written here rather than on ``monai.networks.blocks.SPADE`` because that block cannot share its
label features between layers, compute gamma and beta in one pass, or work in slabs (below).
State dicts written with the MONAI block (``spade.mlp_shared.conv.*``, ``spade.mlp_gamma.conv.*``,
``spade.mlp_beta.conv.*``) load into this class: their keys are renamed on load.

Slabs: the modulation ``(gamma, beta)`` is a stack of local convolutions of the label map, so it
can be computed in depth slabs (each with a halo of the kernels' reach) without changing a
single value; only the slab's ``hidden``-channel features are then held at once. The
normalisation itself needs whole-volume statistics and runs on the whole volume.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def group_count(channels: int, groups: int) -> int:
    """The largest group count <= ``groups`` that divides ``channels`` (32 groups do not fit 16
    or 48 channels; small test networks use 4-8 channels)."""
    return math.gcd(int(channels), int(groups)) or 1


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    # eps 1e-6 as in the TATS / taming VQ-GAN encoders the reference derives from.
    return nn.GroupNorm(group_count(channels, groups), channels, eps=1e-6, affine=True)


def kernel3(kernel: int | Sequence[int]) -> tuple[int, int, int]:
    """A (D, H, W) kernel size from an int or three ints (odd, so that 'same' padding exists)."""
    k = (int(kernel),) * 3 if isinstance(kernel, int) else tuple(int(v) for v in kernel)
    if len(k) != 3 or any(v < 1 or v % 2 == 0 for v in k):
        raise ValueError(f"kernel size must be an odd int or three odd ints (D, H, W), got {kernel!r}")
    return k


class InPlaneConv3d(nn.Conv3d):
    """``nn.Conv3d`` (same weights and state dict) that runs in-plane kernels (1, k, k) as a 2D
    convolution over the slices when the batch is 1 on the CPU. Written by hand because at batch 1
    PyTorch's CPU dispatch picks its slow native conv3d kernel for these shapes (measured,
    benchmarks/sampling.md: 32 channels at 16^3, 4.1 ms against 0.8 ms as conv2d), while from
    batch 2 the oneDNN conv3d is the faster one; GPUs are left alone.

    The 2D path is exact only for a depth kernel, stride and dilation of 1 without depth padding
    and zero padding mode; a depth-1 kernel with depth padding (which would only add zero slices)
    is refused at construction rather than silently computed differently."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.kernel_size[0] == 1 and self.padding != "same" and self.padding[0] != 0:
            raise ValueError(f"InPlaneConv3d: a depth-1 kernel {self.kernel_size} with depth padding "
                             f"{self.padding[0]} is not supported (pad H and W only)")
        self.in_plane = (self.kernel_size[0] == 1 and self.stride[0] == 1 and self.dilation[0] == 1
                         and self.padding_mode == "zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3d(x, self.weight, self.bias, self)


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Conv3d) -> torch.Tensor:
    """``like``'s convolution with another weight and bias (e.g. two convolutions' weights stacked
    along the output channels), through the in-plane fast path where ``like`` allows it."""
    if getattr(like, "in_plane", False) and x.shape[0] == 1 and x.device.type == "cpu":
        padding = like.padding[1:] if like.padding != "same" else "same"
        if _matmul_backward_wanted(x, weight, bias, like):
            return _SlicesConv.apply(x, weight, bias, like.stride[1:], padding, like.dilation[1:])
        slices = x[0].transpose(0, 1)                   # (D, C, H, W): the slices as a batch
        # squeeze, not weight[:, :, 0]: a view whose backward is a view too (indexing's backward
        # writes the gradient into a zero-filled copy of the weight).
        y = F.conv2d(slices, weight.squeeze(2), bias, like.stride[1:], padding, like.dilation[1:], like.groups)
        return y.transpose(0, 1).unsqueeze(0)
    return like._conv_forward(x, weight, bias)


def _matmul_backward_wanted(x, weight, bias, like) -> bool:
    """1x1x1 kernels, or planes of at most 4 voxels (the deepest U-Net levels of small latents),
    where oneDNN's and PyTorch's conv2d backward are 2-10x slower than two matrix products."""
    pointwise = weight.shape[2:] == (1, 1, 1) and tuple(like.stride) == (1, 1, 1)
    return ((pointwise or x.shape[3] * x.shape[4] <= 4) and like.groups == 1 and like.padding != "same"
            and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and x.dtype == weight.dtype
            and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)))


class _SlicesConv(torch.autograd.Function):
    """An in-plane convolution at batch 1: the forward of the in-plane path (conv2d over the
    slices, the same values), the backward as two matrix products over all slices at once
    (im2col; for 1x1 kernels the input itself). PyTorch's conv2d backward runs one small
    product per slice for 1x1 kernels, and oneDNN's is slow on 2x2 planes."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.conv = bias is not None, (stride, padding, dilation)
        y = F.conv2d(x[0].transpose(0, 1), weight.squeeze(2), bias, stride, padding, dilation)
        return y.transpose(0, 1).unsqueeze(0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        cin, depth, height, width = x.shape[1:]
        cout, kernel = weight.shape[0], weight.shape[3:]
        pointwise = kernel == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)
        if pointwise:
            cols = x[0].reshape(cin, -1)                                    # (C_in, voxels)
            g = grad[0].reshape(cout, -1)                                   # (C_out, voxels)
        else:
            cols = F.unfold(x[0].transpose(0, 1), kernel, dilation, padding, stride)   # (D, C_in k k, L)
            cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)
            g = grad[0].reshape(cout, -1)                                   # (C_out, D L), D major
        w = weight.reshape(cout, -1)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gc = w.t() @ g
            if pointwise:
                gx = gc.reshape(x.shape)
            else:
                gc = gc.reshape(gc.shape[0], depth, -1).transpose(0, 1)
                gx = F.fold(gc, (height, width), kernel, dilation, padding, stride).transpose(0, 1).unsqueeze(0)
        if ctx.needs_input_grad[1]:
            gw = (g @ cols.t()).reshape(weight.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(1)
        return gx, gw, gb, None, None, None


def same_conv(cin: int, cout: int, kernel, stride: Sequence[int] = (1, 1, 1), bias: bool = True) -> InPlaneConv3d:
    """A convolution with 'same' padding for odd kernels (output size = input size / stride)."""
    kernel = kernel3(kernel)
    return InPlaneConv3d(cin, cout, kernel, tuple(stride), padding=tuple(k // 2 for k in kernel), bias=bias)


def run_checkpointed(enabled: bool, fn, *args):
    """fn(*args), recomputed in the backward pass (activation checkpointing) when enabled and
    gradients are being recorded: only the inputs are held, not the activations inside."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def apply_norm(norm: nn.Module, x: torch.Tensor, label: torch.Tensor | None = None,
               features: torch.Tensor | None = None) -> torch.Tensor:
    """A plain norm ignores the label map; a SPADE-GroupNorm uses it (or shared label features)."""
    return norm(x, label, features) if isinstance(norm, SPADEGroupNorm) else norm(x)


class LabelFeatures(nn.Module):
    """The label path's first layer, ``act(conv(m))`` with ``hidden`` output channels: inside
    every SPADE-GroupNorm, or once per network when the label features are shared."""

    def __init__(self, label_channels: int, hidden: int, kernel, bias: bool, negative_slope: float):
        super().__init__()
        self.conv = same_conv(label_channels, hidden, kernel, bias=bias)
        self.negative_slope = float(negative_slope)

    def forward(self, label: torch.Tensor) -> torch.Tensor:
        h = self.conv(label)
        if torch.compiler.is_compiling() or h._is_view():   # (compiled: functional anyway; no graph break)
            # The in-plane path returns a transposed view; an in-place op on a view makes autograd
            # copy and zero whole tensors in the backward pass (CopySlices): ~17 % of a SPADE step.
            return F.leaky_relu(h, self.negative_slope) if self.negative_slope else F.relu(h)
        # In place: the activation's backward needs only its output's sign (one tensor less held).
        return F.leaky_relu_(h, self.negative_slope) if self.negative_slope else F.relu_(h)


class SPADEGroupNorm(nn.Module):
    """GroupNorm without affine parameters, modulated by a conditioning map ``(B, K, *spatial)``
    at any resolution (nearest-resized to the input's spatial size).

    ``forward(x, label)`` with the map; or ``forward(x, features=f)`` with label features that
    a shared :class:`LabelFeatures` already computed at x's size (``own_features=False``: this
    norm then has no label convolution of its own). ``slab``: depth of the slabs the modulation
    is computed in (0: whole volume at once). ``normalize_modulation``: gamma and beta each
    instance-normalised (eps 1e-5) over the volume, as MONAI's SPADE block does.
    ``slice_path=False``: no conv2d-over-slices path for (1, k, k) kernels (at image resolution
    oneDNN's conv3d is the faster one: 15 % per SPADE norm at 32x64x64, measured).
    """

    def __init__(self, channels: int, label_channels: int, hidden: int = 128, groups: int = 8,
                 kernel: int | Sequence[int] = 3, shared_bias: bool = True, negative_slope: float = 0.01,
                 eps: float = 1e-5, own_features: bool = True, slab: int = 0,
                 normalize_modulation: bool = False, slice_path: bool = True):
        super().__init__()
        self.normalize_modulation = bool(normalize_modulation)
        self.kernel = kernel3(kernel)
        self.norm = nn.GroupNorm(group_count(channels, groups), channels, eps=eps, affine=False)
        self.shared = (LabelFeatures(label_channels, hidden, self.kernel, shared_bias, negative_slope)
                       if own_features else None)
        self.gamma = same_conv(hidden, channels, self.kernel)
        self.beta = same_conv(hidden, channels, self.kernel)
        self.slab = int(slab)
        if not slice_path:
            for conv in self.modules():
                if isinstance(conv, InPlaneConv3d):
                    conv.in_plane = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Weights written with MONAI's SPADE block (and with this class's former Sequential).
        old = {"spade.mlp_shared.conv.": "shared.conv.", "spade.mlp_gamma.conv.": "gamma.",
               "spade.mlp_beta.conv.": "beta.", "shared.0.": "shared.conv."}
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            for before, after in old.items():
                if rest.startswith(before):
                    state_dict[prefix + after + rest[len(before):]] = state_dict.pop(key)
                    break
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def modulation(self, label: torch.Tensor | None = None, features: torch.Tensor | None = None,
                   size: Sequence[int] | None = None) -> torch.Tensor:
        """``(gamma, beta)`` stacked along the channels, (B, 2C, *size)."""
        if features is None:
            if label.shape[2:] != tuple(size):
                label = F.interpolate(label, size=tuple(size), mode="nearest")
            mod = self._modulation(label, from_label=True)
        else:
            mod = self._modulation(features, from_label=False)
        # Per channel and sample over the whole volume, hence after the slabs.
        return F.instance_norm(mod, eps=1e-5) if self.normalize_modulation else mod

    def _modulation(self, m: torch.Tensor, from_label: bool) -> torch.Tensor:
        depth = m.shape[2]
        if not self.slab or self.slab >= depth:
            return self._modulate(m, from_label)
        # Each convolution of depth k reaches k // 2 slices further: the label map needs twice
        # that halo (label convolution, then gamma/beta), label features once. Values computed
        # next to a slab's cut from zero padding reach only halo positions, which are dropped.
        halo = (self.kernel[0] // 2) * (2 if from_label else 1)
        parts = []
        for start in range(0, depth, self.slab):
            stop = min(depth, start + self.slab)
            lo, hi = max(0, start - halo), min(depth, stop + halo)
            if torch.is_grad_enabled():
                # Recomputed in the backward pass: only one slab's hidden features are ever held.
                part = checkpoint(self._modulate, m[:, :, lo:hi], from_label, use_reentrant=False)
            else:
                part = self._modulate(m[:, :, lo:hi], from_label)
            parts.append(part[:, :, start - lo: stop - lo])
        return torch.cat(parts, dim=2)

    def _modulate(self, m: torch.Tensor, from_label: bool) -> torch.Tensor:
        h = self.shared(m) if from_label else m
        # gamma and beta as one convolution over h (one pass over the hidden features; the
        # same values as two convolutions).
        weight = torch.cat([self.gamma.weight, self.beta.weight])
        bias = torch.cat([self.gamma.bias, self.beta.bias])
        return conv3d(h, weight, bias, self.gamma)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None,
                features: torch.Tensor | None = None) -> torch.Tensor:
        if features is None and label is None:
            raise ValueError("SPADEGroupNorm needs a label map or label features")
        if features is None:
            label = label.to(x.dtype)
        else:
            features = features.to(x.dtype)
        gamma, beta = self.modulation(label, features, x.shape[2:]).chunk(2, dim=1)
        return self.norm(x) * (1 + gamma) + beta
