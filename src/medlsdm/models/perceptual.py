"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"), version 0.1, in plain torch.

torchvision does not import beside the CPU torch build used here and the ``lpips`` package
imports torchvision, so the VGG16 / AlexNet feature stacks are defined here with torchvision's
module layout: a torchvision state dict loads by key (``features.0.weight``, ...). The linear
heads load from the ``lpips`` package's ``weights/v0.1/{vgg,alex}.pth`` (keys
``lin{k}.model.1.weight``). Nothing is downloaded; files are read with
``torch.load(weights_only=True)``.

Weights are found, hash-checked and read by ``medlsdm.pretrained`` (networks
``lpips-{vgg,alex}-backbone`` and ``lpips-{vgg,alex}-heads``; ``medlsdm weights`` lists where they
are looked for). An explicitly given path is the only place looked at for that file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from medlsdm.errors import ConfigError, MedlsdmError
from medlsdm.pretrained import find_weights, load_weights

NETS = ("vgg", "alex")

# torchvision's VGG16 "D" configuration; LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_VGG16_TAPS = (4, 9, 16, 23, 30)
_VGG16_CHANNELS = (64, 128, 256, 512, 512)
_ALEX_TAPS = (2, 5, 8, 10, 12)  # relu1 .. relu5
_ALEX_CHANNELS = (64, 192, 384, 256, 256)


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
            cin = v
    return nn.Sequential(*layers)  # 30 modules: features.0 .. features.29 (relu5_3)


def _alexnet_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
    )


class Backbone(nn.Module):
    """``features`` as in torchvision; ``forward`` returns the five LPIPS activations."""

    def __init__(self, net: str):
        super().__init__()
        if net == "vgg":
            self.features, self.taps, self.channels = _vgg16_features(), _VGG16_TAPS, _VGG16_CHANNELS
        else:
            self.features, self.taps, self.channels = _alexnet_features(), _ALEX_TAPS, _ALEX_CHANNELS

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for stop in self.taps:
            for layer in self.features[start:stop]:
                x = layer(x)
            out.append(x)
            start = stop
        return out


class NetLinLayer(nn.Module):
    """A 1x1 convolution to one channel, after dropout: ``model.1.weight`` as in lpips."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class Heads(nn.Module):
    def __init__(self, channels: Sequence[int]):
        super().__init__()
        for k, c in enumerate(channels):
            self.add_module(f"lin{k}", NetLinLayer(c))

    def __getitem__(self, k: int) -> NetLinLayer:
        return getattr(self, f"lin{k}")


class LPIPS(nn.Module):
    """Frozen LPIPS distance between 2D images in [-1, 1]: ``LPIPS(x, y) -> (N,)``.

    Inputs (N, C, H, W): C = 3 as is, C = 1 repeated to 3 channels; any other C (multi-channel
    MR) is scored per channel (each as grey) and averaged over channels.
    """

    def __init__(self, net: str = "vgg", backbone_path: str | os.PathLike | None = None,
                 heads_path: str | os.PathLike | None = None):
        super().__init__()
        _check_net(net)
        self.net = net
        # LPIPS' ScalingLayer: [-1, 1] inputs to the ImageNet statistics of the backbone.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.backbone = Backbone(net)
        self.heads = Heads(self.backbone.channels)
        backbone, heads = find_lpips_weights(net, backbone_path, heads_path)
        loaded_backbone = load_weights(f"lpips-{net}-backbone", backbone)
        loaded_heads = load_weights(f"lpips-{net}-heads", heads)
        self.provenance = {"backbone": loaded_backbone.provenance(), "heads": loaded_heads.provenance()}
        _load_strict(self.backbone, _features_only(loaded_backbone.state, backbone), backbone)
        _load_strict(self.heads, loaded_heads.state, heads)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        # Always in eval mode (the heads' dropout must stay off), even inside a training module.
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4:
            raise ValueError(f"LPIPS expects two (N, C, H, W) tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
        n, c = x.shape[:2]
        if c not in (1, 3):
            return self.forward(x.reshape(n * c, 1, *x.shape[2:]), y.reshape(n * c, 1, *y.shape[2:])).view(n, c).mean(1)
        if c == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        fx = self.backbone((x - self.shift) / self.scale)
        fy = self.backbone((y - self.shift) / self.scale)
        total = 0
        for k, (a, b) in enumerate(zip(fx, fy)):
            diff = (_unit_channels(a) - _unit_channels(b)) ** 2
            total = total + self.heads[k](diff).mean(dim=(2, 3))
        return total.view(n)


def _unit_channels(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """LPIPS' normalize_tensor: each spatial feature vector scaled to unit length."""
    return f / (torch.sqrt((f**2).sum(dim=1, keepdim=True)) + eps)


# -- weights ---------------------------------------------------------------------------------

def _check_net(net: str) -> None:
    if net not in NETS:
        raise ConfigError(f"loss.perceptual_net must be 'vgg' or 'alex', not {net!r}")


def find_lpips_weights(net: str = "vgg", backbone_path=None, heads_path=None) -> tuple[Path, Path]:
    """(backbone file, heads file), or a MedlsdmError naming what is missing and where to get it."""
    _check_net(net)
    found, missing = [], []
    for part, path in (("backbone", backbone_path), ("heads", heads_path)):
        try:
            found.append(find_weights(f"lpips-{net}-{part}", path))
        except MedlsdmError as exc:
            missing.append(str(exc))
    if missing:
        raise MedlsdmError(f"LPIPS-{net}: " + "; ".join(missing))
    return found[0], found[1]


def _features_only(state: dict, path: Path) -> dict:
    """torchvision files also hold the classifier; LPIPS uses ``features.*`` only."""
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise MedlsdmError(f"{path}: no 'features.*' keys: not a torchvision VGG16/AlexNet state dict")
    return features


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise MedlsdmError(f"{path}: keys do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise MedlsdmError(f"{path}: {str(exc).splitlines()[-1].strip()}") from None


def build_perceptual_loss(cfg: Mapping) -> LPIPS | None:
    """LPIPS from the autoencoder's ``loss`` config (``perceptual_net``, ``lpips_backbone``,
    ``lpips_heads``), or None with a warning when no weights are found (the autoencoder then
    trains without the perceptual term). Explicitly configured files that are missing are an error."""
    net = cfg.get("perceptual_net", "vgg")
    backbone, heads = cfg.get("lpips_backbone"), cfg.get("lpips_heads")
    try:
        find_lpips_weights(net, backbone, heads)
    except MedlsdmError as exc:
        if backbone or heads:
            raise
        warnings.warn(f"{exc}; training without the perceptual (LPIPS) loss", stacklevel=2)
        return None
    return LPIPS(net, backbone, heads)


@torch.no_grad()
def lpips_slices(x: torch.Tensor, y: torch.Tensor, net: LPIPS, axes: Sequence[str] = ("D",),
                 n: int | None = None, generator: torch.Generator | None = None, batch_size: int = 16) -> float:
    """Mean LPIPS over 2D slices of two batches of volumes (B, C, D, H, W) in [-1, 1].

    ``n=None``: every slice along each axis in ``axes`` (deterministic, for evaluation); else
    ``n`` random slices per volume and axis, the same ones in ``x`` and ``y``.
    """
    from medlsdm.models.slicing import axis_dim, slices_at

    if x.shape != y.shape or x.ndim != 5:
        raise ValueError(f"lpips_slices expects two (B, C, D, H, W) tensors of one shape, got "
                         f"{tuple(x.shape)}, {tuple(y.shape)}")
    device = net.shift.device
    total, count = 0.0, 0
    for axis in axes:
        dim = axis_dim(axis)
        size = x.shape[dim]
        if n is None:
            index = torch.arange(size).expand(x.shape[0], size)
        else:
            index = torch.randint(size, (x.shape[0], int(n)), generator=generator)
        sx, sy = slices_at(x, index.to(x.device), dim), slices_at(y, index.to(y.device), dim)
        for a, b in zip(sx.split(batch_size), sy.split(batch_size)):
            total += float(net(a.to(device).float(), b.to(device).float()).sum())
            count += a.shape[0]
    return total / max(count, 1)
