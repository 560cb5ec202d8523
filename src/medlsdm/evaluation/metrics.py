"""Correct image-quality, overlap and distribution metrics for 3D volumes.

Every metric takes the data range explicitly (the reference code used 255 or 1 on [-1, 1] data,
which pushes SSIM to ~1 and shifts PSNR by 6 dB). Inputs are numpy arrays or torch tensors; the
last three axes are spatial (D, H, W); any leading axes (channels) are averaged. Maths is done in
float64.

SSIM is written here with separable ``torch.nn.functional.conv3d`` rather than taken from
``monai.metrics.SSIMMetric``: MONAI's maths is right (normalised kernel, valid region) but it
forces float32, convolves with a dense k³ kernel (11³ = 1331 multiply-adds per voxel against 33
separable), has no foreground mask, and its MS-SSIM refuses volumes that are too small instead of
fitting the scales to them. The tests check this implementation against scikit-image and MONAI.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medlsdm.errors import DataError, MedlsdmError

__all__ = [
    "MS_SSIM_WEIGHTS", "ssim3d", "ssim_map3d", "ms_ssim3d", "ms_ssim_settings", "psnr", "rmse",
    "mae", "json_safe", "confusion_matrix", "overlap_from_confusion", "overlap_per_class",
    "dice_per_class", "mean_over_classes", "feature_statistics", "frechet_distance",
    "fid_from_features", "mmd",
]

K1, K2 = 0.01, 0.03
SSIM_SIGMA = 1.5
# Wang, Simoncelli & Bovik 2003, weights of the five scales (finest first).
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_MS_SSIM_WINDOWS = (7, 5, 3)  # windows tried, largest first, when choosing MS-SSIM settings


# ----------------------------------------------------------------------------- inputs

def _volumes(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """Two volumes as float64 tensors (N, 1, D, H, W), leading axes folded into N."""
    tx, ty = _to_tensor(x), _to_tensor(y)
    if tx.shape != ty.shape:
        raise DataError(f"volumes differ in shape: {tuple(tx.shape)} and {tuple(ty.shape)}")
    if tx.ndim < 3:
        raise DataError(f"expected a 3D volume (D, H, W) or (C, D, H, W), got shape {tuple(tx.shape)}")
    spatial = tx.shape[-3:]
    return tx.reshape(-1, 1, *spatial), ty.reshape(-1, 1, *spatial).to(tx.device)


def _to_tensor(a) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().to(torch.float64)
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def _data_range(data_range) -> float:
    if data_range is None or not np.isfinite(data_range) or float(data_range) <= 0:
        raise MedlsdmError(f"data_range must be a positive number (the volumes' value range, "
                           f"e.g. 2.0 for [-1, 1]), got {data_range!r}")
    return float(data_range)


def _mask_tensor(mask, spatial: Sequence[int], device) -> torch.Tensor | None:
    if mask is None:
        return None
    m = torch.as_tensor(np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask)).bool()
    if tuple(m.shape) != tuple(spatial):
        raise DataError(f"mask shape {tuple(m.shape)} does not match volume shape {tuple(spatial)}")
    if not m.any():
        raise DataError("mask is empty: no voxel to evaluate")
    return m.to(device)


# ----------------------------------------------------------------------------- SSIM

def _window_1d(win_size: int, gaussian: bool, device) -> torch.Tensor:
    """1D window summing to 1 (the reference's window summed to 11)."""
    if gaussian:
        dist = torch.arange(win_size, dtype=torch.float64, device=device) - (win_size - 1) / 2
        w = torch.exp(-0.5 * (dist / SSIM_SIGMA) ** 2)
    else:
        w = torch.ones(win_size, dtype=torch.float64, device=device)
    return w / w.sum()


def _filter(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' filtering along D, H, W: the output covers the voxels whose whole window
    lies inside the volume, i.e. the volume cropped by (win-1)//2 — scikit-image's region."""
    k = w.numel()
    for shape in ((1, 1, k, 1, 1), (1, 1, 1, k, 1), (1, 1, 1, 1, k)):
        v = F.conv3d(v, w.reshape(shape))
    return v


def _check_window(win_size: int, spatial: Sequence[int]) -> None:
    if win_size < 3 or win_size % 2 == 0:
        raise MedlsdmError(f"SSIM win_size must be an odd number >= 3, got {win_size}")
    if min(spatial) < win_size:
        raise DataError(f"volume of shape {tuple(spatial)} is smaller than the SSIM window {win_size}")


def _ssim_and_cs(x: torch.Tensor, y: torch.Tensor, data_range: float, win_size: int,
                 gaussian: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SSIM map and contrast-structure map over the valid region (population covariances)."""
    w = _window_1d(win_size, gaussian, x.device)
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    mu_x, mu_y = _filter(x, w), _filter(y, w)
    var_x = _filter(x * x, w) - mu_x ** 2
    var_y = _filter(y * y, w) - mu_y ** 2
    cov = _filter(x * y, w) - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1)
    return luminance * cs, cs


def ssim_map3d(x, y, data_range: float, win_size: int = 7, gaussian: bool = True) -> torch.Tensor:
    """Local SSIM (N, 1, D-2r, H-2r, W-2r), r = (win_size-1)//2, leading axes folded into N."""
    tx, ty = _volumes(x, y)
    _check_window(win_size, tx.shape[-3:])
    return _ssim_and_cs(tx, ty, _data_range(data_range), win_size, gaussian)[0]


def ssim3d(x, y, data_range: float, win_size: int = 7, gaussian: bool = True, mask=None) -> float:
    """Mean 3D SSIM (Wang et al. 2004) over the valid region, or over the foreground ``mask``
    (D, H, W) restricted to that region.

    Gaussian window: sigma 1.5 over ``win_size`` taps, normalised to sum 1; ``gaussian=False``
    uses a uniform window. K1 = 0.01, K2 = 0.03, population (not sample) covariances. With
    ``win_size=11`` this equals ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False)``; the default 7 fits small volumes better.
    ``data_range`` is the volumes' real value range (2.0 for [-1, 1]).
    """
    smap = ssim_map3d(x, y, data_range, win_size, gaussian)
    m = _mask_tensor(mask, tuple(np.shape(x))[-3:], smap.device)
    if m is None:
        return float(smap.mean())
    r = (win_size - 1) // 2
    inner = m[r:m.shape[0] - r, r:m.shape[1] - r, r:m.shape[2] - r]
    if not inner.any():
        raise DataError(f"mask has no voxel at least {r} voxels away from the volume border")
    return float(smap[:, 0][:, inner].mean())


def ms_ssim_settings(shape: Sequence[int], scales: int | None = None,
                     win_size: int | None = None) -> tuple[int, int]:
    """(scales, win_size) for MS-SSIM on volumes of spatial ``shape``.

    Each scale halves every axis (2× average pooling), so at S scales the coarsest volume has
    n // 2**(S-1) voxels on its shortest axis n, and the window must fit there. Rule when not
    given: keep the standard 5 scales with the largest window in (7, 5, 3) that fits; if not even
    3 fits, use fewer scales with a window of 3 (64³ -> 5 scales, window 3; 128³ -> 5 scales,
    window 7; 32×256×256 -> 4 scales, window 3; 16³ -> 3 scales, window 3). A given ``scales``
    gets the largest window in (7, 5, 3) that fits; a given ``win_size`` gets the most scales (up
    to 5) that fit. Volumes under 3 voxels on an axis (or under the given window) are refused.
    """
    n = int(min(shape))
    if scales is not None and not 1 <= scales <= len(MS_SSIM_WEIGHTS):
        raise MedlsdmError(f"MS-SSIM scales must be 1..{len(MS_SSIM_WEIGHTS)}, got {scales}")
    if win_size is not None and (win_size < 3 or win_size % 2 == 0):
        raise MedlsdmError(f"MS-SSIM win_size must be an odd number >= 3, got {win_size}")
    scale_options = [scales] if scales is not None else range(len(MS_SSIM_WEIGHTS), 0, -1)
    window_options = [win_size] if win_size is not None else _MS_SSIM_WINDOWS
    for s in scale_options:
        for w in window_options:
            if n // 2 ** (s - 1) >= w:
                return s, w
    raise DataError(f"volume of shape {tuple(shape)} is too small for MS-SSIM with "
                    f"scales={scales or 1}, win_size={win_size or 3} (shortest axis {n} voxels)")


def ms_ssim3d(x, y, data_range: float, scales: int | None = None, win_size: int | None = None,
              gaussian: bool = True) -> float:
    """Multi-scale SSIM: prod_j cs_j^w_j × ssim_S^w_S with the Wang 2003 weights (first
    ``scales`` of them, renormalised to sum 1). Scales and window follow ``ms_ssim_settings``.
    Negative per-scale values are clipped to 0 before the fractional powers (as pytorch-msssim
    and MONAI do), so anti-correlated volumes give 0 rather than NaN."""
    tx, ty = _volumes(x, y)
    dr = _data_range(data_range)
    n_scales, win = ms_ssim_settings(tx.shape[-3:], scales, win_size)
    weights = torch.tensor(MS_SSIM_WEIGHTS[:n_scales], dtype=torch.float64)
    weights = weights / weights.sum()
    values = []
    for level in range(n_scales):
        ssim_map, cs_map = _ssim_and_cs(tx, ty, dr, win, gaussian)
        last = level == n_scales - 1
        values.append((ssim_map if last else cs_map).flatten(1).mean(1).clamp_min(0))
        if not last:
            tx, ty = F.avg_pool3d(tx, 2), F.avg_pool3d(ty, 2)
    per_channel = torch.prod(torch.stack(values, 1).cpu() ** weights, dim=1)
    return float(per_channel.mean())


# ----------------------------------------------------------------------------- intensity errors

def _masked_diff(x, y, mask) -> torch.Tensor:
    tx, ty = _volumes(x, y)
    diff = (tx - ty)[:, 0]
    m = _mask_tensor(mask, diff.shape[-3:], diff.device)
    return diff.flatten() if m is None else diff[:, m].flatten()


def psnr(x, y, data_range: float, mask=None) -> float:
    """Peak signal-to-noise ratio 10·log10(data_range² / MSE) in dB; ``float('inf')`` when the
    volumes are identical (use ``json_safe`` before writing JSON)."""
    dr = _data_range(data_range)
    mse = float((_masked_diff(x, y, mask) ** 2).mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(dr * dr / mse)


def rmse(x, y, mask=None) -> float:
    """Root mean squared error, in the volumes' units (inside ``mask`` when given)."""
    return math.sqrt(float((_masked_diff(x, y, mask) ** 2).mean()))


def mae(x, y, mask=None) -> float:
    """Mean absolute error, in the volumes' units (inside ``mask`` when given)."""
    return float(_masked_diff(x, y, mask).abs().mean())


def json_safe(value: Any, nonfinite: str = "null") -> Any:
    """``value`` with numpy types turned into Python ones and non-finite floats (PSNR of identical
    volumes, NaN Dice of absent classes) turned into ``None`` (``nonfinite="null"``) or the strings
    "inf", "-inf", "nan" (``nonfinite="string"``), recursively, so ``json.dumps`` writes valid JSON."""
    if nonfinite not in ("null", "string"):
        raise ValueError(f"nonfinite must be 'null' or 'string', got {nonfinite!r}")
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, nonfinite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, nonfinite) for v in value]
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return json_safe(np.asarray(value.cpu() if isinstance(value, torch.Tensor) else value).tolist(),
                         nonfinite)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        if nonfinite == "null":
            return None
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


# ----------------------------------------------------------------------------- overlap

def _labels(a, name: str, num_classes: int) -> np.ndarray:
    arr = np.asarray(a.cpu() if isinstance(a, torch.Tensor) else a)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise DataError(f"{name} label map has non-integer values")
    elif arr.dtype.kind not in "iub":
        raise DataError(f"{name} label map has dtype {arr.dtype}, expected integers")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise DataError(f"{name} label map has values outside 0..{num_classes - 1}: "
                        f"min {arr.min()}, max {arr.max()}")
    return arr


def confusion_matrix(pred, ref, num_classes: int) -> np.ndarray:
    """(K, K) voxel counts, rows = reference class, columns = predicted class. Sum these over
    volumes to get dataset-level (pooled) overlap scores with ``overlap_from_confusion``."""
    if num_classes < 1:
        raise MedlsdmError(f"num_classes must be >= 1, got {num_classes}")
    p, r = _labels(pred, "predicted", num_classes), _labels(ref, "reference", num_classes)
    if p.shape != r.shape:
        raise DataError(f"label maps differ in shape: predicted {p.shape}, reference {r.shape}")
    counts = np.bincount(r.ravel() * num_classes + p.ravel(), minlength=num_classes ** 2)
    return counts.reshape(num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def overlap_from_confusion(conf: np.ndarray, include_background: bool = False) -> dict[int, dict[str, float]]:
    """Per class: Dice, IoU, precision, recall from a confusion matrix.

    Undefined ratios are NaN: Dice and IoU of a class absent from both maps, precision of a class
    never predicted, recall of a class absent from the reference. ``mean_over_classes`` skips NaN.
    Background (class 0) is left out unless ``include_background`` (the reference counted it,
    inflating Dice with the easy background).
    """
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    fp = conf.sum(0) - tp
    fn = conf.sum(1) - tp
    scores = {"dice": _ratio(2 * tp, 2 * tp + fp + fn), "iou": _ratio(tp, tp + fp + fn),
              "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn)}
    first = 0 if include_background else 1
    return {c: {k: float(v[c]) for k, v in scores.items()} for c in range(first, conf.shape[0])}


def overlap_per_class(pred, ref, num_classes: int, include_background: bool = False) -> dict[int, dict[str, float]]:
    """``{class: {"dice", "iou", "precision", "recall"}}`` for two integer label maps."""
    return overlap_from_confusion(confusion_matrix(pred, ref, num_classes), include_background)


def dice_per_class(pred, ref, num_classes: int, include_background: bool = False) -> dict[int, float]:
    """``{class: Dice}``; background excluded by default; NaN when the class is in neither map."""
    return {c: s["dice"] for c, s in overlap_per_class(pred, ref, num_classes, include_background).items()}


def mean_over_classes(per_class: Mapping[int, float]) -> float:
    """Mean of the finite scores (NaN ones — classes absent from both maps — are skipped); NaN
    when no class has a score."""
    values = np.array([v for v in per_class.values() if np.isfinite(v)], dtype=np.float64)
    return float(values.mean()) if values.size else math.nan


# ----------------------------------------------------------------------------- distributions

def _features(a, name: str) -> np.ndarray:
    arr = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    if arr.ndim != 2:
        raise DataError(f"{name} features must be a 2D array (samples, dims), got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise DataError(f"{name} features: at least 2 samples are needed, got {arr.shape[0]}")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{name} features contain NaN or infinite values")
    return arr


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) in float64 of exactly the given rows (samples × dims), covariance with
    the N-1 denominator as pytorch-fid. The input is never modified."""
    arr = _features(features, "input")
    return arr.mean(axis=0), np.cov(arr, rowvar=False).reshape(arr.shape[1], arr.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1-mu2|² + tr(S1) + tr(S2) - 2·tr((S1 S2)^½).

    tr((S1 S2)^½) is computed as the sum of square roots of the eigenvalues of the symmetric PSD
    matrix S1^½ S2 S1^½ (same eigenvalues as S1 S2), so singular covariances (fewer samples than
    dimensions) need no epsilon and give no complex parts. Tiny negative eigenvalues from rounding
    are clipped; the result is clipped at 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise DataError(f"Fréchet distance: shapes do not match: mu {mu1.shape}, {mu2.shape}; "
                        f"sigma {s1.shape}, {s2.shape}")
    evals, evecs = np.linalg.eigh((s1 + s1.T) / 2)
    sqrt_s1 = (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T
    middle = sqrt_s1 @ s2 @ sqrt_s1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    return float(max(value, 0.0))


def fid_from_features(real_features, fake_features) -> float:
    """FID between two feature sets (samples × dims); each set's statistics from its own rows."""
    mu_r, s_r = feature_statistics(real_features)
    mu_f, s_f = feature_statistics(fake_features)
    if mu_r.shape != mu_f.shape:
        raise DataError(f"real and fake features differ in dimension: {mu_r.shape[0]} vs {mu_f.shape[0]}")
    return frechet_distance(mu_r, s_r, mu_f, s_f)


def _sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.clip(d, 0, None)


def nyquist_energy(volume: np.ndarray) -> np.ndarray:
    """Checkerboard measure per spatial axis of a (C,) D, H, W volume: the spectral power (mean
    removed, channels summed, summed over the other axes) at the Nyquist frequency of that axis —
    the 2-voxel period at which transposed-convolution upsampling leaves its checkerboard — over
    the mean power of the band just below it (3/8 to 1/2 cycles per voxel). Relative to its own
    neighbourhood, so a smooth image and a noisy one both sit near or below 1 and a checkerboard
    stands out as a peak. An axis of odd length has no exact Nyquist bin: its highest bin is used.
    Returns 3 values (D, H, W)."""
    x = np.asarray(volume, dtype=np.float64)
    x = x[None] if x.ndim == 3 else x
    x = x - x.mean(axis=(1, 2, 3), keepdims=True)
    power = np.abs(np.fft.fftn(x, axes=(1, 2, 3))) ** 2
    out = []
    for axis in (1, 2, 3):
        n = x.shape[axis]
        others = tuple(a for a in range(4) if a != axis)
        profile = power.sum(axis=others)                      # power per frequency bin of this axis
        freq = np.abs(np.fft.fftfreq(n))
        top = freq.max()
        band = (freq >= 0.375) & (freq < top)
        ref = profile[band].mean() if band.any() else float("nan")
        peak = profile[freq == top].mean()
        out.append(float(peak / ref) if ref > 0 else float("nan"))
    return np.asarray(out)


def checkerboard_ratio(real: Sequence[np.ndarray], synthetic: Sequence[np.ndarray]) -> dict:
    """Mean Nyquist peak (`nyquist_energy` of each volume) of synthetic volumes over that of real
    ones, per axis and overall (1: no more 2-voxel-period energy than real images; a checkerboard
    gives > 1)."""
    r = np.mean(np.asarray(real, dtype=np.float64), axis=0)
    s = np.mean(np.asarray(synthetic, dtype=np.float64), axis=0)
    per_axis = {axis: float(a / b) if b > 0 else float("nan") for axis, a, b in zip("DHW", s, r)}
    return {"value": float(s.sum() / r.sum()) if r.sum() > 0 else float("nan"), "per_axis": per_axis,
            "real": r.tolist(), "synthetic": s.tolist()}


def mmd(x_features, y_features, kernel: str = "rbf", bandwidth: float | None = None,
        degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> float:
    """Unbiased squared maximum mean discrepancy (Gretton et al. 2012) between two samples.

    ``kernel="rbf"``: exp(-|a-b|² / (2·bandwidth²)); bandwidth None = median heuristic (median
    pairwise distance in the pooled sample). ``kernel="poly"``: (gamma·a·b + coef0)^degree with
    gamma = 1/dims by default — the KID kernel. Being unbiased, the estimate can be slightly
    negative when the two distributions are the same.
    """
    x, y = _features(x_features, "first"), _features(y_features, "second")
    if x.shape[1] != y.shape[1]:
        raise DataError(f"MMD: feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    if kernel == "rbf":
        dxx, dyy, dxy = _sq_distances(x, x), _sq_distances(y, y), _sq_distances(x, y)
        if bandwidth is None:
            pooled = np.concatenate([x, y])
            dist = np.sqrt(_sq_distances(pooled, pooled)[np.triu_indices(len(pooled), 1)])
            bandwidth = float(np.median(dist)) or 1.0  # all points equal: any bandwidth gives 0
        if bandwidth <= 0:
            raise MedlsdmError(f"MMD bandwidth must be positive, got {bandwidth}")
        kxx, kyy, kxy = (np.exp(-d / (2 * bandwidth ** 2)) for d in (dxx, dyy, dxy))
    elif kernel == "poly":
        g = 1.0 / x.shape[1] if gamma is None else gamma
        kxx, kyy, kxy = ((g * a @ b.T + coef0) ** degree for a, b in ((x, x), (y, y), (x, y)))
    else:
        raise MedlsdmError(f"MMD kernel must be 'rbf' or 'poly', got {kernel!r}")
    m, n = len(x), len(y)
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within_x + within_y - 2 * kxy.mean())


# ----------------------------------------------------------------------------- uncertainty

def bootstrap_mean_ci(values, level: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Mean of the finite ``values`` with a percentile-bootstrap confidence interval
    (``scipy.stats.bootstrap``, seeded): ``{"mean", "ci_low", "ci_high", "n", "level"}``.
    The interval is NaN for fewer than 2 values, and collapses onto the mean when all are equal."""
    from scipy.stats import bootstrap

    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    out = {"mean": float(arr.mean()) if arr.size else math.nan, "ci_low": math.nan, "ci_high": math.nan,
           "n": int(arr.size), "level": level}
    if arr.size >= 2 and np.ptp(arr) == 0:
        out["ci_low"] = out["ci_high"] = out["mean"]
    elif arr.size >= 2:
        res = bootstrap((arr,), np.mean, confidence_level=level, n_resamples=n_resamples, method="percentile",
                        vectorized=True, rng=np.random.default_rng(seed))
        out["ci_low"], out["ci_high"] = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return out
