"""Does the generated image follow an edited label map? (the demo's label-editing showcase)

`medlsdm.inference.editing.sample_label_edit` samples an original and an edited label map from the
same initial noise; this module measures the pair. In the voxels the edit changed (on the
model's grid, images in [-1, 1]):

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
into the output folder (an evaluation folder, beside the other results);
`medlsdm.evaluation.report` renders the JSON.
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


def label_edit_result(pair, edits: Sequence[Edit], out: str | Path) -> dict:
    """Measure and picture an `medlsdm.inference.editing.EditedPair`: `edit_following` on the
    model's grid, ``figures/label_edit.png`` and ``label_edit.json`` in `out`."""
    from medlsdm.viz import label_picture, montage, save_png, three_plane

    out = ensure_writable_dir(out)
    label, edited, before, after = pair.label, pair.edited, pair.original_image, pair.edited_image
    numbers = edit_following(label, edited, before[0], after[0])
    changed = (label != edited).astype(np.uint8) * numbers["target_class"]
    centre = tuple(int(round(c)) for c in np.argwhere(changed > 0).mean(axis=0))
    difference = after[0] - before[0]
    rows = [[label_picture(label, centre), three_plane(before, window=(-1, 1), centre=centre)],
            [label_picture(edited, centre), three_plane(after, window=(-1, 1), centre=centre)],
            [label_picture(changed, centre), three_plane(difference, window=(-1, 1), centre=centre)]]
    description = "; ".join(e.describe() for e in edits)
    figure = save_png(out / "figures" / "label_edit.png", montage(
        rows, row_titles=["original", "edited", "change"],
        panel_titles=[["label map", "synthetic"], [f"label map ({description})", "synthetic, same noise"],
                      ["voxels changed", "synthetic difference (edited - original)"]]))
    result = {
        **{k: v for k, v in pair.settings.items()},
        "edits": [e.describe() for e in edits],
        **numbers,
        "files": dict(pair.files),
        "figures": [{"path": str(figure.relative_to(out)),
                     "caption": f"Label-map editing ({description}): the same noise sampled with the original "
                                "and the edited label map, and the difference."}],
    }
    write_json(out / RESULT_FILE, result)
    return result
