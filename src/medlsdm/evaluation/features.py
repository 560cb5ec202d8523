"""Feature extractors for FID: Inception-v3 on 2D slices, MedicalNet 3D ResNets on volumes, and
a fixed random 3D CNN (no weights to download) so that a 3D distribution metric is always there.

Both networks are defined here in plain torch (torchvision does not import beside this torch
build) with the module names of the published weights, so their state dicts load by key:

* Inception: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (the TensorFlow FID network
  ported; torchvision's Inception3 layout with the FIDInceptionA/C/E_1/E_2 pooling patches).
  Download it once from https://github.com/mseitzer/pytorch-fid/releases (``fid_weights``) into
  ``$TORCH_HOME/hub/checkpoints/`` or pass its path. A TorchScript file mapping images to
  features is accepted too.
* MedicalNet (Chen et al. 2019, "Med3D", github.com/Tencent/MedicalNet) ResNet-10/18/34/50,
  e.g. ``resnet_50_23dataset.pth``; the features are the global average of the last layer.

Nothing is downloaded: a missing file is a ``MedlsdmError`` naming it and where to get it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medlsdm.data.geometry import MODEL_AXES, spatial_axis
from medlsdm.errors import DataError, MedlsdmError
from medlsdm.files import atomic_output, ensure_writable_dir

__all__ = [
    "INCEPTION_WEIGHTS_FILE", "INCEPTION_WEIGHTS_URL", "default_inception_path", "InceptionV3",
    "InceptionFeatureExtractor", "MedicalNetResNet", "MedicalNetFeatureExtractor",
    "slices_for_fid", "FeatureCache", "RandomConv3DFeatures", "inception_from_torchscript",
]

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                         + INCEPTION_WEIGHTS_FILE)
MEDICALNET_URL = "https://github.com/Tencent/MedicalNet (pretrain/resnet_*_23dataset.pth)"


# ============================================================================ Inception-v3 (FID)

class BasicConv2d(nn.Module):
    """conv (no bias) → BatchNorm (eps 0.001, as the TF port) → ReLU; keys ``conv.*``, ``bn.*``."""

    def __init__(self, in_ch: int, out_ch: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x):
    # TensorFlow's average pooling ignores padded zeros (pytorch-fid's FID patch).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, in_ch: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, in_ch: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """InceptionE; ``max_pool=True`` for the last block (Mixed_7c), which the TF FID graph pools
    with max instead of average (pytorch-fid's FIDInceptionE_2)."""

    def __init__(self, in_ch: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_ch, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_tf(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    """The FID Inception-v3 up to the 2048-d average pool (no classifier): input (N, 3, 299, 299)
    in [-1, 1], output (N, 2048). Module names equal torchvision's Inception3 / pytorch-fid's."""

    FEATURE_DIM = 2048

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def default_inception_path() -> Path:
    """Where torch.hub caches the pytorch-fid weights: ($TORCH_HOME or ~/.cache/torch)/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def inception_from_torchscript(module) -> dict:
    """State dict for ``InceptionV3`` from NVIDIA's TorchScript FID Inception (allow-listed by
    hash in ``medlsdm.pretrained``): its 94 convolutions carry ``weight``, ``beta``, ``mean``,
    ``var`` (TensorFlow batch norm without scale), in the same order as ``InceptionV3``'s
    ``BasicConv2d`` modules; shapes are checked one by one. The converted network reproduces the
    TorchScript one to about 1e-6 (tests/test_pretrained.py, with the real file)."""
    theirs = module.state_dict()
    template = InceptionV3().state_dict()
    ours = [k[:-len("conv.weight")] for k in template if k.endswith("conv.weight")]
    convs = [k[:-len("weight")] for k in theirs if k.endswith(".weight")]
    if len(ours) != len(convs):
        raise MedlsdmError(f"TorchScript Inception has {len(convs)} convolutions, expected {len(ours)}")
    state = {}
    for mine, src in zip(ours, convs):
        weight = theirs[src + "weight"]
        if weight.shape != template[mine + "conv.weight"].shape:
            raise MedlsdmError(f"TorchScript Inception layer {src} has shape {tuple(weight.shape)}, "
                               f"expected {tuple(template[mine + 'conv.weight'].shape)}")
        state[mine + "conv.weight"] = weight
        state[mine + "bn.weight"] = torch.ones_like(theirs[src + "beta"])
        state[mine + "bn.bias"] = theirs[src + "beta"]
        state[mine + "bn.running_mean"] = theirs[src + "mean"]
        state[mine + "bn.running_var"] = theirs[src + "var"]
        state[mine + "bn.num_batches_tracked"] = torch.tensor(0)
    return state


def _load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise MedlsdmError(f"{path}: weights do not fit the {what} network ({detail})") from None


class InceptionFeatureExtractor:
    """2048-d Inception pool features of 2D images in [0, 1].

    ``weights``: a file of the ``inception-fid`` network (``medlsdm.pretrained``): pytorch-fid's
    state dict (``fc.*``/``AuxLogits.*`` keys dropped), the safetensors conversion written by
    ``medlsdm weights import``, or the allow-listed TorchScript port (converted to a state dict on
    load; any other TorchScript file is refused). None: searched in the torch hub cache.

    Calling with images (N, H, W), (N, 1, H, W) or (N, 3, H, W) in [0, 1] — numpy or torch —
    resizes them to 299×299 (bilinear, as pytorch-fid), repeats grey to 3 channels, maps to
    [-1, 1] and returns float64 (N, F). Values outside [0, 1] are refused: the reference fed
    0..255, which saturates the network.
    """

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 32):
        from medlsdm.pretrained import load_weights

        loaded = load_weights("inception-fid", weights, convert=inception_from_torchscript)
        state = {k: v for k, v in loaded.state.items() if not k.startswith(("fc.", "AuxLogits."))}
        self.path, self.device, self.batch_size = loaded.path, torch.device(device), int(batch_size)
        self.provenance = loaded.provenance()
        self.model = InceptionV3()
        _load_strict(self.model, state, loaded.path, "FID Inception-v3")
        self.model.to(self.device).eval()

    @property
    def name(self) -> str:
        """Identifies the extractor (network + weights file) for ``FeatureCache``."""
        return f"inception-fid:{self.provenance['sha256'][:16]}"

    def _prepare(self, images) -> torch.Tensor:
        t = images.detach() if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
        t = t.to(torch.float32)
        if t.ndim == 3:
            t = t[:, None]
        if t.ndim != 4 or t.shape[1] not in (1, 3):
            raise DataError(f"Inception input must be (N, H, W), (N, 1, H, W) or (N, 3, H, W), "
                            f"got shape {tuple(t.shape)}")
        if t.numel() and (t.min() < -1e-3 or t.max() > 1 + 1e-3):
            raise DataError(f"Inception input must be in [0, 1], got values in "
                            f"[{float(t.min()):.3g}, {float(t.max()):.3g}]")
        return t.clamp(0, 1)

    @torch.no_grad()
    def __call__(self, images) -> np.ndarray:
        t = self._prepare(images)
        out = []
        for start in range(0, t.shape[0], self.batch_size):
            batch = t[start:start + self.batch_size].to(self.device)
            batch = F.interpolate(batch, size=(299, 299), mode="bilinear", align_corners=False)
            batch = batch.expand(-1, 3, -1, -1) * 2.0 - 1.0
            out.append(self.model(batch).reshape(batch.shape[0], -1).double().cpu())
        if not out:
            return np.zeros((0, InceptionV3.FEATURE_DIM))
        return torch.cat(out).numpy()


# ============================================================================ MedicalNet 3D ResNet

_RESNET_LAYERS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}


def _conv3x3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class _ShortcutA(nn.Module):
    """MedicalNet's parameter-free shortcut: strided identity, extra channels zero-padded."""

    def __init__(self, out_ch: int, stride: int):
        super().__init__()
        self.out_ch, self.stride = out_ch, stride

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, 0, 0, self.out_ch - x.shape[1]))


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = _conv3x3x3(in_ch, planes, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3x3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class MedicalNetResNet(nn.Module):
    """MedicalNet 3D ResNet backbone (no segmentation head): conv1 7³ stride 2 → maxpool →
    layer1..4 (layer3/4 dilated 2/4, not strided, as in MedicalNet) → global average pool.
    Output (N, 512) for depth 10/18/34, (N, 2048) for 50. Shortcut 'A' (zero-padding, used by the
    released ResNet-10/18/34 weights) or 'B' (1×1 conv + BN, ResNet-50)."""

    def __init__(self, depth: int = 50, shortcut_type: str | None = None):
        super().__init__()
        if depth not in _RESNET_LAYERS:
            raise MedlsdmError(f"MedicalNet depth must be one of {sorted(_RESNET_LAYERS)}, got {depth}")
        shortcut_type = shortcut_type or ("B" if depth >= 50 else "A")
        if shortcut_type not in ("A", "B"):
            raise MedlsdmError(f"MedicalNet shortcut_type must be 'A' or 'B', got {shortcut_type!r}")
        block = _Bottleneck if depth >= 50 else _BasicBlock
        self.depth, self.shortcut_type = depth, shortcut_type
        self.feature_dim = 512 * block.expansion
        self._in_ch = 64
        self.conv1 = nn.Conv3d(1, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        n1, n2, n3, n4 = _RESNET_LAYERS[depth]
        self.layer1 = self._make_layer(block, 64, n1)
        self.layer2 = self._make_layer(block, 128, n2, stride=2)
        self.layer3 = self._make_layer(block, 256, n3, dilation=2)
        self.layer4 = self._make_layer(block, 512, n4, dilation=4)

    def _make_layer(self, block, planes, blocks, stride=1, dilation=1) -> nn.Sequential:
        out_ch = planes * block.expansion
        downsample = None
        if stride != 1 or self._in_ch != out_ch:
            downsample = (_ShortcutA(out_ch, stride) if self.shortcut_type == "A" else
                          nn.Sequential(nn.Conv3d(self._in_ch, out_ch, 1, stride=stride, bias=False),
                                        nn.BatchNorm3d(out_ch)))
        layers = [block(self._in_ch, planes, stride, dilation, downsample)]
        self._in_ch = out_ch
        layers += [block(out_ch, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = F.max_pool3d(F.relu(self.bn1(self.conv1(x))), kernel_size=3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool3d(x, 1), 1)


def _medicalnet_state(obj: Mapping, path: Path) -> dict:
    """Backbone state dict from a MedicalNet checkpoint ({"state_dict": ...} or bare, with or
    without DataParallel's ``module.`` prefix); the segmentation head ``conv_seg.*`` is dropped."""
    state = obj.get("state_dict", obj)
    if not isinstance(state, Mapping):
        raise MedlsdmError(f"{path}: 'state_dict' entry is not a state dict")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("conv_seg.")}


def _infer_resnet_config(state: Mapping[str, torch.Tensor], path: Path) -> tuple[int, str]:
    """(depth, shortcut) from the keys: bottleneck blocks have conv3; depth from block counts."""
    counts = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    bottleneck = any(".conv3." in k for k in state)
    shortcut = "B" if any(".downsample." in k for k in state) else "A"
    for depth, layers in _RESNET_LAYERS.items():
        if layers == counts and bottleneck == (depth >= 50):
            return depth, shortcut
    raise MedlsdmError(f"{path}: not a MedicalNet ResNet-10/18/34/50 checkpoint (blocks per layer {counts})")


class MedicalNetFeatureExtractor:
    """Global-average-pooled last-layer features of a MedicalNet 3D ResNet, for 3D-FID.

    ``weights``: a local checkpoint (``torch.load(weights_only=True)``), a dict with
    ``state_dict`` or a bare state dict, ``module.`` prefixes allowed; depth and shortcut type are
    read from its keys (``depth`` given: checked). Calling with volumes — a list of (D, H, W) or
    (1, D, H, W) arrays, or an array (N, [1,] D, H, W) — returns float64 (N, 512 or 2048).

    Normalisation: MedicalNet was trained on volumes z-scored per volume, so each volume is
    z-scored (mean 0, std 1 over all its voxels; ``zscore=False`` to feed it unchanged). Unlike
    MedicalNet's loader, background is not replaced by noise, keeping features deterministic.
    """

    def __init__(self, weights: str | os.PathLike, depth: int | None = None,
                 device: str | torch.device = "cpu", zscore: bool = True):
        from medlsdm.pretrained import load_weights

        path = Path(weights)
        if not path.is_file():
            raise MedlsdmError(f"{path}: MedicalNet weights not found; download a pretrained "
                               f"ResNet from {MEDICALNET_URL} to that path")
        loaded = load_weights("medicalnet", path)
        self.provenance = loaded.provenance()
        state = _medicalnet_state(loaded.state, path)
        found_depth, shortcut = _infer_resnet_config(state, path)
        if depth is not None and depth != found_depth:
            raise MedlsdmError(f"{path}: holds a ResNet-{found_depth}, not the requested ResNet-{depth}")
        self.path, self.device, self.zscore = path, torch.device(device), zscore
        self.model = MedicalNetResNet(found_depth, shortcut)
        _load_strict(self.model, state, path, f"MedicalNet ResNet-{found_depth}")
        self.model.to(self.device).eval()

    @property
    def name(self) -> str:
        return f"medicalnet-resnet{self.model.depth}:{self.provenance['sha256'][:16]}:z{int(self.zscore)}"

    def _prepare(self, volume) -> torch.Tensor:
        t = volume.detach() if isinstance(volume, torch.Tensor) else torch.as_tensor(np.asarray(volume))
        t = t.to(torch.float32)
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3:
            raise DataError(f"MedicalNet input must be a single-channel volume (D, H, W), got shape {tuple(t.shape)}")
        if self.zscore:
            t = (t - t.mean()) / t.std().clamp_min(1e-8)
        return t[None, None]

    @torch.no_grad()
    def __call__(self, volumes) -> np.ndarray:
        feats = [self.model(self._prepare(v).to(self.device)).double().cpu() for v in volumes]
        if not feats:
            return np.zeros((0, self.model.feature_dim))
        return torch.cat(feats).numpy()


# ============================================================================ offline 3D features

class RandomConv3DFeatures:
    """Features of a fixed, untrained random 3D CNN — a 3D distribution metric that needs no
    downloaded weights (MedicalNet has no offline source). It knows nothing of anatomy: its
    Fréchet distance compares the statistics of local 3D patterns at four scales, and is
    comparable only with numbers from this same network (``name`` carries its weights' hash).

    Four stride-2 3×3×3 convolutions (1→16→32→64→128 channels, ReLU); the feature vector is each
    stage's per-channel mean and standard deviation over space (480 values). Weights: He-scaled
    normal draws from numpy's PCG64 with ``seed`` (reproducible across machines and torch
    versions), biases 0. Input: a volume (D, H, W) in [0, 1] (the caller's intensity mapping).
    """

    CHANNELS = (16, 32, 64, 128)

    def __init__(self, seed: int = 0, device: str | torch.device = "cpu"):
        rng = np.random.default_rng(seed)
        self.device = torch.device(device)
        self.weights, cin = [], 1
        for cout in self.CHANNELS:
            w = rng.standard_normal((cout, cin, 3, 3, 3)) * np.sqrt(2.0 / (cin * 27))
            self.weights.append(torch.from_numpy(w.astype(np.float32)).to(self.device))
            cin = cout
        digest = hashlib.sha256(b"".join(w.cpu().numpy().tobytes() for w in self.weights)).hexdigest()
        self.seed = seed
        self.provenance = {"network": "random-3d-cnn", "seed": seed, "sha256": digest, "verified": True,
                           "format": "generated (untrained)"}
        self.feature_dim = 2 * sum(self.CHANNELS)

    @property
    def name(self) -> str:
        return f"random-3d-cnn-seed{self.seed}:{self.provenance['sha256'][:16]}"

    @torch.no_grad()
    def __call__(self, volumes) -> np.ndarray:
        feats = []
        for volume in volumes:
            x = torch.as_tensor(np.asarray(volume, dtype=np.float32), device=self.device)[None, None]
            parts = []
            for w in self.weights:
                x = F.relu(F.conv3d(x, w, stride=2, padding=1))
                parts += [x.mean((2, 3, 4)), x.std((2, 3, 4), unbiased=False)]
            feats.append(torch.cat(parts, 1).double().cpu())
        return torch.cat(feats).numpy() if feats else np.zeros((0, self.feature_dim))


# ============================================================================ slices and cache



def slices_for_fid(volume, axes: Sequence[str] = ("D", "H", "W"), every: int = 1,
                   data_range: tuple[float, float] = (-1.0, 1.0),
                   skip_blank: bool = False) -> dict[str, np.ndarray]:
    """2D slices of a volume (D, H, W) or (1, D, H, W) for 2D FID: ``{axis: (n, a, b) float32}``
    in [0, 1], every ``every``-th slice along each named axis (D = axial in the model layout).
    ``data_range`` = (low, high) of the input values, mapped linearly to [0, 1] and clipped.
    ``skip_blank`` drops constant slices (e.g. empty background), which would otherwise be
    identical points in both sets and dilute the distance."""
    arr = np.asarray(volume.detach().cpu() if isinstance(volume, torch.Tensor) else volume, dtype=np.float32)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise DataError(f"slices_for_fid needs a single-channel volume (D, H, W), got shape {arr.shape}")
    lo, hi = (float(v) for v in data_range)
    if not hi > lo:
        raise MedlsdmError(f"data_range must be (low, high) with high > low, got {data_range!r}")
    if every < 1:
        raise MedlsdmError(f"every must be >= 1, got {every}")
    unit = np.clip((arr - lo) / (hi - lo), 0.0, 1.0)
    out = {}
    for axis in axes:
        if axis not in MODEL_AXES:
            raise MedlsdmError(f"unknown slice axis {axis!r}; use 'D', 'H' or 'W'")
        stack = np.moveaxis(unit, spatial_axis(axis), 0)[::every]
        if skip_blank:
            stack = stack[np.ptp(stack.reshape(len(stack), -1), axis=1) > 0]
        out[axis] = np.ascontiguousarray(stack)
    return out


class FeatureCache:
    """Features stored as ``<dir>/<sha1>.npz``, keyed by the source file's resolved path,
    modification time and size, the extractor name and any extra parameters (slicing, ...), so
    re-running an evaluation recomputes only files that changed."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = ensure_writable_dir(directory)

    @staticmethod
    def key(source: str | os.PathLike, extractor: str, params: Mapping | None = None) -> str:
        path = Path(source).resolve()
        try:
            st = path.stat()
        except FileNotFoundError:
            raise DataError(f"{path}: file not found") from None
        ident = {"path": str(path), "mtime_ns": st.st_mtime_ns, "size": st.st_size,
                 "extractor": extractor, "params": dict(params or {})}
        return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()

    def load_or_compute(self, source: str | os.PathLike, extractor: str,
                        compute: Callable[[], np.ndarray], params: Mapping | None = None) -> np.ndarray:
        """Cached features for ``source``, or ``compute()`` stored then returned."""
        file = self.directory / f"{self.key(source, extractor, params)}.npz"
        if file.is_file():
            try:
                with np.load(file, allow_pickle=False) as data:
                    return data["features"]
            except (OSError, ValueError, KeyError):
                pass  # unreadable cache entry (e.g. interrupted disk): recompute and overwrite
        features = np.asarray(compute())
        with atomic_output(file) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, features=features, source=str(Path(source).resolve()), extractor=extractor)
        return features
