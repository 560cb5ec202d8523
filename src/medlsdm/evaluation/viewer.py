"""The interactive 3D viewer of the evaluation reports.

For each case: the real image | its label map over the real image | the synthetic image, side by
side with linked cursors (a menu picks the case); and the samples of one label map side by side.
Scroll through slices in three planes, window/level, zoom (``viewer.js`` around NiiVue).

``viewer_block`` returns one HTML block holding NiiVue, the viewer script and the volumes
(base64 NIfTI, gzipped, at most ``max_side`` voxels a side, uint8 on each image's own 0.5th..99.5th
percentile window, so a synthetic image on another intensity scale is still visible; the quality
metrics measure such shifts), so a report stays a single file that works offline. The block is hidden until its script
runs: without scripting, readers see a one-line note and the report's static figures.

``report_viewer(out_dir)`` builds the block for an evaluation folder from the folders named in its
``metrics.json`` (and the samples recorded by ``record_samples``), or returns None when those
volumes are no longer where the results say.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from medlsdm.errors import MedlsdmError
from medlsdm.files import read_json, write_json
from medlsdm.web import script_bundle
from medlsdm.web.volumes import nifti_base64, robust_range, to_uint8

__all__ = ["Panel", "Row", "viewer_block", "case_rows", "samples_row", "record_samples", "report_viewer",
           "SAMPLES_FILE"]

log = logging.getLogger(__name__)

SAMPLES_FILE = "viewer.json"  # in an evaluation folder: the samples of one label map to show
MAX_CASES = 8                 # cases embedded in a report (each adds three volumes)


@dataclass
class Panel:
    """One canvas: an image (path(s) of its channel files, channel 0 shown), with a label map
    over it when given."""

    title: str
    image: Sequence[str | os.PathLike] = ()
    label: str | os.PathLike | None = None


@dataclass
class Row:
    """Panels shown side by side with linked cursors; all on one voxel grid."""

    title: str
    panels: list[Panel] = field(default_factory=list)


def _read(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, np.ndarray]:
    from medlsdm.evaluation.pairing import VolumeFiles, load_image

    array, affine = load_image(VolumeFiles("viewer", tuple(Path(p) for p in paths)))
    return array[0], affine


def _downsampled(array: np.ndarray, affine: np.ndarray, max_side: int, order: int) -> tuple[np.ndarray, np.ndarray]:
    """The volume on a grid of at most ``max_side`` voxels a side covering the same extent."""
    from medlsdm.data.geometry import resample_to_grid, resized_grid

    factor = max(array.shape) / max_side
    if factor <= 1:
        return array, affine
    shape = tuple(max(1, int(round(s / factor))) for s in array.shape)
    new = resized_grid(affine, array.shape, shape)
    return resample_to_grid(array.astype(np.float32 if order else np.int16), affine, new, shape, order=order,
                            antialias=order > 0), new


def _row_data(row: Row, max_side: int) -> dict:
    """The JSON the page's script gets for one row: per panel its layers (base64 NIfTI)."""
    images = {i: _read(p.image) for i, p in enumerate(row.panels) if p.image}
    labels = {i: _read([p.label]) for i, p in enumerate(row.panels) if p.label is not None}
    top = max((int(arr.max()) for arr, _ in labels.values()), default=1)
    panels = []
    for i, panel in enumerate(row.panels):
        layers = []
        if i in images:
            arr, aff = _downsampled(*images[i], max_side, order=1)
            layers.append({"base64": nifti_base64(to_uint8(arr, *robust_range(arr)), aff, compress=True)})
        if i in labels:
            arr, aff = _downsampled(*labels[i], max_side, order=0)
            layers.append({"base64": nifti_base64(np.clip(arr, 0, 255).astype(np.uint8), aff, compress=True),
                           "labels": int(min(255, max(1, top))), "opacity": 0.5 if layers else 1.0})
        panels.append({"title": panel.title, "layers": layers})
    return {"title": row.title, "panels": panels}


def viewer_block(cases: Sequence[Row], samples: Row | None = None, max_side: int = 96) -> str:
    """The HTML block (see the module doc); ``cases`` share one set of canvases and a menu."""
    data = {"cases": [_row_data(r, max_side) for r in cases],
            "samples": _row_data(samples, max_side) if samples is not None else None}
    payload = json.dumps(data).replace("</", "<\\/")
    return "\n".join([
        '<div class="mv-report">',
        "<noscript><p><em>The interactive viewer needs JavaScript; the figures show fixed slices.</em></p></noscript>",
        '<div class="mv-root" hidden></div>',
        '<style>.mv-report .mv-canvas { height: 260px; background: #000; }'
        ' .mv-report canvas { width: 100%; height: 100%; display: block; }'
        ' .mv-panels { display: grid; gap: 6px; } .mv-panels figure { margin: 0; }'
        ' .mv-controls { display: flex; flex-wrap: wrap; gap: 1em; align-items: center; margin: 0.4em 0 1.2em;'
        ' font-size: 0.9em; }</style>',
        f'<script type="application/json" class="mv-data">{payload}</script>',
        script_bundle(),
        "<script>document.querySelectorAll('.mv-report').forEach((box) => MedlsdmViewer.mountReport("
        "box.querySelector('.mv-root'), JSON.parse(box.querySelector('.mv-data').textContent)));</script>",
        "</div>",
    ])


def case_rows(real: str | os.PathLike, synthetic: str | os.PathLike, labels: str | os.PathLike | None = None,
              max_cases: int = MAX_CASES) -> tuple[list[Row], Row | None]:
    """(a row per case: real | label map on real | first synthetic sample, and a samples row for
    the first case with several samples) from the folders an evaluation compared."""
    from medlsdm.evaluation.pairing import pair_by_case, scan_folder

    real_files = scan_folder(real, "real volumes", labels_dir=labels)
    pairing = pair_by_case(real_files, scan_folder(synthetic, "synthetic volumes"), real, synthetic)
    rows, samples = [], None
    for case_id, pairs in list(pairing.by_case().items())[:max_cases]:
        r = pairs[0].real
        panels = [Panel("real", r.images)]
        if r.label is not None:
            panels.append(Panel("label map on real", r.images, r.label))
        panels.append(Panel("synthetic" if pairs[0].sample is None else f"synthetic, sample {pairs[0].sample}",
                            pairs[0].synthetic.images))
        rows.append(Row(f"case {case_id}", panels))
        if samples is None and len(pairs) >= 2:
            samples = samples_row(r.label, [p.synthetic.images for p in pairs[:4]], case_id)
    return rows, samples


def samples_row(label_map: str | os.PathLike | None, samples: Sequence[Sequence[str | os.PathLike]],
                name: str = "") -> Row:
    """The label map over the first sample (when given) and the samples side by side."""
    panels = [Panel("label map on sample 1", samples[0], label_map)] if label_map is not None else []
    panels += [Panel(f"sample {k + 1}", paths) for k, paths in enumerate(samples)]
    return Row(f"samples of one label map{f' ({name})' if name else ''}", panels)


def record_samples(out_dir: str | os.PathLike, label_map: str | os.PathLike,
                   samples: Sequence[str | os.PathLike]) -> Path:
    """Note in ``out_dir`` (an evaluation folder) the samples of one label map for the report's
    viewer, when they are not among the evaluated synthetic volumes."""
    from medlsdm.files import relative_path

    path = Path(out_dir) / SAMPLES_FILE   # paths relative to the folder, as in metrics.json
    write_json(path, {"label_map": relative_path(label_map, out_dir),
                      "samples": [relative_path(s, out_dir) for s in samples]})
    return path


def report_viewer(out_dir: str | os.PathLike) -> str | None:
    """The viewer block for an evaluation folder, or None (logged) when its volumes are gone."""
    out_dir = Path(out_dir)
    quality = out_dir / "metrics.json"
    if not quality.is_file():
        return None
    data = read_json(quality)
    try:
        if data.get("kind") != "medlsdm-quality" or not data.get("real") or not data.get("synthetic") \
                or data.get("pairing", {}).get("n_pairs", 0) == 0:
            return None
        # Paths in the folder's JSON files are relative to the folder (absolute in older ones).
        def where(p):
            return None if p is None else out_dir / p

        cases, samples = case_rows(where(data["real"]), where(data["synthetic"]), where(data.get("labels")))
        if (out_dir / SAMPLES_FILE).is_file():
            extra = read_json(out_dir / SAMPLES_FILE)
            samples = samples_row(where(extra["label_map"]), [[where(s)] for s in extra["samples"]],
                                  Path(extra["label_map"]).name.split(".")[0])
        return viewer_block(cases, samples)
    except (MedlsdmError, OSError, KeyError) as exc:
        log.warning("report: no interactive viewer (%s)", str(exc).splitlines()[0])
        return None
