"""Does the generated image follow an edited label map? (the demo's label-editing showcase)

One label map is prepared onto the model's grid, edited there (`medlsdm.data.edit`), and both the
original and the edited map are sampled from the same initial noise (same seed, same sampler),
so that any difference between the two images comes from the edit alone. Measured in the voxels
the edit changed (on the prepared grid, images in [-1, 1]):

- ``changed_before`` / ``changed_after``: mean synthetic intensity there, from the original and
  from the edited map, and ``mean_change`` = after - before;
- ``target_reference``: mean intensity of the class those voxels were turned into, elsewhere in
  the image generated from the original map (what "looking like that class" means here);
- ``followed``: (after - before) / (reference - before), the fraction of the way the changed
  voxels moved towards the new class's appearance (1: all the way, 0: the image ignored the edit);
  None when the two appearances differ by less than ``MIN_GAP`` (a class that mixes tissues, such
  as the demo's "CSF and other brain", can have the mean of its neighbour: then ``mean_change``
  alone tells the story);
- ``unchanged_mae``: mean absolute change of the image outside a one-voxel margin around the
  edit (how local the change is).

Writes ``label_edit.json`` and ``figures/label_edit.png`` (rows: original, edited, difference)
into the output folder (an evaluation folder, beside the other results), and under
``label_edit/`` the edited label map (on the input's own grid, ready for ``medlsdm sample``) and
both synthetic volumes; `medlsdm.evaluation.report` renders the JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from medlsdm.data.edit import Edit
from medlsdm.errors import MedlsdmError
from medlsdm.files import ensure_writable_dir, write_json

RESULT_FILE = "label_edit.json"
MIN_GAP = 0.1   # in [-1, 1] image units: 5 % of the range


def edit_following(label: np.ndarray, edited: np.ndarray, before: np.ndarray, after: np.ndarray) -> dict:
    """The numbers above for one pair of label maps (D, H, W) and their images (D, H, W)."""
    label, edited = np.asarray(label), np.asarray(edited)
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if not (label.shape == edited.shape == before.shape == after.shape):
        raise MedlsdmError(f"edit_following: shapes differ: {label.shape}, {edited.shape}, {before.shape}, {after.shape}")
    changed = label != edited
    if not changed.any():
        raise MedlsdmError("the edit changed no voxel of the label map")
    targets, counts = np.unique(edited[changed], return_counts=True)
    target = int(targets[np.argmax(counts)])          # the class most changed voxels became
    reference_mask = (label == target) & ~changed
    reference = float(before[reference_mask].mean()) if reference_mask.any() else float("nan")
    b, a = float(before[changed].mean()), float(after[changed].mean())
    gap = reference - b
    far = ~ndimage.binary_dilation(changed, iterations=1)
    return {
        "changed_voxels": int(changed.sum()),
        "target_class": target,
        "changed_before": b,
        "changed_after": a,
        "mean_change": a - b,
        "target_reference": reference,
        "followed": (a - b) / gap if np.isfinite(gap) and abs(gap) >= MIN_GAP else None,
        "unchanged_mae": float(np.abs(after[far] - before[far]).mean()) if far.any() else None,
    }


def run_label_edit(model_dir: str | Path, label_path: str | Path, edits: Sequence[Edit], out: str | Path,
                   seed: int = 0, sampler: str | None = None, steps: int | None = None,
                   guidance: float | None = None, device: str = "auto", progress: bool = True) -> dict:
    """Edit one label map, sample original and edited from the same noise, measure and picture it."""
    from medlsdm.data.edit import apply_edits
    from medlsdm.data.io import Volume, read_label_map, volume_stem, write_nifti
    from medlsdm.data.preprocess import invert_label, prepared_affine, preprocess_label_map
    from medlsdm.generate import load_model, resolve_device, synthesize, write_sample
    from medlsdm.viz import label_picture, montage, save_png, three_plane

    out = ensure_writable_dir(out)
    model = load_model(model_dir, resolve_device(device))
    if not model.conditional:
        raise MedlsdmError(f"{model_dir}: an unconditional model cannot follow a label map")
    source = read_label_map(label_path)
    label, record = preprocess_label_map(source, model.prepare_spec)
    # Edit on the prepared grid, so both maps share one grid and crop: the images are comparable
    # voxel by voxel. The edited map is also written back onto the input's own grid.
    edited = apply_edits(Volume(label, prepared_affine(record), path=str(label_path)), edits, model.table).array
    scfg = model.sidecar.get("sampling", {})
    sampler = sampler or scfg.get("sampler", "ddim")
    steps = steps if steps is not None else (None if sampler == "ddpm" else scfg.get("steps", 50))
    guidance = guidance if guidance is not None else scfg.get("guidance", 1.0)
    images = [synthesize(model, lab, n=1, sampler=sampler, steps=steps, guidance=guidance, seed=seed,
                         progress=progress)[0].float().cpu().numpy() for lab in (label, edited)]
    numbers = edit_following(label, edited, images[0][0], images[1][0])

    stem = volume_stem(Path(label_path))
    volumes = ensure_writable_dir(out / "label_edit")
    edited_volume = invert_label(edited, record)
    write_nifti(volumes / f"{stem}_edited.nii.gz", edited_volume.array.astype(np.uint8), edited_volume.affine)
    intensity = model.sidecar.get("intensity")
    for name, image in (("original", images[0]), ("edited", images[1])):
        write_sample(volumes / f"{stem}_{name}_sample.nii.gz", image, record, intensity)

    changed = (label != edited).astype(np.uint8) * numbers["target_class"]
    centre = tuple(int(round(c)) for c in np.argwhere(changed > 0).mean(axis=0))
    difference = images[1][0] - images[0][0]
    rows = [[label_picture(label, centre), three_plane(images[0], window=(-1, 1), centre=centre)],
            [label_picture(edited, centre), three_plane(images[1], window=(-1, 1), centre=centre)],
            [label_picture(changed, centre), three_plane(difference, window=(-1, 1), centre=centre)]]
    description = "; ".join(e.describe() for e in edits)
    figure = save_png(out / "figures" / "label_edit.png", montage(
        rows, row_titles=["original", "edited", "change"],
        panel_titles=[["label map", "synthetic"], [f"label map ({description})", "synthetic, same noise"],
                      ["voxels changed", "synthetic difference (edited - original)"]]))
    result = {
        "label_map": str(label_path), "edits": [e.describe() for e in edits], "seed": int(seed),
        "sampler": sampler, "steps": steps, "guidance": guidance,
        "class_names": {str(k): v for k, v in model.table.names.items()},
        **numbers,
        "files": {"edited_label_map": f"label_edit/{stem}_edited.nii.gz",
                  "original_sample": f"label_edit/{stem}_original_sample.nii.gz",
                  "edited_sample": f"label_edit/{stem}_edited_sample.nii.gz"},
        "figures": [{"path": str(figure.relative_to(out)),
                     "caption": f"Label-map editing ({description}): the same noise sampled with the original "
                                "and the edited label map, and the difference."}],
    }
    write_json(out / RESULT_FILE, result)
    return result
