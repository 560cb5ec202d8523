"""What a prepared training set looks like, recorded with every trained model so that sampling
can put new label maps where the model has seen data and say when a map is unlike them.

- `training_geometry`: voxel size (D, H, W) mm, window shape and axes (direction cosines in model
  layout) of the prepared training cases.
- `label_statistics` / `class_statistics`: per class, in how many training maps it appears, its
  share of the labelled (non-background) volume and its extent in mm along D, H, W.
- `scheme_warnings`: the ways one prepared label map falls far outside those statistics.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

DIRECTION_TOLERANCE = 1e-3   # direction cosines closer than this count as the same axes
FRACTION_FACTOR = 4.0        # a class share this many times outside the training range is "far off"
EXTENT_FACTOR = 2.0          # likewise for a class's extent in mm


def _directions(affine: np.ndarray) -> np.ndarray:
    return affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)


def training_geometry(affines: Sequence[np.ndarray], shapes: Sequence[Sequence[int]]) -> dict | None:
    """Median spacing (D, H, W) mm, the most common window shape and — when every case shares
    them — the direction cosines (model layout) of the prepared training grids; None without
    cases."""
    if not affines:
        return None
    affines = [np.asarray(a, dtype=np.float64) for a in affines]
    spacing = np.median([np.linalg.norm(a[:3, :3], axis=0) for a in affines], axis=0)
    shape_list = [tuple(int(s) for s in shape) for shape in shapes]
    shape = max(set(shape_list), key=shape_list.count)
    first = _directions(affines[0])
    same = all(np.allclose(_directions(a), first, atol=DIRECTION_TOLERANCE) for a in affines)
    return {
        "spacing": [float(s) for s in spacing],
        "shape": list(shape),
        "directions": first.round(6).tolist() if same else None,
        "layout": "model layout (D, H, W) = (inferior->superior, posterior->anterior, left->right)",
    }


def label_statistics(label: np.ndarray, spacing: Sequence[float], num_classes: int) -> dict[int, dict]:
    """Per class present in `label` (D, H, W): share of the labelled volume and extent in mm."""
    label = np.asarray(label)
    counts = np.bincount(label.ravel(), minlength=num_classes)
    labelled = max(int(counts[1:].sum()), 1)
    out = {}
    for value in range(1, num_classes):
        if counts[value] == 0:
            continue
        idx = np.argwhere(label == value)
        extent = (idx.max(axis=0) - idx.min(axis=0) + 1) * np.asarray(spacing, dtype=np.float64)
        out[value] = {"fraction": float(counts[value] / labelled), "extent_mm": [float(e) for e in extent]}
    return out


def class_statistics(labels: Iterable[np.ndarray], spacings: Iterable[Sequence[float]], num_classes: int) -> dict:
    """Summary over training label maps: ``{"maps": N, "classes": {value: {"present": share of
    maps, "fraction": [min, median, max], "extent_mm": [[min D, H, W], [max D, H, W]]}}}``."""
    per_class: dict[int, list[dict]] = {v: [] for v in range(1, num_classes)}
    n = 0
    for label, spacing in zip(labels, spacings):
        n += 1
        for value, stats in label_statistics(label, spacing, num_classes).items():
            per_class[value].append(stats)
    classes = {}
    for value, items in per_class.items():
        entry = {"present": len(items) / n if n else 0.0}
        if items:
            fractions = [s["fraction"] for s in items]
            extents = np.array([s["extent_mm"] for s in items])
            entry["fraction"] = [float(np.min(fractions)), float(np.median(fractions)), float(np.max(fractions))]
            entry["extent_mm"] = [extents.min(axis=0).tolist(), extents.max(axis=0).tolist()]
        classes[str(value)] = entry
    return {"maps": n, "classes": classes}


def training_summary(root, manifest: Mapping) -> dict:
    """``{"training_geometry": ..., "class_statistics": ..., "appearance": ...}`` of the training
    cases of the prepared dataset in `root` (every case when it has no training split), for a run's
    sidecar. ``appearance`` (`medlsdm.data.appearance.appearance_profile`) is left out, with a log
    line, when the label maps have fewer than two foreground classes to measure it with."""
    import logging
    from pathlib import Path

    from medlsdm.data.appearance import appearance_profile
    from medlsdm.errors import DataError

    cases = [c for c in manifest.get("cases", []) if c.get("split") == "train"] or list(manifest.get("cases", []))
    affines = [np.asarray(c["record"]["affine"], dtype=np.float64) for c in cases]
    labels = [np.load(Path(root) / c["label"], mmap_mode="r", allow_pickle=False) for c in cases]
    shapes = [label.shape[-3:] for label in labels]
    num_classes = len(manifest["label_table"])
    spacings = [np.linalg.norm(a[:3, :3], axis=0) for a in affines]
    out = {"training_geometry": training_geometry(affines, shapes),
           "class_statistics": class_statistics(labels, spacings, num_classes)}
    try:
        images = [np.load(Path(root) / c["image"], mmap_mode="r", allow_pickle=False) for c in cases]
        out["appearance"] = appearance_profile(images, labels, str(manifest.get("modality", "mr")))
    except DataError as exc:
        logging.getLogger(__name__).info("no appearance profile: %s", exc)
    return out


def scheme_warnings(label: np.ndarray, spacing: Sequence[float], statistics: Mapping, names: Mapping[int, str]
                    ) -> list[str]:
    """How a prepared label map falls far outside the training maps' statistics: a class no
    training map had, a class every training map had that is missing, a class whose share of the
    labelled volume or whose extent is off by more than `FRACTION_FACTOR` / `EXTENT_FACTOR`."""
    classes = statistics.get("classes", {})
    found = label_statistics(label, spacing, len(classes) + 1)
    problems = []
    for key, train in sorted(classes.items(), key=lambda kv: int(kv[0])):
        value = int(key)
        name = f"class {value} ({names.get(value, '?')})"
        stats = found.get(value)
        if stats is None:
            if train["present"] >= 1.0:
                problems.append(f"{name} is missing, but every training map had it")
            continue
        if train["present"] == 0.0:
            problems.append(f"{name} never appeared in the training maps")
            continue
        lo, _, hi = train["fraction"]
        if stats["fraction"] < lo / FRACTION_FACTOR or stats["fraction"] > hi * FRACTION_FACTOR:
            problems.append(f"{name} is {100 * stats['fraction']:.1f}% of the labelled volume "
                            f"(training maps: {100 * lo:.1f}-{100 * hi:.1f}%)")
        emin, emax = (np.asarray(e) for e in train["extent_mm"])
        extent = np.asarray(stats["extent_mm"])
        if np.any(extent > emax * EXTENT_FACTOR) or np.any(extent < emin / EXTENT_FACTOR):
            problems.append(f"{name} spans {' x '.join(f'{e:.0f}' for e in extent)} mm "
                            f"(training maps: {' x '.join(f'{a:.0f}-{b:.0f}' for a, b in zip(emin, emax))} mm)")
    return problems
