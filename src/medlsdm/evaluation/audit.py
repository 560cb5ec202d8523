"""``medlsdm evaluate privacy`` on folders: read the training, held-out and synthetic volumes,
run the copy audit (label-conditioned models: ``evaluation.privacy.copy_audit``) or the
nearest-neighbour audit (unconditional models: ``evaluation.privacy.privacy_audit``), write
OUT/privacy.json and the report's pictures.

Mode ``conditional``: every synthetic volume is named after the case whose label map generated it
(``CASE.nii.gz`` / ``CASE_sample<k>.nii.gz``, CASE a training or held-out case) and is audited with
that map; needs ``held_out`` real cases (images + label maps) for the threshold. Mode
``nearest``: image similarity, with the held-out cases as the baseline when given. ``auto``:
conditional when every synthetic volume names a case with a label map and held-out cases are
given, else nearest.

Volumes are copied once into float32 arrays under OUT/cache (``np.lib.format.open_memmap``) and
handed to the audit memory-mapped, so a large cohort is read from its (compressed) files once
and never held in memory whole. All volumes must share one grid size, channel count and voxel
spacing (origins may differ between patients); the audit compares voxel i of one volume with
voxel i of another.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from medlsdm.data.geometry import voxel_spacing
from medlsdm.errors import DataError, MedlsdmError
from medlsdm.evaluation.metrics import json_safe
from medlsdm.evaluation.pairing import (VolumeFiles, load_image, load_label, refuse_same_folder,
                                        scan_folder, split_sample_name)
from medlsdm.evaluation.copying import copy_audit
from medlsdm.evaluation.privacy import privacy_audit

# What the report says each audit can and cannot detect.
COPY_AUDIT_SCOPE = (
    "Detects: synthetic volumes that reproduce what is private to one training image beyond its label map "
    "and the cohort - its voxel-scale detail (acquisition noise; detail band, any training image, up to "
    "the configured shift, axis flips) or its smooth intensity field (bias field; field band, the image of "
    "the sample's own label map): exact, noisy, intensity-scaled, slightly shifted, axis-flipped and "
    "mildly deformed copies, and copies whose detail was lost but whose intensity field was kept (e.g. a "
    "training image passed through the autoencoder), even when generated from that patient's own label "
    "map. Cannot detect: copying of the anatomy itself (a label map is shared by design), reproduction "
    "of anatomy-scale texture (a label-conditioned model learns it from the maps; it is not tested), "
    "copies outside the label classes' interiors (class edges and background are not compared), copies "
    "rotated, scaled in size or moved further than the shift range, smoothed copies of a patient other "
    "than the one whose map was given, or memorisation of patients outside the training folder given. "
    "The field band has few degrees of freedom: only close reproductions of a whole field stand out. "
    "The thresholds are only as good as the held-out cases: an honest model's samples are flagged at "
    "about the baseline rate.")
NEAREST_SCOPE = (
    "Detects: synthetic volumes whose voxels correlate with a training volume more than held-out real "
    "patients do (near-duplicates on the same grid). Cannot tell memorised detail from shared anatomy: "
    "for label-conditioned samples use the conditional (residual) audit.")

__all__ = ["audit_folders", "stack_volumes"]


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
            reference = (arr.shape, voxel_spacing(affine), f.display)
        shape, spacing, ref_name = reference
        if arr.shape != tuple(shape):
            raise DataError(f"volumes must share one grid: {f.display} has shape {arr.shape} "
                            f"(channels first), {ref_name} has {tuple(shape)}")
        if not np.allclose(voxel_spacing(affine), spacing, rtol=1e-3, atol=1e-4):
            raise DataError(f"volumes must share one grid: {f.display} has spacing "
                            f"{np.round(voxel_spacing(affine), 4).tolist()}, {ref_name} has {np.round(spacing, 4).tolist()}")
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


def _labelled(files: Sequence[VolumeFiles], what: str) -> list[np.ndarray]:
    missing = [f.name for f in files if f.label is None]
    if missing:
        raise DataError(f"{what}: no label map for {', '.join(missing[:5])} (use the images/ + labels/ layout)")
    return [load_label(f.label)[0] for f in files]


def _map_cases(syn_files: Sequence[VolumeFiles], labelled: Mapping[str, VolumeFiles]) -> list[str] | None:
    """The case whose label map generated each synthetic volume (by name), or None when one has none."""
    out = []
    for f in syn_files:
        hit = split_sample_name(f.name, set(labelled))
        if hit is None:
            return None
        out.append(hit[0])
    return out


def audit_folders(train: str | os.PathLike, synthetic: str | os.PathLike, out_dir: str | os.PathLike, *,
                  held_out: str | os.PathLike | None = None, mode: str = "auto",
                  similarity: str = "ncc", quantile: float | None = None, mask: str | None = None,
                  settings: Mapping | None = None, figures: bool = True, progress: bool = True,
                  n_closest: int = 3) -> dict:
    """Memorisation audit of the synthetic folder against the training folder; writes
    OUT/privacy.json and figures; returns the audit dict.

    Nearest-neighbour mode: ``mask="foreground"`` compares voxels inside the union of the training
    label maps' foreground; SSIM uses the training volumes' global max - min as data range.
    Repeat scans of one subject (when the layout gives subject IDs) are never compared with each
    other, and held-out cases of a training subject do not calibrate the threshold.
    """
    from medlsdm.files import ensure_writable_dir, relative_path, write_json

    if mask not in (None, "foreground"):
        raise MedlsdmError(f"--mask: only 'foreground' is supported, got {mask!r}")
    if mode not in ("auto", "conditional", "nearest"):
        raise MedlsdmError(f"--mode must be auto, conditional or nearest, got {mode!r}")
    refuse_same_folder(train=train, synthetic=synthetic, held_out=held_out)
    out_dir = ensure_writable_dir(out_dir)
    train_map = scan_folder(train, "training volumes")
    held_map = scan_folder(held_out, "held-out real volumes") if held_out is not None else {}
    syn_files = list(scan_folder(synthetic, "synthetic volumes").values())
    both = sorted(set(train_map) & set(held_map))
    if both:
        raise DataError(f"case IDs in both --train and --held-out: {', '.join(both[:5])}")
    labelled = {k: v for k, v in {**train_map, **held_map}.items() if v.label is not None}
    map_cases = _map_cases(syn_files, labelled)
    if mode == "auto":
        mode = "conditional" if map_cases is not None and len(held_map) >= 2 else "nearest"
    if mode == "conditional":
        result = _conditional(train_map, held_map, syn_files, map_cases, labelled, quantile, settings)
    else:
        result = _nearest_mode(train_map, held_map, syn_files, out_dir, similarity, quantile, mask, progress)
    result.update({"kind": "medlsdm-privacy", "mode": mode, "train": relative_path(train, out_dir),
                   "synthetic": relative_path(synthetic, out_dir),
                   "held_out": None if held_out is None else relative_path(held_out, out_dir),
                   "scope": COPY_AUDIT_SCOPE if mode == "conditional" else NEAREST_SCOPE, "figures": []})
    if figures:
        arrays = result.pop("_arrays")
        result["figures"] = _privacy_figures(out_dir, result, *arrays, n_closest)
    else:
        result.pop("_arrays")
    write_json(out_dir / "privacy.json", json_safe(result))
    return result


def _conditional(train_map, held_map, syn_files, map_cases, labelled, quantile, settings) -> dict:
    if map_cases is None:
        names = [f.name for f in syn_files if split_sample_name(f.name, set(labelled)) is None]
        raise DataError(f"conditional privacy audit: synthetic volumes {', '.join(names[:5])} name no case with a "
                        f"label map (expected CASE.nii.gz or CASE_sample<k>.nii.gz); use --mode nearest")
    if len(held_map) < 2:
        raise DataError("conditional privacy audit needs --held-out: at least 2 real cases (images and label "
                        "maps) that were not used for training, to calibrate the threshold")
    train_files, held_files = list(train_map.values()), list(held_map.values())
    load = lambda files: [load_image(f)[0] for f in files]  # noqa: E731
    train_arr, held_arr, syn_arr = load(train_files), load(held_files), load(syn_files)
    subject = lambda f: f.subject_id or f.name  # noqa: E731
    # Samples of held-out maps also calibrate: how close an honest sample gets to its own map's image.
    held_index = {f.name: i for i, f in enumerate(held_files)}
    held_samples = [(held_index[c], arr) for c, arr in zip(map_cases, syn_arr) if c in held_index]
    result = copy_audit(
        syn_arr, [load_label(labelled[c].label)[0] for c in map_cases],
        train_arr, _labelled(train_files, "--train"), held_arr, _labelled(held_files, "--held-out"),
        synthetic_ids=[f.name for f in syn_files], train_ids=[f.name for f in train_files],
        held_out_ids=[f.name for f in held_files], train_subjects=[subject(f) for f in train_files],
        held_out_subjects=[subject(f) for f in held_files],
        synthetic_subjects=[subject(labelled[c]) for c in map_cases], held_out_samples=held_samples,
        quantile=quantile, settings=settings)
    result["map_cases"] = dict(zip((f.name for f in syn_files), map_cases))
    result["_arrays"] = (syn_arr, train_arr, [f.name for f in syn_files], [f.name for f in train_files])
    return result


def _nearest_mode(train_map, held_map, syn_files, out_dir, similarity, quantile, mask, progress) -> dict:
    from medlsdm.files import ensure_writable_dir

    cache = ensure_writable_dir(out_dir / "cache")
    train_files, held_files = list(train_map.values()), list(held_map.values())
    note = None
    if len(held_files) == 1:  # one held-out case cannot calibrate a threshold: the older rule
        note = "1 held-out case is too few for the threshold; training leave-one-out rule used"
        held_files = []
    train_arr, ref = stack_volumes(train_files, cache / "privacy_train.npy", progress=progress, desc="training volumes")
    syn_arr, _ = stack_volumes(syn_files, cache / "privacy_synthetic.npy", ref, progress, "synthetic volumes")
    held_arr = stack_volumes(held_files, cache / "privacy_held_out.npy", ref, progress, "held-out volumes")[0] \
        if held_files else None
    fg = _foreground_union(train_files, ref[0]) if mask == "foreground" else None
    data_range = None
    if similarity == "ssim":
        data_range = float(np.max(train_arr) - np.min(train_arr)) or 1.0
    subject = lambda f: f.subject_id or f.name  # noqa: E731
    result = privacy_audit(syn_arr, train_arr, [f.name for f in syn_files], [f.name for f in train_files],
                           [subject(f) for f in train_files], similarity=similarity, mask=fg,
                           data_range=data_range, quantile=quantile, held_out=held_arr,
                           held_out_groups=[subject(f) for f in held_files] if held_files else None)
    result.update({"mask": mask, "data_range": data_range, "note": note})
    result["_arrays"] = (syn_arr, train_arr, [f.name for f in syn_files], [f.name for f in train_files])
    # Copies of the data are not kept: the memory maps stay readable until dropped (POSIX).
    for name in ("privacy_train.npy", "privacy_synthetic.npy", "privacy_held_out.npy"):
        (cache / name).unlink(missing_ok=True)
    return result


def _privacy_figures(out_dir: Path, result: dict, syn_arr, train_arr, syn_ids, train_ids, n_closest) -> list[dict]:
    from medlsdm.evaluation.figures import save_panel_rows, similarity_histogram, volume_panel

    hist = "figures/privacy_histogram.png"
    held = "held_out_to_train" in result
    reference = result["held_out_to_train"] if held else result["train_to_train"]
    real_label = "held-out real to nearest training" if held else "real to nearest other real"
    if result.get("held_out_samples_to_own_image"):
        reference = list(reference) + list(result["held_out_samples_to_own_image"])
        real_label = "held-out real and held-out-map samples (calibration)"
    similarity_histogram(out_dir / hist, reference, result["synthetic_to_train"], result["threshold"],
                         result["similarity"], real_label)
    figs = [{"path": hist, "caption": f"Nearest-neighbour {result['similarity']}: {real_label} (the threshold's "
                                      f"reference) and each synthetic volume to the training set; volumes right "
                                      f"of the threshold line are flagged."}]
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
