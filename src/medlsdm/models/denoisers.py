"""Denoising networks ``forward(x_t, t, cond) -> prediction`` (B, C, D, H, W) for the three systems.

- :class:`SemanticUNet` (Med-LSDM, SDM-style): the label map conditions the middle and decoder
  halves through SPADE-GroupNorm, fed by a learned :class:`LabelEncoder` ("SegConv3D") that
  brings the one-hot label map from image resolution down to the latent resolution.
  ``conditioning = "spade"``.
- :class:`ConcatUNet` (Med-DDPM): pixel-space full-3D U-Net with the one-hot mask without
  background concatenated to x_t. ``conditioning = "concat"``.
- :class:`UnconditionalUNet` (medicaldiffusion): the SemanticUNet architecture without the label
  path; ``cond`` is ignored. ``conditioning = "none"``.

``t`` are the integer training timesteps (B,) (a scalar is broadcast). Inputs of any spatial
size work: the U-Nets pad the far end of each axis (replicate) to a multiple of their total
downsampling and crop the output back.

Why the Med-LSDM U-Net is written here rather than on MONAI's ``SPADEDiffusionModelUNet``: that
network applies SPADE only in its up path (its middle block is plain GroupNorm), feeds SPADE the
raw one-hot map instead of a learned label encoding, and is full-3D only. The reference puts
SPADE in the middle block too, encodes the label map with a jointly trained encoder and is
pseudo-3D. Two more choices differ from MONAI on purpose: no convolution is zero-initialised
(zero-initialised residual and output layers make an untrained network ignore its condition,
so conditioning could not be tested before training), and the label path has no biases, so the
null condition (an all-zero one-hot map, used for classifier-free guidance) encodes to exactly
zero and every SPADE layer then reduces to plain GroupNorm with a learned affine
``x_hat * (1 + b_gamma) + b_beta``.
"""

from __future__ import annotations

import copy
import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medlsdm.errors import ConfigError, MedlsdmError
from medlsdm.models.layers import InPlaneConv3d, SPADEGroupNorm, apply_norm, group_norm, run_checkpointed, same_conv

DENOISER_DEFAULTS: dict = {
    "kind": "semantic",               # semantic (Med-LSDM) | concat (Med-DDPM) | unconditional (medicaldiffusion)
    "variant": "pseudo3d",            # semantic/unconditional: pseudo3d ((1,3,3) convs, H/W downsampled) | 3d
    "in_channels": 8,                 # latent channels (latent space) or image channels (pixel space)
    "out_channels": None,             # None: in_channels (epsilon / x0 / v prediction of the same tensor)
    "num_classes": None,              # K, label classes including background (set from the label table)
    "base_channels": 64,
    "channel_mult": [1, 2, 4, 8],     # Med-DDPM used [1, 1, 2, 3, 4]
    "num_res_blocks": 1,
    "attention_levels": [2, 3],       # U-Net levels (0 = full resolution) with spatial (pseudo3d) or 3D attention
    "attention_head_dim": 32,
    "depth_attention": True,          # pseudo3d: attention across slices at every level (depth mixing)
    "max_relative_distance": 32,      # depth attention: relative position bias clipped at this many slices
    "label_channels": 32,             # C: channels of the label encoding (the reference's "#channels", 8..128)
    "label_hidden": [64, 128],        # label encoder widths before the last convolution
    "label_downsample": [4, 4, 4],    # per-axis image -> latent factor of the autoencoder ([1, 1, 1] in pixel space)
    "spade_hidden": 128,              # SPADE shared convolution width (SDM / reference: 128)
    "dropout": 0.0,
    "gradient_checkpointing": False,  # recompute blocks in the backward pass (less activation memory)
}

KINDS = ("semantic", "concat", "unconditional")
VARIANTS = ("pseudo3d", "3d")


# --- small pieces ----------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Ho et al. 2020 / Transformer): [cos(t w_i), sin(t w_i)],
    w_i = max_period^(-i / (dim/2)), (B,) -> (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _heads(channels: int, head_dim: int) -> int:
    """The largest head count <= channels // head_dim that divides channels (at least 1)."""
    for heads in range(max(1, channels // max(1, head_dim)), 0, -1):
        if channels % heads == 0:
            return heads
    return 1


def _pad_to_multiple(x: torch.Tensor, multiple: Sequence[int]) -> torch.Tensor:
    """Pad the far end of each spatial axis (replicate) to a multiple of ``multiple``."""
    extra = [-s % m for s, m in zip(x.shape[2:], multiple)]
    if not any(extra):
        return x
    return F.pad(x, (0, extra[2], 0, extra[1], 0, extra[0]), mode="replicate")


def _as_batch_t(t, batch: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    return t.reshape(1).expand(batch) if t.ndim == 0 else t.reshape(batch)


def spade_norm(channels: int, label_channels: int, hidden: int = 128, kernel=(1, 3, 3)) -> SPADEGroupNorm:
    """The denoiser's SPADE-GroupNorm (SDM): 32 groups, eps 1e-6, ReLU, and no bias in the shared
    convolution, so the null condition f = 0 gives GN(x) * (1 + b_gamma) + b_beta exactly."""
    return SPADEGroupNorm(channels, label_channels, hidden, groups=32, kernel=kernel, shared_bias=False,
                          negative_slope=0.0, eps=1e-6)


class ResBlock(nn.Module):
    """GN/SPADE -> SiLU -> conv -> GN/SPADE * (1 + scale(t)) + shift(t) -> SiLU -> dropout -> conv,
    plus the (1x1-projected) input. The time embedding enters as scale/shift in every block
    (the reference's middle blocks had none)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, kernel, label_channels: int | None = None,
                 spade_hidden: int = 128, dropout: float = 0.0):
        super().__init__()

        def norm(c):
            return group_norm(c) if label_channels is None else spade_norm(c, label_channels, spade_hidden, kernel)

        self.norm1, self.conv1 = norm(cin), same_conv(cin, cout, kernel)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.dropout, self.conv2 = norm(cout), nn.Dropout(dropout), same_conv(cout, cout, kernel)
        self.skip = nn.Identity() if cin == cout else InPlaneConv3d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(apply_norm(self.norm1, x, label)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None, None].chunk(2, dim=1)
        h = apply_norm(self.norm2, h, label) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class MultiHeadAttention(nn.Module):
    """Softmax attention over token sequences (N, L, C), optional additive bias (heads, L, L)."""

    def __init__(self, channels: int, head_dim: int = 32):
        super().__init__()
        self.heads = _heads(channels, head_dim)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, tokens: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        n, length, c = tokens.shape
        q, k, v = self.qkv(tokens).reshape(n, length, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias[None].to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(n, length, c))


class SpatialAttention(nn.Module):
    """Pseudo-3D: attention among the H*W positions of each slice, slices independent."""

    def __init__(self, channels: int, head_dim: int = 32):
        super().__init__()
        self.norm, self.attn = group_norm(channels), MultiHeadAttention(channels, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b * d, h * w, c)
        out = self.attn(tokens).reshape(b, d, h, w, c).permute(0, 4, 1, 2, 3)
        return x + out


class DepthAttention(nn.Module):
    """Pseudo-3D: attention across slices at each (h, w) position (the 'temporal' attention of
    video diffusion), with a learned relative position bias per head (T5-style, distances
    clipped at ``max_distance``), so it knows slice order for any depth."""

    def __init__(self, channels: int, head_dim: int = 32, max_distance: int = 32):
        super().__init__()
        self.norm, self.attn = group_norm(channels), MultiHeadAttention(channels, head_dim)
        self.max_distance = int(max_distance)
        self.relative_bias = nn.Parameter(torch.zeros(self.attn.heads, 2 * self.max_distance + 1))

    def position_bias(self, depth: int, device) -> torch.Tensor:
        pos = torch.arange(depth, device=device)
        rel = (pos[None, :] - pos[:, None]).clamp(-self.max_distance, self.max_distance) + self.max_distance
        return self.relative_bias[:, rel]                          # (heads, D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        tokens = self.norm(x).permute(0, 3, 4, 2, 1).reshape(b * h * w, d, c)
        out = self.attn(tokens, self.position_bias(d, x.device)).reshape(b, h, w, d, c).permute(0, 4, 3, 1, 2)
        return x + out


class VolumeAttention(nn.Module):
    """Full 3D: attention among all D*H*W positions (used at the lowest levels only)."""

    def __init__(self, channels: int, head_dim: int = 32):
        super().__init__()
        self.norm, self.attn = group_norm(channels), MultiHeadAttention(channels, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        return x + self.attn(tokens).transpose(1, 2).reshape(b, c, d, h, w)


class LabelEncoder(nn.Module):
    """The Med-LSDM "SegConv3D": one-hot label map (B, K, D', H', W') at image resolution ->
    label encoding (B, C, D'/fd, H'/fh, W'/fw) at latent resolution.

    (1,3,3) convolutions with ReLU and max-pools, log2(max factor) pools, each halving the axes
    that still need it (the reference for factor 4: conv K->64, ReLU, pool, conv 64->128, ReLU,
    pool, conv 128->C). Label maps whose size is not a multiple of the factors are padded at the
    far end (replicate) first, exactly as the autoencoder pads images, so the encoding has the
    latent's size ceil(D'/fd) x ... No biases: the all-zero null condition encodes to zero.
    """

    def __init__(self, num_classes: int, out_channels: int = 32, downsample: Sequence[int] = (4, 4, 4),
                 hidden: Sequence[int] = (64, 128), kernel=(1, 3, 3)):
        super().__init__()
        self.factors = tuple(int(f) for f in downsample)
        if len(self.factors) != 3 or any(f < 1 or f & (f - 1) for f in self.factors):
            raise ConfigError(f"denoiser.label_downsample must be 3 powers of two (D, H, W), got {list(downsample)}")
        hidden = [int(h) for h in hidden] or [int(out_channels)]
        self.num_classes = int(num_classes)
        pools = int(math.log2(max(self.factors)))
        widths = [hidden[min(j, len(hidden) - 1)] for j in range(pools + 1)]
        layers: list[nn.Module] = [same_conv(num_classes, widths[0], kernel, bias=False), nn.ReLU()]
        for j in range(pools):
            layers.append(nn.MaxPool3d(tuple(2 if f > 2 ** j else 1 for f in self.factors)))
            if j < pools - 1:
                layers += [same_conv(widths[j], widths[j + 1], kernel, bias=False), nn.ReLU()]
        layers.append(same_conv(widths[pools - 1] if pools else widths[0], out_channels, kernel, bias=False))
        self.layers = nn.Sequential(*layers)
        # Batch 1 on the CPU: run in slice layout (below). False: the layers one after the other.
        self.fast = True

    def output_shape(self, label_shape: Sequence[int]) -> tuple[int, int, int]:
        return tuple(math.ceil(int(s) / f) for s, f in zip(tuple(label_shape)[-3:], self.factors))

    def forward(self, label: torch.Tensor) -> torch.Tensor:
        label = _pad_to_multiple(label, self.factors)
        if self.fast and label.shape[0] == 1 and label.device.type == "cpu" and self._slice_layout_ok():
            return self._forward_slices(label)
        return self.layers(label)

    def _slice_layout_ok(self) -> bool:
        return all(m.in_plane for m in self.layers if isinstance(m, InPlaneConv3d)) and all(
            m.padding == 0 and m.dilation == 1 and not m.ceil_mode and (m.stride == m.kernel_size or m.stride is None)
            for m in self.layers if isinstance(m, nn.MaxPool3d))

    def _forward_slices(self, label: torch.Tensor) -> torch.Tensor:
        """The same values as ``self.layers(label)`` for one sample, computed with the slices as
        the batch (D, C, H, W) from the first layer to the last: the in-plane convolutions run
        as conv2d without transposing copies in between, a max-pool is an in-plane max-pool
        and a max over slice pairs, and ReLU runs after the pool (max(ReLU) = ReLU(max), on an
        eighth of the values). Gradients go to the same elements (the first maximum of each
        window, as PyTorch's max-pool), so they equal the layer-by-layer ones up to rounding."""
        h = label[0].transpose(0, 1).contiguous()
        layers = list(self.layers)
        i = 0
        while i < len(layers):
            layer = layers[i]
            if isinstance(layer, InPlaneConv3d):
                h = F.conv2d(h, layer.weight.squeeze(2), layer.bias, layer.stride[1:], layer.padding[1:],
                             layer.dilation[1:], layer.groups)
            elif isinstance(layer, nn.ReLU) and i + 1 < len(layers) and isinstance(layers[i + 1], nn.MaxPool3d):
                h = F.relu_(_max_pool_slices(h, layers[i + 1].kernel_size))
                i += 1
            elif isinstance(layer, nn.ReLU):
                h = F.relu(h)
            elif isinstance(layer, nn.MaxPool3d):
                h = _max_pool_slices(h, layer.kernel_size)
            else:
                raise TypeError(f"no slice-layout path for {type(layer).__name__}")
            i += 1
        return h.transpose(0, 1).unsqueeze(0)


def _max_pool_slices(h: torch.Tensor, kernel) -> torch.Tensor:
    """``max_pool3d(kernel)`` (stride = kernel) of slices stacked as a batch (D, C, H, W): an
    in-plane max-pool, then the maximum over each group of kd consecutive slices, the earlier
    slice winning ties (PyTorch's max-pool takes the first maximum in (d, h, w) order, so the
    gradient reaches the same element)."""
    kd, kh, kw = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
    if (kh, kw) != (1, 1):
        h = F.max_pool2d(h, (kh, kw))
    if kd > 1:
        h = h[: h.shape[0] // kd * kd]
        best = h[0::kd]
        for j in range(1, kd):
            other = h[j::kd]
            best = torch.where(other > best, other, best)
        h = best
    return h


# --- the Med-LSDM / medicaldiffusion U-Net ------------------------------------------------------
class _Level(nn.Module):
    def __init__(self, blocks, attns, resample=None):
        super().__init__()
        self.blocks, self.attns, self.resample = nn.ModuleList(blocks), nn.ModuleList(attns), resample


class Upsample(nn.Module):
    def __init__(self, channels: int, kernel, factor):
        super().__init__()
        self.factor, self.conv = tuple(factor), same_conv(channels, channels, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.factor, mode="nearest"))


class LatentUNet(nn.Module):
    """Time-conditioned U-Net, pseudo-3D or 3D, optionally SPADE-conditioned in the middle and
    decoder halves (``label_channels`` set). The common body of :class:`SemanticUNet`,
    :class:`UnconditionalUNet` and :class:`ConcatUNet`; ``forward(x, t, label_features=None)``
    with label features already at x's resolution.

    pseudo3d: (1,3,3) convolutions, H and W halved per level, depth kept; spatial attention at
    ``attention_levels`` and depth attention after every block (without it the slices would
    share nothing but GroupNorm statistics). 3d: 3x3x3 convolutions, every axis halved, 3D attention at
    ``attention_levels``. The middle block always has attention.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, variant: str = "pseudo3d",
                 base_channels: int = 64, channel_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int = 1,
                 attention_levels: Sequence[int] = (2, 3), attention_head_dim: int = 32,
                 depth_attention: bool = True, max_relative_distance: int = 32, label_channels: int | None = None,
                 spade_hidden: int = 128, dropout: float = 0.0, gradient_checkpointing: bool = False):
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(f"denoiser.variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
        levels = len(channel_mult)
        if levels < 1 or num_res_blocks < 1:
            raise ConfigError("denoiser.channel_mult needs at least one level and num_res_blocks >= 1")
        if any(not 0 <= int(a) < levels for a in attention_levels):
            raise ConfigError(f"denoiser.attention_levels {list(attention_levels)} must lie in 0..{levels - 1}")
        self.variant, self.in_channels = variant, int(in_channels)
        self.out_channels = int(out_channels or in_channels)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        kernel, factor = ((1, 3, 3), (1, 2, 2)) if variant == "pseudo3d" else ((3, 3, 3), (2, 2, 2))
        self.multiple = tuple(f ** (levels - 1) for f in factor)
        chans = [int(base_channels) * int(m) for m in channel_mult]
        self.base_channels, emb_dim = chans[0], 4 * int(base_channels)
        self.time_mlp = nn.Sequential(nn.Linear(self.base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def attention(c: int, level: int | None) -> nn.Module:
            """level None: the middle block."""
            mods: list[nn.Module] = []
            wanted = level is None or level in {int(a) for a in attention_levels}
            if variant == "3d":
                return VolumeAttention(c, attention_head_dim) if wanted else nn.Identity()
            if wanted:
                mods.append(SpatialAttention(c, attention_head_dim))
            if depth_attention:
                mods.append(DepthAttention(c, attention_head_dim, max_relative_distance))
            return nn.Sequential(*mods) if mods else nn.Identity()

        def block(cin, cout, spade):
            return ResBlock(cin, cout, emb_dim, kernel, label_channels if spade else None, spade_hidden, dropout)

        self.conv_in = same_conv(self.in_channels, chans[0], kernel)
        self.down, skip_chans, ch = nn.ModuleList(), [], chans[0]
        for lvl, c in enumerate(chans):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(block(ch, c, spade=False))
                attns.append(attention(c, lvl))
                ch = c
                skip_chans.append(c)
            down = same_conv(c, c, kernel, stride=factor) if lvl < levels - 1 else None
            self.down.append(_Level(blocks, attns, down))
        self.mid = _Level([block(ch, ch, True), block(ch, ch, True)], [attention(ch, None)])
        self.up = nn.ModuleList()
        for lvl in reversed(range(levels)):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(block(ch + skip_chans.pop(), chans[lvl], spade=True))
                attns.append(attention(chans[lvl], lvl))
                ch = chans[lvl]
            up = Upsample(ch, kernel, factor) if lvl > 0 else None
            self.up.append(_Level(blocks, attns, up))
        self.norm_out = spade_norm(ch, label_channels, spade_hidden, kernel) if label_channels else group_norm(ch)
        self.conv_out = same_conv(ch, self.out_channels, kernel)

    def _run(self, fn, *args):
        return run_checkpointed(self.gradient_checkpointing and self.training, fn, *args)

    def forward(self, x: torch.Tensor, t, label_features: torch.Tensor | None = None) -> torch.Tensor:
        size = x.shape[2:]
        x = _pad_to_multiple(x, self.multiple)
        if label_features is not None:
            label_features = _pad_to_multiple(label_features, self.multiple)
        t = _as_batch_t(t, x.shape[0], x.device)
        emb = self.time_mlp(timestep_embedding(t, self.base_channels).to(x.dtype))

        h, skips = self.conv_in(x), []
        for level in self.down:
            for blk, attn in zip(level.blocks, level.attns):
                h = self._run(attn, self._run(blk, h, emb, None))
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
        sized: dict = {}

        def label_at(shape) -> torch.Tensor | None:
            """The label features nearest-resized to a level's size, once per level (the SPADE
            norms would each resize them; the same values)."""
            key = tuple(shape)
            if label_features is None or label_features.shape[2:] == key:
                return label_features
            if key not in sized:
                sized[key] = F.interpolate(label_features, size=key, mode="nearest")
            return sized[key]

        h = self._run(self.mid.blocks[0], h, emb, label_at(h.shape[2:]))
        h = self._run(self.mid.attns[0], h)
        h = self._run(self.mid.blocks[1], h, emb, label_at(h.shape[2:]))
        for level in self.up:
            for blk, attn in zip(level.blocks, level.attns):
                h = self._run(attn, self._run(blk, torch.cat([h, skips.pop()], dim=1), emb, label_at(h.shape[2:])))
            if level.resample is not None:
                h = level.resample(h)
        h = self.conv_out(F.silu(apply_norm(self.norm_out, h, label_at(h.shape[2:]))))
        return h[:, :, : size[0], : size[1], : size[2]]


class SemanticUNet(LatentUNet):
    """Med-LSDM denoiser: :class:`LatentUNet` with SPADE in the middle and decoder halves, fed by
    a jointly trained :class:`LabelEncoder`. ``forward(x_t, t, label_onehot)`` with the one-hot
    label map (B, num_classes, D', H', W') at image resolution (D' = D * factor, or up to
    factor - 1 less when the autoencoder padded). An all-zero map is the null condition."""

    conditioning = "spade"

    def __init__(self, in_channels: int, num_classes: int, out_channels: int | None = None,
                 label_channels: int = 32, label_hidden: Sequence[int] = (64, 128),
                 label_downsample: Sequence[int] = (4, 4, 4), **unet_kwargs):
        if not num_classes or int(num_classes) < 1:
            raise ConfigError("denoiser.num_classes must be set for a semantic denoiser")
        super().__init__(in_channels, out_channels, label_channels=int(label_channels), **unet_kwargs)
        self.num_classes = int(num_classes)
        # (1,3,3) kernels for both variants, as the reference: the encoder runs at full image
        # resolution, where 3x3x3 kernels would triple its cost for piecewise-constant input.
        self.label_encoder = LabelEncoder(num_classes, label_channels, label_downsample, label_hidden)

    def encode_label(self, label_onehot: torch.Tensor) -> torch.Tensor:
        """Label encoding at latent resolution. Without grad (sampling), null samples (all-zero
        maps, e.g. the guidance half of the batch) are not run through the encoder: they encode
        to exactly zero anyway. In training every sample is encoded, so that every parameter
        gets a gradient at every step (DDP requires it)."""
        if torch.is_grad_enabled():
            return self.label_encoder(label_onehot)
        present = label_onehot.flatten(1).any(dim=1)
        if bool(present.all()):
            return self.label_encoder(label_onehot)
        shape = (label_onehot.shape[0], self.label_encoder.layers[-1].out_channels,
                 *self.label_encoder.output_shape(label_onehot.shape))
        out = label_onehot.new_zeros(shape)
        if bool(present.any()):
            out[present] = self.label_encoder(label_onehot[present])
        return out

    def forward(self, x_t: torch.Tensor, t, label_onehot: torch.Tensor) -> torch.Tensor:
        if label_onehot is None or label_onehot.ndim != 5 or label_onehot.shape[1] != self.num_classes \
                or label_onehot.shape[0] != x_t.shape[0]:
            got = None if label_onehot is None else tuple(label_onehot.shape)
            raise MedlsdmError(f"the semantic denoiser needs a one-hot label map (B={x_t.shape[0]}, "
                               f"K={self.num_classes}, D, H, W), got {got}")
        expected = self.label_encoder.output_shape(label_onehot.shape)
        if expected != tuple(x_t.shape[2:]):
            raise MedlsdmError(f"label map of spatial shape {tuple(label_onehot.shape[2:])} does not fit a latent of "
                               f"shape {tuple(x_t.shape[2:])} with downsampling {list(self.label_encoder.factors)}")
        return super().forward(x_t, t, self.encode_label(label_onehot.to(x_t.dtype)))


class UnconditionalUNet(LatentUNet):
    """medicaldiffusion denoiser: :class:`LatentUNet` without the label path.
    ``forward(x_t, t, cond=None)``; ``cond`` is accepted and ignored, so training and sampling
    loops can call every denoiser the same way."""

    conditioning = "none"

    def forward(self, x_t: torch.Tensor, t, cond: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x_t, t, None)


# --- Med-DDPM ---------------------------------------------------------------------------------
class ConcatUNet(LatentUNet):
    """Med-DDPM denoiser: a pixel-space full-3D U-Net (:class:`LatentUNet`, variant "3d": 3x3x3
    convolutions, every axis halved per level, 3D attention at ``attention_levels`` and the
    bottleneck, time embedding in every ResBlock) on ``cat(x_t, one-hot mask without
    background)``: in_channels + num_classes - 1 inputs, in_channels outputs (e.g. the 4 BraTS
    modalities jointly). ``forward(x_t, t, label_onehot)`` takes the full one-hot map (B, K, ...)
    and drops the background channel itself. The all-zero null condition here means "no
    foreground anywhere"; Med-DDPM itself had no guidance.

    Not built on MONAI's ``DiffusionModelUNet``: its attention blocks need ``einops``, which is
    not a dependency of this package; the shared U-Net body also gives gradient checkpointing
    and no zero-initialised output layer (see the module docstring).
    """

    conditioning = "concat"

    def __init__(self, in_channels: int, num_classes: int, out_channels: int | None = None, base_channels: int = 64,
                 channel_mult: Sequence[int] = (1, 1, 2, 3, 4), num_res_blocks: int = 1,
                 attention_levels: Sequence[int] = (3, 4), attention_head_dim: int = 32, dropout: float = 0.0,
                 gradient_checkpointing: bool = False):
        if not num_classes or int(num_classes) < 2:
            raise ConfigError("denoiser.num_classes must be >= 2 (background + at least one label) for concat")
        self.num_classes, self.image_channels = int(num_classes), int(in_channels)
        super().__init__(self.image_channels + self.num_classes - 1, out_channels or in_channels, variant="3d",
                         base_channels=base_channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
                         attention_levels=attention_levels, attention_head_dim=attention_head_dim,
                         dropout=dropout, gradient_checkpointing=gradient_checkpointing)

    def forward(self, x_t: torch.Tensor, t, label_onehot: torch.Tensor) -> torch.Tensor:
        if label_onehot is None or label_onehot.ndim != 5 or label_onehot.shape[1] != self.num_classes \
                or label_onehot.shape[2:] != x_t.shape[2:] or label_onehot.shape[0] != x_t.shape[0]:
            got = None if label_onehot is None else tuple(label_onehot.shape)
            raise MedlsdmError(f"the concat denoiser needs a one-hot mask ({x_t.shape[0]}, {self.num_classes}, "
                               f"{', '.join(map(str, x_t.shape[2:]))}), got {got}")
        return super().forward(torch.cat([x_t, label_onehot[:, 1:].to(x_t.dtype)], dim=1), t)


# --- factory ----------------------------------------------------------------------------------
def build_denoiser(cfg: Mapping) -> nn.Module:
    """A denoiser from a config dict with keys of :data:`DENOISER_DEFAULTS` (missing keys take the
    defaults; unknown keys are errors). ``kind`` picks the class; keys a kind does not use are
    ignored (one config section serves all three)."""
    unknown = sorted(set(cfg) - set(DENOISER_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown denoiser option(s) {', '.join(unknown)} (known: {', '.join(DENOISER_DEFAULTS)})")
    c = copy.deepcopy(DENOISER_DEFAULTS)
    c.update(copy.deepcopy(dict(cfg)))
    kind = c["kind"]
    common = dict(in_channels=c["in_channels"], out_channels=c["out_channels"], base_channels=c["base_channels"],
                  channel_mult=c["channel_mult"], num_res_blocks=c["num_res_blocks"],
                  attention_levels=c["attention_levels"], attention_head_dim=c["attention_head_dim"],
                  gradient_checkpointing=c["gradient_checkpointing"])
    unet = dict(variant=c["variant"], depth_attention=c["depth_attention"], dropout=c["dropout"],
                max_relative_distance=c["max_relative_distance"], spade_hidden=c["spade_hidden"])
    if kind == "semantic":
        return SemanticUNet(num_classes=c["num_classes"], label_channels=c["label_channels"],
                            label_hidden=c["label_hidden"], label_downsample=c["label_downsample"], **common, **unet)
    if kind == "unconditional":
        return UnconditionalUNet(**common, **unet)
    if kind == "concat":
        return ConcatUNet(num_classes=c["num_classes"], dropout=c["dropout"], **common)
    raise ConfigError(f"denoiser.kind must be one of {', '.join(KINDS)}, not {kind!r}")
