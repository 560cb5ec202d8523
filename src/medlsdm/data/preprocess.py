"""Invertible preprocessing: reorient -> resample -> crop/pad (or resize) -> normalise -> remap.

Spec `shape` and `spacing` are in MODEL LAYOUT (D, H, W) = (Z, Y, X) of the canonical RAS array:
D = inferior->superior (axial slice index), H = posterior->anterior, W = left->right.

Every prepared case comes with a JSON-serialisable `record` holding what the inverse needs:
the original grid and orientation, the prepared grid's affine (`prepared_affine(record)` maps
(d, h, w) indices to world, so ``write_nifti(path, prepared, prepared_affine(record))`` lands
in the right place), the crop offset, the per-channel normalisation and the label mapping.
Inversion goes prepared grid -> (integer un-crop, or one `resample_to_grid`) -> canonical grid
in model layout -> transpose -> `from_canonical`; without resampling it is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence, TypedDict

import numpy as np

from medlsdm.data.geometry import (aligned_grid, from_canonical, resample_labels, resample_to_grid, resampled_grid,
                                    resized_grid, to_canonical)
from medlsdm.data.io import Volume, check_same_grid
from medlsdm.data.labels import LabelTable, label_dtype, remap, validate_label_map
from medlsdm.errors import ConfigError, DataError

PREPROCESS_DEFAULTS = {
    "spacing": None,  # mm, one value or (D, H, W); None keeps the original spacing
    "shape": None,  # voxels, one value or (D, H, W); None keeps the (resampled) shape
    "shape_mode": "crop_pad",  # crop_pad: around the label foreground; resize: resample to `shape`
    "image_interpolation": "linear",  # linear | bspline | nearest
    "antialias": True,  # Gaussian pre-smoothing of images when resampling to a coarser grid
    "modality": "mr",  # mr: percentile clipping; ct: HU window
    "mr_percentiles": [0.5, 99.5],
    "ct_window": [-1000.0, 1000.0],
    "label_mapping": None,  # {raw value: prepared value}; keys may be strings (YAML/JSON)
}
INTERPOLATION_ORDERS = {"nearest": 0, "linear": 1, "bspline": 3}
MODEL_FROM_VOXEL = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
"""(d, h, w) = (k, j, i): the model-layout affine is ``canonical_affine @ MODEL_FROM_VOXEL``."""


# ------------------------------------------------------------------------------------- spec


def _three(value, name: str, cast) -> list | None:
    if value is None:
        return None
    values = [value] * 3 if np.isscalar(value) else list(value)
    try:
        values = [cast(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(f"preprocessing {name}: expected one or three numbers, got {value!r}") from None
    if len(values) != 3 or any(v <= 0 for v in values):
        raise ConfigError(f"preprocessing {name}: expected one or three positive numbers, got {value!r}")
    return values


def resolve_spec(spec: Mapping | None) -> dict:
    """Defaults merged with `spec`, checked; unknown keys and bad values are ConfigErrors."""
    spec = dict(spec or {})
    unknown = sorted(set(spec) - set(PREPROCESS_DEFAULTS))
    if unknown:
        raise ConfigError(f"preprocessing: unknown keys {unknown} (known: {sorted(PREPROCESS_DEFAULTS)})")
    out = {**PREPROCESS_DEFAULTS, **spec}
    out["spacing"] = _three(out["spacing"], "spacing", float)
    out["shape"] = _three(out["shape"], "shape", int)
    if out["shape_mode"] not in ("crop_pad", "resize"):
        raise ConfigError(f"preprocessing shape_mode: expected crop_pad or resize, got {out['shape_mode']!r}")
    if out["shape_mode"] == "resize" and out["spacing"] is not None:
        # resize sets the spacing from the extent and the shape; both would double-interpolate.
        raise ConfigError("preprocessing: shape_mode resize sets the spacing itself; set spacing to null")
    if out["image_interpolation"] not in INTERPOLATION_ORDERS:
        raise ConfigError(f"preprocessing image_interpolation: expected one of {list(INTERPOLATION_ORDERS)}, "
                          f"got {out['image_interpolation']!r}")
    if out["modality"] not in ("mr", "ct"):
        raise ConfigError(f"preprocessing modality: expected mr or ct, got {out['modality']!r}")
    for key in ("mr_percentiles", "ct_window"):
        pair = [float(v) for v in out[key]]
        if len(pair) != 2 or not pair[0] < pair[1] or (key == "mr_percentiles" and not 0 <= pair[0] < pair[1] <= 100):
            raise ConfigError(f"preprocessing {key}: expected [low, high] with low < high, got {out[key]!r}")
        out[key] = pair
    if out["label_mapping"] is not None:
        try:
            out["label_mapping"] = {int(k): int(v) for k, v in dict(out["label_mapping"]).items()}
        except (TypeError, ValueError):
            raise ConfigError(f"preprocessing label_mapping: keys and values must be integers, "
                              f"got {out['label_mapping']!r}") from None
    return out


# ---------------------------------------------------------------------------------- record


class OriginalGrid(TypedDict, total=False):
    """The file a case came from: its grid and (for prepare) where it was."""

    shape: list[int]                # spatial shape (X, Y, Z) of the file
    affine: list[list[float]]       # 4x4 voxel -> world RAS mm
    path: str | None                # label file (relative in manifests)
    image_path: str | None


class CaseRecord(TypedDict, total=False):
    """What inverting a prepared case needs (JSON-serialisable; stored per case in manifest.json
    and built for every label map at sampling). `check_record` validates one read from a file."""

    original: OriginalGrid
    ornt: list[list[float]]         # nibabel orientation of the file's axes to canonical RAS
    canonical_shape: list[int]      # (D, H, W) of the reoriented original, in model layout
    canonical_affine: list[list[float]]
    resampled: bool                 # False: crop/pad only (exactly invertible)
    resampled_shape: list[int]      # (D, H, W) of the grid at the target spacing, before the window
    crop_start: list[int]           # window start on that grid (negative: padded)
    foreground_clipped: bool        # the window cut labelled voxels
    shape: list[int]                # (D, H, W) of the prepared arrays
    affine: list[list[float]]       # prepared (d, h, w) -> world RAS mm
    normalisation: dict | None      # per-channel {"lo", "hi", "min"} and modality; None for label maps
    label_mapping: dict[str, int] | None   # raw value -> prepared class
    channel_names: list[str] | None
    source: dict                    # prepare: the case's files, relative to the dataset root


REQUIRED_RECORD_KEYS = {"ornt": list, "canonical_shape": list, "canonical_affine": list, "resampled": bool,
                        "crop_start": list, "shape": list, "affine": list}


def check_record(record: Mapping, where: str) -> CaseRecord:
    """A record read from a file, checked for what inversion needs; a DataError names the key."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: a case record must be a JSON object, got {type(record).__name__}")
    for key, kind in REQUIRED_RECORD_KEYS.items():
        if key not in record:
            raise DataError(f"{where}: case record has no '{key}'")
        if not isinstance(record[key], kind):
            raise DataError(f"{where}: case record '{key}' must be a {kind.__name__}, got {record[key]!r:.60}")
    for key in ("affine", "canonical_affine"):
        if np.asarray(record[key], dtype=float).shape != (4, 4):
            raise DataError(f"{where}: case record '{key}' must be a 4x4 matrix")
    return record  # type: ignore[return-value]


def grid_record(shape: Sequence[int], spacing: Sequence[float]) -> CaseRecord:
    """The record of a volume generated with no label map: the prepared grid itself at `spacing`
    (D, H, W) mm, axes (D, H, W) = (S, A, R), written back as canonical RAS (X, Y, Z)."""
    canonical = np.diag([float(spacing[2]), float(spacing[1]), float(spacing[0]), 1.0])   # (X, Y, Z) = (W, H, D)
    affine = (canonical @ MODEL_FROM_VOXEL).tolist()
    shape = [int(s) for s in shape]
    return {"shape": shape, "canonical_shape": shape, "canonical_affine": affine, "affine": affine,
            "resampled": False, "crop_start": [0, 0, 0], "ornt": [[0, 1], [1, 1], [2, 1]], "normalisation": None}


# --------------------------------------------------------------------------------- geometry


def to_model_layout(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canonical RAS, then (X, Y, Z) -> (Z, Y, X) with the affine's columns permuted alongside."""
    canonical, canonical_affine, ornt = to_canonical(array, affine)
    model = np.ascontiguousarray(np.swapaxes(canonical, -1, -3))
    return model, canonical_affine @ MODEL_FROM_VOXEL, ornt


def volume_in_model_layout(volume) -> np.ndarray:
    """A loaded `Volume`'s array in canonical RAS model layout (C,)D, H, W (pictures, summaries)."""
    return to_model_layout(np.asarray(volume.array), volume.affine)[0]


def _from_model_layout(array: np.ndarray, model_affine: np.ndarray, ornt) -> tuple[np.ndarray, np.ndarray]:
    canonical = np.ascontiguousarray(np.swapaxes(array, -1, -3))
    return from_canonical(canonical, model_affine @ MODEL_FROM_VOXEL, ornt)


def _crop_pad(array: np.ndarray, start: Sequence[int], shape: Sequence[int], fill) -> np.ndarray:
    """Window of `shape` starting at `start` (may be negative or run past the end: padded with
    `fill`, one value or one per channel). Integer slicing, so it is exact and its own inverse
    with ``-start``."""
    lead = array.shape[:-3]
    fill = np.broadcast_to(np.asarray(fill, dtype=array.dtype), lead) if lead else np.asarray(fill, dtype=array.dtype)
    out = np.empty(lead + tuple(shape), dtype=array.dtype)
    out[...] = fill.reshape(lead + (1, 1, 1)) if lead else fill
    src, dst = [], []
    for s, n, size in zip(start, shape, array.shape[-3:]):
        lo, hi = max(s, 0), min(s + n, size)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[(Ellipsis, *dst)] = array[(Ellipsis, *src)]
    return out


def _crop_start(label: np.ndarray, shape: Sequence[int], source: str) -> tuple[list[int], bool]:
    """Window start centred on the label foreground's bounding box, kept inside the volume where
    the volume is large enough (so no voxel is padded that could have been kept); a volume
    smaller than `shape` on an axis is padded evenly. Also returns whether foreground is cut."""
    foreground = np.argwhere(label > 0)
    if foreground.size == 0:
        raise DataError(f"{source}: label map has no foreground, so there is nothing to centre the crop on")
    lo, hi = foreground.min(axis=0), foreground.max(axis=0)
    start = []
    for axis, (n, size) in enumerate(zip(shape, label.shape)):
        if size <= n:
            s = -((n - size) // 2)
        else:
            s = int(np.floor((lo[axis] + hi[axis]) / 2.0 - (n - 1) / 2.0 + 0.5))
            s = min(max(s, 0), size - n)
        start.append(int(s))
    clipped = any(l < s or h >= s + n for l, h, s, n in zip(lo, hi, start, shape))
    return start, bool(clipped)


@dataclass(frozen=True)
class SamplingGrid:
    """Where a label map given at sampling time is put for a model (see `preprocess_label_map`).

    ``spacing`` (D, H, W) mm and ``directions`` (3x3 direction cosines in model layout, None to
    keep the map's own) are the training data's; ``shape`` is the training window. With
    ``cover``, a foreground larger than ``shape`` gets a larger window (a multiple of
    ``multiple`` voxels per axis) instead of being cut."""

    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    directions: tuple[tuple[float, ...], ...] | None = None
    cover: bool = True
    multiple: tuple[int, int, int] = (1, 1, 1)


def _covering_shape(label: np.ndarray, shape: Sequence[int], multiple: Sequence[int]) -> tuple[int, ...]:
    """`shape`, grown per axis (to a multiple of `multiple`) where the foreground's bounding box
    is larger."""
    foreground = np.argwhere(label > 0)
    if foreground.size == 0:
        return tuple(int(s) for s in shape)
    extent = foreground.max(axis=0) - foreground.min(axis=0) + 1
    return tuple(int(n) if e <= n else int(-(-e // m) * m) for e, n, m in zip(extent, shape, multiple))


def _plan_geometry(label_model: np.ndarray, model_affine: np.ndarray, spec: dict, source: str,
                   grid: SamplingGrid | None = None) -> dict:
    """Target grid (resampled affine/shape) and crop start, from the label map in model layout."""
    shape = tuple(label_model.shape)
    if spec["shape_mode"] == "resize" and spec["shape"] is not None:
        grid_affine, grid_shape = resized_grid(model_affine, shape, spec["shape"]), tuple(spec["shape"])
    elif grid is not None and grid.directions is not None:
        grid_affine, grid_shape = aligned_grid(model_affine, shape, np.asarray(grid.directions), spec["spacing"])
    elif spec["spacing"] is not None:
        grid_affine, grid_shape = resampled_grid(model_affine, shape, spec["spacing"])
    else:
        grid_affine, grid_shape = model_affine, shape
    resampled = grid_shape != shape or not np.allclose(grid_affine, model_affine, atol=1e-6)
    if not resampled:
        grid_affine = model_affine
    grid_label = resample_labels(label_model, model_affine, grid_affine, grid_shape) if resampled else label_model
    if spec["shape"] is not None and spec["shape_mode"] == "crop_pad":
        window = tuple(spec["shape"])
        if grid is not None and grid.cover:
            window = _covering_shape(grid_label, window, grid.multiple)
        start, clipped = _crop_start(grid_label, window, source)
        out_shape = window
    else:
        start, clipped, out_shape = [0, 0, 0], False, grid_shape
    prepared = grid_affine.copy()
    prepared[:3, 3] += grid_affine[:3, :3] @ np.asarray(start, dtype=np.float64)
    return {
        "canonical_shape": [int(s) for s in shape],
        "canonical_affine": model_affine.tolist(),
        "resampled": bool(resampled),
        "resampled_shape": [int(s) for s in grid_shape],
        "crop_start": start,
        "foreground_clipped": clipped,
        "shape": [int(s) for s in out_shape],
        "affine": prepared.tolist(),
        "_grid_affine": grid_affine,
        "_grid_label": grid_label,
    }


def _geometry_record(label: Volume, spec: dict, grid: SamplingGrid | None = None) -> tuple[CaseRecord, np.ndarray]:
    """Reorient/resample/crop the label map; returns the geometry record and the prepared map."""
    label_model, model_affine, ornt = to_model_layout(np.asarray(label.array), label.affine)
    plan = _plan_geometry(label_model, model_affine, spec, str(label.path), grid)
    grid_label = plan.pop("_grid_label")
    plan.pop("_grid_affine")
    record = {
        "original": {"shape": [int(s) for s in label.spatial_shape], "affine": np.asarray(label.affine).tolist(),
                     "path": None if label.path is None else str(label.path)},
        "ornt": np.asarray(ornt).tolist(),
        **plan,
    }
    return record, _crop_pad(grid_label, record["crop_start"], record["shape"], 0)


def prepared_affine(record: Mapping) -> np.ndarray:
    """Affine mapping prepared (d, h, w) indices to world RAS mm."""
    return np.asarray(record["affine"], dtype=np.float64)


# ---------------------------------------------------------------------------------- labels


def _apply_mapping(label: np.ndarray, spec: dict, source: str, only_if_all_keys: bool) -> tuple[np.ndarray, dict | None]:
    mapping = spec["label_mapping"]
    if mapping is None:
        return label, None
    if only_if_all_keys and not set(np.unique(label).tolist()) <= set(mapping):
        return label, None
    return remap(label, mapping, source=source), {str(k): int(v) for k, v in mapping.items()}


def _finish_label(label: np.ndarray, table: LabelTable | None, source: str) -> np.ndarray:
    out = validate_label_map(label, table, source=source)
    if out.dtype != np.uint8:
        raise DataError(f"{source}: prepared label values must be below 256 (max {int(out.max())}); set a label_mapping")
    return out


# ------------------------------------------------------------------------------- intensity


def _normalise(image: np.ndarray, spec: dict, minimum: Sequence[float]) -> tuple[np.ndarray, dict]:
    """Per channel: clip to [lo, hi] and map linearly to [-1, 1]. MR: lo/hi are percentiles of
    the voxels above the channel's minimum (the head/body; MR background is usually the
    minimum, often 0), or of the whole volume when there are none. Not the label foreground:
    a small label (a tumour) would clip the rest of the anatomy flat. `minimum` (the original
    image's per-channel minimum) is stored to fill what lies outside the crop on inversion."""
    out = np.empty(image.shape, dtype=np.float32)
    channels = []
    for c, channel in enumerate(image):
        if spec["modality"] == "ct":
            lo, hi = spec["ct_window"]
        else:
            body = channel[channel > channel.min()]
            lo, hi = (float(v) for v in np.percentile(body if body.size else channel, spec["mr_percentiles"]))
            if hi <= lo:  # constant channel: any positive range maps it to -1
                hi = lo + 1.0
        # The final clip guards the [-1, 1] contract against float rounding at hi.
        out[c] = np.clip(2.0 * (np.clip(channel, lo, hi) - lo) / (hi - lo) - 1.0, -1.0, 1.0)
        channels.append({"lo": float(lo), "hi": float(hi), "min": float(minimum[c])})
    return out, {"modality": spec["modality"], "channels": channels}


def _denormalise(array: np.ndarray, normalisation: Mapping) -> np.ndarray:
    """[-1, 1] -> [lo, hi] per channel; NaN voxels (outside the prepared region) get the
    channel's original minimum (its lower clip value for records that predate storing it)."""
    channels = normalisation["channels"]
    if len(channels) not in (1, array.shape[0]):
        raise DataError(f"cannot undo the normalisation: {array.shape[0]} image channels but {len(channels)} "
                        f"normalisation entries")
    out = np.empty(array.shape, dtype=np.float32)
    for c in range(array.shape[0]):
        entry = channels[c if len(channels) > 1 else 0]
        out[c] = (array[c] + 1.0) / 2.0 * (entry["hi"] - entry["lo"]) + entry["lo"]
        out[c][np.isnan(out[c])] = entry.get("min", entry["lo"])
    return out


def intensity_summary(records: Sequence[Mapping]) -> dict:
    """Typical normalisation (median lo and hi per channel over `records`, e.g. the training
    cases), for inverting images generated from label maps alone."""
    norms = [r["normalisation"] for r in records if r.get("normalisation")]
    if not norms:
        raise DataError("no case records with an intensity normalisation to summarise")
    num = len(norms[0]["channels"])
    keys = [k for k in ("lo", "hi", "min") if all(k in n["channels"][c] for n in norms for c in range(num))]
    channels = [{key: float(np.median([n["channels"][c][key] for n in norms])) for key in keys}
                for c in range(num)]
    return {"modality": norms[0]["modality"], "channels": channels}


# ------------------------------------------------------------------------------ public API


def preprocess_case(image: Volume, label: Volume, spec: Mapping, table: LabelTable | None = None
                    ) -> tuple[np.ndarray, np.ndarray, CaseRecord]:
    """-> image float32 (C, D, H, W) in [-1, 1], label uint8 (D, H, W), JSON-serialisable record."""
    spec = resolve_spec(spec)
    check_same_grid(image, label, what="image and label map")
    source = str(label.path)
    record, prepared_label = _geometry_record(label, spec)
    array = np.asarray(image.array, dtype=np.float32)
    array = array if array.ndim == 4 else array[None]
    model, model_affine, _ = to_model_layout(array, image.affine)
    if record["resampled"]:
        model = resample_to_grid(model, model_affine, resampled_affine(record), record["resampled_shape"],
                                 order=INTERPOLATION_ORDERS[spec["image_interpolation"]], cval=0.0,
                                 antialias=spec["antialias"])
    # Padding with each channel's minimum makes the padded voxels -1 after normalisation.
    minimum = model.reshape(model.shape[0], -1).min(axis=1)
    model = _crop_pad(model, record["crop_start"], record["shape"], minimum)
    prepared_image, record["normalisation"] = _normalise(model, spec, array.min(axis=(1, 2, 3)))
    prepared_label, record["label_mapping"] = _apply_mapping(prepared_label, spec, source, only_if_all_keys=False)
    record["channel_names"] = image.channel_names
    record["original"]["image_path"] = None if image.path is None else str(image.path)
    return prepared_image, _finish_label(prepared_label, table, source), record


def preprocess_label_map(label: Volume, spec: Mapping, table: LabelTable | None = None,
                         grid: SamplingGrid | None = None) -> tuple[np.ndarray, CaseRecord]:
    """Label map alone (sampling): the same geometry; the record has no normalisation.

    Label maps given at sampling time may already hold prepared values, so `label_mapping` is
    applied only when the spec has one and every value present is one of its keys (raw values);
    otherwise the map is used as it is (and `invert_label` leaves its values alone too).
    `grid` (a `SamplingGrid`): resample to the training spacing (and axes) and cover the whole
    foreground; its spacing replaces the spec's.
    """
    spec = resolve_spec(spec)
    if grid is not None and spec["shape_mode"] == "crop_pad":
        spec = {**spec, "spacing": [float(s) for s in grid.spacing], "shape": [int(s) for s in grid.shape]}
    elif grid is not None:
        grid = None   # resize: the spec's own rule (whole extent to `shape`) is the training geometry
    if np.asarray(label.array).ndim != 3:
        raise DataError(f"{label.path}: a label map must be 3D, got shape {np.asarray(label.array).shape}")
    source = str(label.path)
    record, prepared = _geometry_record(label, spec, grid)
    prepared, record["label_mapping"] = _apply_mapping(prepared, spec, source, only_if_all_keys=True)
    record["normalisation"] = None
    return _finish_label(prepared, table, source), record


def resampled_affine(record: Mapping) -> np.ndarray:
    """Affine of the resampled grid before cropping (= prepared affine without the crop offset)."""
    affine = prepared_affine(record)
    affine[:3, 3] -= affine[:3, :3] @ np.asarray(record["crop_start"], dtype=np.float64)
    return affine


def _to_original_grid(array: np.ndarray, record: Mapping, order: int, fill) -> tuple[np.ndarray, np.ndarray]:
    """(C, D, H, W) on the prepared grid -> (C, X, Y, Z) on the original grid, and its affine."""
    check_record(record, "cannot map the volume back to its original grid")
    canonical_shape = record["canonical_shape"]
    canonical_affine = np.asarray(record["canonical_affine"], dtype=np.float64)
    if list(array.shape[-3:]) != list(record["shape"]):
        raise DataError(f"array of spatial shape {tuple(array.shape[-3:])} does not match the prepared "
                        f"shape {tuple(record['shape'])} of its record")
    if record["resampled"]:
        model = resample_to_grid(array, prepared_affine(record), canonical_affine, canonical_shape,
                                 order=order, cval=fill, margin=0.5)  # rim lost to rounding the grid shape
    else:  # crop/pad only: integer un-crop, exact
        model = _crop_pad(array, [-s for s in record["crop_start"]], canonical_shape, fill)
    out, affine = _from_model_layout(model, canonical_affine, record["ornt"])
    return out, affine


def invert_image(array: np.ndarray, record: Mapping, intensity: Mapping | None = None,
                 interpolation: str = "linear") -> Volume:
    """(C, D, H, W) or (D, H, W) in [-1, 1] -> Volume on the original grid, affine and
    orientation, in original intensities (the record's normalisation, or `intensity` when
    given, e.g. `intensity_summary` of training records for label-map-only records). Voxels
    outside the prepared region get each channel's original minimum."""
    array = np.asarray(array, dtype=np.float32)
    array = array[None] if array.ndim == 3 else array
    if not np.all(np.isfinite(array)):  # NaN below marks "outside"; a NaN from a model must not hide there
        raise DataError("the image to invert contains NaN or Inf values")
    normalisation = intensity if intensity is not None else record.get("normalisation")
    if normalisation is None:
        raise DataError("this record has no intensity normalisation (label-map-only); pass `intensity`")
    # NaN marks the voxels outside the prepared region; _denormalise fills them per channel.
    out, affine = _to_original_grid(array, record, INTERPOLATION_ORDERS[interpolation], np.nan)
    out = _denormalise(out, normalisation)
    names = record.get("channel_names")
    return Volume(array=out[0] if out.shape[0] == 1 else out, affine=affine, path=None,
                  channel_names=names if names and len(names) == out.shape[0] else None)


def invert_label(array: np.ndarray, record: Mapping) -> Volume:
    """(D, H, W) prepared label map -> Volume on the original grid (nearest neighbour), with
    the label mapping undone (a value several raw values mapped to goes back to the smallest)."""
    array = np.asarray(array)
    array = array[0] if array.ndim == 4 else array
    out, affine = _to_original_grid(array.astype(np.int64), record, order=0, fill=0)
    mapping = record.get("label_mapping")
    if mapping:
        inverse = {}
        for raw, new in sorted(((int(k), int(v)) for k, v in mapping.items()), reverse=True):
            inverse[new] = raw
        inverse.setdefault(0, 0)  # background filled outside the crop
        out = remap(out, inverse, source="prepared label map")
    out = out.astype(label_dtype(out, "prepared label map"))  # exact: never a narrowing cast
    return Volume(array=out, affine=affine, path=None)
