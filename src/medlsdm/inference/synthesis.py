"""Sampling and decoding on the prepared grid: one-hot label map -> sampler in the latent (or
pixel) space -> unscale, optional re-quantisation, decode (SPADE decoders get the label map) ->
the acquisition appearance (noise, contrast, bias field) of a training scan drawn with the seed,
when the model's sidecar has an appearance profile (`medlsdm.data.appearance`).

Grids larger than the training window are sampled whole (the networks are convolutional and
their attention takes any size), or in overlapping tiles of the training window blended at every
step (`TiledDenoiser`), which keeps what the network sees at its training size.
"""

from __future__ import annotations

import warnings
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from medlsdm.data.labels import one_hot
from medlsdm.errors import MedlsdmError
from medlsdm.inference.model import SynthesisModel


def model_shape(model: SynthesisModel, image_shape: Sequence[int]) -> tuple[int, ...]:
    """(C, d, h, w) of the model's space for an image of spatial shape (D, H, W)."""
    if model.autoencoder is not None:
        return tuple(model.autoencoder.latent_shape(tuple(image_shape)))
    return (len(model.sidecar["channels"]), *image_shape)


def x0_clip(model: SynthesisModel, clip_x0: float | None = None) -> float:
    """The samplers' x0 bound: `clip_x0` if given, else the model's ``sampling.clip_x0``, else the
    widest sensible one: 1 in pixel space and for min-max latents, the largest |scaled latent|
    of the training set for std-scaled latents (a tighter bound steadies few-step samplers of
    epsilon-prediction models; benchmarks/sampling.md)."""
    if clip_x0 is None:
        clip_x0 = model.sidecar.get("sampling", {}).get("clip_x0")
    if clip_x0 is None:
        return 1.0 if model.scaler is None else model.scaler.x0_clip
    if not float(clip_x0) > 0:
        raise MedlsdmError(f"--clip-x0 must be a positive number, got {clip_x0}")
    return float(clip_x0)


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of windows of `tile` covering [0, size) with at least `overlap` shared voxels."""
    if size <= tile:
        return [0]
    count = int(np.ceil((size - overlap) / (tile - overlap)))
    return [int(round(i * (size - tile) / (count - 1))) for i in range(count)]


def _ramp(length: int, start: int, size: int, overlap: int) -> torch.Tensor:
    """Blending weights along one axis of a tile: rising linearly over `overlap` voxels on each
    side that borders another tile, 1 in the middle and at the volume's own borders."""
    w = torch.ones(length)
    if overlap <= 0:
        return w
    ramp = (torch.arange(overlap, dtype=torch.float32) + 1) / (overlap + 1)
    if start > 0:
        w[:overlap] = torch.minimum(w[:overlap], ramp)
    if start + length < size:
        w[-overlap:] = torch.minimum(w[-overlap:], ramp.flip(0))
    return w


class TiledDenoiser(torch.nn.Module):
    """A denoiser evaluated in overlapping tiles of ``tile`` (model-space voxels, D, H, W), its
    outputs blended with linear ramps over the overlaps (weights sum to one everywhere), so no
    seam shows where tiles meet. The condition (at image resolution, ``factor`` image voxels per
    model voxel) is cut to the matching window. Written by hand: MONAI's sliding-window inferer
    takes one input tensor, while a denoiser takes the noisy sample, the time and the label map
    at another resolution, at every sampling step."""

    def __init__(self, denoiser: torch.nn.Module, tile: Sequence[int], factor: Sequence[int], overlap: float = 0.25):
        super().__init__()
        self.denoiser = denoiser
        self.tile = tuple(int(t) for t in tile)
        self.factor = tuple(int(f) for f in factor)
        # at least one shared voxel where a tile has room for it (a 1-voxel tile shares none)
        self.overlap = tuple(min(max(1, int(round(t * overlap))), t - 1) for t in self.tile)
        self.conditioning = getattr(denoiser, "conditioning", None)
        self._plans: dict[tuple[int, ...], list] = {}

    def windows(self, spatial: Sequence[int]) -> list[tuple[slice, ...]]:
        starts = [_tile_starts(s, t, o) for s, t, o in zip(spatial, self.tile, self.overlap)]
        return [tuple(slice(a, a + min(t, s)) for a, t, s in zip(corner, self.tile, spatial))
                for corner in np.stack(np.meshgrid(*starts, indexing="ij"), -1).reshape(-1, 3).tolist()]

    def plan(self, spatial: Sequence[int]) -> list[tuple[tuple[slice, ...], torch.Tensor]]:
        """(window, blending weight normalised so that the weights sum to one at every voxel) per
        tile; the same at every sampling step, so made once per grid."""
        spatial = tuple(int(s) for s in spatial)
        if spatial not in self._plans:
            tiles = []
            total = torch.zeros(spatial)
            for window in self.windows(spatial):
                ramps = [_ramp(w.stop - w.start, w.start, n, o) for w, n, o in zip(window, spatial, self.overlap)]
                weight = ramps[0][:, None, None] * ramps[1][:, None] * ramps[2]
                tiles.append((window, weight))
                total[window] += weight
            self._plans[spatial] = [(window, weight / total[window]) for window, weight in tiles]
        return self._plans[spatial]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.zeros_like(x)
        for window, weight in self.plan(x.shape[2:]):
            sub_cond = None
            if cond is not None:
                sub_cond = cond[(Ellipsis, *(slice(w.start * f, w.stop * f) for w, f in zip(window, self.factor)))]
            out[(Ellipsis, *window)] += self.denoiser(x[(Ellipsis, *window)], t, sub_cond) * weight.to(x)
        return out


def _padded_condition(cond: torch.Tensor, spatial: Sequence[int], factor: Sequence[int]) -> torch.Tensor:
    """The one-hot condition padded at the far end to `spatial` x `factor` (edge values repeated,
    as the networks pad it for a whole grid), so every tile cuts a whole window."""
    extra = [s * f - c for s, f, c in zip(spatial, factor, cond.shape[2:])]
    if not any(extra):
        return cond
    return torch.nn.functional.pad(cond, (0, extra[2], 0, extra[1], 0, extra[0]), mode="replicate")


@torch.no_grad()
def synthesize(model: SynthesisModel, label: np.ndarray | None, n: int = 1, sampler: str = "ddim",
               steps: int | None = 50, guidance: float = 1.0, eta: float = 0.0, seed: int = 0,
               image_shape: Sequence[int] | None = None, callback: Callable | None = None,
               progress: bool = True, clip_x0: float | None = None, tile: Sequence[int] | None = None,
               appearance: str | Mapping = "none") -> torch.Tensor:
    """`n` volumes (n, C, D, H, W) in [-1, 1] on the prepared grid, for one prepared label map
    (D, H, W) (None for unconditional models, which then need `image_shape`); `clip_x0`: see
    `x0_clip`; `tile` (image voxels, D, H, W): denoise in overlapping tiles of that size;
    `appearance`: see `appearance_targets` ("none" here: the decoder's output; `medlsdm sample`
    passes "auto")."""
    from medlsdm.diffusion.samplers import sample

    dcfg = model.sidecar["diffusion"]
    if model.conditional:
        if label is None:
            raise MedlsdmError("this model is conditioned on label maps: give --labels")
        label_t = torch.as_tensor(np.asarray(label), dtype=torch.long, device=model.device)[None, None]
        cond = one_hot(label_t, model.table.num_classes).repeat(n, 1, 1, 1, 1)
        image_shape = tuple(label.shape)
    else:
        cond = None
        if image_shape is None:
            raise MedlsdmError("an unconditional model needs the output shape")
    shape = (n, *model_shape(model, image_shape))
    generator = torch.Generator(device=model.device).manual_seed(int(seed))
    clip = x0_clip(model, clip_x0)
    denoiser, sample_cond = model.denoiser, cond
    if tile is not None and any(s > t for s, t in zip(shape[2:], model_shape(model, tile)[1:])):
        denoiser = TiledDenoiser(model.denoiser, model_shape(model, tile)[1:], model.downsample)
        if cond is not None:
            sample_cond = _padded_condition(cond, shape[2:], model.downsample)
    x = sample(denoiser, shape, sample_cond, model.schedule, sampler=sampler, steps=steps, eta=eta,
               guidance=guidance if model.conditional else 1.0, prediction=dcfg["prediction"],
               clip_x0=clip, generator=generator, callback=callback, progress=progress)
    volumes, _, note = with_appearance(model, decode(model, x, cond, image_shape), label, seed, appearance)
    if note:
        warnings.warn(note, stacklevel=2)
    return volumes


def appearance_targets(model: SynthesisModel, n: int, seed: int, appearance: str | Mapping = "auto"
                       ) -> list[list[dict]] | None:
    """The appearance each of `n` samples drawn with `seed` gets, per channel, or None. The values
    are statistics of the sample on the model's grid (before it is written back on the label
    map's own grid, whose interpolation changes the noise a little):

    * "auto": a training scan's appearance drawn at random (seeded, per sample) when the model's
      sidecar has an appearance profile, else none; "sample": the same, an error without a profile;
    * "none": the decoder's output as it is;
    * a mapping ``{"noise": ..., "contrast": ..., "bias": ...}``: that appearance for every sample.
    """
    from medlsdm.data.appearance import APPEARANCE_STATISTICS, choose_target

    profile = model.sidecar.get("appearance")
    if isinstance(appearance, Mapping):
        check_appearance_values(appearance)
        if profile is None:
            raise MedlsdmError("this model has no appearance profile (trained before appearance profiles existed, "
                               "or unconditional): --appearance must be 'none'")
        return [[{k: float(appearance[k]) for k in APPEARANCE_STATISTICS}] * len(profile["channels"])
                for _ in range(n)]
    if appearance not in ("auto", "sample", "none"):
        raise MedlsdmError(f"--appearance must be auto, sample, none or noise=..,contrast=..,bias=.., not {appearance!r}")
    if appearance == "none" or (profile is None and appearance == "auto"):
        return None
    if profile is None:
        raise MedlsdmError("this model has no appearance profile (trained before appearance profiles existed, "
                           "or unconditional): use --appearance none")
    return [[choose_target(profile, c, np.random.default_rng([int(seed), i, 0]))
             for c in range(len(profile["channels"]))] for i in range(n)]


def check_appearance_values(values: Mapping) -> None:
    """Chosen appearance values: exactly noise, contrast and bias, finite, noise and bias >= 0,
    |contrast| < 1 (the statistics of `medlsdm.data.appearance.appearance_statistics`)."""
    from medlsdm.data.appearance import APPEARANCE_STATISTICS

    missing = [k for k in APPEARANCE_STATISTICS if k not in values]
    unknown = [k for k in values if k not in APPEARANCE_STATISTICS]
    if missing or unknown:
        raise MedlsdmError(f"--appearance needs {', '.join(APPEARANCE_STATISTICS)}"
                           + (f" (missing {', '.join(missing)})" if missing else "")
                           + (f" (unknown {', '.join(map(str, unknown))})" if unknown else ""))
    v = {k: float(values[k]) for k in APPEARANCE_STATISTICS}
    if not all(np.isfinite(x) for x in v.values()) or v["noise"] < 0 or v["bias"] < 0 or abs(v["contrast"]) >= 1:
        raise MedlsdmError(f"--appearance values out of range: noise and bias >= 0, -1 < contrast < 1, all finite "
                           f"(got {', '.join(f'{k}={x}' for k, x in v.items())})")


def with_appearance(model: SynthesisModel, volumes: torch.Tensor, label: np.ndarray | None, seed: int,
                    appearance: str | Mapping = "auto") -> tuple[torch.Tensor, list[list[dict]] | None, str | None]:
    """`volumes` (n, C, D, H, W) with the appearance `appearance_targets` gives them, the targets
    applied (None: none) and, when "auto" had to leave a map as it was, why (unconditional models
    have no label map to find the tissues in; a map with too little of the two tissue classes)."""
    from medlsdm.data.appearance import apply_appearance
    from medlsdm.errors import DataError

    explicit = isinstance(appearance, Mapping) or appearance == "sample"
    if label is None:
        if explicit:
            raise MedlsdmError("appearance needs a label map (unconditional models have none): use --appearance none")
        return volumes, None, None
    targets = appearance_targets(model, volumes.shape[0], seed, appearance)
    if targets is None:
        return volumes, None, None
    profile = model.sidecar["appearance"]
    out = volumes.detach().float().cpu().numpy().copy()
    label = np.asarray(label)
    try:
        for i, per_channel in enumerate(targets):
            rng = np.random.default_rng([int(seed), i, 1])
            for c, target in enumerate(per_channel):
                out[i, c] = apply_appearance(out[i, c], label, profile, target, rng, channel=c)
    except DataError as exc:
        if explicit:
            raise
        return volumes, None, f"no appearance applied: {exc}"
    return torch.from_numpy(out).to(device=volumes.device, dtype=volumes.dtype), targets, None


def decode(model: SynthesisModel, x: torch.Tensor, cond: torch.Tensor | None, image_shape) -> torch.Tensor:
    """Model-space samples (latent or pixel) -> images in [-1, 1] on the prepared grid."""
    if model.autoencoder is None:
        return x.clamp(-1, 1)
    z = model.scaler.unscale(x)
    if model.sidecar.get("latent", {}).get("requantize"):
        z = model.autoencoder.quantizer.quantize_nearest(z)
    decoder_label = cond[: x.shape[0]] if model.autoencoder.decoder_kind == "spade" else None
    return model.autoencoder.decode(z, label=decoder_label, out_shape=tuple(image_shape)).clamp(-1, 1)
