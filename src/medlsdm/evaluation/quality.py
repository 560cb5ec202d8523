"""Image quality of synthetic volumes: paired, distributional and diversity metrics.

* **Paired** (each synthetic volume vs the real case whose label map generated it, on one grid):
  3D SSIM, MS-SSIM, PSNR, RMSE, MAE, LPIPS slice-wise (VGG and/or AlexNet weights, when present).
  The data range is the real volume's max - min (or ``data_range``), never 255 or 1 on other
  data. With ``mask="foreground"`` SSIM, PSNR, RMSE and MAE are computed inside the real case's
  label map > 0; MS-SSIM (its pooling needs whole volumes) and LPIPS stay whole-volume.
* **Distributional** (all real vs all synthetic volumes of the two folders; pairing not needed):
  2D FID of Inception features of slices along each axis, 3D FID of MedicalNet features (when
  the user has its weights) and of a fixed random 3D CNN (always; no weights needed), MMD²
  (RBF kernel, median bandwidth) on the MedicalNet features — or, without MedicalNet, on
  intensities average-pooled to 8³ per channel (a feature-free comparison of coarse anatomy and
  contrast). For slices and pooled intensities every volume is mapped to [0, 1] with the real
  folder's global min/max per channel, the same mapping for real and synthetic, so intensity
  shifts of the synthetic data count. Multi-channel volumes: slices of all channels form one
  set; MedicalNet features of the channels are concatenated.
* **Diversity**: mean pairwise MS-SSIM among the samples of each label map (cases with >= 2
  samples) and among real volumes (lower = more diverse; ``evaluation.diversity``); with label
  maps, the spread of global appearance (noise, tissue contrast, bias field) over the samples of
  one map against its spread over the real volumes.

Axis names: arrays are read in the file's voxel axes (i, j, k); slices "D", "H", "W" are taken
along k, j, i (for RAS-like files: axial, coronal, sagittal), the model layout's D, H, W.

Optional metrics whose weights are missing are skipped with the reason when they were not asked
for; naming them in ``metrics`` makes the missing file an error.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medlsdm.data.geometry import MODEL_AXES
from medlsdm.errors import DataError, MedlsdmError
from medlsdm.evaluation import metrics as M
from medlsdm.evaluation.diversity import mean_pairwise_ms_ssim
from medlsdm.evaluation.pairing import (Pairing, VolumeFiles, check_same_grid, load_image,
                                        load_label, pair_by_case, scan_folder)

__all__ = ["QUALITY_METRICS", "PAIRED_METRICS", "resolve_metrics", "paired_metrics",
           "summarise", "evaluate_quality"]

log = logging.getLogger(__name__)

PAIRED_METRICS = ("ssim", "ms_ssim", "psnr", "rmse", "mae")
QUALITY_METRICS = PAIRED_METRICS + ("lpips", "fid2d", "fid3d", "fid3d_random", "mmd", "checkerboard", "diversity")
LPIPS_NETS = ("vgg", "alex")
MMD_POOL = 8           # side of the pooled intensity grid for feature-free MMD
FID_AXES = MODEL_AXES   # slices along every axis of the model layout


def resolve_metrics(metrics: Sequence[str] | str | None) -> tuple[list[str], bool]:
    """(metric names, explicit). None or "all" = every metric, those lacking weights skipped."""
    if metrics is None or metrics == "all":
        return list(QUALITY_METRICS), False
    names = [m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    unknown = [m for m in names if m not in QUALITY_METRICS]
    if unknown or not names:
        raise MedlsdmError(f"--metrics: unknown {', '.join(unknown) or 'empty list'}; choose from "
                           f"{','.join(QUALITY_METRICS)}")
    return list(dict.fromkeys(names)), True


# ----------------------------------------------------------------------------- paired

def paired_metrics(real: np.ndarray, fake: np.ndarray, data_range: float, mask=None,
                   names: Sequence[str] = PAIRED_METRICS, ssim_window: int = 7) -> dict[str, float]:
    """The named voxel metrics of one pair (C, X, Y, Z) on ``data_range``; ``mask`` (X, Y, Z)
    restricts SSIM, PSNR, RMSE and MAE. ``ssim_window``: Gaussian SSIM window (7 here by default;
    11 as in most papers and scikit-image's ``gaussian_weights=True``)."""
    fns: dict[str, Callable[[], float]] = {
        "ssim": lambda: M.ssim3d(real, fake, data_range, win_size=ssim_window, mask=mask),
        "ms_ssim": lambda: M.ms_ssim3d(real, fake, data_range),
        "psnr": lambda: M.psnr(real, fake, data_range, mask=mask),
        "rmse": lambda: M.rmse(real, fake, mask=mask),
        "mae": lambda: M.mae(real, fake, mask=mask),
    }
    return {n: fns[n]() for n in names if n in fns}


def summarise(values: Sequence[float]) -> dict:
    """mean, std (population), n of per-volume values; inf stays inf (PSNR of identical volumes)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    finite = arr[np.isfinite(arr)]
    if finite.size == arr.size:
        return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size)}
    # All-infinite: mean inf, spread 0; a mix: mean inf, spread undefined.
    return {"mean": float(np.mean(arr)), "std": 0.0 if finite.size == 0 else math.nan, "n": int(arr.size)}


class _Lpips:
    """LPIPS networks found on disk, by backbone name; mean over every slice along D, H and W."""

    def __init__(self, nets: dict, device: str, explicit: bool, skipped: dict):
        self.nets, self.device, self.explicit, self.skipped = nets, device, explicit, skipped

    def __call__(self, real: np.ndarray, fake: np.ndarray, lo: float, hi: float) -> dict[str, float]:
        from medlsdm.models.perceptual import lpips_slices

        scale = 2.0 / (hi - lo) if hi > lo else 1.0
        # Both volumes mapped with the real one's range to [-1, 1], LPIPS's input range.
        x = torch.from_numpy(np.transpose((real - lo) * scale - 1, (0, 3, 2, 1)).copy()).float()[None]
        y = torch.from_numpy(np.transpose((fake - lo) * scale - 1, (0, 3, 2, 1)).copy()).float()[None]
        out = {}
        for name, net in list(self.nets.items()):
            try:
                out[f"lpips_{name}"] = lpips_slices(x, y, net, axes=FID_AXES)
            except RuntimeError as exc:  # e.g. AlexNet's stride-4 stem on slices under ~32 pixels
                reason = f"LPIPS-{name} cannot run on slices of volume shape {real.shape[1:]} ({str(exc).splitlines()[0]})"
                if self.explicit:
                    raise DataError(reason) from None
                self.skipped[f"lpips_{name}"] = reason
                del self.nets[name]
        return out


def _load_lpips(net: str | None, backbone, heads, device: str, explicit: bool, skipped: dict) -> _Lpips | None:
    """LPIPS networks whose weights are found. ``net`` None: VGG and AlexNet, whichever exist
    (VGG only when files are given: one backbone file fits one network). Missing files are an
    error when LPIPS was asked for or the files were named, else the metric is skipped."""
    from medlsdm.models import perceptual as P

    if net not in (None, *LPIPS_NETS):
        raise MedlsdmError(f"--lpips-net must be one of {', '.join(LPIPS_NETS)}, got {net!r}")
    named = backbone is not None or heads is not None
    candidates = [net] if net else (["vgg"] if named else list(LPIPS_NETS))
    nets, reasons = {}, []
    for name in candidates:
        try:
            b, h = P.find_lpips_weights(name, backbone, heads)
            nets[name] = P.LPIPS(name, b, h).to(device)
        except MedlsdmError as exc:
            if named or net:
                raise
            reasons.append(str(exc))
    if not nets:
        if explicit:
            raise MedlsdmError(f"lpips requested but {reasons[0]}")
        skipped["lpips"] = "; ".join(reasons)
        return None
    return _Lpips(nets, device, explicit, skipped)


# ----------------------------------------------------------------------------- distributional

def _display_layout(channel: np.ndarray) -> np.ndarray:
    """(X, Y, Z) file axes -> (D, H, W) = (Z, Y, X)."""
    return np.ascontiguousarray(np.transpose(channel, (2, 1, 0)))


class _Distribution:
    """Per-volume features (cached in OUT/cache) for 2D FID, 3D FID and MMD."""

    def __init__(self, cache, ranges: np.ndarray, inception=None, medicalnet=None, fid_slices: int = 32,
                 fid_axes: Sequence[str] = FID_AXES, random3d=None):
        self.cache, self.ranges = cache, ranges
        self.inception, self.medicalnet, self.fid_slices = inception, medicalnet, fid_slices
        self.random3d = random3d
        self.fid_axes = tuple(fid_axes)

    def _unit(self, array: np.ndarray) -> np.ndarray:
        lo, hi = self.ranges[:, 0], self.ranges[:, 1]
        scale = np.where(hi > lo, hi - lo, 1.0)
        return np.clip((array - lo[:, None, None, None]) / scale[:, None, None, None], 0, 1).astype(np.float32)

    def slice_features(self, files: VolumeFiles, array: np.ndarray) -> dict[str, np.ndarray]:
        from medlsdm.evaluation.features import slices_for_fid

        out = {}
        unit = self._unit(array)
        for axis in self.fid_axes:
            def compute(axis=axis):
                feats = []
                for chan in unit:
                    vol = _display_layout(chan)
                    n = vol.shape[FID_AXES.index(axis)]
                    every = max(1, math.ceil(n / self.fid_slices))
                    stack = slices_for_fid(vol, axes=(axis,), every=every, data_range=(0.0, 1.0),
                                           skip_blank=True)[axis]
                    if len(stack):
                        feats.append(self.inception(stack))
                return np.concatenate(feats) if feats else np.zeros((0, 2048))
            params = {"axis": axis, "n": self.fid_slices, "ranges": self.ranges.tolist(), "skip_blank": True}
            out[axis] = self.cache.load_or_compute(files.images[0], self.inception.name, compute, params)
        return out

    def random_features(self, files: VolumeFiles, array: np.ndarray) -> np.ndarray:
        unit = self._unit(array)
        return self.cache.load_or_compute(
            files.images[0], self.random3d.name, lambda: np.concatenate([self.random3d([_display_layout(c)])[0]
                                                                         for c in unit]),
            {"ranges": self.ranges.tolist()})

    def volume_features(self, files: VolumeFiles, array: np.ndarray) -> np.ndarray:
        return self.cache.load_or_compute(
            files.images[0], self.medicalnet.name,
            lambda: np.concatenate([self.medicalnet([_display_layout(c)])[0] for c in array]))

    def pooled_intensities(self, array: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(self._unit(array))[None]
        return F.adaptive_avg_pool3d(t, MMD_POOL).flatten().double().numpy()


def _global_ranges(real: Mapping[str, VolumeFiles]) -> tuple[np.ndarray, dict[str, tuple[float, float]]]:
    """Per-channel (min, max) over all real volumes, and each real case's overall (min, max)."""
    lo, hi, per_case = None, None, {}
    for name, files in real.items():
        arr, _ = load_image(files)
        flat = arr.reshape(arr.shape[0], -1)
        c_lo, c_hi = flat.min(1), flat.max(1)
        if lo is not None and len(c_lo) != len(lo):
            raise DataError(f"{files.display}: {len(c_lo)} channels, other real volumes have {len(lo)}")
        lo = c_lo if lo is None else np.minimum(lo, c_lo)
        hi = c_hi if hi is None else np.maximum(hi, c_hi)
        per_case[name] = (float(c_lo.min()), float(c_hi.max()))
    return np.stack([lo, hi], 1).astype(np.float64), per_case


def _fid_block(real_feats: list[dict], syn_feats: list[dict], name: str) -> dict:
    axes = list(real_feats[0])
    per_axis = {}
    for axis in axes:
        r = np.concatenate([f[axis] for f in real_feats])
        s = np.concatenate([f[axis] for f in syn_feats])
        if len(r) < 2 or len(s) < 2:
            raise DataError(f"2D FID along {axis}: fewer than 2 non-blank slices ({len(r)} real, {len(s)} synthetic)")
        per_axis[axis] = M.fid_from_features(r, s)
    n_r = {a: int(sum(len(f[a]) for f in real_feats)) for a in axes}
    n_s = {a: int(sum(len(f[a]) for f in syn_feats)) for a in axes}
    return {"per_axis": per_axis, "mean": float(np.mean(list(per_axis.values()))), "features": name,
            "n_real_slices": n_r, "n_synthetic_slices": n_s}


# ----------------------------------------------------------------------------- main

def evaluate_quality(real: str | os.PathLike, synthetic: str | os.PathLike, out_dir: str | os.PathLike, *,
                     labels: str | os.PathLike | None = None, metrics: Sequence[str] | str | None = None,
                     data_range: float | None = None, mask: str | None = None,
                     inception: str | os.PathLike | None = None, medicalnet: str | os.PathLike | None = None,
                     lpips_backbone: str | os.PathLike | None = None,
                     lpips_heads: str | os.PathLike | None = None, lpips_net: str | None = None,
                     device: str = "cpu",
                     fid_slices: int = 32, fid_axes: Sequence[str] = FID_AXES, max_pairs: int = 50,
                     figures: bool = True, unpaired: bool = False, ssim_window: int = 7,
                     progress: bool = True) -> dict:
    """Evaluate ``synthetic`` against ``real``; write OUT/metrics.json and figures; return the dict.

    ``fid_slices``: at most this many slices per axis, channel and volume enter 2D FID (evenly
    spaced; blank slices dropped), along each of ``fid_axes`` (D, H, W). ``max_pairs``: pairs drawn for each diversity estimate.
    ``unpaired``: the synthetic volumes belong to no real case (an unconditional model): no
    paired metrics; distributions, and diversity among all synthetic volumes.
    """
    from tqdm.auto import tqdm

    from medlsdm.files import ensure_writable_dir, relative_path, write_json

    names, explicit = resolve_metrics(metrics)
    if mask not in (None, "foreground"):
        raise MedlsdmError(f"--mask: only 'foreground' is supported, got {mask!r}")
    if data_range is not None and not (np.isfinite(data_range) and data_range > 0):
        raise MedlsdmError(f"--data-range must be a positive number, got {data_range}")
    if ssim_window < 3 or ssim_window % 2 == 0:
        raise MedlsdmError(f"--ssim-window must be an odd number >= 3, got {ssim_window}")
    out_dir = ensure_writable_dir(out_dir)
    if Path(real).resolve() == Path(synthetic).resolve():
        log.warning("--real and --synthetic are the same folder: every paired score is perfect by construction")

    real_files = scan_folder(real, "real volumes", labels)
    syn_files = scan_folder(synthetic, "synthetic volumes")
    pairing = Pairing([], sorted(real_files), sorted(syn_files)) if unpaired else \
        pair_by_case(real_files, syn_files, real, synthetic)
    if mask == "foreground":
        missing = sorted({p.case_id for p in pairing.pairs if p.real.label is None})
        if missing:
            raise DataError(f"--mask foreground needs label maps: none found for {', '.join(missing[:5])} "
                            f"(give --labels DIR or use the images/ + labels/ layout)")
    ranges, case_ranges = _global_ranges(real_files)
    skipped: dict[str, str] = {}
    lpips = _load_lpips(lpips_net, lpips_backbone, lpips_heads, device, explicit, skipped) \
        if "lpips" in names else None

    per_case, diversity_per_case, appearance_groups = [], {}, {}
    want_paired = [m for m in PAIRED_METRICS if m in names]
    for case_id, pairs in tqdm(pairing.by_case().items(), desc="paired metrics", disable=not progress, leave=False):
        real_arr, real_aff = load_image(pairs[0].real)
        lo, hi = case_ranges[case_id]
        dr = data_range if data_range is not None else (hi - lo if hi > lo else 1.0)
        fg = _foreground(pairs[0].real, real_arr, real_aff) if mask == "foreground" else None
        samples = []
        for pair in pairs:
            fake, fake_aff = load_image(pair.synthetic)
            check_same_grid(real_arr.shape, real_aff, pair.real.display, fake.shape, fake_aff, pair.synthetic.display)
            if fake.shape[0] != real_arr.shape[0]:
                raise DataError(f"{pair.synthetic.display} has {fake.shape[0]} channels, "
                                f"{pair.real.display} has {real_arr.shape[0]}")
            row = {"case_id": case_id, "sample": pair.sample, "synthetic": pair.synthetic.display,
                   "data_range": dr}
            row.update(_paired_row(real_arr, fake, dr, fg, want_paired, explicit, skipped, ssim_window))
            if lpips is not None:
                row.update(lpips(real_arr, fake, lo, hi))
            per_case.append(row)
            if "diversity" in names:
                samples.append(fake)
        if len(samples) >= 2:
            diversity_per_case[case_id] = _case_diversity(samples, dr, max_pairs)
            if pairs[0].real.label is not None:
                appearance_groups[case_id] = (pairs[0].real.label, [v[0] for v in samples])
    if unpaired and "diversity" in names and len(syn_files) >= 2:
        width = float(np.max(ranges[:, 1]) - np.min(ranges[:, 0])) or 1.0
        diversity_per_case[UNPAIRED_GROUP] = _case_diversity([load_image(f)[0] for f in syn_files.values()],
                                                             width, max_pairs)

    metric_keys = [k for k in (*PAIRED_METRICS, "lpips_vgg", "lpips_alex") if any(k in r for r in per_case)]
    data = {
        # Input folders relative to this report's folder: no absolute location in a report.
        "kind": "medlsdm-quality", "real": relative_path(real, out_dir), "synthetic": relative_path(synthetic, out_dir),
        "labels": None if labels is None else relative_path(labels, out_dir), "mask": mask,
        "mask_note": "SSIM, PSNR, RMSE, MAE inside the mask; MS-SSIM and LPIPS on whole volumes" if mask else None,
        "data_range_rule": f"given: {data_range}" if data_range is not None else "each real volume's max - min",
        "metrics_requested": names, "pairing": pairing.summary(),
        "paired": {"per_case": per_case,
                   "summary": {k: summarise([r[k] for r in per_case if k in r]) for k in metric_keys}},
        "distribution": _distribution(real_files, syn_files, ranges, names, explicit, skipped, out_dir,
                                      inception, medicalnet, device, fid_slices, fid_axes, progress),
    }
    if "diversity" in names:
        data["diversity"] = _diversity(real_files, diversity_per_case, ranges, max_pairs, explicit, skipped)
        data["diversity"]["appearance"] = _appearance(real_files, appearance_groups, skipped)
    data["skipped"] = skipped
    data["settings"] = metric_settings(data, ssim_window, lpips, fid_slices, fid_axes)
    if figures:
        data["figures"] = _unpaired_figures(out_dir, syn_files) if unpaired else \
            _quality_figures(out_dir, pairing, max_cases=4)
    else:
        data["figures"] = []
    write_json(out_dir / "metrics.json", M.json_safe(data, nonfinite="string"))
    return data


def metric_settings(data: dict, ssim_window: int, lpips, fid_slices: int, fid_axes: Sequence[str]) -> dict:
    """Every setting a reader needs to compare these numbers with others' (recorded in
    metrics.json and shown in the report)."""
    dist = data.get("distribution", {})
    out = {
        "ssim": {"window": ssim_window, "window_shape": "Gaussian", "sigma": M.SSIM_SIGMA, "k1": M.K1, "k2": M.K2,
                 "covariance": "population", "region": "valid (volume cropped by (window-1)/2)",
                 "note": "window 11 = scikit-image gaussian_weights=True and most papers"},
        "ms_ssim": {"weights": list(M.MS_SSIM_WEIGHTS), "rule": "5 scales with the largest window in (7, 5, 3) "
                                                                "that fits the coarsest scale, else fewer scales"},
        "data_range_rule": data.get("data_range_rule"),
        "psnr": "10 log10(data_range^2 / MSE)",
        "mask": data.get("mask"),
    }
    if lpips is not None:
        out["lpips"] = {"version": "0.1", "slices": "every slice along D, H and W",
                        "input": "both volumes mapped with the real volume's min/max to [-1, 1]",
                        "networks": {name: net.provenance for name, net in lpips.nets.items()}}
    if dist.get("fid2d"):
        out["fid2d"] = {"axes": list(fid_axes), "slices_per_axis": f"at most {fid_slices} per axis, channel and "
                                                                    "volume, evenly spaced; blank slices dropped",
                        "intensity": "real folder's global min/max per channel -> [0, 1], same for synthetic",
                        "resize": "bilinear to 299 x 299", "network": dist["fid2d"].get("weights")}
    for key in ("fid3d", "fid3d_random"):
        if dist.get(key):
            out[key] = {"features": dist[key].get("features"), "network": dist[key].get("weights")}
    return out


def _foreground(files: VolumeFiles, image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The label map's foreground, which must lie on the image's grid: same shape and affine (a
    map shifted or rotated against the image would mask the wrong anatomy)."""
    label, label_affine = load_label(files.label)
    check_same_grid(label.shape, label_affine, str(files.label), image.shape[1:], affine, files.display)
    return label > 0


def _paired_row(real, fake, dr, fg, names, explicit, skipped, ssim_window) -> dict:
    row = {}
    for name in names:
        if name in skipped:
            continue
        try:
            row.update(paired_metrics(real, fake, dr, fg, [name], ssim_window))
        except DataError as exc:  # e.g. MS-SSIM on a volume too small for it
            if explicit:
                raise
            skipped[name] = str(exc)
    return row


UNPAIRED_GROUP = "all synthetic volumes"   # the diversity group of unpaired (unconditional) samples


def _case_diversity(samples: list[np.ndarray], dr: float, max_pairs: int) -> float | None:
    """Mean pairwise MS-SSIM of one label map's samples; None when MS-SSIM cannot run on them."""
    try:
        return mean_pairwise_ms_ssim(samples, dr, max_pairs=max_pairs)
    except DataError:
        return None


def _diversity(real_files, per_case, ranges, max_pairs, explicit, skipped) -> dict:
    values = {c: v for c, v in per_case.items() if v is not None}
    out = {"synthetic_per_case": values,
           "synthetic_mean": float(np.mean(list(values.values()))) if values else math.nan,
           "real": math.nan,
           "note": "mean pairwise MS-SSIM on each case's real data range (synthetic) and on the "
                   "real folder's global range (real); lower = more diverse"}
    reasons = []
    if not values:
        reasons.append("no label map has 2 or more synthetic samples")
    real_list = list(real_files.values())
    if len(real_list) >= 2:
        from medlsdm.evaluation.diversity import sample_pairs

        pairs = sample_pairs(len(real_list), max_pairs)
        width = float(np.max(ranges[:, 1]) - np.min(ranges[:, 0])) or 1.0
        try:
            scores = []
            for i, j in pairs:
                a, b = load_image(real_list[i])[0], load_image(real_list[j])[0]
                if a.shape != b.shape:
                    raise DataError(f"real volumes differ in shape ({real_list[i].display} {a.shape}, "
                                    f"{real_list[j].display} {b.shape}): no real diversity")
                scores.append(M.ms_ssim3d(a, b, width))
            out["real"] = float(np.mean(scores))
        except DataError as exc:
            reasons.append(str(exc))
    else:
        reasons.append("fewer than 2 real volumes")
    if reasons:
        if explicit and not values and math.isnan(out["real"]):
            raise DataError("diversity: " + "; ".join(reasons))
        skipped["diversity (part)"] = "; ".join(reasons)
    return out


def _appearance(real_files, groups: dict, skipped: dict) -> dict | None:
    """Spread of the global appearance (noise, tissue contrast, bias field; first channel) over the
    samples of each label map, mean over maps, against its spread over the real volumes
    (`evaluation.diversity.appearance_spread`): a ratio near 1 = samples of one anatomy vary as
    much as real scans do, near 0 = the seed changes nothing the label map leaves open."""
    from medlsdm.data.appearance import tissue_pair
    from medlsdm.evaluation.diversity import appearance_spread, appearance_statistics

    real = [(load_image(f)[0][0], load_label(f.label)[0]) for f in real_files.values() if f.label is not None]
    if len(real) < 2 or not groups:
        skipped["appearance"] = "needs label maps for 2 or more real volumes and a map with 2 or more samples"
        return None
    try:
        tissue, other = tissue_pair([label for _, label in real])
    except DataError as exc:
        skipped["appearance"] = str(exc)
        return None
    left_out = []

    def measured(pairs):
        out = []
        for image, label, name in pairs:
            try:
                out.append(appearance_statistics(image, label, tissue, other))
            except DataError:   # too little of one tissue in this volume's map
                left_out.append(name)
        return out

    real_stats = measured((image, label, "real") for image, label in real)
    synthetic = [measured((v, load_label(path)[0], str(path.name)) for v in volumes) for path, volumes in groups.values()]
    synthetic = [group for group in synthetic if len(group) >= 2]
    if len(real_stats) < 2 or not synthetic:
        skipped["appearance"] = (f"too few volumes with at least {50} voxels of classes {tissue} and {other} "
                                 f"({len(real_stats)} real, {len(synthetic)} label maps with 2 or more samples)")
        return None
    real_spread, syn_spread = appearance_spread([real_stats]), appearance_spread(synthetic)
    return {"tissue": tissue, "other": other, "real_spread": real_spread, "synthetic_spread_within_map": syn_spread,
            "ratio": {k: syn_spread[k] / real_spread[k] if real_spread[k] > 0 else math.nan for k in real_spread},
            "real_mean": {k: float(np.mean([r[k] for r in real_stats])) for k in real_spread},
            "synthetic_mean": {k: float(np.mean([r[k] for g in synthetic for r in g])) for k in real_spread},
            "volumes_left_out": len(left_out),
            "note": f"noise and bias measured in class {tissue} (the thickest foreground class of the real label "
                    f"maps), contrast of class {tissue} against {other} (the largest other one); spread = SD over "
                    "the samples of one map (mean over maps) and over the real volumes; volumes whose map has too "
                    "little of either class are left out"}


def _distribution(real_files, syn_files, ranges, names, explicit, skipped, out_dir, inception,
                  medicalnet, device, fid_slices, fid_axes, progress) -> dict:
    from tqdm.auto import tqdm

    from medlsdm.evaluation.features import (FeatureCache, InceptionFeatureExtractor,
                                             MedicalNetFeatureExtractor, RandomConv3DFeatures)

    wanted = [m for m in ("fid2d", "fid3d", "fid3d_random", "mmd", "checkerboard") if m in names]
    if not wanted:
        return {}
    if min(len(real_files), len(syn_files)) < 2:
        reason = f"needs at least 2 real and 2 synthetic volumes ({len(real_files)} real, {len(syn_files)} synthetic)"
        if explicit:
            raise DataError(f"{', '.join(wanted)}: {reason}")
        skipped.update({m: reason for m in wanted})
        return {}
    inc = med = None
    if "fid2d" in wanted:
        try:
            inc = InceptionFeatureExtractor(inception, device=device)
        except MedlsdmError as exc:
            if explicit or inception is not None:
                raise
            skipped["fid2d"] = str(exc)
    if medicalnet is not None and ("fid3d" in wanted or "mmd" in wanted):
        med = MedicalNetFeatureExtractor(medicalnet, device=device)
    elif "fid3d" in wanted:
        if explicit:
            raise MedlsdmError("fid3d needs --medicalnet FILE (a MedicalNet ResNet checkpoint, "
                               "github.com/Tencent/MedicalNet)")
        skipped["fid3d"] = "no --medicalnet FILE given (MedicalNet ResNet weights for 3D FID)"
    bad_axes = [a for a in fid_axes if a not in FID_AXES]
    if bad_axes or not fid_axes:
        raise MedlsdmError(f"FID slice axes must be among {', '.join(FID_AXES)}, got {list(fid_axes)}")
    dist = _Distribution(FeatureCache(out_dir / "cache"), ranges, inc, med, fid_slices, fid_axes,
                         RandomConv3DFeatures(device=device) if "fid3d_random" in wanted else None)
    feats = {"real": defaultdict(list), "synthetic": defaultdict(list)}
    for side, files_map in (("real", real_files), ("synthetic", syn_files)):
        for files in tqdm(files_map.values(), desc=f"features ({side})", disable=not progress, leave=False):
            arr, _ = load_image(files)
            if arr.shape[0] != len(ranges):
                raise DataError(f"{files.display}: {arr.shape[0]} channels, real volumes have {len(ranges)}")
            if inc is not None:
                feats[side]["slices"].append(dist.slice_features(files, arr))
            if med is not None:
                feats[side]["medicalnet"].append(dist.volume_features(files, arr))
            if dist.random3d is not None:
                feats[side]["random3d"].append(dist.random_features(files, arr))
            if "mmd" in wanted and med is None:
                feats[side]["pooled"].append(dist.pooled_intensities(arr))
            if "checkerboard" in wanted:
                feats[side]["nyquist"].append(M.nyquist_energy(arr))
    out = {"n_real": len(real_files), "n_synthetic": len(syn_files)}
    if inc is not None:
        out["fid2d"] = {**_fid_block(feats["real"]["slices"], feats["synthetic"]["slices"], inc.name),
                        "weights": inc.provenance}
    if med is not None and "fid3d" in wanted:
        out["fid3d"] = {"value": M.fid_from_features(feats["real"]["medicalnet"], feats["synthetic"]["medicalnet"]),
                        "features": med.name, "weights": med.provenance}
    if dist.random3d is not None:
        out["fid3d_random"] = {"value": M.fid_from_features(feats["real"]["random3d"], feats["synthetic"]["random3d"]),
                               "features": dist.random3d.name + " (untrained random 3D CNN, no pretrained "
                                                                "knowledge; compare only with the same network)",
                               "weights": dist.random3d.provenance}
    if "mmd" in wanted:
        key, what = ("medicalnet", med.name) if med is not None else \
            ("pooled", f"intensities average-pooled to {MMD_POOL}^3 per channel (no feature network)")
        out["mmd"] = {"value": M.mmd(feats["real"][key], feats["synthetic"][key]), "features": what,
                      "kernel": "rbf, median bandwidth"}
    if "checkerboard" in wanted:
        out["checkerboard"] = {**M.checkerboard_ratio(feats["real"]["nyquist"], feats["synthetic"]["nyquist"]),
                               "features": "spectral power at the 2-voxel period over the band 3/8-1/2 cycles/voxel, "
                                           "per axis, synthetic / real"}
    return out


# ----------------------------------------------------------------------------- figures

def _quality_figures(out_dir: Path, pairing: Pairing, max_cases: int = 4, max_samples: int = 6) -> list[dict]:
    from medlsdm.evaluation.figures import save_panel_rows, volume_panel

    by_case = pairing.by_case()
    figs = []
    rows, row_titles = [], []
    for case_id, pairs in list(by_case.items())[:max_cases]:
        real_arr, _ = load_image(pairs[0].real)
        label = load_label(pairs[0].real.label)[0] if pairs[0].real.label else None
        fake, _ = load_image(pairs[0].synthetic)
        window = _window(real_arr)
        rows.append([volume_panel(real_arr, window=window),
                     volume_panel(real_arr, label, window=window, label_only=True) if label is not None
                     else volume_panel(real_arr, window=window),
                     volume_panel(fake, window=window)])
        row_titles.append(case_id)
    rel = "figures/quality_cases.png"
    save_panel_rows(out_dir / rel, rows, ["real", "label map", "synthetic"], row_titles)
    figs.append({"path": rel, "caption": "Real volume, its label map and the synthetic volume generated from "
                                         "it (three planes each; real intensity window on both)."})
    case_id, pairs = max(by_case.items(), key=lambda kv: len(kv[1]))
    if len(pairs) >= 2:
        real_arr, _ = load_image(pairs[0].real)
        window = _window(real_arr)
        panels = [volume_panel(real_arr, window=window)] + \
                 [volume_panel(load_image(p.synthetic)[0], window=window) for p in pairs[:max_samples]]
        rel = "figures/quality_diversity.png"
        save_panel_rows(out_dir / rel, [panels], ["real"] + [f"sample {p.sample if p.sample is not None else 0}"
                                                              for p in pairs[:max_samples]], [case_id])
        figs.append({"path": rel, "caption": f"Samples generated from the label map of case {case_id} (diversity)."})
    return figs


def _unpaired_figures(out_dir: Path, syn_files: Mapping[str, VolumeFiles], max_samples: int = 6) -> list[dict]:
    from medlsdm.evaluation.figures import save_panel_rows, volume_panel

    chosen = list(syn_files.items())[:max_samples]
    arrays = [load_image(files)[0] for _, files in chosen]
    rel = "figures/quality_samples.png"
    save_panel_rows(out_dir / rel, [[volume_panel(a, window=_window(a))] for a in arrays], ["synthetic"],
                    [name for name, _ in chosen])
    return [{"path": rel, "caption": "Synthetic volumes (unpaired: generated without a label map)."}]


def _window(array: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(array[0], [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)
