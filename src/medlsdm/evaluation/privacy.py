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

__all__ = ["NearestResult", "nearest_neighbours", "real_to_real_nearest", "privacy_audit", "case_ids"]

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
    use ``evaluation.copying.copy_audit``: their samples share the anatomy of a training map by design.

    Returns a JSON-ready dict: ``similarity``, ``threshold``, ``threshold_rule``, ``quantile``,
    ``n_synthetic``, ``n_train``, ``n_flagged``, ``fraction_flagged``, ``flagged`` (pairs above
    the threshold, most similar first), ``pairs`` (every synthetic volume with its nearest
    training volume), ``synthetic_to_train`` and ``train_to_train`` (the two distributions of
    nearest similarities, for a histogram).
    """
    if quantile is not None and not 0.0 < quantile <= 1.0:
        raise MedlsdmError(f"quantile must be in (0, 1], got {quantile}")
    synthetic_ids = case_ids(synthetic_ids, len(synthetic), "synthetic")
    train_ids = case_ids(train_ids, len(train), "train")
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


def case_ids(ids: Sequence[str] | None, n: int, what: str) -> list[str]:
    if ids is None:
        return [str(i) for i in range(n)]
    if len(ids) != n:
        raise DataError(f"{what}_ids has {len(ids)} entries for {n} {what} volumes")
    return [str(i) for i in ids]
