"""Acquisition appearance: what a scan's label map does not determine and real scans of one
anatomy still differ in — the noise level, the contrast between tissues, a smooth multiplicative
bias field — measured, fitted over a training set, and sampled for synthetic volumes.

Why an explicit model: the autoencoder compresses 4x per axis and is trained to reconstruct, so
it returns the clean "average" image of a patch; the diffusion model, conditioned on a label map,
then has almost nothing left to vary. Samples of one map were nearly the same image (mean
pairwise MS-SSIM 0.99 on the demo cohort, real subjects 0.86) with no noise and no bias field.
Here each synthetic volume takes the appearance of a training scan drawn at random (seeded), or
one the user chooses: the contrast is matched with a gamma, a smooth field and noise are added
until the volume's own statistics reach the target's (what the model already produced counts: its
noise adds in quadrature, the field's strength is searched on the bias measured with it). MR
magnitude images get all three, with Rician noise; other modalities (CT: calibrated Hounsfield
units) only Gaussian noise.

All statistics are computed on the brain's (label map > 0) 1st / 99th intensity percentiles
mapped to [0, 1], so gain and offset, which preparation normalises away, do not count.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from medlsdm.errors import DataError

__all__ = ["APPEARANCE_STATISTICS", "appearance_statistics", "tissue_pair", "appearance_profile",
           "apply_appearance", "choose_target"]

APPEARANCE_STATISTICS = ("noise", "contrast", "bias")
MIN_VOXELS = 50
MAX_PROFILE_CASES = 512   # per-case targets kept in a sidecar
FIELD_LIMIT = 4.0         # bias log-field clipped at this many of its SDs (inside the tissue)
MAX_LOG_BIAS = 1.0        # largest SD of the added log-field
# Gamma range for the contrast: scans of one cohort need 0.55-1.0 (the demo cohort, every training
# scan given every other's contrast); beyond, a target contrast is out of reach of this volume
# (a model far from its training intensities) and a steeper gamma would only distort it.
GAMMA_RANGE = (0.5, 2.0)
BACKGROUND_MARGIN = 3     # voxels from the label map beyond which label 0 counts as background


def _unit_range(image: np.ndarray, brain: np.ndarray) -> tuple[np.ndarray, float, float]:
    lo, hi = np.percentile(image[brain], [1, 99])
    scale = hi - lo if hi > lo else 1.0
    return (image - lo) / scale, float(lo), float(scale)


def _six_neighbour_residual(x: np.ndarray) -> np.ndarray:
    """``x - mean of its 6 face neighbours`` / sqrt(7/6): the SD of white noise, ~0 on smooth fields."""
    from scipy import ndimage

    kernel = np.zeros((3, 3, 3))
    kernel[1, 1, 1] = 1.0
    kernel[[0, 2, 1, 1, 1, 1], [1, 1, 0, 2, 1, 1], [1, 1, 1, 1, 0, 2]] = -1.0 / 6
    return ndimage.convolve(x, kernel, mode="nearest") / np.sqrt(7 / 6)


def _robust_sd(values: np.ndarray) -> float:
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


def _quadratic_terms(mask: np.ndarray, shape=None) -> np.ndarray:
    """The 9 non-constant quadratic monomials of the voxel coordinates, standardised on the voxels
    of ``mask``: for those voxels, or (``shape`` given) for every voxel of the volume."""
    inside = np.argwhere(mask).astype(np.float64)
    centre, spread = inside.mean(0), np.maximum(inside.std(0), 1.0)
    grid = inside if shape is None else np.indices(shape).reshape(3, -1).T.astype(np.float64)
    d, h, w = ((grid - centre) / spread).T
    return np.stack([d, h, w, d * d, h * h, w * w, d * h, d * w, h * w], axis=1)


def _contrast(u: np.ndarray, region: np.ndarray, other: np.ndarray) -> float:
    a, b = float(np.median(u[region])), float(np.median(u[other]))
    return (a - b) / (a + b) if a + b > 0 else float("nan")


def _regions(label: np.ndarray, tissue: int, other: int, erosion: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from scipy import ndimage

    region = label == tissue
    core = ndimage.binary_erosion(region, iterations=erosion) if erosion else region
    if core.sum() < MIN_VOXELS or (label == other).sum() < MIN_VOXELS:
        raise DataError(f"appearance statistics: classes {tissue} and {other} need at least {MIN_VOXELS} voxels "
                        f"each (found {int(core.sum())} inside the eroded class {tissue}, "
                        f"{int((label == other).sum())} of class {other})")
    return region, core, label == other


def _bias_design(core: np.ndarray) -> np.ndarray:
    """The least-squares design of `_bias` for ``core``: a constant and the quadratic terms."""
    terms = _quadratic_terms(core)
    return np.concatenate([np.ones((len(terms), 1)), terms], axis=1)


def _bias(x: np.ndarray, core, design: np.ndarray | None = None) -> float:
    """SD of the log-intensity of ``core`` explained by a quadratic of the voxel coordinates;
    ``design``: `_bias_design` of ``core``, computed once by callers that measure many volumes."""
    design = _bias_design(core) if design is None else design
    values = np.log(np.clip(x[core], 1e-3, None))
    fitted = design @ np.linalg.lstsq(design, values, rcond=None)[0]
    return float(fitted.std())


def _statistics(x: np.ndarray, region, core, other) -> dict[str, float]:
    noise = _robust_sd(_six_neighbour_residual(x)[core])
    return {"noise": noise, "contrast": _contrast(x, region, other), "bias": _bias(x, core)}


def _statistics_of(x: np.ndarray, brain, region, core, other) -> dict[str, float]:
    return _statistics(_unit_range(x, brain)[0], region, core, other)


def _far_background(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance of every voxel to the label map's foreground, in voxels; the voxels at least
    `BACKGROUND_MARGIN` from it)."""
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(label == 0)
    return distance, distance >= BACKGROUND_MARGIN


def _background_noise(x: np.ndarray, brain, far) -> float:
    """Noise SD in the background away from the label map, on the brain's unit range (the units
    of ``noise``): 0 where the data zero-fill it (skull-stripped scans), a Rayleigh floor's
    spread where they keep the magnitude image's noise."""
    return _robust_sd(_six_neighbour_residual(_unit_range(x, brain)[0])[far])


def appearance_statistics(image, label, tissue: int, other: int, erosion: int = 1) -> dict[str, float]:
    """Global appearance of one volume (D, H, W) with its label map:

    * ``noise``: the noise standard deviation inside class ``tissue`` eroded by ``erosion``
      voxels (a homogeneous tissue, e.g. white matter), from the residual ``r = x - mean of its 6
      neighbours``: robust SD (1.4826 x median absolute deviation) of ``r`` / sqrt(7/6), which is
      the SD of white noise (a smooth field leaves ``r`` near 0; fine texture counts as noise);
    * ``contrast``: ``(median(tissue) - median(other)) / (median(tissue) + median(other))``
      (e.g. white against grey matter);
    * ``bias``: standard deviation of the log-intensity of ``tissue`` explained by a quadratic
      polynomial of the voxel coordinates (a smooth multiplicative field, as MR bias fields are).
    """
    image, label = np.asarray(image, dtype=np.float64), np.asarray(label)
    if image.shape != label.shape or image.ndim != 3:
        raise DataError(f"appearance statistics need a 3D image and label map of one shape, got "
                        f"{image.shape} and {label.shape}")
    region, core, other_mask = _regions(label, tissue, other, erosion)
    return _statistics(_unit_range(image, label > 0)[0], region, core, other_mask)


def tissue_pair(labels: Sequence[np.ndarray]) -> tuple[int, int]:
    """The tissue the noise and bias are measured in — the foreground class with the most voxels
    left after a one-voxel erosion over ``labels`` (the thickest, most homogeneous one: white
    rather than the thin cortical grey matter) — and the class it is contrasted with, the largest
    other foreground class."""
    from scipy import ndimage

    cores: dict[int, int] = {}
    counts: dict[int, int] = {}
    for label in labels:
        label = np.asarray(label)
        values, n = np.unique(label, return_counts=True)
        for v, c in zip(values.tolist(), n.tolist()):
            if v > 0:
                counts[int(v)] = counts.get(int(v), 0) + int(c)
                cores[int(v)] = cores.get(int(v), 0) + int(ndimage.binary_erosion(label == v).sum())
    if len(counts) < 2:
        raise DataError("an appearance profile needs label maps with at least two foreground classes")
    tissue = max(cores, key=lambda v: (cores[v], counts[v]))
    other = max((v for v in counts if v != tissue), key=lambda v: counts[v])
    return tissue, other


def appearance_profile(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], modality: str,
                       seed: int = 0) -> dict:
    """The training set's appearance, for a model's sidecar: the tissue pair, per channel the
    statistics of every case (at most ``MAX_PROFILE_CASES``, drawn with ``seed``), the median
    over cases of the median intensity outside the label map (``background``) and of the noise SD
    in the background away from it (``background_noise``, `_background_noise`; each None without
    enough such voxels). ``images``: (C, D, H, W) or (D, H, W) arrays; cases where a statistic
    cannot be measured are left out."""
    tissue, other = tissue_pair(labels)
    order = np.random.default_rng(seed).permutation(len(images))[:MAX_PROFILE_CASES]
    channels: list[list[dict]] = []
    backgrounds: list[list[float]] = []
    background_noise: list[list[float]] = []
    for i in sorted(order.tolist()):
        image = np.asarray(images[i], dtype=np.float64)
        image = image[None] if image.ndim == 3 else image
        label = np.asarray(labels[i])
        outside = label == 0
        _, far = _far_background(label)
        while len(channels) < image.shape[0]:
            channels.append([])
            backgrounds.append([])
            background_noise.append([])
        for c in range(image.shape[0]):
            if outside.sum() >= MIN_VOXELS:
                backgrounds[c].append(float(np.median(image[c][outside])))
            if far.sum() >= MIN_VOXELS and (~outside).sum() >= MIN_VOXELS:
                background_noise[c].append(_background_noise(image[c], ~outside, far))
            try:
                channels[c].append(appearance_statistics(image[c], labels[i], tissue, other))
            except DataError:
                continue
    if not channels or not all(channels):
        raise DataError("no training case had enough of classes "
                        f"{tissue} and {other} to measure its appearance")
    return {"version": 1, "tissue": tissue, "other": other, "noise_model": "rician" if modality == "mr" else "gaussian",
            "channels": channels, "background": [float(np.median(b)) if b else None for b in backgrounds],
            "background_noise": [float(np.median(b)) if b else None for b in background_noise]}


def choose_target(profile: Mapping, channel: int, rng: np.random.Generator) -> dict[str, float]:
    """A training case's appearance, drawn at random."""
    cases = profile["channels"][channel]
    return dict(cases[int(rng.integers(len(cases)))])


def _measured_contrast(v: np.ndarray, brain, region, other) -> float:
    return _contrast(_unit_range(v, brain)[0], region, other)


def _solve_gamma(contrast_of, target: float) -> float:
    """Gamma g with ``contrast_of(g) == target``: bisection on log g in `GAMMA_RANGE` (the contrast
    is monotone in g); the nearer end when the target is out of reach."""
    if not np.isfinite(target):
        return 1.0
    lo, hi = np.log(GAMMA_RANGE[0]), np.log(GAMMA_RANGE[1])
    f_lo, f_hi = contrast_of(np.exp(lo)) - target, contrast_of(np.exp(hi)) - target
    if not np.isfinite(f_lo + f_hi):
        return 1.0
    if f_lo * f_hi > 0:
        return float(np.exp(lo if abs(f_lo) < abs(f_hi) else hi))
    for _ in range(20):
        mid = 0.5 * (lo + hi)
        f_mid = contrast_of(np.exp(mid)) - target
        if f_lo * f_mid <= 0:
            hi = mid
        else:
            lo, f_lo = mid, f_mid
    return float(np.exp(0.5 * (lo + hi)))


def _solve_bias(bias_of, target: float, iterations: int = 9) -> float:
    """Field strength b in [0, `MAX_LOG_BIAS`] with ``bias_of(b) == target``: 0 when the volume's
    own bias already reaches it, `MAX_LOG_BIAS` when nothing does, else bisection. The measured
    bias is not monotone near 0 (a field drawn against the volume's own low-frequency variation
    first cancels part of it), so no step may extrapolate from a small b: a secant step from one
    did, and a cancelling draw sent b to its bound (a 2.6x brighter corner, the rest of the brain
    crushed to the floor when the top was put back)."""
    if not np.isfinite(target) or bias_of(0.0) >= target:
        return 0.0
    lo, hi = 0.0, MAX_LOG_BIAS
    if bias_of(hi) < target:
        return hi
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if bias_of(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _smooth_log_field(shape, core: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random quadratic polynomial of the voxel coordinates, zero mean and unit SD inside ``core``."""
    field = _quadratic_terms(core, shape) @ rng.normal(size=9)
    inside = core.reshape(-1)
    field = (field - field[inside].mean()) / max(float(field[inside].std()), 1e-12)
    # A quadratic grows without bound away from the tissue it was scaled on: held at 4 SD, so the
    # background and the volume's corners get no runaway gain.
    return np.clip(field, -FIELD_LIMIT, FIELD_LIMIT).reshape(shape)


def apply_appearance(image: np.ndarray, label: np.ndarray, profile: Mapping, target: Mapping[str, float],
                     rng: np.random.Generator, value_range: tuple[float, float] = (-1.0, 1.0),
                     iterations: int = 3, channel: int = 0) -> np.ndarray:
    """One channel (D, H, W) of a synthetic volume, in prepared intensities (``value_range``, whose
    lower end is the zero signal of a scan), given ``target``'s appearance (a dict of
    `appearance_statistics`): ``signal ** gamma * exp(b * field)`` plus noise (Rician for MR), with
    a random smooth field and noise drawn once from ``rng``, and gamma, b and the noise level set so
    that the result's own statistics reach the target's (the decoder's own noise and bias count: the
    noise adds in quadrature; b is searched on the bias measured with the field, which can cancel
    part of the decoder's own). The three interact through the percentile range the
    statistics are measured on, so they are refined ``iterations`` times. Clipped to ``value_range``.
    Without a Rician noise model (CT, other calibrated intensities) only Gaussian noise is added.

    Zero signal is ``value_range``'s lower end, raised by as much as the volume's background (its
    median outside the label map) lies above the training scans' (the profile's ``background`` of
    ``channel``), at most to the brain's 1st percentile: a model that does not yet give its
    background the training scans' level (an undertrained one) keeps it. The gamma pivots at half
    the brain's 1st percentile above zero signal, and the field fades out below it: the
    background's faint floor (a decoder's smooth one, a little above zero) is not lifted, only the
    tissue's signal is reshaped. Values below zero signal are kept (plus the Rician noise floor, as
    in the background of a magnitude image). Profiles without a ``background`` (written before it
    was recorded): zero signal is the range's lower end (the pivot and the fade apply to every
    profile).

    The noise level reached in the tissue counts fine texture as noise, which the decoder's output
    lacks; in the background, `BACKGROUND_MARGIN` voxels or more from the label map, the added
    noise is scaled instead to the training scans' background noise (``background_noise``, times
    the target's noise over the profile's median): none where the training scans were
    zero-filled there (skull-stripped data), their Rayleigh floor where they kept it. Profiles
    without it: the tissue's noise level everywhere."""
    x = np.asarray(image, dtype=np.float64)
    label = np.asarray(label)
    brain = label > 0
    region, core, other = _regions(label, int(profile["tissue"]), int(profile["other"]), 1)
    _, lo, scale = _unit_range(x, brain)
    if profile.get("noise_model") != "rician":
        # CT and other calibrated intensities: a gamma or a bias field would change what the
        # values mean (Hounsfield units); only the noise level is an acquisition property there.
        own = _statistics_of(x, brain, region, core, other)
        sigma = float(np.sqrt(max(float(target["noise"]) ** 2 - own["noise"] ** 2, 0.0))) * scale
        return np.clip(x + sigma * rng.normal(size=x.shape), *value_range).astype(np.float32)
    zero = float(value_range[0])
    reference = list(profile.get("background") or [])
    if channel < len(reference) and reference[channel] is not None and (~brain).sum() >= MIN_VOXELS:
        # Only how far this volume's background lies above the training scans' counts: where
        # label 0 holds tissue (a few structures labelled in a body), their median was tissue too.
        lift = float(np.median(x[~brain])) - float(reference[channel])
        zero = min(zero + max(lift, 0.0), lo)
    top = lo + scale                                           # the brain's 99th percentile
    v = (x - zero) / max(top - zero, 1e-12)                    # signal, 0 = none
    below = np.minimum(v, 0.0)                                 # under zero signal: kept
    v = np.maximum(v, 0.0)
    field = _smooth_log_field(v.shape, core, rng)
    n1, n2 = rng.normal(size=v.shape), rng.normal(size=v.shape)

    pivot = 0.5 * (lo - zero) / max(top - zero, 1e-12)          # half the brain's 1st percentile
    above = v > pivot
    fade = np.minimum(v / max(pivot, 1e-12), 1.0)               # the field: 0 at zero signal, 1 from the pivot
    # The gamma curve takes over from the identity smoothly between the pivot and the brain's 1st
    # percentile (twice the pivot), where no brain voxel lies: a hard switch would have an
    # unbounded slope just above the pivot for gamma < 1 and amplify a floor's texture there.
    v_above = v[above]                                          # indexed once: build runs ~130 times
    base = (v_above - pivot) / (1 - pivot)
    weight = np.clip(v_above / max(pivot, 1e-12) - 1.0, 0.0, 1.0) if pivot > 0 else np.ones(v_above.size)
    weight = weight * weight * (3 - 2 * weight)                 # smoothstep

    def build(g: float, b: float, sigma, amplitude=1.0) -> np.ndarray:
        # gamma on [pivot, 1] (the top stays where it was), the floor below the pivot as it is
        w = v.copy()
        curve = pivot + (1 - pivot) * base ** g
        w[above] = v_above + weight * (curve - v_above)
        if b > 0:
            # faded below the pivot, and there no darker than exp(-1) (v exp(c v / pivot) rises
            # with v only for c >= -1: a dark corner of the field would otherwise invert the floor)
            w = w * np.exp(np.where(fade < 1.0, np.maximum(b * field, -1.0), b * field) * fade)
        if sigma > 0:
            s = sigma * amplitude
            w = np.sqrt((w + s * n1) ** 2 + (s * n2) ** 2)   # Rician: a magnitude image
        return w + below

    design = _bias_design(core)                                  # the same for every build

    def stats(w: np.ndarray) -> dict[str, float]:
        return _statistics_of(w, brain, region, core, other)

    g, b, sigma = 1.0, 0.0, 0.0
    for _ in range(iterations):
        g = _solve_gamma(lambda gg: _measured_contrast(build(gg, b, sigma), brain, region, other),
                         float(target["contrast"]))
        # on the volume with its noise (from the second pass): the noise widens the percentile
        # range the bias is measured on, and a field fitted without it fell short of the target
        b = _solve_bias(lambda bb: _bias(_unit_range(build(g, bb, sigma), brain)[0], core, design),
                        float(target["bias"]))
        clean = build(g, b, 0.0)
        own = stats(clean)
        p1, p99 = np.percentile(build(g, b, sigma)[brain], [1, 99])
        sigma = float(np.sqrt(max(float(target["noise"]) ** 2 - own["noise"] ** 2, 0.0))) * float(p99 - p1)
    g = _solve_gamma(lambda gg: _measured_contrast(build(gg, b, sigma), brain, region, other),
                     float(target["contrast"]))
    amplitude = _background_amplitude(profile, channel, target, label, brain,
                                      lambda a: build(g, b, sigma, a)) if sigma > 0 else 1.0
    # The brain's 99th percentile back where it was (the field and the noise raise it), so no more
    # of the brain is clipped at the range's end than before: the gain is not part of the
    # appearance (the statistics do not see it), and a bright corner of the field saturated.
    signal = build(g, b, sigma, amplitude) - below
    signal /= max(float(np.percentile(signal[brain], 99)), 1e-12)
    return np.clip((signal + below) * (top - zero) + zero, *value_range).astype(np.float32)


def _background_amplitude(profile: Mapping, channel: int, target: Mapping[str, float], label: np.ndarray,
                          brain: np.ndarray, build):
    """The added noise's amplitude per voxel: 1 in and near the label map, ramping over
    `BACKGROUND_MARGIN` voxels to k in the background, k (in [0, 1], one secant step: the floor's
    spread grows about linearly with it) giving the background the training scans' noise scaled
    by the target's noise level; 1 when the profile has no ``background_noise`` for the channel."""
    reference = list(profile.get("background_noise") or [])
    distance, far = _far_background(label)
    if channel >= len(reference) or reference[channel] is None or far.sum() < MIN_VOXELS:
        return 1.0
    typical = float(np.median([case["noise"] for case in profile["channels"][channel]]))
    want = float(reference[channel]) * (float(target["noise"]) / typical if typical > 0 else 1.0)
    ramp = np.clip(distance / BACKGROUND_MARGIN, 0.0, 1.0)
    own = _background_noise(build(1.0 - ramp), brain, far)            # k = 0: no noise added there
    full = _background_noise(build(1.0), brain, far)                  # k = 1: the tissue's level
    added = float(np.sqrt(max(want**2 - own**2, 0.0)))
    k = float(np.clip(added / max(float(np.sqrt(max(full**2 - own**2, 0.0))), 1e-12), 0.0, 1.0))
    return 1.0 - ramp * (1.0 - k)
