"""Editing label maps: move, scale, grow, shrink, paste or relabel one class region, so that a
trained model can be asked for anatomy that was never scanned (Med-DDPM did this in a notebook).

Every operation is a pure function ``op(label, affine, ...) -> new label array`` on a 3D integer
label map in its file's voxel axes (i, j, k) and its voxel -> world (RAS mm) affine; the grid and
affine never change. `apply_edits` runs a list of them on a `Volume` and checks the result.

Fill rule. Voxels a class leaves (move, shrinking scale, erode) take the ``fill`` class when one
is given; otherwise the class most common in the one-voxel shell (6-connected) around the class's
region before the edit — the tissue it sits in — with ties going to the smaller value, and
background 0 when the region has no surroundings (it fills the whole grid). Voxels a class
enters (move, growing scale, dilate, paste) are overwritten, whatever class they held.

Structuring elements (dilate, erode): ``"ball"``, the voxels within Euclidean distance N (for
N = 1 the 6-connected cross), or ``"cube"``, the (2N+1)^3 box; both in voxels, not mm. Beyond the
grid's edge nothing is known, so the edge does not erode a region that touches it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from medlsdm.data.io import Volume
from medlsdm.data.labels import LabelTable, validate_label_map
from medlsdm.errors import DataError

ELEMENTS = ("ball", "cube")


# ----------------------------------------------------------------------------------- helpers


def _class_mask(label: np.ndarray, cls: int) -> np.ndarray:
    mask = label == cls
    if not mask.any():
        present = ", ".join(str(v) for v in np.unique(label).tolist())
        raise DataError(f"class {cls} is not in the label map (values: {present})")
    return mask


def surrounding_class(label: np.ndarray, mask: np.ndarray) -> int:
    """The most common class in the 6-connected one-voxel shell around `mask` (ties: smaller
    value); 0 when the shell is empty."""
    shell = ndimage.binary_dilation(mask, structure=ndimage.generate_binary_structure(3, 1)) & ~mask
    values, counts = np.unique(label[shell], return_counts=True)
    return int(values[np.argmax(counts)]) if values.size else 0


def _fill_value(label: np.ndarray, mask: np.ndarray, fill: int | None) -> int:
    return int(fill) if fill is not None else surrounding_class(label, mask)


def _shift_mask(mask: np.ndarray, shift: Sequence[int]) -> np.ndarray:
    """`mask` translated by whole voxels; what leaves the grid is dropped."""
    out = np.zeros_like(mask)
    src, dst = [], []
    for size, s in zip(mask.shape, shift):
        s = int(s)
        if abs(s) >= size:
            return out
        src.append(slice(max(0, -s), size - max(0, s)))
        dst.append(slice(max(0, s), size - max(0, -s)))
    out[tuple(dst)] = mask[tuple(src)]
    return out


def voxel_shift(affine: np.ndarray, shift: Sequence[float], mm: bool = False) -> tuple[int, int, int]:
    """A shift as whole voxels along (i, j, k). With `mm`, `shift` is a world displacement in
    millimetres (RAS: +x right, +y anterior, +z superior), mapped through the affine's linear part
    and rounded to the nearest voxel; otherwise it must already be whole voxels."""
    shift = np.asarray(shift, dtype=np.float64)
    if shift.shape != (3,):
        raise DataError(f"a shift needs three values (DX DY DZ), got {shift.tolist()}")
    if mm:
        shift = np.linalg.solve(np.asarray(affine, dtype=np.float64)[:3, :3], shift)
    elif not np.all(shift == np.round(shift)):
        raise DataError(f"voxel shifts must be whole numbers, got {shift.tolist()} (use mm=True / --mm for millimetres)")
    return tuple(int(v) for v in np.round(shift))


def _place(label: np.ndarray, cls: int, old: np.ndarray, new: np.ndarray, fill: int | None) -> np.ndarray:
    """Region `old` of class `cls` becomes `new`: vacated voxels get the fill class, `new` is
    written over whatever it covers."""
    if not new.any():
        raise DataError(f"class {cls} would leave the grid entirely")
    out = label.copy()
    out[old & ~new] = _fill_value(label, old, fill)
    out[new] = cls
    return out


# -------------------------------------------------------------------------------- operations


def move_class(label: np.ndarray, affine: np.ndarray, cls: int, shift: Sequence[float], mm: bool = False,
               fill: int | None = None) -> np.ndarray:
    """Translate the region of class `cls` by `shift` (voxels along i, j, k, or world mm with
    `mm`); the part moved beyond the grid is lost."""
    mask = _class_mask(label, cls)
    return _place(label, cls, mask, _shift_mask(mask, voxel_shift(affine, shift, mm)), fill)


def _scaled_indices(size: int, centre: float, factor: float, lo: int, hi: int) -> tuple[slice, np.ndarray]:
    """Destination index range along one axis covering the scaled source range [lo, hi], and the
    nearest source index of each destination index (round half up, so the result is exact)."""
    start = max(0, int(np.floor(centre + (lo - 0.5 - centre) * factor)))
    stop = min(size, int(np.ceil(centre + (hi + 0.5 - centre) * factor)) + 1)
    dst = np.arange(start, stop)
    src = np.floor(centre + (dst - centre) / factor + 0.5).astype(np.int64)
    return slice(start, stop), src


def scale_class(label: np.ndarray, affine: np.ndarray, cls: int, factor: float, fill: int | None = None) -> np.ndarray:
    """Scale the region of class `cls` by `factor` about its centroid (voxel centre of mass),
    sampling the class mask at the nearest voxel: a factor of 2 doubles each extent."""
    if not factor > 0:
        raise DataError(f"scale factor must be positive, got {factor}")
    mask = _class_mask(label, cls)
    centroid = np.argwhere(mask).mean(axis=0)
    coords = np.nonzero(mask)
    # The scaling is separable (diagonal), so each axis maps on its own: only the scaled
    # bounding box is evaluated, never a coordinate grid of the whole volume.
    slices, sources = [], []
    for axis in range(3):
        sl, src = _scaled_indices(mask.shape[axis], centroid[axis], float(factor), int(coords[axis].min()),
                                  int(coords[axis].max()))
        slices.append(sl)
        sources.append(src)
    valid = [(s >= 0) & (s < n) for s, n in zip(sources, mask.shape)]
    picked = mask[np.ix_(*[np.clip(s, 0, n - 1) for s, n in zip(sources, mask.shape)])]
    picked &= valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
    new = np.zeros_like(mask)
    new[tuple(slices)] = picked
    return _place(label, cls, mask, new, fill)


def _distance(mask: np.ndarray, element: str) -> np.ndarray:
    """Distance of every voxel to the nearest False voxel of `mask`: Euclidean for the ball,
    chessboard for the cube (a distance transform handles any radius in one pass, where repeated
    binary dilations would cost N passes)."""
    if element == "ball":
        return ndimage.distance_transform_edt(mask)
    if element == "cube":
        return ndimage.distance_transform_cdt(mask, metric="chessboard")
    raise DataError(f"structuring element must be one of {', '.join(ELEMENTS)}, got {element!r}")


def _check_radius(n: int) -> int:
    if int(n) != n or n < 1:
        raise DataError(f"dilation/erosion radius must be a whole number of voxels >= 1, got {n}")
    return int(n)


def dilate_class(label: np.ndarray, affine: np.ndarray, cls: int, n: int, element: str = "ball") -> np.ndarray:
    """Grow the region of class `cls` by `n` voxels (structuring element `element`), over any class."""
    n = _check_radius(n)
    mask = _class_mask(label, cls)
    grown = _distance(~mask, element) <= n
    out = label.copy()
    out[grown] = cls
    return out


def erode_class(label: np.ndarray, affine: np.ndarray, cls: int, n: int, element: str = "ball",
                fill: int | None = None) -> np.ndarray:
    """Shrink the region of class `cls` by `n` voxels; removed voxels take the fill class."""
    n = _check_radius(n)
    mask = _class_mask(label, cls)
    if mask.all():  # no boundary inside the grid: nothing to erode from
        return label.copy()
    kept = mask & (_distance(mask, element) > n)
    out = label.copy()
    out[mask & ~kept] = _fill_value(label, mask, fill)
    return out


def paste_class(label: np.ndarray, affine: np.ndarray, cls: int, source: np.ndarray, source_affine: np.ndarray,
                shift: Sequence[float] = (0, 0, 0), mm: bool = False) -> np.ndarray:
    """Write the region of class `cls` of another label map (`source` on `source_affine`) into
    this one, then shifted by `shift` (voxels, or world mm with `mm`). A source on another grid is
    resampled onto this one (nearest neighbour through both affines)."""
    from medlsdm.data.geometry import resample_to_grid

    source_mask = np.asarray(source) == cls
    if not source_mask.any():
        raise DataError(f"class {cls} is not in the pasted label map")
    same_grid = source_mask.shape == label.shape and np.allclose(source_affine, affine, atol=1e-3)
    if not same_grid:
        source_mask = resample_to_grid(source_mask.astype(np.uint8), source_affine, affine, label.shape, order=0) > 0
        if not source_mask.any():
            raise DataError(f"class {cls} of the pasted label map lies outside this label map's grid")
    new = _shift_mask(source_mask, voxel_shift(affine, shift, mm))
    if not new.any():
        raise DataError(f"the pasted class {cls} would leave the grid entirely")
    out = label.copy()
    out[new] = cls
    return out


def replace_class(label: np.ndarray, affine: np.ndarray, old: int, new: int) -> np.ndarray:
    """Relabel every voxel of class `old` as `new`."""
    if int(new) != new or new < 0:
        raise DataError(f"the new class must be a non-negative whole number, got {new}")
    mask = _class_mask(label, old)
    out = label.copy()
    if new > np.iinfo(out.dtype).max:
        out = out.astype(np.int32)
    out[mask] = new
    return out


OPERATIONS = {"move": move_class, "scale": scale_class, "dilate": dilate_class, "erode": erode_class,
              "paste": paste_class, "replace": replace_class}


# ------------------------------------------------------------------------------ edit lists


@dataclass(frozen=True)
class Edit:
    """One step of `apply_edits`: `op` is a key of `OPERATIONS` and `params` the keyword arguments
    of its function besides the label map and affine (e.g. ``Edit("move", {"cls": 1, "shift":
    (2, 0, 0)})``; for "paste", ``source`` and ``source_affine``)."""

    op: str
    params: Mapping = field(default_factory=dict)

    def describe(self) -> str:
        shown = {k: v for k, v in self.params.items()
                 if k not in ("source", "source_affine") and v is not None and v is not False}
        return f"{self.op} " + ", ".join(f"{k}={tuple(v) if isinstance(v, (list, np.ndarray)) else v}"
                                         for k, v in shown.items())


def apply_edits(volume: Volume, edits: Sequence[Edit], table: LabelTable | None = None) -> Volume:
    """Apply `edits` in order to a label map; the result may hold only known classes (those of
    `table`, or else those of the input and background 0) and keeps the input's grid and affine."""
    source = volume.path or "label map"
    if np.asarray(volume.array).ndim != 3:
        raise DataError(f"{source}: a label map must be 3D, got shape {np.asarray(volume.array).shape}")
    label = validate_label_map(volume.array, table, source=source)
    # Background 0 is always a class: the default fill falls back to it.
    known = set(table.values) if table is not None else set(np.unique(label).tolist()) | {0}
    for edit in edits:
        if edit.op not in OPERATIONS:
            raise DataError(f"unknown label edit '{edit.op}' (known: {', '.join(OPERATIONS)})")
        try:
            label = OPERATIONS[edit.op](label, volume.affine, **edit.params)
        except DataError as exc:
            raise DataError(f"{source}: {edit.describe()}: {exc}") from None
        unknown = sorted(set(np.unique(label).tolist()) - known)
        if unknown:
            where = "the label table" if table is not None else "the input label map (give --table to allow more)"
            raise DataError(f"{source}: {edit.describe()}: class(es) {unknown} not in {where}: {sorted(known)}")
    label = validate_label_map(label, table, source=source)
    return Volume(array=label, affine=np.array(volume.affine, dtype=np.float64), path=None)
