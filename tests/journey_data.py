"""Small datasets in the layouts users bring (BraTS 2021 / 2023, AutoPET, nnU-Net, generic), with
1 mm files, several modalities, raw label values and repeat scans of one subject, for the journey
tests (tests/test_journeys.py). Each case is a head-like ellipsoid (random size, position and
texture) with nested label regions; images are non-zero inside the head only (skull-stripped)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

SHAPE = (26, 30, 24)   # voxels at 1 mm: a 20-24 mm "head" fits a 16^3 window at 2 mm


def _case(rng: np.random.Generator, values=(1, 2, 3), shape=SHAPE, spacing=(1.0, 1.0, 1.0), tumour: bool = False):
    """(label with the three `values` nested, images dict channel -> float32, affine). With
    `tumour`, the labels cover only the inner part of the head (a tumour in a brain, as in BraTS)."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = rng.uniform(-5, 5, 3)
    centre = np.asarray(shape) / 2 + rng.uniform(-1.5, 1.5, 3)
    radius = np.asarray([9.0, 11.0, 8.5]) * rng.uniform(0.9, 1.1) / np.asarray(spacing)
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    r = np.sqrt((((grid - centre) / radius) ** 2).sum(-1))
    label = np.zeros(shape, np.uint8)
    label[r < 1.0] = values[0]
    label[r < 0.7] = values[1]
    label[r < 0.35] = values[2]
    head = r < 1.0
    if tumour:
        label = np.zeros(shape, np.uint8)
        label[r < 0.75] = values[0]
        label[r < 0.5] = values[1]
        label[r < 0.3] = values[2]
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0)
    base = {values[0]: 300.0, values[1]: 600.0, values[2]: 900.0}
    intensity = np.where(head, 450.0, 0.0).astype(np.float32)
    for v, level in base.items():
        intensity[label == v] = level
    images = {}
    for k in range(4):
        img = (intensity * (1.0 + 0.2 * k) + 40.0 * texture) * head
        images[k] = np.clip(img, 0, None).astype(np.float32)
    return label, images, affine


def _save(path: Path, array, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _brats(root: Path, cases, modalities, sep: str, values, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for case in cases:
        label, images, affine = _case(rng, values=values, tumour=True)
        for k, mod in enumerate(modalities):
            _save(root / case / f"{case}{sep}{mod}.nii.gz", images[k], affine)
        _save(root / case / f"{case}{sep}seg.nii.gz", label, affine)
    return root


def brats2021(root: Path, n: int = 6, seed: int = 0) -> Path:
    """BraTS 2018-2021 names, 4 modalities, labels 0, 1, 2, 4 (edema > necrosis > enhancing 4)."""
    return _brats(root, [f"BraTS2021_{i:05d}" for i in range(n)], ("t1", "t1ce", "t2", "flair"), "_", (2, 1, 4), seed)


def brats2023(root: Path, n_subjects: int = 4, seed: int = 1) -> Path:
    """BraTS 2023 names, 4 modalities, labels 0..3; every subject has a baseline and a follow-up."""
    cases = [f"BraTS-GLI-{s:05d}-{t:03d}" for s in range(n_subjects) for t in range(2)]
    return _brats(root, cases, ("t1n", "t1c", "t2w", "t2f"), "-", (2, 1, 3), seed)


def autopet(root: Path, n_patients: int = 3, seed: int = 2) -> Path:
    """PATIENT/STUDY/{CTres,SUV,SEG}.nii.gz; two studies per patient; 2 classes (lesion)."""
    rng = np.random.default_rng(seed)
    for p in range(n_patients):
        for s in range(2):
            label, images, affine = _case(rng)
            folder = root / f"PETCT_{p:04x}" / f"0{s}-study"
            ct = images[0] - 1000.0 * (label == 0)            # air outside, tissue inside, in HU
            _save(folder / "CTres.nii.gz", ct.astype(np.float32), affine)
            _save(folder / "SUV.nii.gz", images[1] / 100.0, affine)
            _save(folder / "SEG.nii.gz", (label == 3).astype(np.uint8), affine)
    return root


def nnunet(root: Path, n: int = 6, seed: int = 3, subjects: dict[str, str] | None = None) -> Path:
    """imagesTr/CASE_0000, CASE_0001 + labelsTr/CASE, dataset.json; optional subjects.csv."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        case = f"case_{i:03d}"
        label, images, affine = _case(rng)
        for k in range(2):
            _save(root / "imagesTr" / f"{case}_{k:04d}.nii.gz", images[k], affine)
        _save(root / "labelsTr" / f"{case}.nii.gz", label, affine)
    info = {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "a": 1, "b": 2, "c": 3},
            "numTraining": n, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(info), encoding="utf-8")
    if subjects:
        (root / "subjects.csv").write_text("case_id,subject_id\n" + "".join(f"{c},{s}\n" for c, s in subjects.items()),
                                           encoding="utf-8")
    return root


def generic(root: Path, n: int = 6, seed: int = 4, subjects: dict[str, str] | None = None) -> Path:
    """images/ + labels/ with labels.json; optional subjects.csv."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        case = f"pat{i // 2}_scan{i % 2}"
        label, images, affine = _case(rng)
        _save(root / "images" / f"{case}.nii.gz", images[0], affine)
        _save(root / "labels" / f"{case}.nii.gz", label, affine)
    (root / "labels.json").write_text(json.dumps({"0": "background", "1": "a", "2": "b", "3": "c"}), encoding="utf-8")
    if subjects:
        (root / "subjects.csv").write_text("case_id,subject_id\n" + "".join(f"{c},{s}\n" for c, s in subjects.items()),
                                           encoding="utf-8")
    return root


def oblique_anisotropic(label_path: Path, out: Path) -> Path:
    """The same label map resampled onto a grid rotated 20 degrees and 0.8 x 0.8 x 2.5 mm."""
    from medlsdm.data.geometry import resample_to_grid

    image = nib.load(str(label_path))
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([0.8, 0.8, 2.5])
    shape = (40, 44, 12)
    centre_world = image.affine[:3, :3] @ (np.asarray(image.shape) - 1) / 2 + image.affine[:3, 3]
    affine[:3, 3] = centre_world - affine[:3, :3] @ (np.asarray(shape) - 1) / 2
    array = resample_to_grid(np.asarray(image.dataobj), image.affine, affine, shape, order=0)
    return _save(out, array.astype(np.uint8), affine)
