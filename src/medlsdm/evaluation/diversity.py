"""Sample diversity as mean pairwise MS-SSIM (medicaldiffusion, Med-DDPM): lower = more diverse.

Compute it among the samples generated from one label map (does the model produce variety for a
fixed anatomy?) and among real volumes (the reference value, 0.81 for brain MRI in
medicaldiffusion); a synthetic value far above the real one signals mode collapse.

MS-SSIM mixes anatomy with appearance. ``appearance_statistics`` measures the global properties
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

from medlsdm.errors import DataError
from medlsdm.evaluation.metrics import ms_ssim3d

__all__ = ["sample_pairs", "pairwise_ms_ssim", "mean_pairwise_ms_ssim", "APPEARANCE_STATISTICS",
           "appearance_statistics", "appearance_spread"]

APPEARANCE_STATISTICS = ("noise", "contrast", "bias")


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


def _unit_range(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Intensities mapped so the brain's 1st / 99th percentiles go to 0 / 1: gain and offset, which
    dataset preparation normalises away, do not count as appearance."""
    lo, hi = np.percentile(image[brain], [1, 99])
    return (image - lo) / (hi - lo if hi > lo else 1.0)


def appearance_statistics(image, label, tissue: int, other: int, erosion: int = 1) -> dict[str, float]:
    """Global appearance of one volume (D, H, W) with its label map, on the brain's [1st, 99th]
    percentile range mapped to [0, 1]:

    * ``noise``: the noise standard deviation inside class ``tissue`` eroded by ``erosion`` voxels
      (a homogeneous tissue, e.g. white matter), from the residual ``r = x - mean of its 6
      neighbours``: robust SD (1.4826 x median absolute deviation) of ``r`` / sqrt(7/6), which is
      the SD of white noise (a smooth field leaves ``r`` near 0; texture counts as noise);
    * ``contrast``: ``(median(tissue) - median(other)) / (median(tissue) + median(other))``
      (e.g. white against grey matter);
    * ``bias``: standard deviation of the log-intensity of ``tissue`` explained by a quadratic
      polynomial of the voxel coordinates (a smooth multiplicative field, as MR bias fields are).
    """
    from scipy import ndimage

    image, label = np.asarray(image, dtype=np.float64), np.asarray(label)
    if image.shape != label.shape or image.ndim != 3:
        raise DataError(f"appearance statistics need a 3D image and label map of one shape, got "
                        f"{image.shape} and {label.shape}")
    region = label == tissue
    core = ndimage.binary_erosion(region, iterations=erosion) if erosion else region
    if core.sum() < 50 or (label == other).sum() < 50:
        raise DataError(f"appearance statistics: classes {tissue} and {other} need at least 50 voxels "
                        f"each (found {int(core.sum())} inside the eroded class {tissue}, "
                        f"{int((label == other).sum())} of class {other})")
    x = _unit_range(image, label > 0)
    kernel = np.zeros((3, 3, 3))
    kernel[1, 1, 1] = 1.0
    kernel[[0, 2, 1, 1, 1, 1], [1, 1, 0, 2, 1, 1], [1, 1, 1, 1, 0, 2]] = -1.0 / 6
    residual = ndimage.convolve(x, kernel, mode="nearest")[core] / np.sqrt(7 / 6)
    noise = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))
    a, b = float(np.median(x[region])), float(np.median(x[label == other]))
    contrast = (a - b) / (a + b) if a + b > 0 else float("nan")
    coords = np.argwhere(core).astype(np.float64)
    coords = (coords - coords.mean(0)) / np.maximum(coords.std(0), 1.0)
    d, h, w = coords.T
    design = np.stack([np.ones_like(d), d, h, w, d * d, h * h, w * w, d * h, d * w, h * w], axis=1)
    values = np.log(np.clip(x[core], 1e-3, None))
    fitted = design @ np.linalg.lstsq(design, values, rcond=None)[0]
    return {"noise": noise, "contrast": float(contrast), "bias": float(fitted.std())}


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
