"""Volumes encoded for web pages: NIfTI-1 bytes, base64, with a header that carries nothing but
the grid (no description, no intent, no original file name), and uint8 intensities on a window
the caller chooses, so a page stays small and every volume is displayed the same way."""

from __future__ import annotations

import base64
import gzip

import numpy as np


def to_uint8(array: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``array`` mapped linearly from [lo, hi] to 0..255 (clipped, rounded)."""
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip(np.rint((np.asarray(array, dtype=np.float32) - lo) * scale), 0, 255).astype(np.uint8)


def robust_range(array: np.ndarray, mask: np.ndarray | None = None, q: float = 0.5) -> tuple[float, float]:
    """The ``q`` and ``100 - q`` percentiles of the voxels (inside ``mask`` when given)."""
    values = np.asarray(array, dtype=np.float32)
    values = values[mask] if mask is not None else values.ravel()
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [q, 100.0 - q])
    return float(lo), float(hi)


def nifti_bytes(array: np.ndarray, affine: np.ndarray, compress: bool = False) -> bytes:
    """A NIfTI-1 file of a 3D array with a header made from scratch: shape, type, ``affine`` as
    both qform and sform, millimetres; every free-text field empty. ``compress`` gzips it
    (without a file name or time stamp in the gzip header)."""
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    data = image.to_bytes()
    return gzip.compress(data, compresslevel=6, mtime=0) if compress else data


def nifti_base64(array: np.ndarray, affine: np.ndarray, compress: bool = False) -> str:
    return base64.b64encode(nifti_bytes(array, affine, compress)).decode("ascii")
