"""Voxel-grid geometry: reorientation, grids at a new spacing or shape, and resampling.

Pure functions on arrays and 4x4 voxel -> world (RAS mm) affines. Arrays are ``(X, Y, Z)`` or
channels-first ``(C, X, Y, Z)``; the geometry always refers to the last three axes. A voxel
index is the voxel's centre, so voxel ``i`` covers ``[i - 0.5, i + 0.5]`` (NIfTI convention).
"""

from __future__ import annotations

from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from medlsdm.errors import ConfigError

RAS_ORNT = np.array([[0, 1], [1, 1], [2, 1]], dtype=np.float64)


def _over_spatial(array: np.ndarray, fn) -> np.ndarray:
    """Apply `fn` (a function of one (X, Y, Z) array) to a 3D array or each channel of a 4D one."""
    if array.ndim == 3:
        return fn(array)
    if array.ndim == 4:
        return np.stack([fn(channel) for channel in array])
    raise ValueError(f"expected a (X, Y, Z) or (C, X, Y, Z) array, got shape {array.shape}")


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorient to the closest canonical RAS voxel order by flips and axis swaps only (no
    interpolation); oblique affines keep their rotation, with axes in closest-RAS order.

    Returns (array, affine, ornt); `ornt` (nibabel orientation, input axes -> RAS) inverts it.
    """
    affine = np.asarray(affine, dtype=np.float64)
    ornt = nib.orientations.io_orientation(affine)
    spatial_shape = array.shape[-3:]
    out = _over_spatial(array, lambda a: nib.orientations.apply_orientation(a, ornt))
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, spatial_shape)
    return np.ascontiguousarray(out), new_affine, ornt


def from_canonical(array: np.ndarray, affine: np.ndarray, ornt) -> tuple[np.ndarray, np.ndarray]:
    """Exact inverse of `to_canonical` given its `ornt` (array or nested lists, as in JSON)."""
    ornt = np.asarray(ornt, dtype=np.float64)
    back = nib.orientations.ornt_transform(RAS_ORNT, ornt)  # canonical axes -> original axes
    spatial_shape = array.shape[-3:]
    out = _over_spatial(array, lambda a: nib.orientations.apply_orientation(a, back))
    new_affine = np.asarray(affine, dtype=np.float64) @ nib.orientations.inv_ornt_aff(back, spatial_shape)
    return np.ascontiguousarray(out), new_affine


MODEL_AXES = ("D", "H", "W")
"""Model layout: the spatial axes of every array and tensor inside the models, (D, H, W) =
(inferior->superior, posterior->anterior, left->right); arrays are (..., D, H, W)."""


def spatial_axis(name: str) -> int:
    """Index 0, 1, 2 of a model-layout axis name among the spatial axes (its dimension in an
    array or tensor is ``ndim - 3 + index``)."""
    if name not in MODEL_AXES:
        raise ConfigError(f"axis must be one of {', '.join(MODEL_AXES)} (model layout), got {name!r}")
    return MODEL_AXES.index(name)


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size along each voxel axis of `affine` (the norms of its columns), in mm."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def _corner_aligned(affine: np.ndarray, new_spacing: np.ndarray) -> np.ndarray:
    """Affine with the same direction cosines and the same outer corner of voxel 0 (index
    -0.5 on every axis), at `new_spacing`."""
    affine = np.asarray(affine, dtype=np.float64)
    directions = affine[:3, :3] / voxel_spacing(affine)
    corner = affine[:3, :3] @ np.full(3, -0.5) + affine[:3, 3]
    new = np.eye(4)
    new[:3, :3] = directions * new_spacing
    new[:3, 3] = corner + new[:3, :3] @ np.full(3, 0.5)
    return new


def resampled_grid(
    affine: np.ndarray, shape: Sequence[int], new_spacing: float | Sequence[float | None]
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Grid at `new_spacing` (per voxel axis; None keeps that axis) with the same direction
    cosines and physical extent: corner-aligned, ``new_shape = round(shape * old / new)``."""
    old = voxel_spacing(affine)
    if np.isscalar(new_spacing):
        new_spacing = [new_spacing] * 3
    new = np.array([o if n is None else float(n) for o, n in zip(old, new_spacing)])
    if len(new) != 3 or np.any(new <= 0):
        raise ValueError(f"new spacing must be three positive values, got {new_spacing!r}")
    new_shape = tuple(max(1, int(round(s * o / n))) for s, o, n in zip(shape[-3:], old, new))
    return _corner_aligned(affine, new), new_shape


def aligned_grid(
    affine: np.ndarray, shape: Sequence[int], directions: np.ndarray, new_spacing: Sequence[float]
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Grid with the given direction cosines (3x3, columns = voxel axes) and `new_spacing` that
    covers the whole extent of (`affine`, `shape`): an oblique label map resampled onto the axes a
    model was trained on. With the source's own directions this is `resampled_grid` (same grid)."""
    affine = np.asarray(affine, dtype=np.float64)
    directions = np.asarray(directions, dtype=np.float64)
    new = np.asarray(new_spacing, dtype=np.float64)
    if np.allclose(affine[:3, :3] / voxel_spacing(affine), directions, atol=1e-4):
        return resampled_grid(affine, shape, new)
    # Outer corners of the source volume (indices -0.5 and n - 0.5) in world mm, then in the new
    # axes' coordinates: their bounding box is the region the new grid must cover.
    n = np.asarray(shape[-3:], dtype=np.float64)
    corners = np.array([[a, b, c] for a in (-0.5, n[0] - 0.5) for b in (-0.5, n[1] - 0.5)
                        for c in (-0.5, n[2] - 0.5)])
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    local = world @ directions                          # coordinates along each new axis, in mm
    lo, hi = local.min(axis=0), local.max(axis=0)
    new_shape = tuple(max(1, int(np.ceil((h - l) / s - 1e-6))) for l, h, s in zip(lo, hi, new))
    out = np.eye(4)
    out[:3, :3] = directions * new
    out[:3, 3] = directions @ (lo + new / 2.0)          # centre of the first voxel
    return out, new_shape


def resized_grid(affine: np.ndarray, shape: Sequence[int], new_shape: Sequence[int]) -> np.ndarray:
    """Affine of a grid of exactly `new_shape` voxels covering the same extent as (`affine`, `shape`)."""
    new_spacing = voxel_spacing(affine) * np.asarray(shape[-3:], dtype=np.float64) / np.asarray(new_shape, dtype=np.float64)
    return _corner_aligned(affine, new_spacing)


def resample_to_grid(
    array: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    order: int,
    cval: float = 0.0,
    antialias: bool = False,
    margin: float = 0.0,
) -> np.ndarray:
    """Resample `array` (on `src_affine`) onto the grid (`dst_affine`, `dst_shape`).

    For each destination voxel: world = dst_affine @ idx, source idx = inv(src_affine) @ world.
    `order` 0 = nearest (labels), 1 = linear, 3 = cubic B-spline (with prefilter). Destination
    voxels whose centre falls outside the source's extent (beyond half a voxel from the edge
    centres) get `cval`; inside it, values near the edge are extended from the edge voxels,
    so a grid covering the same extent does not lose its border; `margin` (source voxels)
    widens that extent, e.g. 0.5 to cover the rim lost when a grid's shape was rounded. With `antialias` (orders >= 1),
    a Gaussian (sigma = (factor - 1) / 2 source voxels, as scikit-image) smooths the source
    first along axes sampled more coarsely. Channels-first (C, X, Y, Z) arrays are supported.
    """
    src_affine = np.asarray(src_affine, dtype=np.float64)
    vox_to_vox = np.linalg.inv(src_affine) @ np.asarray(dst_affine, dtype=np.float64)
    matrix, offset = vox_to_vox[:3, :3], vox_to_vox[:3, 3]
    dst_shape = tuple(int(s) for s in dst_shape[-3:])
    src_shape = array.shape[-3:]
    # The mapping is affine, so scipy's affine_transform avoids building a full coordinate grid.
    sigma = np.maximum(np.abs(matrix).max(axis=1) - 1.0, 0.0) / 2.0 if antialias and order > 0 else np.zeros(3)

    def one(volume: np.ndarray) -> np.ndarray:
        if np.any(sigma > 0):
            volume = ndimage.gaussian_filter(volume.astype(np.float32, copy=False), sigma, mode="nearest")
        out = ndimage.affine_transform(
            volume, matrix, offset=offset, output_shape=dst_shape, order=order, mode="nearest",
            prefilter=order > 1,
        )
        out[~inside] = cval
        return out

    inside = _inside_mask(matrix, offset, dst_shape, src_shape, 0.5 + margin)
    return _over_spatial(array, one)


def resample_labels(
    label: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: Sequence[int]
) -> np.ndarray:
    """A label map (X, Y, Z) onto another grid. Nearest neighbour where the new grid is not
    coarser; where it is coarser along some axis, partial volumes: each class's indicator is
    resampled linearly with the antialiasing Gaussian and the class with the largest share wins.
    Nearest-neighbour subsampling aliases thin structures, and at an even factor (1.5 mm -> 3 mm)
    every new voxel centre falls on a boundary between two old voxels, shifting the map by half an
    old voxel; partial volumes are also how the demo cohort's coarse maps are made."""
    src_affine = np.asarray(src_affine, dtype=np.float64)
    vox_to_vox = np.linalg.inv(src_affine) @ np.asarray(dst_affine, dtype=np.float64)
    if not np.any(np.abs(vox_to_vox[:3, :3]).max(axis=1) > 1.0 + 1e-6):
        return resample_to_grid(label, src_affine, dst_affine, dst_shape, order=0)
    values = np.unique(label)
    best = np.full(tuple(int(s) for s in dst_shape[-3:]), -1.0, dtype=np.float32)
    out = np.zeros(best.shape, dtype=label.dtype)
    for value in values:
        share = resample_to_grid((label == value).astype(np.float32), src_affine, dst_affine, dst_shape, order=1,
                                 cval=float(value == 0), antialias=True)
        better = share > best
        out[better], best[better] = value, share[better]
    return out


def _inside_mask(matrix, offset, dst_shape, src_shape, half: float) -> np.ndarray:
    """Destination voxels whose source coordinate lies within [-half, n - 1 + half] on every axis.
    Built one source axis at a time from broadcast index vectors, to keep memory at one volume."""
    idx = np.ogrid[tuple(slice(0, s) for s in dst_shape)]
    inside = np.ones(dst_shape, dtype=bool)
    tol = 1e-6  # centres that land exactly on a boundary through rounding stay inside
    for axis in range(3):
        coord = offset[axis] + sum(matrix[axis, b] * idx[b] for b in range(3))
        inside &= (coord >= -half - tol) & (coord <= src_shape[axis] - 1 + half + tol)
    return inside
