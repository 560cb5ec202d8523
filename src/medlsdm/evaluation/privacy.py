"""Memorisation audit: is a synthetic volume a (near) copy of a training volume?

For each synthetic volume we find its most similar training volume. Real data tell how similar
two *different* patients can be: the leave-one-out nearest similarity of each training volume to
the rest of the training set. A synthetic volume closer to some training volume than any real
patient is to another (by default: above the maximum of those real-to-real values) is flagged as
a likely copy (cf. Akbar et al. 2023, "Beware of diffusion models for synthesizing medical
images"; Dar et al. 2023 on memorisation in 3D diffusion models).

Similarities: ``"ncc"`` — zero-mean normalised cross-correlation (Pearson correlation of the
voxels, inside the foreground ``mask`` when given; 0 for a constant volume); ``"ssim"`` — 3D SSIM
(needs ``data_range``). All volumes must share one grid. Volumes are read by index from any
sequence (a list of arrays, or arrays opened with ``np.load(..., mmap_mode="r")``); NCC works on
blocks of at most ``block_bytes`` of flattened volumes, never an N×N set of volume copies.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import numpy as np

from medlsdm.errors import DataError, MedlsdmError
from medlsdm.evaluation.metrics import ssim3d

__all__ = ["NearestResult", "nearest_neighbours", "real_to_real_nearest", "privacy_audit", "label_residual",
           "residual_correlation", "copy_audit", "COPY_AUDIT_DEFAULTS"]

SIMILARITIES = ("ncc", "ssim")
DEFAULT_BLOCK_BYTES = 256 * 2 ** 20


class NearestResult(NamedTuple):
    """For each query volume: ``index`` of its nearest reference volume (-1 if none allowed) and
    the ``similarity`` to it (NaN if none)."""

    index: np.ndarray
    similarity: np.ndarray


def _check_inputs(groups: Sequence[Sequence], mask, similarity: str, data_range) -> tuple[int, ...]:
    if similarity not in SIMILARITIES:
        raise MedlsdmError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if similarity == "ssim" and data_range is None:
        raise MedlsdmError("similarity 'ssim' needs data_range (the volumes' value range, e.g. 2.0)")
    shapes = {tuple(np.shape(v)) for vols in groups for v in vols}
    if len(shapes) != 1:
        raise DataError(f"privacy audit: all volumes must share one shape, got {sorted(shapes)}")
    shape = shapes.pop()
    if mask is not None and tuple(np.shape(mask)) != shape[-3:]:
        raise DataError(f"mask shape {np.shape(mask)} does not match volume shape {shape}")
    return shape


def _normalised_rows(volumes: Sequence, indices: range, mask) -> np.ndarray:
    """Rows of zero-mean, unit-norm voxel vectors (float32), so NCC is a dot product."""
    rows = []
    for i in indices:
        v = np.asarray(volumes[i], dtype=np.float64)
        v = v[..., mask].ravel() if mask is not None else v.ravel()
        v = v - v.mean()
        norm = np.linalg.norm(v)
        rows.append((v / norm if norm > 0 else np.zeros_like(v)).astype(np.float32))
    return np.stack(rows)


def _similarity_blocks(queries: Sequence, refs: Sequence, similarity: str, mask, data_range,
                       block_bytes: int) -> Iterator[tuple[range, range, np.ndarray]]:
    """Yield (query indices, reference indices, similarity block) covering all pairs."""
    if similarity == "ncc":
        voxels = int(np.count_nonzero(mask)) if mask is not None else int(np.prod(np.shape(queries[0])))
        rows = max(1, block_bytes // (2 * 4 * voxels))
    else:
        rows = 16
    for q0 in range(0, len(queries), rows):
        q_idx = range(q0, min(q0 + rows, len(queries)))
        q_rows = _normalised_rows(queries, q_idx, mask) if similarity == "ncc" else None
        for r0 in range(0, len(refs), rows):
            r_idx = range(r0, min(r0 + rows, len(refs)))
            if similarity == "ncc":
                block = q_rows @ _normalised_rows(refs, r_idx, mask).T
            else:
                block = np.array([[ssim3d(queries[i], refs[j], data_range, mask=mask)
                                   for j in r_idx] for i in q_idx])
            yield q_idx, r_idx, block.astype(np.float64)


def _nearest(queries, refs, similarity, mask, data_range, block_bytes, exclude=None) -> NearestResult:
    """Best reference per query; ``exclude(q_idx, r_idx) -> bool block`` removes pairs."""
    best_sim = np.full(len(queries), -np.inf)
    best_idx = np.full(len(queries), -1, dtype=np.int64)
    for q_idx, r_idx, block in _similarity_blocks(queries, refs, similarity, mask, data_range, block_bytes):
        if exclude is not None:
            block = np.where(exclude(q_idx, r_idx), -np.inf, block)
        arg = block.argmax(axis=1)
        val = block[np.arange(len(q_idx)), arg]
        q = np.asarray(q_idx)
        better = val > best_sim[q]
        best_sim[q[better]] = val[better]
        best_idx[q[better]] = np.asarray(r_idx)[arg[better]]
    best_sim[best_idx < 0] = np.nan
    return NearestResult(best_idx, best_sim)


def _mask_array(mask):
    return None if mask is None else np.asarray(mask, dtype=bool)


def nearest_neighbours(synthetic: Sequence, train: Sequence, similarity: str = "ncc", mask=None,
                       data_range: float | None = None,
                       block_bytes: int = DEFAULT_BLOCK_BYTES) -> NearestResult:
    """Nearest training volume of each synthetic volume and the similarity to it."""
    if len(synthetic) == 0 or len(train) == 0:
        raise DataError("nearest_neighbours needs at least one synthetic and one training volume")
    mask = _mask_array(mask)
    _check_inputs([synthetic, train], mask, similarity, data_range)
    return _nearest(synthetic, train, similarity, mask, data_range, block_bytes)


def real_to_real_nearest(train: Sequence, similarity: str = "ncc", mask=None,
                         data_range: float | None = None, groups: Sequence | None = None,
                         block_bytes: int = DEFAULT_BLOCK_BYTES) -> NearestResult:
    """Leave-one-out nearest similarity inside the training set. With ``groups`` (e.g. subject
    IDs), volumes of the same group are not compared, so repeat scans of one patient do not set
    the bar for "different patients"."""
    if len(train) < 2:
        raise DataError(f"real-to-real similarities need at least 2 training volumes, got {len(train)}")
    mask = _mask_array(mask)
    _check_inputs([train], mask, similarity, data_range)
    group_arr = np.asarray(list(groups) if groups is not None else range(len(train)), dtype=object)
    if len(group_arr) != len(train):
        raise DataError(f"groups has {len(group_arr)} entries for {len(train)} training volumes")

    def same_group(q_idx, r_idx):
        return group_arr[np.asarray(q_idx)][:, None] == group_arr[np.asarray(r_idx)][None, :]

    return _nearest(train, train, similarity, mask, data_range, block_bytes, exclude=same_group)


def privacy_audit(synthetic: Sequence, train: Sequence, synthetic_ids: Sequence[str] | None = None,
                  train_ids: Sequence[str] | None = None, train_groups: Sequence | None = None,
                  similarity: str = "ncc", mask=None, data_range: float | None = None,
                  quantile: float | None = None, block_bytes: int = DEFAULT_BLOCK_BYTES,
                  held_out: Sequence | None = None, held_out_groups: Sequence | None = None) -> dict:
    """Nearest-neighbour audit (for unconditional models): flag synthetic volumes more similar to
    a training volume than real patients are to it.

    Threshold: with ``held_out`` real volumes (never trained on), the maximum (or ``quantile``)
    of their nearest-training similarities — the calibration to use; held-out volumes of a
    training subject (``held_out_groups`` vs ``train_groups``) are left out of it, and
    ``baseline_rate`` is the fraction of held-out volumes flagged against a threshold set by the
    others. Without ``held_out``, the leave-one-out real-to-real similarities inside the training
    set (the older rule; the bar rises with the cohort size). A synthetic volume is flagged when
    its nearest-training similarity is strictly above the threshold. For label-conditioned models
    use ``copy_audit``: their samples share the anatomy of a training map by design.

    Returns a JSON-ready dict: ``similarity``, ``threshold``, ``threshold_rule``, ``quantile``,
    ``n_synthetic``, ``n_train``, ``n_flagged``, ``fraction_flagged``, ``flagged`` (pairs above
    the threshold, most similar first), ``pairs`` (every synthetic volume with its nearest
    training volume), ``synthetic_to_train`` and ``train_to_train`` (the two distributions of
    nearest similarities, for a histogram).
    """
    if quantile is not None and not 0.0 < quantile <= 1.0:
        raise MedlsdmError(f"quantile must be in (0, 1], got {quantile}")
    synthetic_ids = _ids(synthetic_ids, len(synthetic), "synthetic")
    train_ids = _ids(train_ids, len(train), "train")
    syn = nearest_neighbours(synthetic, train, similarity, mask, data_range, block_bytes)
    baseline_rate = None
    if held_out is not None:
        train_set = set(train_groups) if train_groups is not None else set()
        keep = [i for i in range(len(held_out))
                if held_out_groups is None or held_out_groups[i] not in train_set]
        if len(keep) < 2:
            raise DataError("privacy audit: the threshold needs at least 2 held-out real volumes of subjects "
                            "not in the training set")
        real = nearest_neighbours([held_out[i] for i in keep], train, similarity, mask, data_range, block_bytes)
    else:
        real = real_to_real_nearest(train, similarity, mask, data_range, train_groups, block_bytes)
    real_values = real.similarity[np.isfinite(real.similarity)]
    if real_values.size == 0:
        raise DataError("privacy audit: no two training volumes from different groups to compare")
    threshold = float(real_values.max() if quantile is None else np.quantile(real_values, quantile))
    if held_out is not None and real_values.size >= 2:
        baseline_rate = float(np.mean([v > (np.delete(real_values, i).max() if quantile is None else
                                            np.quantile(np.delete(real_values, i), quantile))
                                       for i, v in enumerate(real_values)]))
    pairs = [{"synthetic_id": synthetic_ids[i], "train_id": train_ids[int(j)], "similarity": float(s),
              "flagged": bool(s > threshold)} for i, (j, s) in enumerate(zip(syn.index, syn.similarity))]
    flagged = sorted((p for p in pairs if p["flagged"]), key=lambda p: -p["similarity"])
    reference = "held-out-real to training" if held_out is not None else "real-to-real (training, leave one out)"
    return {
        "method": "nearest neighbour",
        "similarity": similarity,
        "threshold": threshold,
        "threshold_rule": ("max" if quantile is None else f"quantile {quantile}") + f" of {reference}",
        "baseline_rate": baseline_rate,
        "quantile": quantile,
        "n_synthetic": len(synthetic),
        "n_train": len(train),
        "n_flagged": len(flagged),
        "fraction_flagged": len(flagged) / len(synthetic),
        "flagged": flagged,
        "pairs": pairs,
        "synthetic_to_train": [float(s) for s in syn.similarity],
        # NaN (a volume with no partner outside its group) becomes null, keeping the dict JSON-ready.
        "train_to_train" if held_out is None else "held_out_to_train":
            [float(s) if np.isfinite(s) else None for s in real.similarity],
    }


def _ids(ids: Sequence[str] | None, n: int, what: str) -> list[str]:
    if ids is None:
        return [str(i) for i in range(n)]
    if len(ids) != n:
        raise DataError(f"{what}_ids has {len(ids)} entries for {n} {what} volumes")
    return [str(i) for i in ids]


# ============================================================================ copy audit
#
# Label-conditioned models reproduce the anatomy of the label map they are given, so a sample of a
# training label map resembles that training image however honest the model is. What a copy also
# reproduces is what the map does not explain: the patient's texture, noise and intensity
# idiosyncrasies. The copy audit therefore compares *label-conditional residuals* — the image
# minus a per-class smooth intensity field predicted from its own label map — inside the class
# interiors (class edges, where partial volume is shared by any two images of one map, are left
# out), by correlation, maximised over small shifts and axis flips so that moved copies are found
# too. The threshold is calibrated on held-out real cases (never trained on) compared with the
# training set: a synthetic volume whose residual is closer to a training residual than any
# held-out patient's is flagged.

COPY_AUDIT_DEFAULTS = {
    "field_sigma": 3.0,     # voxels: smoothness of the per-class intensity field (the map's "prediction")
    "texture_sigma": 0.7,   # voxels: residual smoothing, tolerates sub-voxel deformation
    "erode": 1,             # voxels removed at every class edge
    "outlier": 4.0,         # |residual| above this many robust SDs: map/image disagreement, not texture
    "max_shift": 2,         # shifts d with |dx| + |dy| + |dz| <= max_shift (voxels)
    "flips": True,          # also compare with the volume flipped along each axis
    "min_overlap": 0.2,     # minimum shared interior, as a fraction of the smaller one
}


def label_residual(image: np.ndarray, label: np.ndarray, field_sigma: float = 3.0, texture_sigma: float = 0.7,
                   erode: int = 1, outlier: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """(residual (C, X, Y, Z) float32, interior mask (X, Y, Z)) of ``image`` (C, X, Y, Z) given its
    ``label`` map (X, Y, Z).

    Prediction: for each class k, the normalised convolution of the image over class k's voxels
    (Gaussian ``field_sigma``), so each voxel is predicted from its own class only. The residual
    is smoothed by ``texture_sigma``, restricted to the interiors of the foreground classes
    (eroded by ``erode``), cleared of outliers (``outlier`` robust SDs) and scaled to zero mean
    and unit norm per channel; zero outside the interior."""
    from scipy.ndimage import binary_erosion, gaussian_filter

    image = np.asarray(image, dtype=np.float64)
    label = np.asarray(label)
    if image.ndim == 3:
        image = image[None]
    if image.shape[1:] != label.shape:
        raise DataError(f"label map shape {label.shape} does not match image shape {image.shape[1:]}")
    prediction = np.zeros_like(image)
    interior = np.zeros(label.shape, dtype=bool)
    for k in np.unique(label):
        member = label == k
        weight = gaussian_filter(member.astype(np.float64), field_sigma)
        for c in range(image.shape[0]):
            field = gaussian_filter(image[c] * member, field_sigma)
            prediction[c][member] = field[member] / np.maximum(weight[member], 1e-12)
        if k > 0:
            interior |= binary_erosion(member, iterations=erode) if erode > 0 else member
    residual = image - prediction
    out = np.zeros(image.shape, dtype=np.float32)
    for c in range(image.shape[0]):
        r = gaussian_filter(residual[c], texture_sigma) if texture_sigma > 0 else residual[c]
        values = r[interior]
        if values.size == 0:
            continue
        centre = np.median(values)
        spread = 1.4826 * np.median(np.abs(values - centre)) or 1.0
        keep = interior & (np.abs(r - centre) <= outlier * spread)
        v = np.where(keep, r - r[keep].mean() if keep.any() else 0.0, 0.0)
        norm = np.linalg.norm(v)
        out[c] = v / norm if norm > 0 else 0.0
    return out, interior


def _shifts(max_shift: int) -> list[tuple[int, int, int]]:
    r = range(-max_shift, max_shift + 1)
    return [(a, b, c) for a in r for b in r for c in r if abs(a) + abs(b) + abs(c) <= max_shift]


def _window(n: int, d: int) -> tuple[slice, slice]:
    """Slices of two arrays of length n that overlap when the first is moved by d."""
    return (slice(0, n - d), slice(d, n)) if d >= 0 else (slice(-d, n), slice(0, n + d))


def residual_correlation(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
                         max_shift: int = 2, flips: bool = True, min_overlap: float = 0.2) -> float:
    """Largest correlation of residual ``a`` with residual ``b`` (each ``(residual, interior)``
    from ``label_residual``) over shifts and axis flips of ``a``, on their shared interior; NaN
    when no placement shares ``min_overlap`` of the smaller interior."""
    ra, ma = a
    rb, mb = b
    if ra.shape != rb.shape:
        raise DataError(f"copy audit: residual shapes differ, {ra.shape} and {rb.shape}")
    need = min_overlap * min(ma.sum(), mb.sum())
    best = -np.inf
    for axes in ([()] + [(i,) for i in range(3)] if flips else [()]):
        fa = np.flip(ra, [ax + 1 for ax in axes]) if axes else ra
        fm = np.flip(ma, list(axes)) if axes else ma
        for shift in _shifts(max_shift):
            src, dst = zip(*(_window(n, d) for n, d in zip(ma.shape, shift)))
            both = fm[src] & mb[dst]
            if both.sum() < max(need, 1):
                continue
            x, y = fa[(slice(None), *src)], rb[(slice(None), *dst)]
            den = np.sqrt(np.sum(x * x * both) * np.sum(y * y * both))
            if den > 0:
                best = max(best, float(np.sum(x * y) / den))
    return best if np.isfinite(best) else float("nan")


def copy_audit(synthetic: Sequence[np.ndarray], synthetic_labels: Sequence[np.ndarray],
               train: Sequence[np.ndarray], train_labels: Sequence[np.ndarray],
               held_out: Sequence[np.ndarray], held_out_labels: Sequence[np.ndarray], *,
               synthetic_ids: Sequence[str] | None = None, train_ids: Sequence[str] | None = None,
               held_out_ids: Sequence[str] | None = None, train_subjects: Sequence | None = None,
               held_out_subjects: Sequence | None = None, synthetic_subjects: Sequence | None = None,
               held_out_samples: Sequence[tuple[int, np.ndarray]] = (),
               quantile: float | None = None, settings: dict | None = None) -> dict:
    """Flag synthetic volumes whose label-conditional residual is closer to a training volume's
    than any held-out real case's is (see the section comment above).

    Volumes (C, X, Y, Z) or (X, Y, Z) with their label maps; each synthetic volume with the label
    map it was generated from. Threshold: the maximum (or ``quantile``) over held-out cases of
    their nearest-training residual correlation; a held-out case is never compared with training
    volumes of its own subject (``*_subjects``), and held-out cases whose subject is in the
    training set are left out of the calibration. ``baseline_rate``: the fraction of held-out
    cases flagged against a threshold set by the others (leave one out) — what an honest model's
    samples should not exceed.

    ``held_out_samples``: (index of a held-out case, synthetic volume generated from that case's
    label map) pairs. The correlation of such a sample with its own map's real image measures how
    much of the residual the map explains *for this model* on maps it never saw (high when the
    cohort's texture follows the anatomy); these values join the calibration, so samples of
    training maps are flagged only when closer to their training image than that."""
    cfg = {**COPY_AUDIT_DEFAULTS, **(settings or {})}
    unknown = sorted(set(cfg) - set(COPY_AUDIT_DEFAULTS))
    if unknown:
        raise MedlsdmError(f"copy audit settings: unknown {', '.join(unknown)}")
    if quantile is not None and not 0.0 < quantile <= 1.0:
        raise MedlsdmError(f"quantile must be in (0, 1], got {quantile}")
    if not len(train) or not len(synthetic):
        raise DataError("copy audit needs at least one training and one synthetic volume")
    synthetic_ids = _ids(synthetic_ids, len(synthetic), "synthetic")
    train_ids = _ids(train_ids, len(train), "train")
    held_out_ids = _ids(held_out_ids, len(held_out), "held_out")
    # Without subject IDs every volume is its own subject (held-out IDs kept apart from training ones).
    train_subjects = list(train_subjects) if train_subjects is not None else list(train_ids)
    held_out_subjects = list(held_out_subjects) if held_out_subjects is not None else \
        [f"held_out:{i}" for i in held_out_ids]
    res_kw = {k: cfg[k] for k in ("field_sigma", "texture_sigma", "erode", "outlier")}
    cmp_kw = {k: cfg[k] for k in ("max_shift", "flips", "min_overlap")}

    def residuals(volumes, labels):
        if len(volumes) != len(labels):
            raise DataError(f"copy audit: {len(volumes)} volumes but {len(labels)} label maps")
        return [label_residual(v, lab, **res_kw) for v, lab in zip(volumes, labels)]

    train_res = residuals(train, train_labels)

    def nearest(res, exclude_subject=None) -> tuple[int, float]:
        best_i, best = -1, -np.inf
        for i, t in enumerate(train_res):
            if exclude_subject is not None and train_subjects[i] == exclude_subject:
                continue
            value = residual_correlation(res, t, **cmp_kw)
            if np.isfinite(value) and value > best:
                best_i, best = i, value
        return best_i, (best if best_i >= 0 else float("nan"))

    train_subject_set = set(train_subjects)
    calibration, left_out = [], []
    held_residuals = residuals(held_out, held_out_labels)
    for hid, subject, res in zip(held_out_ids, held_out_subjects, held_residuals):
        if subject in train_subject_set:
            left_out.append(hid)
            continue
        j, value = nearest(res)
        calibration.append({"held_out_id": hid, "train_id": train_ids[j] if j >= 0 else None, "similarity": value})
    held_res = dict(enumerate(held_residuals))
    for index, volume in held_out_samples:
        if held_out_subjects[index] in train_subject_set:
            continue
        res = label_residual(volume, held_out_labels[index], **res_kw)
        calibration.append({"held_out_id": held_out_ids[index], "train_id": None, "own_map_sample": True,
                            "similarity": residual_correlation(res, held_res[index], **cmp_kw)})
    values = np.array([c["similarity"] for c in calibration], dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size < 2:
        raise DataError(f"copy audit: the threshold needs at least 2 held-out real cases of subjects not in "
                        f"the training set, got {values.size}")
    threshold = float(values.max() if quantile is None else np.quantile(values, quantile))
    loo = [v > (np.delete(values, i).max() if quantile is None else np.quantile(np.delete(values, i), quantile))
           for i, v in enumerate(values)]
    pairs = []
    syn_subjects = list(synthetic_subjects) if synthetic_subjects is not None else [None] * len(synthetic)
    for sid, subject, res in zip(synthetic_ids, syn_subjects, residuals(synthetic, synthetic_labels)):
        j, value = nearest(res)
        pairs.append({"synthetic_id": sid, "train_id": train_ids[j] if j >= 0 else None,
                      "train_subject": str(train_subjects[j]) if j >= 0 else None,
                      "map_subject": None if subject is None else str(subject),
                      "similarity": value, "flagged": bool(np.isfinite(value) and value > threshold)})
    flagged = sorted((p for p in pairs if p["flagged"]), key=lambda p: -p["similarity"])
    return {
        "method": "label-conditional residual correlation",
        "similarity": "residual correlation",
        "threshold": threshold,
        "threshold_rule": ("max" if quantile is None else f"quantile {quantile}") +
                          " of held-out-real to training residual correlations" +
                          (" and of held-out-map samples to their own map's real image" if held_out_samples else ""),
        "quantile": quantile,
        "settings": {k: cfg[k] for k in COPY_AUDIT_DEFAULTS},
        "n_synthetic": len(synthetic), "n_train": len(train),
        "n_held_out": sum(1 for c in calibration if not c.get("own_map_sample")), "n_calibration": int(values.size),
        "held_out_left_out": left_out,
        "baseline_rate": float(np.mean(loo)),
        "n_flagged": len(flagged), "fraction_flagged": len(flagged) / len(synthetic),
        "subjects_flagged": sorted({p["train_subject"] for p in flagged}),
        "flagged": flagged, "pairs": pairs, "calibration": calibration,
        "synthetic_to_train": [p["similarity"] for p in pairs],
        "held_out_to_train": [c["similarity"] for c in calibration if not c.get("own_map_sample")],
        "held_out_samples_to_own_image": [c["similarity"] for c in calibration if c.get("own_map_sample")],
    }
