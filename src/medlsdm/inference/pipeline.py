"""`medlsdm sample` as a function: label map files (any grid) -> synthetic volumes on each
map's own grid and affine, in the training data's intensities, with a report of what was done.

label map -> `labelmaps.prepare_label_map` (classes, training voxel size, a window that covers
the foreground, scheme check) -> `synthesis.synthesize` (whole grid, or tiles) -> undo the window,
spacing and orientation, de-normalise -> NIfTI + PNG preview (+ denoising GIF) + sampling_report.json.
"""

from __future__ import annotations

import logging
import warnings
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from medlsdm.data.labels import one_hot
from medlsdm.data.sources import sample_name
from medlsdm.errors import MedlsdmError
from medlsdm.inference.labelmaps import LabelMapJob, label_jobs, parse_label_map
from medlsdm.inference.model import SynthesisModel, load_model, resolve_device
from medlsdm.inference.synthesis import appearance_targets, decode, synthesize, with_appearance

log = logging.getLogger(__name__)

REPORT_FILE = "sampling_report.json"


def seed_for(seed: int, stem: str, start: int) -> int:
    """A seed per (run seed, label map name, first sample of the batch): a label map gives the
    same outputs whether it is sampled alone or in a folder with others, in any order."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(stem.encode("utf-8")), start]).generate_state(1)[0])


def unconditional_record(model: SynthesisModel, image_shape: Sequence[int]) -> dict:
    """The record of a sample with no label map: the prepared grid at the training voxel size
    (else 1 mm)."""
    from medlsdm.data.preprocess import grid_record

    return grid_record(image_shape, model.card.spacing or (1.0, 1.0, 1.0))


def write_sample(path: Path, array: np.ndarray, record: dict, intensity: dict | None, provenance: dict) -> None:
    """One sample (C, D, H, W) in [-1, 1] -> NIfTI on the record's original grid, de-normalised,
    marked synthetic (header ``descrip`` and a JSON sidecar with `provenance`, see
    `medlsdm.data.io.synthetic_provenance`)."""
    from medlsdm.data.io import write_synthetic_nifti
    from medlsdm.data.preprocess import invert_image

    neutral = {"channels": [{"lo": -1.0, "hi": 1.0, "min": -1.0}]}   # keeps [-1, 1] when no intensities are known
    volume = invert_image(array, record, intensity=intensity or neutral)
    write_synthetic_nifti(path, volume.array, volume.affine, provenance)


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


def sampling_settings(model: SynthesisModel, sampler: str | None, steps: int | None,
                      guidance: float | None) -> tuple[str, int | None, float]:
    """The sampler, steps and guidance to use: the given ones, else the model's defaults."""
    scfg = model.sidecar.get("sampling", {})
    sampler = sampler or scfg.get("sampler", "ddim")
    steps = steps if steps is not None else (None if sampler == "ddpm" else scfg.get("steps", 50))
    guidance = guidance if guidance is not None else scfg.get("guidance", 1.0)
    return sampler, steps, guidance


def sample_to_files(model_dir: str | Path, labels: str | Path | None, out: str | Path, n: int = 1,
                    sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
                    eta: float = 0.0, seed: int = 0, batch_size: int = 1, device: str = "auto",
                    save_trajectory: bool = False, progress: bool = True, clip_x0: float | None = None,
                    layout: str = "auto", label_map: str | dict | None = None, crop: bool = False,
                    tile: bool = False, overwrite: bool = False, appearance: str | dict = "auto") -> list[Path]:
    """Generate `n` volumes per label map (or `n` in all for unconditional models) and write each
    as ``<case ID>_sample<k>.nii.gz`` on the label map's own grid and affine, in original
    intensities, plus ``<case ID>_sample<k>.png`` (label map | sample on the model's grid) and,
    with `save_trajectory`, ``<case ID>_sample<k>_trajectory.gif`` for the first sample of each
    batch; ``sampling_report.json`` says what was done to each label map. The case ID is the
    layout's for a dataset root, else the file name without its suffix; unconditional samples are
    named sample_sample<k>.

    `labels`: a label map file, a folder of them, or a dataset root (`layout`). `label_map`: another
    scheme's values -> the model's classes (see `labelmaps.parse_label_map`). `crop`: keep the
    training window even where the foreground is larger (cut, with a warning); `tile`: generate
    grids larger than the training window in overlapping tiles of it instead of whole. `out` is a
    new folder or one `sample` wrote before (`medlsdm.files.owned_output`; `overwrite`: any other),
    locked while it is written; every volume is marked synthetic, with a provenance sidecar.
    `appearance`: each sample's noise level, tissue contrast and bias field (see
    `synthesis.appearance_targets`; "auto": a training scan's, drawn with the seed, when the model
    has an appearance profile), recorded in its provenance and the report.
    The same seed gives the same files (for the same batch size: one noise draw per batch)."""
    from medlsdm.files import owned_output

    if n < 1 or batch_size < 1:
        raise MedlsdmError("--n and --batch-size must be at least 1")
    if steps is not None and steps < 1:
        raise MedlsdmError("--steps must be at least 1")
    value_map = parse_label_map(label_map)
    model = load_model(model_dir, resolve_device(device))
    sampler, steps, guidance = sampling_settings(model, sampler, steps, guidance)
    if model.conditional and guidance != 1.0 and not model.sidecar["diffusion"].get("cond_drop_prob"):
        warnings.warn(f"--guidance {guidance}: this model was trained without condition dropout, so its "
                      "unconditional prediction is untrained; guidance 1 uses the condition alone", stacklevel=2)
    intensity = model.sidecar.get("intensity")
    if intensity is None:
        warnings.warn("the model's sidecar has no intensity summary: samples are written in [-1, 1]", stacklevel=2)

    if model.conditional:
        if labels is None:
            raise MedlsdmError("this model is conditioned on label maps: give --labels FILE_OR_DIR")
        jobs = label_jobs(model, labels, layout=layout, value_map=value_map, crop=crop)
    else:
        if labels is not None or label_map is not None or crop or tile:
            raise MedlsdmError("this model is unconditional: give --n without --labels (--label-map, --crop and "
                               "--tile apply to label maps)")
        shape = model.card.shape
        if shape is None:
            raise MedlsdmError("the model's sidecar gives no image shape for unconditional sampling")
        jobs = [LabelMapJob(case_id="sample", source=Path(), label=None,
                            record=unconditional_record(model, shape))]
    tile_shape = model.card.shape if tile else None
    if not model.conditional and appearance not in ("auto", "none"):
        raise MedlsdmError("--appearance: an unconditional model has no label map to find the tissues in; "
                           "use auto or none")
    appearance_targets(model, 1, seed, appearance if model.conditional else "none")   # bad settings fail here
    inputs = [p for p in (labels, model_dir) if p is not None]
    with owned_output(out, "sample", inputs=inputs, overwrite=overwrite) as out:
        return _generate(model, jobs, out, model_dir, n, sampler, steps, guidance, eta, seed, batch_size,
                         save_trajectory, progress, clip_x0, tile_shape, intensity, appearance)


def _generate(model: SynthesisModel, jobs: list[LabelMapJob], out: Path, model_dir, n: int, sampler: str,
              steps: int | None, guidance: float, eta: float, seed: int, batch_size: int, save_trajectory: bool,
              progress: bool, clip_x0: float | None, tile_shape, intensity: dict | None,
              appearance: str | dict = "auto") -> list[Path]:
    from tqdm.auto import tqdm

    from medlsdm.data.io import synthetic_provenance
    from medlsdm.files import write_json

    base = synthetic_provenance(model_dir, sampler, steps, guidance, seed=seed, label_path=None)   # hashes once
    written: list[Path] = []
    described = appearance if isinstance(appearance, str) else dict(appearance)
    if not model.conditional:
        appearance, described = "none", "none (unconditional model)"
    elif appearance == "auto" and model.sidecar.get("appearance") is None:
        described = "none (the model has no appearance profile: trained before profiles were recorded)"
        log.info("appearance: %s", described)
    report = {"model": Path(model_dir).name, "sampler": sampler, "steps": steps, "guidance": guidance, "eta": eta,
              "seed": int(seed), "appearance": described, "label_maps": []}
    bar = tqdm(total=len(jobs) * n, desc="generating", unit="volume", disable=not progress)
    for job in jobs:
        image_shape = job.grid_shape
        files = []
        for start in range(0, n, batch_size):
            k = min(batch_size, n - start)
            frames: list[torch.Tensor] = []
            keep = max(1, (steps or model.schedule.T) // 20)   # about 20 frames per animation
            callback = ((lambda i, x, x0: frames.append(x0[:1].clone()) if i % keep == 0 else None)
                        if save_trajectory else None)
            batch_seed = seed_for(seed, job.case_id, start)
            volumes = synthesize(model, job.label, n=k, sampler=sampler, steps=steps, guidance=guidance, eta=eta,
                                 seed=batch_seed, image_shape=image_shape, callback=callback, progress=False,
                                 clip_x0=clip_x0, tile=tile_shape, appearance="none")
            volumes, targets, note = with_appearance(model, volumes, job.label, batch_seed, appearance)
            volumes = volumes.float().cpu().numpy()
            if note and note not in job.warnings:
                log.warning("warning: %s: %s", job.source, note)
                job.warnings.append(note)
            for j in range(k):
                name = sample_name(job.case_id, start + j)
                provenance = {**base, "seed": batch_seed, "sample_index": start + j,
                              "label_map_case_id": job.case_id if model.conditional else None,
                              "appearance": targets[j] if targets else None}
                write_sample(out / f"{name}.nii.gz", volumes[j], job.record, intensity, provenance)
                _preview(out / f"{name}.png", volumes[j], job.label)
                written.append(out / f"{name}.nii.gz")
                files.append(f"{name}.nii.gz")
                bar.update(1)
            if save_trajectory and frames:
                _trajectory_gif(out / f"{job.case_id}_sample{start}_trajectory.gif", model, frames, job.label,
                                image_shape)
        if model.conditional:
            report["label_maps"].append({"case_id": job.case_id, "label_map": job.source.name, "files": files,
                                         "grid": list(image_shape),
                                         "classes": sorted(int(v) for v in np.unique(job.label)),
                                         "notes": job.notes, "warnings": job.warnings})
    bar.close()
    write_json(out / REPORT_FILE, report)
    return written
