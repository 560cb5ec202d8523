"""A prepared dataset on disk (see docs/architecture.md) as a torch Dataset.

Arrays are memory-mapped, so large datasets cost no RAM until read; optional random patches
and flips apply the same crop/flip to the image and its label map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from medlsdm.data.geometry import MODEL_AXES, spatial_axis
from medlsdm.errors import ConfigError, DataError
from medlsdm.files import load_array, read_json

MANIFEST_FORMAT = "medlsdm-prepared"
SPLIT_NAMES = ("train", "val", "test")
# Model layout (D, H, W) = (inferior->superior, posterior->anterior, left->right). Only W
# (left-right) is flipped by default: anatomy is roughly mirror-symmetric left to right, but not
# head to foot or front to back, so flipping those would teach the model impossible images.
AXES = {name: spatial_axis(name) for name in MODEL_AXES}   # array axis of (D, H, W)


def load_manifest(root: str | Path) -> dict:
    """The manifest of a prepared dataset; a clear error when `root` is not one."""
    root = Path(root)
    path = root / "manifest.json"
    if not path.is_file():
        raise DataError(f"{root}: not a prepared dataset (no manifest.json; create one with `medlsdm prepare`)")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: not a medlsdm prepared-dataset manifest")
    return manifest


def _flip_dims(flip_axes: Sequence[str]) -> list[int]:
    unknown = [a for a in flip_axes if a not in AXES]
    if unknown:
        raise ConfigError(f"flip axes {unknown} unknown (use D, H, W of the model layout)")
    return [AXES[a] for a in flip_axes]


def _distributed_rank() -> int:
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if initialised else 0


class PreparedDataset(Dataset):
    """Cases of one split (``None``: all): ``{"image": float32 (C, D, H, W), "label": int64
    (1, D, H, W), "case_id": str}``.

    `patch_size` (D, H, W) crops a random window, the same for image and label; `flip` mirrors
    both along `flip_axes` with probability 1/2 each. Random draws come from ``seed``; in
    DataLoader workers each worker draws from ``(seed, worker seed)``, which torch derives from
    its own seeded generator anew for every epoch, so workers do not repeat each other's patches
    and runs stay repeatable.
    """

    def __init__(self, root: str | Path, split: str | None = "train", patch_size: Sequence[int] | None = None,
                 flip: bool = False, seed: int = 0, flip_axes: Sequence[str] = ("W",)):
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        if split is not None and split not in SPLIT_NAMES:
            raise ConfigError(f"unknown split '{split}' (use {', '.join(SPLIT_NAMES)} or None for all)")
        self.cases = [c for c in self.manifest["cases"] if split is None or c["split"] == split]
        if not self.cases:
            raise DataError(f"{self.root}: no cases in split '{split}'")
        self.patch_size = tuple(int(p) for p in patch_size) if patch_size else None
        if self.patch_size is not None and (len(self.patch_size) != 3 or min(self.patch_size) < 1):
            raise ConfigError(f"patch_size must be three positive sizes (D, H, W), got {list(patch_size)}")
        self.flip = flip
        self.flip_dims = _flip_dims(flip_axes)
        self.seed = int(seed)
        self._rng: np.random.Generator | None = None
        self._rng_key: tuple | None = None

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def rng(self) -> np.random.Generator:
        """The generator of this process: one per DataLoader worker (and per DDP rank)."""
        info = get_worker_info()
        key = ("worker", info.seed) if info is not None else ("main", _distributed_rank())
        if key != self._rng_key:
            entropy = self.seed if key == ("main", 0) else [self.seed, int(key[1]) % 2**63, key[0] == "worker"]
            self._rng, self._rng_key = np.random.default_rng(entropy), key
        return self._rng

    def _load(self, case: dict) -> tuple[np.ndarray, np.ndarray]:
        image = load_array(self.root / case["image"])  # plain arrays only: a pickle is refused
        label = load_array(self.root / case["label"])
        if image.ndim != 4 or label.shape != image.shape[1:]:
            raise DataError(f"{self.root / case['image']}: image {image.shape} and label map {label.shape} do not "
                            "match (expected (C, D, H, W) and (D, H, W)); prepare the dataset again")
        return image, label

    def _patch(self, image: np.ndarray, label: np.ndarray, case: dict) -> tuple[np.ndarray, np.ndarray]:
        shape = label.shape
        if any(p > s for p, s in zip(self.patch_size, shape)):
            raise DataError(f"{self.root / case['image']}: patch size {list(self.patch_size)} exceeds the volume "
                            f"shape {list(shape)}")
        start = [int(self.rng.integers(0, s - p + 1)) for p, s in zip(self.patch_size, shape)]
        window = tuple(slice(a, a + p) for a, p in zip(start, self.patch_size))
        return image[(slice(None),) + window], label[window]

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        image, label = self._load(case)
        if self.patch_size is not None:
            image, label = self._patch(image, label, case)  # sliced before reading: only the patch is read
        image, label = np.array(image, dtype=np.float32), np.array(label)  # copies: memory maps are read-only
        if self.flip:
            for dim in self.flip_dims:
                if self.rng.random() < 0.5:
                    image, label = np.flip(image, axis=dim + 1), np.flip(label, axis=dim)
        return {"image": torch.from_numpy(np.ascontiguousarray(image)),
                "label": torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))[None],
                "case_id": case["case_id"]}
