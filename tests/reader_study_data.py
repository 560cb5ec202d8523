"""Tiny real and synthetic cohorts for the reader-study tests: real volumes at 1 mm, synthetic
ones on an oblique 0.7 x 0.7 x 5 mm grid with another intensity range and telltale header fields,
so blinding has something to hide."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

REAL_AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])


def oblique_affine(spacing=(0.7, 0.7, 5.0), degrees: float = 20.0) -> np.ndarray:
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = [-7.0, -7.0, -10.0]
    return affine


def blob(rng: np.random.Generator, shape, scale: float, offset: float) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    centre = rng.uniform(-0.3, 0.3, size=3)
    ball = (np.linalg.norm(grid - centre, axis=-1) < 0.6).astype(np.float32)
    noise = gaussian_filter(rng.normal(size=shape), 1.0)
    return (offset + scale * (ball + 0.2 * noise)).astype(np.float32)


def write_cohorts(root: Path, n_real: int = 4, n_synthetic: int = 4, seed: int = 0,
                  channels: int = 1) -> tuple[Path, Path]:
    """``root/real_scans`` (CT-like values, 1 mm, 16^3) and ``root/generated_volumes`` (values in
    [-1, 1], oblique 0.7 x 0.7 x 5 mm, 22 x 22 x 4, described as synthetic in the header)."""
    rng = np.random.default_rng(seed)
    real, synthetic = root / "real_scans", root / "generated_volumes"
    real.mkdir(parents=True)
    synthetic.mkdir(parents=True)
    for i in range(n_real):
        arrs = [blob(rng, (16, 16, 16), 800.0, -200.0) for _ in range(channels)]
        arr = arrs[0] if channels == 1 else np.stack(arrs, -1)
        image = nib.Nifti1Image(np.rint(arr).astype(np.int16), REAL_AFFINE)
        image.header["descrip"] = b"hospital scanner patient0042"
        nib.save(image, str(real / f"patient_{i:02d}.nii.gz"))
    for i in range(n_synthetic):
        arrs = [np.tanh(blob(rng, (22, 22, 4), 1.2, -0.6)) for _ in range(channels)]
        arr = arrs[0] if channels == 1 else np.stack(arrs, -1)
        image = nib.Nifti1Image(arr, oblique_affine())
        image.header["descrip"] = b"medlsdm synthetic sample"
        image.header["intent_name"] = b"synthetic"
        nib.save(image, str(synthetic / f"patient_{i:02d}_sample0.nii.gz"))
    return real, synthetic
