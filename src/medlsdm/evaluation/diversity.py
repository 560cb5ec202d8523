"""Sample diversity as mean pairwise MS-SSIM (medicaldiffusion, Med-DDPM): lower = more diverse.

Compute it among the samples generated from one label map (does the model produce variety for a
fixed anatomy?) and among real volumes (the reference value, 0.81 for brain MRI in
medicaldiffusion); a synthetic value far above the real one signals mode collapse.

MS-SSIM mixes anatomy with appearance. ``appearance_statistics`` (``medlsdm.data.appearance``) measures the global properties
that a label map does not determine and that differ between real scans of one anatomy: the noise
level inside a homogeneous tissue, the contrast between two tissues and the strength of a smooth
multiplicative bias field. Their spread over the samples of one label map, next to their spread
over real subjects (``appearance_spread``), says whether the noise seed varies what real
acquisitions vary.
"""

from __future__ import annotations

from itertools import combinations
from typing import Mapping, Sequence

import numpy as np

from medlsdm.data.appearance import APPEARANCE_STATISTICS, appearance_statistics
from medlsdm.errors import DataError
from medlsdm.evaluation.metrics import ms_ssim3d

__all__ = ["sample_pairs", "pairwise_ms_ssim", "mean_pairwise_ms_ssim", "APPEARANCE_STATISTICS",
           "appearance_statistics", "appearance_spread"]


def sample_pairs(n: int, max_pairs: int | None = None, seed: int = 0) -> list[tuple[int, int]]:
    """All pairs i < j of ``n`` items, or ``max_pairs`` of them drawn without replacement."""
    if n < 2:
        raise DataError(f"diversity needs at least 2 volumes, got {n}")
    total = n * (n - 1) // 2
    if max_pairs is None or max_pairs >= total:
        return list(combinations(range(n), 2))
    if max_pairs < 1:
        raise DataError(f"max_pairs must be >= 1, got {max_pairs}")
    # Draw pair indices, not pairs, so memory stays O(max_pairs) even for large n.
    flat = np.random.default_rng(seed).choice(total, size=max_pairs, replace=False)
    return [_unrank_pair(int(k), n) for k in np.sort(flat)]


def _unrank_pair(k: int, n: int) -> tuple[int, int]:
    """k-th pair (0-based) in the order (0,1), (0,2), ..., (0,n-1), (1,2), ..."""
    i = 0
    while k >= n - 1 - i:
        k -= n - 1 - i
        i += 1
    return i, i + 1 + k


def pairwise_ms_ssim(volumes: Sequence, data_range: float, max_pairs: int | None = None,
                     seed: int = 0, scales: int | None = None,
                     win_size: int | None = None) -> np.ndarray:
    """MS-SSIM of each sampled pair (see ``sample_pairs``); volumes must share one shape."""
    pairs = sample_pairs(len(volumes), max_pairs, seed)
    shapes = {tuple(np.shape(v)) for v in volumes}
    if len(shapes) > 1:
        raise DataError(f"diversity: volumes differ in shape: {sorted(shapes)}")
    return np.array([ms_ssim3d(volumes[i], volumes[j], data_range, scales, win_size) for i, j in pairs])


def mean_pairwise_ms_ssim(volumes: Sequence, data_range: float, max_pairs: int | None = None,
                          seed: int = 0, scales: int | None = None,
                          win_size: int | None = None) -> float:
    """Mean MS-SSIM over all pairs (or ``max_pairs`` random pairs, seeded) of ``volumes``."""
    return float(pairwise_ms_ssim(volumes, data_range, max_pairs, seed, scales, win_size).mean())


def appearance_spread(groups: Sequence[Sequence[Mapping[str, float]]]) -> dict[str, float]:
    """Mean over ``groups`` (e.g. the samples of each label map, or one group of real subjects) of
    the standard deviation (ddof 1) of each appearance statistic within the group."""
    out = {}
    for name in APPEARANCE_STATISTICS:
        stds = [float(np.std([g[name] for g in group], ddof=1)) for group in groups if len(group) >= 2]
        if not stds:
            raise DataError("appearance spread needs a group of at least 2 volumes")
        out[name] = float(np.mean(stds))
    return out
