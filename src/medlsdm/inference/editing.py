"""Sampling an edited label map beside the original from the same noise (label-map editing).

The label map is prepared onto the model's grid, edited there (`medlsdm.data.edit`), and both
maps are sampled with the same seed and sampler, so that any difference between the two images
comes from the edit alone. The edited map is written back on the input's own grid (ready for
`medlsdm sample`), beside both synthetic volumes; `medlsdm.evaluation.editing` measures them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from medlsdm.data.edit import Edit
from medlsdm.errors import MedlsdmError


@dataclass
class EditedPair:
    """Both label maps (D, H, W) and both images (C, D, H, W, in [-1, 1]) on the model's grid,
    and the files written (relative to the output folder)."""

    label: np.ndarray
    edited: np.ndarray
    original_image: np.ndarray
    edited_image: np.ndarray
    files: dict[str, str]
    settings: dict


def sample_label_edit(model_dir: str | Path, label_path: str | Path, edits: Sequence[Edit], out: str | Path,
                      seed: int = 0, sampler: str | None = None, steps: int | None = None,
                      guidance: float | None = None, device: str = "auto", progress: bool = True,
                      folder: str = "label_edit") -> EditedPair:
    """Edit one label map on the model's grid and sample original and edited from the same noise;
    writes ``<folder>/<stem>_edited.nii.gz`` and ``<folder>/<stem>_{original,edited}_sample.nii.gz``."""
    from medlsdm.data.edit import apply_edits
    from medlsdm.data.io import Volume, volume_stem, write_nifti
    from medlsdm.data.preprocess import invert_label, prepared_affine
    from medlsdm.files import ensure_writable_dir
    from medlsdm.inference.labelmaps import prepare_label_map
    from medlsdm.inference.model import load_model, resolve_device
    from medlsdm.inference.pipeline import sampling_settings, write_sample
    from medlsdm.inference.synthesis import synthesize

    model = load_model(model_dir, resolve_device(device))
    if not model.conditional:
        raise MedlsdmError(f"{model_dir}: an unconditional model cannot follow a label map")
    job = prepare_label_map(model, label_path)
    label, record = job.label, job.record
    edited = apply_edits(Volume(label, prepared_affine(record), path=str(label_path)), edits, model.table).array
    sampler, steps, guidance = sampling_settings(model, sampler, steps, guidance)
    images = [synthesize(model, lab, n=1, sampler=sampler, steps=steps, guidance=guidance, seed=seed,
                         progress=progress)[0].float().cpu().numpy() for lab in (label, edited)]

    stem = volume_stem(Path(label_path))
    ensure_writable_dir(Path(out) / folder)
    files = {"edited_label_map": f"{folder}/{stem}_edited.nii.gz",
             "original_sample": f"{folder}/{stem}_original_sample.nii.gz",
             "edited_sample": f"{folder}/{stem}_edited_sample.nii.gz"}
    edited_volume = invert_label(edited, record)
    write_nifti(Path(out) / files["edited_label_map"], edited_volume.array, edited_volume.affine)
    from medlsdm.data.io import synthetic_provenance

    intensity = model.sidecar.get("intensity")
    provenance = synthetic_provenance(model_dir, sampler, steps, guidance, seed=seed, label_path=stem)
    write_sample(Path(out) / files["original_sample"], images[0], record, intensity, provenance)
    write_sample(Path(out) / files["edited_sample"], images[1], record, intensity,
                 {**provenance, "label_map_edits": [e.describe() for e in edits]})
    settings = {"label_map": Path(label_path).name, "seed": int(seed), "sampler": sampler, "steps": steps,
                "guidance": guidance, "class_names": {str(k): v for k, v in model.table.names.items()}}
    return EditedPair(label, edited, images[0], images[1], files, settings)
