"""``medlsdm evaluate privacy`` on folders: read the training and synthetic volumes, run
``evaluation.privacy.privacy_audit``, write OUT/privacy.json and the report's pictures.

Volumes are copied once into float32 arrays under OUT/cache (``np.lib.format.open_memmap``) and
handed to the audit memory-mapped, so a large cohort is read from its (compressed) files once
and never held in memory whole. All volumes must share one grid size, channel count and voxel
spacing (origins may differ between patients); the audit compares voxel i of one volume with
voxel i of another.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from medlsdm.errors import DataError, MedlsdmError
from medlsdm.evaluation.metrics import json_safe
from medlsdm.evaluation.pairing import (VolumeFiles, load_image, load_label, refuse_same_folder,
                                        scan_folder)
from medlsdm.evaluation.privacy import privacy_audit

__all__ = ["audit_folders", "stack_volumes"]


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)


def stack_volumes(files: Sequence[VolumeFiles], path: Path, reference: tuple | None = None,
                  progress: bool = False, desc: str = "reading") -> tuple[np.ndarray, tuple]:
    """All volumes into one (N, C, X, Y, Z) float32 .npy at ``path``, opened memory-mapped
    copy-on-write (the file is never changed; torch warns about read-only arrays).
    ``reference`` = (shape, spacing, name) every volume must match (the first volume's when
    None); returns (array, reference)."""
    from tqdm.auto import tqdm

    out = None
    for i, f in enumerate(tqdm(files, desc=desc, disable=not progress, leave=False)):
        arr, affine = load_image(f)
        if reference is None:
            reference = (arr.shape, _spacing(affine), f.display)
        shape, spacing, ref_name = reference
        if arr.shape != tuple(shape):
            raise DataError(f"volumes must share one grid: {f.display} has shape {arr.shape} "
                            f"(channels first), {ref_name} has {tuple(shape)}")
        if not np.allclose(_spacing(affine), spacing, rtol=1e-3, atol=1e-4):
            raise DataError(f"volumes must share one grid: {f.display} has spacing "
                            f"{np.round(_spacing(affine), 4).tolist()}, {ref_name} has {np.round(spacing, 4).tolist()}")
        if out is None:
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(files), *arr.shape))
        out[i] = arr
    out.flush()
    del out
    return np.load(path, mmap_mode="c"), reference


def _foreground_union(files: Sequence[VolumeFiles], shape: tuple) -> np.ndarray:
    missing = [f.name for f in files if f.label is None]
    if missing:
        raise DataError(f"--mask foreground needs the training label maps: none for {', '.join(missing[:5])} "
                        f"(use the images/ + labels/ layout)")
    union = np.zeros(shape[-3:], dtype=bool)
    for f in files:
        label, _ = load_label(f.label)
        if label.shape != union.shape:
            raise DataError(f"{f.label}: label map shape {label.shape} differs from the images {union.shape}")
        union |= label > 0
    return union


def audit_folders(train: str | os.PathLike, synthetic: str | os.PathLike, out_dir: str | os.PathLike, *,
                  similarity: str = "ncc", quantile: float | None = None, mask: str | None = None,
                  figures: bool = True, progress: bool = True, n_closest: int = 3) -> dict:
    """Memorisation audit of the synthetic folder against the training folder; writes
    OUT/privacy.json and figures; returns the audit dict.

    ``mask="foreground"``: compare voxels inside the union of the training label maps' foreground.
    SSIM similarity uses the training volumes' global max - min as data range. Repeat scans of
    one subject (when the layout gives subject IDs) are not compared with each other.
    """
    from medlsdm.files import ensure_writable_dir, write_json

    if mask not in (None, "foreground"):
        raise MedlsdmError(f"--mask: only 'foreground' is supported, got {mask!r}")
    refuse_same_folder(train=train, synthetic=synthetic)
    out_dir = ensure_writable_dir(out_dir)
    cache = ensure_writable_dir(out_dir / "cache")
    train_files = list(scan_folder(train, "training volumes").values())
    syn_files = list(scan_folder(synthetic, "synthetic volumes").values())
    train_arr, ref = stack_volumes(train_files, cache / "privacy_train.npy", progress=progress, desc="training volumes")
    syn_arr, _ = stack_volumes(syn_files, cache / "privacy_synthetic.npy", ref, progress, "synthetic volumes")
    fg = _foreground_union(train_files, ref[0]) if mask == "foreground" else None
    data_range = None
    if similarity == "ssim":
        data_range = float(np.max(train_arr) - np.min(train_arr)) or 1.0
    groups = [f.subject_id or f.name for f in train_files]
    result = privacy_audit(syn_arr, train_arr, [f.name for f in syn_files], [f.name for f in train_files],
                           groups, similarity=similarity, mask=fg, data_range=data_range, quantile=quantile)
    result.update({"kind": "medlsdm-privacy", "train": str(train), "synthetic": str(synthetic),
                   "mask": mask, "data_range": data_range, "figures": []})
    if figures:
        result["figures"] = _privacy_figures(out_dir, result, syn_arr, train_arr,
                                             [f.name for f in syn_files], [f.name for f in train_files], n_closest)
    write_json(out_dir / "privacy.json", json_safe(result))
    del train_arr, syn_arr
    for name in ("privacy_train.npy", "privacy_synthetic.npy"):  # copies of the data: not kept
        (cache / name).unlink(missing_ok=True)
    return result


def _privacy_figures(out_dir: Path, result: dict, syn_arr, train_arr, syn_ids, train_ids, n_closest) -> list[dict]:
    from medlsdm.evaluation.figures import save_panel_rows, similarity_histogram, volume_panel

    hist = "figures/privacy_histogram.png"
    similarity_histogram(out_dir / hist, result["train_to_train"], result["synthetic_to_train"],
                         result["threshold"], result["similarity"])
    figs = [{"path": hist, "caption": "Nearest-neighbour similarity: each training volume to the rest of the "
                                      "training set (real-to-real) and each synthetic volume to the training "
                                      "set; volumes right of the threshold line are flagged."}]
    closest = sorted(result["pairs"], key=lambda p: -p["similarity"])[:n_closest]
    if closest:
        rows, titles = [], []
        for p in closest:
            s, t = syn_arr[syn_ids.index(p["synthetic_id"])], train_arr[train_ids.index(p["train_id"])]
            window = tuple(np.percentile(t[0], [0.5, 99.5]).tolist())
            rows.append([volume_panel(np.asarray(s), window=window), volume_panel(np.asarray(t), window=window)])
            flag = ", FLAGGED" if p["flagged"] else ""
            titles.append([f"synthetic {p['synthetic_id']} ({result['similarity']} {p['similarity']:.3f}{flag})",
                           f"nearest training volume {p['train_id']}"])
        rel = "figures/privacy_closest_pairs.png"
        save_panel_rows(out_dir / rel, rows, [], panel_titles=titles)
        figs.append({"path": rel, "caption": f"The {len(rows)} synthetic volumes closest to a training volume, "
                                             f"beside that training volume."})
    return figs
