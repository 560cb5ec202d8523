"""Stage 1 of Med-LSDM: the 3D VQ-GAN autoencoder (TATS / medicaldiffusion family), with a plain
or a SPADE (label-map conditioned) decoder. REFERENCE.md §1 gives the published configuration:
channels (16, 32, 64), one encoder and two decoder ResBlocks per level, 8-dim latent,
16,384 EMA codes, downsampling [4, 4, 4].

Downsampling is per axis (D, H, W): factors are powers of two; there are as many stride-2
levels as the largest factor's log2, and an axis whose factor is exhausted gets stride 1 at the
remaining levels. Inputs whose size is not a multiple of the factor are padded at the far end
of each axis by **replicating the edge voxels** (no artificial edge for the encoder, whatever
the intensity of the background) and the decoder's output is cropped back; the label map of
the SPADE decoder is padded the same way so it stays aligned with the image.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medlsdm.errors import ConfigError, MedlsdmError
from medlsdm.models.layers import LabelFeatures, SPADEGroupNorm, apply_norm, group_norm, run_checkpointed
from medlsdm.models.quantizer import EMAVectorQuantizer


def level_strides(downsample: Sequence[int]) -> list[tuple[int, ...]]:
    """Per-level (D, H, W) strides for per-axis power-of-two factors, e.g. [2, 4, 4] ->
    [(2, 2, 2), (1, 2, 2)]."""
    factors = [int(f) for f in downsample]
    if len(factors) != 3 or any(f < 1 or f & (f - 1) for f in factors):
        raise ConfigError(f"model.downsample must be 3 powers of two (D, H, W), got {list(downsample)}")
    logs = [f.bit_length() - 1 for f in factors]
    if max(logs) == 0:
        raise ConfigError("model.downsample must compress at least one axis, got [1, 1, 1]")
    return [tuple(2 if level < n else 1 for n in logs) for level in range(max(logs))]


UPSAMPLE_MODES = ("interpolate", "transposed")


def _resample_conv(cin: int, cout: int, stride: tuple[int, ...], transposed: bool) -> nn.Module:
    """Kernel 4 / stride 2 / pad 1 on halved (doubled) axes, kernel 3 / stride 1 / pad 1 elsewhere:
    both map n -> n/2 (n -> 2n) or n -> n exactly."""
    kernel = tuple(4 if s == 2 else 3 for s in stride)
    conv = nn.ConvTranspose3d if transposed else nn.Conv3d
    return conv(cin, cout, kernel, stride=stride, padding=1)


class InterpolateConv(nn.Module):
    """Upsampling by nearest-neighbour interpolation, then a 3x3x3 convolution (Odena et al.
    2016, "Deconvolution and checkerboard artifacts"). A stride-2 transposed convolution with a
    4-tap kernel gives the even and odd output voxels different kernel taps, which leaves a
    pattern at the 2-voxel period unless training balances the two exactly; here every output
    voxel sees the same kernel over a piecewise-constant input, so no such pattern is built in.
    Maps n -> n * stride per axis, like the transposed convolution it replaces."""

    def __init__(self, cin: int, cout: int, stride: tuple[int, ...]):
        super().__init__()
        self.scale = tuple(int(s) for s in stride)
        self.conv = nn.Conv3d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s != 1 for s in self.scale):
            x = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        return self.conv(x)


def _upsample(cin: int, cout: int, stride: tuple[int, ...], mode: str) -> nn.Module:
    if mode == "transposed":
        return _resample_conv(cin, cout, stride, transposed=True)
    return InterpolateConv(cin, cout, stride)


class ResBlock(nn.Module):
    """(norm, SiLU, conv3) twice, plus the input. ``make_norm(channels)`` builds either a plain
    GroupNorm or a SPADE-GroupNorm; the label map (or the shared label features at this
    level's size) is used only by the latter."""

    def __init__(self, channels: int, make_norm):
        super().__init__()
        self.norm1, self.conv1 = make_norm(channels), nn.Conv3d(channels, channels, 3, padding=1)
        self.norm2, self.conv2 = make_norm(channels), nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None,
                features: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(apply_norm(self.norm1, x, label, features)))
        h = self.conv2(F.silu(apply_norm(self.norm2, h, label, features)))
        return x + h


class SelfAttention(nn.Module):
    """Single-head self-attention over all voxels of a feature map, with a residual (taming /
    TATS "AttnBlock"). Written here because MONAI's SpatialAttentionBlock needs einops, which is
    not a dependency; ``scaled_dot_product_attention`` keeps memory linear in the voxel count
    (an 8x64x64 latent has 32,768 tokens)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv3d(channels, 3 * channels, 1)
        self.proj = nn.Conv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, N, C)
        return x + self.proj(h.squeeze(1).transpose(1, 2).reshape(x.shape))


class Encoder(nn.Module):
    def __init__(self, in_channels: int, channels: Sequence[int], num_res_blocks: int,
                 strides: list[tuple[int, ...]], latent_channels: int, attention: bool, norm_groups: int,
                 checkpointing: bool = False):
        super().__init__()
        make_norm = lambda c: group_norm(c, norm_groups)  # noqa: E731
        self.checkpointing = checkpointing
        self.conv_in = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        self.levels = nn.ModuleList(
            nn.Sequential(_resample_conv(channels[i], channels[i + 1], s, transposed=False),
                          *(ResBlock(channels[i + 1], make_norm) for _ in range(num_res_blocks)))
            for i, s in enumerate(strides))
        self.attention = SelfAttention(channels[-1], norm_groups) if attention else nn.Identity()
        self.norm_out = make_norm(channels[-1])
        self.conv_out = nn.Conv3d(channels[-1], latent_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            for layer in level:
                h = run_checkpointed(self.checkpointing and isinstance(layer, ResBlock), layer, h)
        h = self.attention(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DecoderLevel(nn.Module):
    def __init__(self, cin: int, cout: int, stride: tuple[int, ...], num_res_blocks: int, make_norm,
                 checkpointing: bool = False, upsample: str = "interpolate"):
        super().__init__()
        self.upsample = _upsample(cin, cout, stride, upsample)
        self.blocks = nn.ModuleList(ResBlock(cout, make_norm) for _ in range(num_res_blocks))
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor, label: torch.Tensor | None,
                features: torch.Tensor | None = None) -> torch.Tensor:
        """``label``: the one-hot map (any size; resized here once for all blocks), or
        ``features``: shared label features (resized here likewise)."""
        h = self.upsample(x)
        if label is not None and label.shape[2:] != h.shape[2:]:
            label = F.interpolate(label, size=h.shape[2:], mode="nearest")
        if features is not None and features.shape[2:] != h.shape[2:]:
            features = F.interpolate(features, size=h.shape[2:], mode="nearest")
        for block in self.blocks:
            h = run_checkpointed(self.checkpointing, block, h, label, features)
        return h


class Decoder(nn.Module):
    """Mirror of the encoder: conv3 latent -> channels[-1], then
    levels (upsampling + ResBlocks) with output channels channels[-1], ..., channels[1]
    (TATS: 64 -> 64 -> 32), conv3 to the image channels, tanh; as in TATS no norm before the
    output conv (it would be one more SPADE at full resolution, the costliest place).
    With ``label_channels`` every GroupNorm is a SPADE-GroupNorm (``spade_kernel``: 3 = 3x3x3,
    or (1, 3, 3) as the reference; ``spade_shared``: one label convolution for the whole decoder,
    its features nearest-resized to each level, instead of one per norm; ``spade_slab``: the
    modulation computed in depth slabs of that many voxels, for large volumes).
    ``checkpointing``: the ResBlocks are recomputed in the backward pass. ``upsample``:
    "interpolate" (nearest + conv3, no checkerboard) or "transposed" (kernel-4 stride-2
    transposed convolutions, as TATS and the reference, and every model trained before the option)."""

    def __init__(self, out_channels: int, channels: Sequence[int], num_res_blocks: int,
                 strides: list[tuple[int, ...]], latent_channels: int, attention: bool, norm_groups: int,
                 label_channels: int | None = None, spade_hidden: int = 128, spade_groups: int = 8,
                 spade_kernel=3, spade_shared: bool = False, spade_slab: int = 0, checkpointing: bool = False,
                 spade_instance_norm: bool = True, upsample: str = "interpolate"):
        super().__init__()
        self.label_features = None
        if label_channels is None:
            make_norm = lambda c: group_norm(c, norm_groups)  # noqa: E731
        else:
            if spade_shared:
                self.label_features = LabelFeatures(label_channels, spade_hidden, spade_kernel, bias=True,
                                                    negative_slope=0.01)
                self.label_features.conv.in_plane = False   # image resolution: oneDNN's conv3d
            make_norm = lambda c: SPADEGroupNorm(  # noqa: E731
                c, label_channels, spade_hidden, spade_groups, kernel=spade_kernel,
                own_features=not spade_shared, slab=spade_slab, normalize_modulation=spade_instance_norm,
                slice_path=False)
        n = len(strides)
        self.conv_in = nn.Conv3d(latent_channels, channels[n], 3, padding=1)
        self.attention = SelfAttention(channels[n], norm_groups) if attention else nn.Identity()
        self.levels = nn.ModuleList(
            DecoderLevel(channels[n] if j == 0 else channels[n - j + 1], channels[n - j],
                         strides[n - 1 - j], num_res_blocks, make_norm, checkpointing, upsample)
            for j in range(n))
        # Default (random) initialisation on purpose: a zero output layer would make the
        # conditioning of an untrained decoder untestable (REFERENCE.md §5).
        self.conv_out = nn.Conv3d(channels[1], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        h = self.attention(self.conv_in(z))
        features = None
        if self.label_features is not None:
            # Computed once at full resolution; levels take nearest-resized copies.
            features, label = self.label_features(label), None
        for level in self.levels:
            h = level(h, label, features)
        return torch.tanh(self.conv_out(h))


def _pair(value, name: str) -> tuple[int, int]:
    values = [value, value] if isinstance(value, int) else list(value)
    if len(values) != 2 or any(int(v) < 0 for v in values):
        raise ConfigError(f"model.{name} must be an int or [encoder, decoder], got {value!r}")
    return int(values[0]), int(values[1])


class VQGAN(nn.Module):
    """3D VQ-GAN: ``encode`` -> continuous latent, ``quantize`` -> codebook vectors,
    ``decode`` -> image in [-1, 1] (with the one-hot label map for the SPADE decoder).

    ``channels``: widths after the input convolution and after each downsampling level; only
    the first (levels + 1) are used (TATS doubles its width per level the same way), so the
    default (16, 32, 64) serves [4, 4, 4] and [2, 2, 2] alike. ``num_res_blocks``: ResBlocks
    per level, (encoder, decoder) or one int for both. ``norm_groups`` (32) and
    ``spade_norm_groups`` (8, the reference's SPADE-GroupNorm) are reduced to a divisor of the
    channel count where needed. Speed and memory options (defaults: the architecture the shipped
    weights were trained with): ``spade_kernel`` 3 or (1, 3, 3) (the reference's, about a third
    of the SPADE cost), ``spade_shared`` (one label convolution for the whole decoder),
    ``spade_slab`` (SPADE modulation in depth slabs; a runtime setting, see
    :meth:`set_spade_slab`), ``checkpointing`` (ResBlocks recomputed in the backward pass);
    ``spade_instance_norm`` (True: gamma and beta instance-normalised as MONAI's SPADE block
    did for every decoder trained so far; False: the reference's and SPADE paper's plain
    convolutions, a little cheaper). ``upsample``: the decoder's upsampling, "interpolate"
    (nearest + convolution: no 2-voxel checkerboard, benchmarks/quality.md) or "transposed" (the
    reference's; ``None``, for configurations written before the option, means "transposed").
    ``dead_code_threshold``: a code is restarted when its EMA usage falls below this fraction of
    the usage every code would have if all were used equally (see the quantizer).
    """

    def __init__(self, in_channels: int = 1, out_channels: int | None = None,
                 channels: Sequence[int] = (16, 32, 64), num_res_blocks: int | Sequence[int] = (1, 2),
                 downsample: Sequence[int] = (4, 4, 4), latent_channels: int = 8, num_codes: int = 16384,
                 codebook_decay: float = 0.99, commitment: float = 0.25, attention: bool = False,
                 decoder: str = "plain", num_classes: int | None = None, spade_hidden: int = 128,
                 norm_groups: int = 32, spade_norm_groups: int = 8, dead_code_threshold: float | None = 0.03,
                 spade_kernel: int | Sequence[int] | None = 3, spade_shared: bool | None = False,
                 spade_slab: int | None = 0, checkpointing: bool | None = False,
                 spade_instance_norm: bool | None = True, upsample: str | None = "interpolate"):
        super().__init__()
        strides = level_strides(downsample)
        if len(channels) < len(strides) + 1:
            raise ConfigError(f"model.channels needs {len(strides) + 1} entries for downsample "
                              f"{list(downsample)}, got {list(channels)}")
        if decoder not in ("plain", "spade"):
            raise ConfigError(f"model.decoder must be 'plain' or 'spade', not {decoder!r}")
        if decoder == "spade" and not num_classes:
            raise ConfigError("the SPADE decoder needs num_classes (the label table's size)")
        channels = [int(c) for c in channels[: len(strides) + 1]]
        # None: the option's default (configurations written before the option existed).
        spade_kernel = 3 if spade_kernel is None else spade_kernel
        spade_instance_norm = True if spade_instance_norm is None else spade_instance_norm
        upsample = "transposed" if upsample is None else upsample
        if upsample not in UPSAMPLE_MODES:
            raise ConfigError(f"model.upsample must be one of {', '.join(UPSAMPLE_MODES)}, not {upsample!r}")
        self.upsample_mode = upsample
        enc_blocks, dec_blocks = _pair(num_res_blocks, "num_res_blocks")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels or in_channels)
        self.latent_channels = int(latent_channels)
        self.factors = tuple(int(f) for f in downsample)
        self.decoder_kind = decoder
        self.num_classes = int(num_classes) if num_classes else None
        self.encoder = Encoder(self.in_channels, channels, enc_blocks, strides, self.latent_channels,
                               attention, norm_groups, checkpointing=bool(checkpointing))
        self.quantizer = EMAVectorQuantizer(num_codes, self.latent_channels, codebook_decay, commitment,
                                            dead_code_threshold=0.03 if dead_code_threshold is None
                                            else dead_code_threshold)
        self.decoder = Decoder(self.out_channels, channels, dec_blocks, strides, self.latent_channels,
                               attention, norm_groups,
                               label_channels=self.num_classes if decoder == "spade" else None,
                               spade_hidden=spade_hidden, spade_groups=spade_norm_groups,
                               spade_kernel=spade_kernel, spade_shared=bool(spade_shared),
                               spade_slab=int(spade_slab or 0), checkpointing=bool(checkpointing),
                               spade_instance_norm=bool(spade_instance_norm), upsample=upsample)

    def set_spade_slab(self, depth: int) -> None:
        """Compute the SPADE decoder's modulation in depth slabs of ``depth`` voxels (0: whole
        volume). Same values; only one slab's hidden label features are held at once, the
        largest tensors of a SPADE decode of a large volume. No effect on a plain decoder."""
        for module in self.decoder.modules():
            if isinstance(module, SPADEGroupNorm):
                module.slab = int(depth)

    # -- shapes -----------------------------------------------------------------------------
    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int, int]:
        """``(latent_channels, d, h, w)`` for an image of spatial shape ``(D, H, W)`` (a longer
        shape such as ``(C, D, H, W)`` or ``(B, C, D, H, W)`` is read by its last three axes)."""
        spatial = tuple(int(s) for s in image_shape)[-3:]
        return (self.latent_channels, *(math.ceil(s / f) for s, f in zip(spatial, self.factors)))

    def _padding(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """F.pad argument (last axis first) padding the far end of each axis to a multiple of its factor."""
        extra = [-s % f for s, f in zip(spatial, self.factors)]
        return (0, extra[2], 0, extra[1], 0, extra[0])

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        pad = self._padding(x.shape[2:])
        return F.pad(x, pad, mode="replicate") if any(pad) else x

    # -- the three stages ---------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous (pre-quantisation) latent ``(B, latent_channels, d, h, w)`` of ``(B, C, D, H, W)``."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise MedlsdmError(f"autoencoder expects images of shape (B, {self.in_channels}, D, H, W), "
                               f"got {tuple(x.shape)}")
        return self.encoder(self._pad(x))

    def quantize(self, z_e: torch.Tensor):
        """``(z_q, commitment loss, info)``; the codebook learns only in training mode with grad."""
        return self.quantizer(z_e)

    def decode(self, z_q: torch.Tensor, label: torch.Tensor | None = None,
               out_shape: Sequence[int] | None = None) -> torch.Tensor:
        """Image ``(B, out_channels, *out_shape)`` in [-1, 1].

        ``label``: one-hot float ``(B, num_classes, D, H, W)`` at image resolution, required by
        the SPADE decoder and ignored by the plain one. ``out_shape``: the image's spatial shape
        (defaults to the label map's, else latent size x factor); the output is cropped to it.
        """
        full = tuple(s * f for s, f in zip(z_q.shape[2:], self.factors))
        if out_shape is None:
            out_shape = tuple(label.shape[2:]) if label is not None else full
        out_shape = tuple(int(s) for s in out_shape)
        if self.latent_shape(out_shape)[1:] != tuple(z_q.shape[2:]):
            raise MedlsdmError(f"latent of spatial shape {tuple(z_q.shape[2:])} cannot decode to an image "
                               f"of shape {out_shape} with downsampling {list(self.factors)}")
        if self.decoder_kind == "spade":
            label = self._check_label(label, z_q.shape[0], out_shape)
            label = self._pad(label.to(z_q.dtype))
        else:
            label = None
        x = self.decoder(z_q, label)
        return x[:, :, : out_shape[0], : out_shape[1], : out_shape[2]]

    def _check_label(self, label: torch.Tensor | None, batch: int, out_shape: tuple) -> torch.Tensor:
        if label is None:
            raise MedlsdmError("the SPADE decoder needs a label map (one-hot, (B, num_classes, D, H, W))")
        expected = (batch, self.num_classes, *out_shape)
        if tuple(label.shape) != expected:
            raise MedlsdmError(f"label map of shape {tuple(label.shape)} does not fit the SPADE decoder: "
                               f"expected one-hot {expected}")
        return label

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None):
        """``(x_rec, vq_loss, info)``: reconstruction of ``x`` through the codebook."""
        z_q, vq_loss, info = self.quantize(self.encode(x))
        return self.decode(z_q, label=label, out_shape=x.shape[2:]), vq_loss, info
