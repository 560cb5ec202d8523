"""Copy audit for label-conditioned models: does a synthetic volume reproduce what is *private* to
one training image, beyond what its label map and the cohort explain?

A sample of a training label map shares that map's anatomy with the training image however
honest the model is, and a model that learned the cohort's appearance also reproduces the
texture that moves with the anatomy (in the demo cohort, one template's texture under every
subject's deformation). Neither is copying. What a copy reproduces and an honest model cannot
know is the part of the image that belongs to the acquisition of that one patient:

- **detail band** — the voxel-scale detail (acquisition noise realisation, the finest texture):
  the 6-neighbour Laplacian of the image inside the class interiors (far enough from every class
  edge that the stencil never crosses one). The Laplacian removes everything smooth (the label
  map's class intensities, bias fields, the cohort's coarse texture), so what is left is mostly
  the noise no map predicts. Compared over small shifts and axis flips, it catches exact, noisy,
  shifted, flipped, intensity-scaled and mildly deformed copies.
- **field band** — the smooth intensity field (bias field, scanner idiosyncrasies): per class,
  intensities as robust z-scores (median / MAD of that class), smoothed by normalised convolution
  over the class interiors (Gaussian ``field_sigma``), minus the cohort's mean field (the mean
  over the training images: the intensity variation every subject shares). It catches copies
  whose fine detail was lost but whose intensity field was kept, such as a training image
  reconstructed through the model's autoencoder (a memorised latent), which the detail band
  misses. The field has few degrees of freedom, so its null distribution is wide: only close
  reproductions of the whole field stand out.

The mid band — texture at the scale of anatomy — is deliberately not used: a label-conditioned
model learns it from the maps and, on maps it was trained on, reproduces it more closely than on
new ones (on the demo cohort, residual correlation 0.68 on training maps against 0.64 on held-out
maps, with a statistic that included it), without reproducing any patient's noise or bias field.

Each synthetic volume is compared with every training volume in each band; its value in a band is
the largest correlation. The threshold of each band is calibrated on data the model never saw:
held-out real cases against the training set (how close two different patients get) and, when
given, samples of held-out label maps against their own map's real image (how close an honest
sample gets to the image of its map). A volume is flagged when any band exceeds its threshold;
``baseline_rate`` is the fraction of calibration cases that would be flagged by the same rule
against thresholds set by the others (leave one out) — the rate an honest model's samples should
not exceed. Its ``copy_margin`` is the largest band value minus that band's threshold (> 0:
flagged).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from medlsdm.errors import DataError, MedlsdmError
from medlsdm.evaluation.privacy import case_ids

__all__ = ["COPY_AUDIT_DEFAULTS", "BANDS", "detail_residual", "intensity_field", "field_residual",
           "cohort_field", "residual_correlation", "copy_audit"]

BANDS = ("detail", "field")
HELD_OUT, OWN_MAP = "held-out real to training", "held-out-map sample to its own image"

COPY_AUDIT_DEFAULTS = {
    "erode": 1,             # voxels kept clear of every class edge, beyond a filter's own reach
    "outlier": 4.0,         # values above this many robust SDs: map/image disagreement, left out
    "field_sigma": 3.0,     # voxels: smoothness of the intensity field (field band)
    "max_shift": 2,         # detail band: shifts d with |dx| + |dy| + |dz| <= max_shift (voxels)
    "flips": True,          # both bands: also compare with the volume flipped along each axis
    "min_overlap": 0.2,     # minimum shared support, as a fraction of the smaller one
    "min_cohort": 0.5,      # field band: the cohort mean is used where this fraction of training fields exist
}

# 6-neighbour discrete Laplacian (centre minus the mean of the 6 face neighbours).
_LAPLACIAN = np.zeros((3, 3, 3))
_LAPLACIAN[1, 1, 1] = 1.0
for _axis in range(3):
    for _end in (0, 2):
        _index = [1, 1, 1]
        _index[_axis] = _end
        _LAPLACIAN[tuple(_index)] = -1.0 / 6.0


def _as_channels(image, label) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image, dtype=np.float64)
    label = np.asarray(label)
    if image.ndim == 3:
        image = image[None]
    if image.shape[1:] != label.shape:
        raise DataError(f"label map shape {label.shape} does not match image shape {image.shape[1:]}")
    return image, label


def _interiors(label: np.ndarray, erode: int) -> list[np.ndarray]:
    """Each foreground class's voxels at least ``erode`` voxels from its edge."""
    from scipy.ndimage import binary_erosion

    out = []
    for k in np.unique(label):
        if k == 0:
            continue
        member = label == k
        out.append(binary_erosion(member, iterations=erode) if erode > 0 else member)
    return out


def _unit(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Zero mean over ``keep``, zero elsewhere, unit norm (all zero if constant)."""
    v = np.where(keep, values - (values[keep].mean() if keep.any() else 0.0), 0.0)
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def _robust_keep(values: np.ndarray, support: np.ndarray, outlier: float) -> np.ndarray:
    inside = values[support]
    if inside.size == 0:
        return support
    centre = np.median(inside)
    spread = 1.4826 * np.median(np.abs(inside - centre)) or 1.0
    return support & (np.abs(values - centre) <= outlier * spread)


def detail_residual(image, label, erode: int = 1, outlier: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Detail band: (residual (C, X, Y, Z) float32, support (X, Y, Z)) of ``image`` (C, X, Y, Z) or
    (X, Y, Z) given its ``label`` map.

    The 6-neighbour Laplacian of each channel on the voxels ``erode + 1`` or more voxels inside a
    foreground class (so the stencil stays in one class), values beyond ``outlier`` robust SDs
    left out, zero mean and unit norm per channel; zero outside the support."""
    from scipy.ndimage import convolve

    image, label = _as_channels(image, label)
    support = np.zeros(label.shape, dtype=bool)
    for interior in _interiors(label, erode + 1):
        support |= interior
    out = np.zeros(image.shape, dtype=np.float32)
    for c in range(image.shape[0]):
        detail = convolve(image[c], _LAPLACIAN, mode="nearest")
        out[c] = _unit(detail, _robust_keep(detail, support, outlier))
    return out, support


def intensity_field(image, label, field_sigma: float = 3.0, erode: int = 1,
                    outlier: float = 4.0) -> np.ndarray:
    """Field band, before the cohort is removed: the smooth intensity field (C, X, Y, Z) float32 of
    ``image`` given its ``label`` map, NaN where it is not defined.

    Per channel and foreground class, intensities on the class interior (``erode``) become robust
    z-scores (median, 1.4826 MAD of that class), so class contrast, gain and offset drop out;
    values beyond ``outlier`` are left out; the z-scores are smoothed by normalised convolution
    over all interiors (Gaussian ``field_sigma``). Defined inside the foreground where the
    interiors carry at least 5 % of the smoothing weight."""
    from scipy.ndimage import gaussian_filter

    image, label = _as_channels(image, label)
    interiors = _interiors(label, erode)
    out = np.full(image.shape, np.nan, dtype=np.float32)
    for c in range(image.shape[0]):
        z = np.zeros(label.shape)
        keep = np.zeros(label.shape, dtype=bool)
        for interior in interiors:
            values = image[c][interior]
            if values.size == 0:
                continue
            centre = np.median(values)
            spread = 1.4826 * np.median(np.abs(values - centre)) or 1.0
            z[interior] = (values - centre) / spread
            keep |= interior & (np.abs(z) <= outlier)
        weight = gaussian_filter(keep.astype(np.float64), field_sigma)
        field = gaussian_filter(np.where(keep, z, 0.0), field_sigma) / np.maximum(weight, 1e-12)
        out[c] = np.where((label > 0) & (weight >= 0.05), field, np.nan)
    return out


def cohort_field(fields: Sequence[np.ndarray], min_cohort: float = 0.5) -> np.ndarray:
    """Mean of training intensity fields where at least ``min_cohort`` of them are defined (NaN
    elsewhere): the intensity variation the cohort shares."""
    if not len(fields):
        raise DataError("copy audit: the cohort field needs at least one training volume")
    total = np.zeros(np.shape(fields[0]), dtype=np.float64)
    count = np.zeros(np.shape(fields[0]), dtype=np.int64)
    for f in fields:
        ok = np.isfinite(f)
        total += np.where(ok, f, 0.0)
        count += ok
    return np.where(count >= max(1, min_cohort * len(fields)), total / np.maximum(count, 1), np.nan).astype(np.float32)


def field_residual(field: np.ndarray, cohort: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(intensity field minus the cohort field, zero mean, unit norm per channel; support)."""
    support = np.all(np.isfinite(field) & np.isfinite(cohort), axis=0)
    out = np.zeros(field.shape, dtype=np.float32)
    for c in range(field.shape[0]):
        out[c] = _unit(np.where(support, field[c] - cohort[c], 0.0), support)
    return out, support


def _shifts(max_shift: int) -> list[tuple[int, int, int]]:
    r = range(-max_shift, max_shift + 1)
    return [(a, b, c) for a in r for b in r for c in r if abs(a) + abs(b) + abs(c) <= max_shift]


def _window(n: int, d: int) -> tuple[slice, slice]:
    """Slices of two arrays of length n that overlap when the first is moved by d."""
    return (slice(0, n - d), slice(d, n)) if d >= 0 else (slice(-d, n), slice(0, n + d))


def residual_correlation(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
                         max_shift: int = 2, flips: bool = True, min_overlap: float = 0.2) -> float:
    """Largest correlation of residual ``a`` with residual ``b`` (each ``(residual, support)``, as
    from ``detail_residual`` or ``field_residual``) over shifts and axis flips of ``a``, on their
    shared support; NaN when no placement shares ``min_overlap`` of the smaller support."""
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


def _threshold(values: np.ndarray, quantile: float | None) -> float:
    return float(values.max() if quantile is None else np.quantile(values, quantile))


def _loo_rate(values: np.ndarray, quantile: float | None) -> float:
    """Fraction of ``values`` above the threshold set by the others (leave one out)."""
    return float(np.mean([v > _threshold(np.delete(values, i), quantile) for i, v in enumerate(values)]))


def copy_audit(synthetic: Sequence[np.ndarray], synthetic_labels: Sequence[np.ndarray],
               train: Sequence[np.ndarray], train_labels: Sequence[np.ndarray],
               held_out: Sequence[np.ndarray], held_out_labels: Sequence[np.ndarray], *,
               synthetic_ids: Sequence[str] | None = None, train_ids: Sequence[str] | None = None,
               held_out_ids: Sequence[str] | None = None, train_subjects: Sequence | None = None,
               held_out_subjects: Sequence | None = None, synthetic_subjects: Sequence | None = None,
               held_out_samples: Sequence[tuple[int, np.ndarray]] = (),
               quantile: float | None = None, settings: dict | None = None) -> dict:
    """Flag synthetic volumes that reproduce a training image's detail or intensity field more
    closely than unseen data do (see the module docstring).

    Volumes (C, X, Y, Z) or (X, Y, Z) with their label maps; each synthetic volume with the label
    map it was generated from and (``synthetic_subjects``) the subject of that map.

    Detail band: each synthetic volume against every training volume (a copy of any patient);
    its value is the largest correlation. Calibration: each held-out real case's largest
    correlation with the training volumes, and each of ``held_out_samples`` — (index of a held-out
    case, a synthetic volume generated from that case's label map) — with its own map's real image.

    Field band: each synthetic volume against the training volumes of its map's subject only (the
    image a label-conditioned model may have memorised for that map; none when its map is not a
    training subject's: not tested). Calibration: single comparisons of unrelated subjects — every
    held-out real case against every training volume, and each held-out-map sample against its own
    map's real image. (A maximum over the whole training set would, with so few degrees of freedom
    per field, let chance matches decide.)

    Per band the threshold is the maximum (or ``quantile``) of its calibration values; held-out
    cases whose subject is in the training set (``*_subjects``) are left out. A synthetic volume
    is flagged when a band exceeds its threshold. ``baseline_rate``: the chance that one honest
    sample is flagged, 1 - prod(1 - r_band), with r_band each band's leave-one-out rate over its
    calibration values. Returns a JSON-ready dict (``pairs``, ``bands``, ``calibration``, ...).
    """
    cfg = {**COPY_AUDIT_DEFAULTS, **(settings or {})}
    unknown = sorted(set(cfg) - set(COPY_AUDIT_DEFAULTS))
    if unknown:
        raise MedlsdmError(f"copy audit settings: unknown {', '.join(unknown)}")
    if quantile is not None and not 0.0 < quantile <= 1.0:
        raise MedlsdmError(f"quantile must be in (0, 1], got {quantile}")
    if not len(train) or not len(synthetic):
        raise DataError("copy audit needs at least one training and one synthetic volume")
    synthetic_ids = case_ids(synthetic_ids, len(synthetic), "synthetic")
    train_ids = case_ids(train_ids, len(train), "train")
    held_out_ids = case_ids(held_out_ids, len(held_out), "held_out")
    # Without subject IDs every volume is its own subject (held-out IDs kept apart from training ones).
    train_subjects = [str(s) for s in train_subjects] if train_subjects is not None else list(train_ids)
    held_out_subjects = [str(s) for s in held_out_subjects] if held_out_subjects is not None else \
        [f"held_out:{i}" for i in held_out_ids]
    syn_subjects = [None if s is None else str(s) for s in synthetic_subjects] \
        if synthetic_subjects is not None else [None] * len(synthetic)
    for volumes, labels in ((synthetic, synthetic_labels), (train, train_labels), (held_out, held_out_labels)):
        if len(volumes) != len(labels):
            raise DataError(f"copy audit: {len(volumes)} volumes but {len(labels)} label maps")
    if len(syn_subjects) != len(synthetic):
        raise DataError(f"synthetic_subjects has {len(syn_subjects)} entries for {len(synthetic)} synthetic volumes")

    train_fields = [intensity_field(v, lab, cfg["field_sigma"], cfg["erode"], cfg["outlier"])
                    for v, lab in zip(train, train_labels)]
    cohort = cohort_field(train_fields, cfg["min_cohort"])

    def features(volume, label, field=None) -> dict:
        if field is None:
            field = intensity_field(volume, label, cfg["field_sigma"], cfg["erode"], cfg["outlier"])
        return {"detail": detail_residual(volume, label, cfg["erode"], cfg["outlier"]),
                "field": field_residual(field, cohort)}

    compare = {"detail": dict(max_shift=cfg["max_shift"], flips=cfg["flips"], min_overlap=cfg["min_overlap"]),
               # smooth fields: shifts of a few voxels change nothing, flips do
               "field": dict(max_shift=0, flips=cfg["flips"], min_overlap=cfg["min_overlap"])}
    train_feats = [features(v, lab, f) for v, lab, f in zip(train, train_labels, train_fields)]
    del train_fields

    def against(feats, band, indices) -> tuple[int, float, list[float]]:
        """(best training index or -1, its correlation or NaN, all finite correlations)."""
        best_i, best, every = -1, -np.inf, []
        for i in indices:
            value = residual_correlation(feats[band], train_feats[i][band], **compare[band])
            if np.isfinite(value):
                every.append(value)
                if value > best:
                    best_i, best = i, value
        return best_i, (best if best_i >= 0 else float("nan")), every

    train_subject_set = set(train_subjects)
    calibration, left_out, held_feats = [], [], {}
    field_pairs = []                       # held-out real vs every training volume: unrelated pairs
    for i, (hid, subject) in enumerate(zip(held_out_ids, held_out_subjects)):
        if subject in train_subject_set:
            left_out.append(hid)
            continue
        held_feats[i] = feats = features(held_out[i], held_out_labels[i])
        others = [t for t in range(len(train)) if train_subjects[t] != subject]
        j, value, _ = against(feats, "detail", others)
        _, _, every = against(feats, "field", others)
        field_pairs += every
        calibration.append({"held_out_id": hid, "kind": HELD_OUT,
                            "detail": {"train_id": train_ids[j] if j >= 0 else None, "similarity": value},
                            "field": {"n_pairs": len(every), "max": max(every) if every else float("nan")}})
    own_values = {b: [] for b in BANDS}
    for index, volume in held_out_samples:
        if index not in held_feats:
            continue
        feats = features(volume, held_out_labels[index])
        entry = {"held_out_id": held_out_ids[index], "kind": OWN_MAP}
        for band in BANDS:
            value = residual_correlation(feats[band], held_feats[index][band], **compare[band])
            entry[band] = {"train_id": None, "similarity": value}
            own_values[band].append(value)
        calibration.append(entry)
    detail_values = [c["detail"]["similarity"] for c in calibration]
    values = {"detail": np.array([v for v in detail_values if np.isfinite(v)], dtype=np.float64),
              "field": np.array([v for v in field_pairs + own_values["field"] if np.isfinite(v)], dtype=np.float64)}
    n_real = sum(1 for c in calibration if c["kind"] == HELD_OUT)
    if n_real < 2 or min(v.size for v in values.values()) < 2:
        raise DataError(f"copy audit: the thresholds need at least 2 held-out real cases of subjects not in "
                        f"the training set, got {n_real}")
    thresholds = {b: _threshold(v, quantile) for b, v in values.items()}
    rates = {b: _loo_rate(v, quantile) for b, v in values.items()}

    pairs = []
    for sid, subject, volume, label in zip(synthetic_ids, syn_subjects, synthetic, synthetic_labels):
        feats = features(volume, label)
        j, value, _ = against(feats, "detail", range(len(train)))
        near = {"detail": {"train_id": train_ids[j] if j >= 0 else None, "similarity": value}}
        own = [t for t in range(len(train)) if subject is not None and train_subjects[t] == subject]
        j, value, _ = against(feats, "field", own)
        near["field"] = {"train_id": train_ids[j] if j >= 0 else None, "similarity": value}
        margins = {b: near[b]["similarity"] - thresholds[b] for b in BANDS if np.isfinite(near[b]["similarity"])}
        top = max(margins, key=margins.get) if margins else "detail"
        flagged_bands = [b for b, m in margins.items() if m > 0]
        train_id = near[top]["train_id"]
        pairs.append({"synthetic_id": sid, "train_id": train_id,
                      "train_subject": train_subjects[train_ids.index(train_id)] if train_id is not None else None,
                      "map_subject": subject, "similarity": margins.get(top, float("nan")),
                      "flagged": bool(flagged_bands), "flagged_bands": flagged_bands, **near})
    for c in calibration:
        c["copy_margin"] = max(c["detail"]["similarity"] - thresholds["detail"],
                               c["field"].get("similarity", c["field"].get("max", np.nan)) - thresholds["field"])
    flagged = sorted((p for p in pairs if p["flagged"]), key=lambda p: -p["similarity"])
    rule = "max" if quantile is None else f"quantile {quantile}"
    own_note = " and held-out-map samples to their own map's real image" if held_out_samples else ""
    return {
        "method": "label-conditional copy audit (detail band + intensity-field band)",
        "similarity": "copy margin",
        "threshold": 0.0,
        "threshold_rule": f"flagged when a band exceeds its threshold: detail, the {rule} of held-out real cases' "
                          f"nearest-training correlations{own_note}; field (own map's training image only), the "
                          f"{rule} of held-out-real to training pairs{own_note}. Copy margin = the largest band "
                          "correlation minus that band's threshold",
        "quantile": quantile,
        "settings": {k: cfg[k] for k in COPY_AUDIT_DEFAULTS},
        "bands": {
            "detail": {"threshold": thresholds["detail"], "baseline_rate": rates["detail"],
                       "compared_with": "every training volume",
                       "held_out_to_train": [c["detail"]["similarity"] for c in calibration if c["kind"] == HELD_OUT],
                       "held_out_samples_to_own_image": own_values["detail"],
                       "n_flagged": sum("detail" in p["flagged_bands"] for p in pairs)},
            "field": {"threshold": thresholds["field"], "baseline_rate": rates["field"],
                      "compared_with": "the training volumes of the map's subject",
                      "held_out_to_train_pairs": len(field_pairs),
                      "held_out_to_train_max": [c["field"]["max"] for c in calibration if c["kind"] == HELD_OUT],
                      "held_out_samples_to_own_image": own_values["field"],
                      "n_tested": int(sum(np.isfinite(p["field"]["similarity"]) for p in pairs)),
                      "n_flagged": sum("field" in p["flagged_bands"] for p in pairs)}},
        "n_synthetic": len(synthetic), "n_train": len(train), "n_held_out": n_real,
        "n_calibration": {b: int(v.size) for b, v in values.items()},
        "held_out_left_out": left_out,
        "baseline_rate": float(1.0 - np.prod([1.0 - r for r in rates.values()])),
        "n_flagged": len(flagged), "fraction_flagged": len(flagged) / len(synthetic),
        "subjects_flagged": sorted({p["train_subject"] for p in flagged}),
        "flagged": flagged, "pairs": pairs, "calibration": calibration,
        "synthetic_to_train": [p["similarity"] for p in pairs],
        "held_out_to_train": [c["copy_margin"] for c in calibration if c["kind"] == HELD_OUT],
        "held_out_samples_to_own_image": [c["copy_margin"] for c in calibration if c["kind"] == OWN_MAP],
    }
