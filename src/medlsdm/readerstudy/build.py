"""Building a blinded reader study: real and synthetic volumes, equally many, in a seeded random
order, under opaque IDs, each resampled onto one grid and intensity-normalised the same way, with
a static web page that shows them and asks the questions.

What readers get (the study folder)::

    STUDY/
      index.html             the page (open it as a file, or `medlsdm reader-study serve STUDY`)
      study.json             study ID, questions, item IDs in presentation order, the grid; no sources
      volumes/ID.js          one volume: an uncompressed NIfTI-1 file, base64, in a script the page loads
      app/                   the page's scripts and styles, NiiVue (BSD-2) with its licence

What un-blinds it (the key, written apart, by default ``STUDY-key.json`` beside the folder): the
source (real / synthetic) and original file of every item, and the seed.

Blinding: every volume is resampled (trilinear, anti-aliased) onto the same RAS-aligned grid of
``shape``^3 voxels, centred on the volume's own centre, with one spacing for the whole study (the
largest field of view fits); its intensities are mapped to 0..255 from its own 0.5th..99.5th
percentiles inside its field of view (outside: 0); it is written with a header built from scratch
(the study grid and nothing else) and stored uncompressed, so every volume file has the same size.
Item IDs are random tokens; the order is a seeded shuffle.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from medlsdm import __version__
from medlsdm.data.geometry import resample_to_grid
from medlsdm.errors import DataError, MedlsdmError
from medlsdm.evaluation.pairing import VolumeFiles, load_image, refuse_same_folder, scan_folder
from medlsdm.files import atomic_directory, atomic_output, write_json
from medlsdm.readerstudy.page import write_page
from medlsdm.readerstudy.questions import TURING_CONFIDENCE, load_categories
from medlsdm.web.volumes import nifti_bytes, robust_range, to_uint8

__all__ = ["STUDY_FORMAT", "KEY_FORMAT", "MAX_SIDE", "default_key_path", "study_grid", "blind_volume",
           "build_study"]

STUDY_FORMAT = "medlsdm-reader-study"
KEY_FORMAT = "medlsdm-reader-study-key"
MAX_SIDE = 160  # default grid side at most: a 160^3 uint8 volume is 4 MB (5.5 MB in base64)


def default_key_path(study: str | os.PathLike) -> Path:
    study = Path(study)
    return study.with_name(study.name + "-key.json")


def _corners(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World coordinates of the outer corners of the voxel grid (8, 3)."""
    idx = np.array([[i, j, k] for i in (-0.5, shape[0] - 0.5) for j in (-0.5, shape[1] - 0.5)
                    for k in (-0.5, shape[2] - 0.5)])
    return idx @ affine[:3, :3].T + affine[:3, 3]


def _field_of_view(shape: Sequence[int], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centre, extent) of a volume's axis-aligned world bounding box, in mm."""
    corners = _corners(shape, affine)
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    return (lo + hi) / 2, hi - lo


def study_grid(side: int, spacing: float, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Affine of the RAS-aligned grid of ``side``^3 voxels of ``spacing`` mm centred on ``centre``."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = np.asarray(centre, dtype=np.float64) - spacing * (side - 1) / 2.0
    return affine


def blind_volume(array: np.ndarray, affine: np.ndarray, side: int, spacing: float) -> np.ndarray:
    """A 3D volume on the study grid, centred on its own field of view, as uint8 (see module doc)."""
    centre, _ = _field_of_view(array.shape, affine)
    dst = study_grid(side, spacing, centre)
    out = resample_to_grid(np.asarray(array, dtype=np.float32), affine, dst, (side,) * 3, order=1,
                           cval=np.nan, antialias=True)
    inside = np.isfinite(out)
    lo, hi = robust_range(out, inside)
    data = to_uint8(np.where(inside, out, lo), lo, hi)
    data[~inside] = 0
    return data


def _image(files: VolumeFiles, channel: int) -> tuple[np.ndarray, np.ndarray]:
    array, affine = load_image(files)
    if channel >= array.shape[0]:
        raise DataError(f"{files.display}: --channel {channel} asked, the volume has {array.shape[0]} channel(s)")
    return array[channel], affine


def _choose(found: dict[str, VolumeFiles], n: int, rng: np.random.Generator, folder, role: str) -> list[VolumeFiles]:
    if len(found) < n:
        raise DataError(f"{folder}: {len(found)} {role} volume(s), --n {n} asked (the study shows n real and "
                        f"n synthetic volumes)")
    names = sorted(found)
    return [found[names[i]] for i in sorted(rng.choice(len(names), size=n, replace=False))]


def _opaque_ids(rng: np.random.Generator, count: int) -> list[str]:
    ids: list[str] = []
    while len(ids) < count:
        token = "v" + "".join(rng.choice(list("0123456789abcdefghjkmnpqrstvwxyz"), size=6))
        if token not in ids:
            ids.append(token)
    return ids


def _check_outputs(out: Path, key: Path, overwrite: bool) -> None:
    out_r, key_r = out.resolve(), key.resolve()
    if out_r == key_r or out_r in key_r.parents:
        raise MedlsdmError(f"--key {key}: the key must be written outside the study folder {out} "
                           f"(readers get the folder)")
    if out.exists() and not (out / "study.json").is_file() and any(out.iterdir()):
        raise MedlsdmError(f"{out}: folder exists and is not a reader study; choose a new --out")
    if not overwrite:
        for path in (out, key):
            if path.exists() and (path.is_file() or any(path.iterdir())):
                raise MedlsdmError(f"{path}: exists; pass --overwrite to replace it")


def build_study(real: str | os.PathLike, synthetic: str | os.PathLike, n: int, out: str | os.PathLike,
                seed: int = 0, categories: str | os.PathLike | None = "default", turing: bool = False,
                key: str | os.PathLike | None = None, shape: int | None = None, channel: int = 0,
                title: str = "Reader study", overwrite: bool = False) -> dict:
    """Build the study folder ``out`` and its key (default ``default_key_path(out)``) from ``n``
    volumes of each folder; returns the study manifest (what study.json holds)."""
    if n < 1:
        raise MedlsdmError(f"--n {n}: must be at least 1")
    if shape is not None and not 8 <= shape <= 512:
        raise MedlsdmError(f"--shape {shape}: must be between 8 and 512 voxels")
    out = Path(out)
    key = Path(key) if key is not None else default_key_path(out)
    cats = load_categories(categories)
    _check_outputs(out, key, overwrite)
    refuse_same_folder(real=real, synthetic=synthetic)
    rng = np.random.default_rng(seed)
    chosen = ([("real", f) for f in _choose(scan_folder(real, "real volumes"), n, rng, real, "real")]
              + [("synthetic", f) for f in _choose(scan_folder(synthetic, "synthetic volumes"), n, rng,
                                                   synthetic, "synthetic")])
    # First pass: the fields of view, to fit every volume on one grid (volumes are read again
    # below rather than kept, so memory holds one volume at a time).
    fovs, sides = [], []
    for _, files in chosen:
        array, affine = _image(files, channel)
        fovs.append(_field_of_view(array.shape, affine)[1].max())
        sides.append(max(array.shape))
    side = int(shape or min(MAX_SIDE, max(sides)))
    spacing = float(max(fovs)) / side
    order = rng.permutation(len(chosen))
    ids = _opaque_ids(rng, len(chosen))
    grid = study_grid(side, spacing)
    digest = hashlib.sha256(json.dumps([cats, turing, ids]).encode())
    key_items = []
    with atomic_directory(out) as tmp:
        (tmp / "volumes").mkdir()
        for item_id, index in tqdm(list(zip(ids, order)), desc="blinding volumes", leave=False):
            role, files = chosen[index]
            array, affine = _image(files, channel)
            data = nifti_bytes(blind_volume(array, affine, side, spacing), grid)
            digest.update(data)
            write_volume_script(tmp / "volumes" / f"{item_id}.js", item_id, data)
            key_items.append({"id": item_id, "source": role, "file": files.display, "name": files.name})
        study = {
            "format": STUDY_FORMAT, "version": 1, "study_id": digest.hexdigest()[:16], "title": title,
            "categories": cats, "turing": bool(turing), "turing_confidence": TURING_CONFIDENCE,
            "items": [{"id": item_id} for item_id in ids],
            "grid": {"shape": [side] * 3, "spacing_mm": round(spacing, 6)},
            "medlsdm_version": __version__,
        }
        write_json(tmp / "study.json", study)
        write_page(tmp, study)
    write_json(key, {"format": KEY_FORMAT, "version": 1, "study_id": study["study_id"], "seed": seed,
                     "real": str(real), "synthetic": str(synthetic), "channel": channel, "items": key_items})
    return study


def write_volume_script(path: Path, item_id: str, nifti: bytes) -> None:
    """``volumes/ID.js``: a script that hands the page one volume (pages opened as files cannot
    fetch other files, but they can load scripts)."""
    import base64

    text = f'medlsdmVolume("{item_id}", "{base64.b64encode(nifti).decode("ascii")}");\n'
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="ascii")
