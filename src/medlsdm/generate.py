"""Generating volumes from label maps with a trained model (`medlsdm sample`).

label map file (any grid) → the model's stored preprocessing → one-hot → sampler in the latent
(or pixel) space → unscale, optional re-quantisation, decode (SPADE decoders get the label map)
→ undo crop/pad, spacing and orientation, de-normalise intensities → NIfTI on the label map's
own grid and affine.
"""

from __future__ import annotations

import logging
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from medlsdm.data.io import VOLUME_SUFFIXES, volume_stem
from medlsdm.data.labels import LabelTable, one_hot
from medlsdm.errors import MedlsdmError

log = logging.getLogger(__name__)


@dataclass
class SynthesisModel:
    """A trained stage-2 model with everything needed to sample and map back to files."""

    denoiser: torch.nn.Module
    schedule: object
    sidecar: dict
    table: LabelTable
    autoencoder: torch.nn.Module | None = None
    scaler: object | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def conditional(self) -> bool:
        return self.denoiser.conditioning != "none"

    @property
    def prepare_spec(self) -> dict:
        return self.sidecar.get("prepare_spec", {})


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> SynthesisModel:
    """Load `diffusion.safetensors` (+ the autoencoder copied next to it for latent models)."""
    from medlsdm.diffusion.scaling import LatentScaler
    from medlsdm.diffusion.schedules import NoiseSchedule
    from medlsdm.models.denoisers import build_denoiser
    from medlsdm.training.autoencoder import load_autoencoder
    from medlsdm.weights import load_weights

    run_dir = Path(run_dir)
    path = run_dir / "diffusion.safetensors" if run_dir.is_dir() else run_dir
    state, sidecar = load_weights(path)
    if sidecar.get("kind") != "diffusion":
        raise MedlsdmError(f"{path}: not a diffusion model (kind {sidecar.get('kind')!r})")
    device = torch.device(device)
    denoiser = build_denoiser(sidecar["denoiser"])
    try:
        denoiser.load_state_dict(state)
    except RuntimeError as exc:
        raise MedlsdmError(f"{path}: weights do not match the denoiser in its sidecar "
                           f"({str(exc).splitlines()[0]})") from None
    denoiser.to(device).eval().requires_grad_(False)
    dcfg = sidecar["diffusion"]
    model = SynthesisModel(denoiser=denoiser, schedule=NoiseSchedule(dcfg["timesteps"], kind=dcfg["schedule"]),
                           sidecar=sidecar, table=LabelTable.from_mapping(sidecar["label_table"]), device=device)
    if sidecar["space"] == "latent":
        ae_path = path.parent / "autoencoder.safetensors"
        if not ae_path.is_file():
            raise MedlsdmError(f"{ae_path}: a latent model needs the autoencoder next to {path.name}")
        model.autoencoder, _ = load_autoencoder(ae_path, device=device)
        model.scaler = LatentScaler.from_dict(sidecar["scaler"])
    return model


def _model_shape(model: SynthesisModel, image_shape: Sequence[int]) -> tuple[int, ...]:
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


@torch.no_grad()
def synthesize(model: SynthesisModel, label: np.ndarray | None, n: int = 1, sampler: str = "ddim",
               steps: int | None = 50, guidance: float = 1.0, eta: float = 0.0, seed: int = 0,
               image_shape: Sequence[int] | None = None, callback: Callable | None = None,
               progress: bool = True, clip_x0: float | None = None) -> torch.Tensor:
    """`n` volumes (n, C, D, H, W) in [-1, 1] on the prepared grid, for one prepared label map
    (D, H, W) (None for unconditional models, which then need `image_shape`); `clip_x0`: see
    `x0_clip`."""
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
    shape = (n, *_model_shape(model, image_shape))
    generator = torch.Generator(device=model.device).manual_seed(int(seed))
    clip = x0_clip(model, clip_x0)
    x = sample(model.denoiser, shape, cond, model.schedule, sampler=sampler, steps=steps, eta=eta,
               guidance=guidance if model.conditional else 1.0, prediction=dcfg["prediction"],
               clip_x0=clip, generator=generator, callback=callback, progress=progress)
    return decode(model, x, cond, image_shape)


def label_files(labels: str | Path) -> list[Path]:
    labels = Path(labels)
    if labels.is_file():
        return [labels]
    if labels.is_dir():
        files = sorted(p for p in labels.iterdir() if p.name.lower().endswith(VOLUME_SUFFIXES))
        if not files:
            raise MedlsdmError(f"{labels}: no label map files (.nii.gz, .nii, .nrrd, .mha) in this folder")
        return files
    raise MedlsdmError(f"{labels}: no such file or folder")



def decode(model: SynthesisModel, x: torch.Tensor, cond: torch.Tensor | None, image_shape) -> torch.Tensor:
    """Model-space samples (latent or pixel) -> images in [-1, 1] on the prepared grid."""
    if model.autoencoder is None:
        return x.clamp(-1, 1)
    z = model.scaler.unscale(x)
    if model.sidecar.get("latent", {}).get("requantize"):
        z = model.autoencoder.quantizer.quantize_nearest(z)
    decoder_label = cond[: x.shape[0]] if model.autoencoder.decoder_kind == "spade" else None
    return model.autoencoder.decode(z, label=decoder_label, out_shape=tuple(image_shape)).clamp(-1, 1)


def _seed_for(seed: int, stem: str, start: int) -> int:
    """A seed per (run seed, label map name, first sample of the batch): a label map gives the
    same outputs whether it is sampled alone or in a folder with others, in any order."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(stem.encode("utf-8")), start]).generate_state(1)[0])


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MedlsdmError(f"--device {device!r}: not a device name (cpu, cuda, cuda:1 ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MedlsdmError(f"--device {device}: CUDA is not available on this machine")
    return dev


def _label_jobs(model: SynthesisModel, labels) -> list[tuple[str, np.ndarray, dict]]:
    """(stem, prepared label map, record) per label map file; unknown classes are an error."""
    from medlsdm.data.io import read_label_map
    from medlsdm.data.preprocess import preprocess_label_map

    jobs = []
    known = set(model.table.values)
    for path in label_files(labels):
        volume = read_label_map(path)
        label, record = preprocess_label_map(volume, model.prepare_spec)
        # Without a label mapping the file's own values are the classes: check all of them, also
        # those outside the prepared window, which the crop would otherwise hide.
        values = np.unique(label if record.get("label_mapping") else np.asarray(volume.array)).tolist()
        unknown = sorted(set(values) - known)
        if unknown:
            raise MedlsdmError(f"{path}: label values {unknown} are not classes this model knows "
                               f"({model.table.to_json()})")
        jobs.append((volume_stem(path), label, record))
    return jobs


def _unconditional_record(model: SynthesisModel, image_shape: Sequence[int]) -> dict:
    """A record for `invert_image` of a sample with no label map: the prepared grid itself, at
    the prepared spacing (the spec's, else the training cases' median, else 1 mm), axes
    (D, H, W) = (S, A, R) written back as canonical RAS (X, Y, Z)."""
    from medlsdm.data.preprocess import MODEL_FROM_VOXEL

    spacing = model.prepare_spec.get("spacing") or model.sidecar.get("image_spacing") or [1.0, 1.0, 1.0]
    spacing = [float(spacing)] * 3 if np.isscalar(spacing) else [float(s) for s in spacing]
    canonical = np.diag([spacing[2], spacing[1], spacing[0], 1.0])   # (X, Y, Z) = (W, H, D)
    affine = canonical @ MODEL_FROM_VOXEL
    shape = [int(s) for s in image_shape]
    return {"shape": shape, "canonical_shape": shape, "canonical_affine": affine.tolist(), "affine": affine.tolist(),
            "resampled": False, "crop_start": [0, 0, 0], "ornt": [[0, 1], [1, 1], [2, 1]], "normalisation": None}


def _image_shape(model: SynthesisModel) -> tuple[int, ...]:
    shape = model.sidecar.get("image_shape") or model.prepare_spec.get("shape")
    if not shape:
        raise MedlsdmError("the model's sidecar gives no image shape for unconditional sampling")
    return tuple(int(s) for s in shape)


def write_sample(path: Path, array: np.ndarray, record: dict, intensity: dict | None) -> None:
    """One sample (C, D, H, W) in [-1, 1] -> NIfTI on the record's original grid, de-normalised."""
    from medlsdm.data.io import write_nifti
    from medlsdm.data.preprocess import invert_image

    neutral = {"channels": [{"lo": -1.0, "hi": 1.0, "min": -1.0}]}   # keeps [-1, 1] when no intensities are known
    volume = invert_image(array, record, intensity=intensity or neutral)
    write_nifti(path, volume.array, volume.affine)


def _trajectory_gif(path: Path, model: SynthesisModel, frames: list[torch.Tensor], label, image_shape) -> None:
    from medlsdm.viz import save_gif, three_plane

    cond = None
    if label is not None:
        cond = one_hot(torch.as_tensor(label, dtype=torch.long, device=model.device)[None, None],
                       model.table.num_classes)
    pictures = [three_plane(decode(model, f, cond, image_shape)[0, 0].cpu().numpy(), window=(-1, 1))
                for f in frames]
    save_gif(path, pictures)


def _preview(path: Path, array: np.ndarray, label: np.ndarray | None) -> None:
    from medlsdm.viz import label_picture, montage, save_png, three_plane

    if label is None:
        save_png(path, montage([[three_plane(array, window=(-1, 1))]], titles=["synthetic"]))
    else:
        save_png(path, montage([[label_picture(label), three_plane(array, window=(-1, 1))]],
                               titles=["label map", "synthetic"]))


def sample_to_files(model_dir: str | Path, labels: str | Path | None, out: str | Path, n: int = 1,
                    sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
                    eta: float = 0.0, seed: int = 0, batch_size: int = 1, device: str = "auto",
                    save_trajectory: bool = False, progress: bool = True,
                    clip_x0: float | None = None) -> list[Path]:
    """Generate `n` volumes per label map (or `n` in all for unconditional models) and write each
    as ``<label stem>_sample<k>.nii.gz`` on the label map's own grid and affine, in original
    intensities, plus ``<label stem>_sample<k>.png`` (label map | sample on the prepared grid)
    and, with `save_trajectory`, ``<label stem>_sample<k>_trajectory.gif`` (x0 estimates over
    the steps) for the first sample of each batch. Unconditional samples are named sample_sample<k>.

    The same seed gives the same files (for the same batch size: one noise draw per batch)."""
    from tqdm.auto import tqdm

    from medlsdm.files import ensure_writable_dir

    if n < 1 or batch_size < 1:
        raise MedlsdmError("--n and --batch-size must be at least 1")
    if steps is not None and steps < 1:
        raise MedlsdmError("--steps must be at least 1")
    model = load_model(model_dir, resolve_device(device))
    scfg = model.sidecar.get("sampling", {})
    sampler = sampler or scfg.get("sampler", "ddim")
    steps = steps if steps is not None else (None if sampler == "ddpm" else scfg.get("steps", 50))
    guidance = guidance if guidance is not None else scfg.get("guidance", 1.0)
    if model.conditional and guidance != 1.0 and not model.sidecar["diffusion"].get("cond_drop_prob"):
        warnings.warn(f"--guidance {guidance}: this model was trained without condition dropout, so its "
                      "unconditional prediction is untrained; guidance 1 uses the condition alone", stacklevel=2)
    intensity = model.sidecar.get("intensity")
    if intensity is None:
        warnings.warn("the model's sidecar has no intensity summary: samples are written in [-1, 1]", stacklevel=2)

    if model.conditional:
        if labels is None:
            raise MedlsdmError("this model is conditioned on label maps: give --labels FILE_OR_DIR")
        jobs = _label_jobs(model, labels)
    else:
        if labels is not None:
            raise MedlsdmError("this model is unconditional: give --n without --labels")
        jobs = [("sample", None, _unconditional_record(model, _image_shape(model)))]
    out = ensure_writable_dir(out)

    written: list[Path] = []
    bar = tqdm(total=len(jobs) * n, desc="generating", unit="volume", disable=not progress)
    for stem, label, record in jobs:
        image_shape = tuple(record["shape"])
        for start in range(0, n, batch_size):
            k = min(batch_size, n - start)
            frames: list[torch.Tensor] = []
            keep = max(1, (steps or model.schedule.T) // 20)   # about 20 frames per animation
            callback = ((lambda i, x, x0: frames.append(x0[:1].clone()) if i % keep == 0 else None)
                        if save_trajectory else None)
            volumes = synthesize(model, label, n=k, sampler=sampler, steps=steps, guidance=guidance, eta=eta,
                                 seed=_seed_for(seed, stem, start), image_shape=image_shape,
                                 callback=callback, progress=False, clip_x0=clip_x0).float().cpu().numpy()
            for j in range(k):
                name = f"{stem}_sample{start + j}"
                write_sample(out / f"{name}.nii.gz", volumes[j], record, intensity)
                _preview(out / f"{name}.png", volumes[j], label)
                written.append(out / f"{name}.nii.gz")
                bar.update(1)
            if save_trajectory and frames:
                _trajectory_gif(out / f"{stem}_sample{start}_trajectory.gif", model, frames, label, image_shape)
    bar.close()
    return written
