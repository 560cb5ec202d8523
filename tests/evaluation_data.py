"""Tiny NIfTI cohorts for the evaluation command tests (written with nibabel, read by the code
under test through medlsdm.data.io)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(array)
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.int16)
    else:
        arr = arr.astype(np.float32)
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def phantom(rng: np.random.Generator, shape=(16, 16, 16)) -> tuple[np.ndarray, np.ndarray]:
    """(image, label): smooth noisy background; class 1 = a bright ball, class 2 = a dimmer
    ball, at random places — the label is a simple function of the image."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    label = np.zeros(shape, dtype=np.int16)
    for value in (1, 2):
        centre = rng.uniform(4, np.array(shape) - 4)
        radius = rng.uniform(2.5, 3.5)
        label[np.linalg.norm(grid - centre, axis=-1) < radius] = value
    image = 100 + 10 * gaussian_filter(rng.normal(size=shape), 1.0)
    image = image + 200 * (label == 1) + 90 * (label == 2) + 5 * rng.normal(size=shape)
    return image.astype(np.float32), label


def write_cohort(root: Path, ids, seed: int, shape=(16, 16, 16)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Generic layout root/images/ID.nii.gz + root/labels/ID.nii.gz; returns {ID: (image, label)}."""
    out = {}
    for i, case_id in enumerate(ids):
        image, label = phantom(np.random.default_rng([seed, i]), shape)
        write_nifti(root / "images" / f"{case_id}.nii.gz", image)
        write_nifti(root / "labels" / f"{case_id}.nii.gz", label)
        out[case_id] = (image, label)
    return out
