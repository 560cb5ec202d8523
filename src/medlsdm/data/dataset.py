"""A prepared dataset on disk (see docs/architecture.md) as a torch Dataset.

Arrays are memory-mapped, so large datasets cost no RAM until read; optional random patches
and flips apply the same crop/flip to the image and its label map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from medlsdm.errors import DataError
from medlsdm.files import read_json

MANIFEST_FORMAT = "medlsdm-prepared"
AXES = {"D": 0, "H": 1, "W": 2}


def load_manifest(root: str | Path) -> dict:
    """The manifest of a prepared dataset; a clear error when `root` is not one."""
    root = Path(root)
    path = root / "manifest.json"
    if not path.is_file():
        raise DataError(f"{root}: not a prepared dataset (no manifest.json; create one with `medlsdm prepare`)")
    manifest = read_json(path)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: not a medlsdm prepared-dataset manifest")
    return manifest


class PreparedDataset(Dataset):
    """Cases of one split: {"image": float32 (C, D, H, W), "label": int64 (1, D, H, W), "case_id"}."""

    def __init__(self, root: str | Path, split: str | None = "train", patch_size: Sequence[int] | None = None,
                 flip: bool = False, seed: int = 0, flip_axes: Sequence[str] = ("W",)):
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        self.cases = [c for c in self.manifest["cases"] if split is None or c["split"] == split]
        if not self.cases:
            raise DataError(f"{self.root}: no cases in split '{split}'")
        self.patch_size = tuple(int(p) for p in patch_size) if patch_size else None
        self.flip = flip
        self.flip_dims = [AXES[a] for a in flip_axes]
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.cases)

    def _load(self, case: dict) -> tuple[np.ndarray, np.ndarray]:
        image = np.load(self.root / case["image"], mmap_mode="r")
        label = np.load(self.root / case["label"], mmap_mode="r")
        return image, label

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        image, label = self._load(case)
        if self.patch_size is not None:
            shape = label.shape
            if any(p > s for p, s in zip(self.patch_size, shape)):
                raise DataError(f"{self.root}: patch size {self.patch_size} exceeds volume shape {shape}")
            start = [int(self.rng.integers(0, s - p + 1)) for p, s in zip(self.patch_size, shape)]
            window = tuple(slice(a, a + p) for a, p in zip(start, self.patch_size))
            image, label = image[(slice(None),) + window], label[window]
        image, label = np.array(image, dtype=np.float32), np.array(label)  # copies: memory maps are read-only
        if self.flip:
            for dim in self.flip_dims:
                if self.rng.random() < 0.5:
                    image, label = np.flip(image, axis=dim + 1), np.flip(label, axis=dim)
        return {"image": torch.from_numpy(np.ascontiguousarray(image)),
                "label": torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))[None],
                "case_id": case["case_id"]}
