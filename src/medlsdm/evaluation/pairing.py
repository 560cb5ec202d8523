"""Find volumes in evaluation folders and pair synthetic volumes with the real case they came from.

A real folder is anything ``medlsdm prepare`` reads (``medlsdm.data.sources.read_dataset``): a
dataset root in a known layout (detected, or given as a ``DatasetSource`` with a layout or
preset), with multi-channel cases (BraTS: 4 modalities) as one case; or a prepared dataset (its
original files, subjects and splits). Any other folder is flat: one image file per case, the case
ID being the file name without its extension (label maps from ``labels_dir``; subjects from a
``subjects.csv`` beside the files, else the case ID).

A synthetic volume generated from the label map of real case ``ID`` is named ``ID.nii.gz`` or
``ID_sample<k>.nii.gz`` (k = 0, 1, ...; what ``medlsdm sample`` writes), so one case may have
several samples; ``<label file stem>_sample<k>`` (e.g. ``BraTS2021_00000_seg_sample0``) pairs too.
A file whose whole stem is a real case ID pairs with that case even if it ends in ``_sample<k>``.
Files that pair with nothing are reported, not silently dropped.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from medlsdm.data.sources import DatasetSource, as_source, case_aliases, find_dataset, split_sample_name
from medlsdm.errors import DataError

__all__ = [
    "VOLUME_SUFFIXES", "VolumeFiles", "Pair", "Pairing", "volume_stem", "scan_folder",
    "split_sample_name", "pair_by_case", "load_image", "load_label", "check_same_grid",
    "refuse_same_folder", "DatasetSource",
]

# Longest first, so "x.nii.gz" is stripped as ".nii.gz", not ".gz".
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass(frozen=True)
class VolumeFiles:
    """One volume on disk: ``name`` (case ID for real cases, file stem for synthetic files), its
    image file(s) (one per channel in multi-file layouts) and its label map, if any."""

    name: str
    images: tuple[Path, ...]
    label: Path | None = None
    channel_names: tuple[str, ...] = ()
    subject_id: str | None = None  # patient (repeat scans share one); the case ID when nothing tells
    split: str | None = None  # train / val / test when the dataset records it

    @property
    def display(self) -> str:
        return str(self.images[0]) if len(self.images) == 1 else f"{self.images[0]} (+{len(self.images) - 1} channels)"


@dataclass(frozen=True)
class Pair:
    """A synthetic volume and the real case whose label map generated it."""

    case_id: str
    sample: int | None
    real: VolumeFiles
    synthetic: VolumeFiles


@dataclass
class Pairing:
    pairs: list[Pair]
    unpaired_real: list[str] = field(default_factory=list)
    unpaired_synthetic: list[str] = field(default_factory=list)

    def by_case(self) -> dict[str, list[Pair]]:
        """Pairs grouped by case ID, samples in order."""
        out: dict[str, list[Pair]] = defaultdict(list)
        for p in self.pairs:
            out[p.case_id].append(p)
        return dict(out)

    def summary(self) -> dict:
        return {"n_pairs": len(self.pairs), "n_cases": len(self.by_case()),
                "unpaired_real": list(self.unpaired_real),
                "unpaired_synthetic": list(self.unpaired_synthetic)}


def volume_stem(path: str | os.PathLike) -> str | None:
    """File name without its volume extension, or None for files that are not volumes."""
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _flat_files(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        stem = volume_stem(path)
        if stem is None or stem.startswith(".") or not path.is_file():
            continue  # hidden files include our own half-written temporaries
        if stem in out:
            raise DataError(f"{folder}: two files for '{stem}': {out[stem].name} and {path.name}")
        out[stem] = path
    return out


def scan_folder(root: str | os.PathLike, what: str = "volumes",
                labels_dir: str | os.PathLike | None = None) -> dict[str, VolumeFiles]:
    """``{name: VolumeFiles}`` of a dataset (module docstring; `root` may be a ``DatasetSource``),
    a flat folder or a folder with only ``images/``. ``labels_dir`` (flat, files named by case ID)
    gives label maps for flat folders or overrides the dataset's. ``what`` names the folder's role
    in error messages."""
    source = as_source(root)
    if not source.path.is_dir():
        raise DataError(f"{source.path}: {what} folder not found")
    found = find_dataset(source)
    if found is not None:
        volumes = {c.case_id: VolumeFiles(c.case_id, tuple(Path(p) for p in c.image_paths), Path(c.label_path),
                                          tuple(c.channel_names or ()), c.subject_id, c.split)
                   for c in found.cases}
    else:  # flat, or images/ alone (synthetic volumes have no label maps of their own)
        volumes = _flat_volumes(source)
    if not volumes:
        raise DataError(f"{source.path}: no {what} found (expected NIfTI files such as CASE.nii.gz, directly or "
                        f"under images/, or a dataset folder medlsdm prepare reads)")
    if labels_dir is not None:
        labels = _flat_files(_existing_dir(labels_dir, f"{what} labels"))
        volumes = {k: dataclasses.replace(v, label=labels.get(k, v.label)) for k, v in volumes.items()}
    return volumes


def _flat_volumes(source: DatasetSource) -> dict[str, VolumeFiles]:
    from medlsdm.data.layouts import Case, assign_subjects

    folder = source.path / "images" if (source.path / "images").is_dir() else source.path
    cases = [Case(stem, stem, [path], None, []) for stem, path in _flat_files(folder).items()]
    assign_subjects(cases, source.path, source.subject_regex)
    return {c.case_id: VolumeFiles(c.case_id, tuple(c.image_paths), subject_id=c.subject_id) for c in cases}


def _existing_dir(path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found")
    return path


def pair_by_case(real: Mapping[str, VolumeFiles], synthetic: Mapping[str, VolumeFiles],
                 real_dir: str | os.PathLike = "real", synthetic_dir: str | os.PathLike = "synthetic") -> Pairing:
    """Pair every synthetic volume with its real case by name (case ID, or the stem of the case's
    label file); a DataError if nothing pairs."""
    ids = set(real)
    names = case_aliases((k, v.label) for k, v in real.items())
    pairs, unpaired_syn = [], []
    for stem in sorted(synthetic):
        hit = split_sample_name(stem, names)
        if hit is None:
            unpaired_syn.append(stem)
        else:
            pairs.append(Pair(hit[0], hit[1], real[hit[0]], synthetic[stem]))
    if not pairs:
        raise DataError(f"no synthetic volume in {synthetic_dir} matches a case in {real_dir}: expected "
                        f"names CASE.nii.gz or CASE_sample<k>.nii.gz with CASE among "
                        f"{_examples(sorted(ids))}, found {_examples(sorted(synthetic))}")
    pairs.sort(key=lambda p: (p.case_id, -1 if p.sample is None else p.sample))
    paired_ids = {p.case_id for p in pairs}
    return Pairing(pairs, sorted(ids - paired_ids), unpaired_syn)


def _examples(names: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


# ----------------------------------------------------------------------------- reading

def load_image(files: VolumeFiles) -> tuple[np.ndarray, np.ndarray]:
    """(array float32 (C, X, Y, Z), affine) of a volume; channel files are stacked in order."""
    from medlsdm.data.io import read_volume

    arrays, affine = [], None
    for path in files.images:
        vol = read_volume(path)
        arr = np.asarray(vol.array, dtype=np.float32)
        arrays.append(arr[None] if arr.ndim == 3 else arr)
        if affine is None:
            affine = np.asarray(vol.affine, dtype=np.float64)
        elif arrays[-1].shape[1:] != arrays[0].shape[1:] or not np.allclose(vol.affine, affine, atol=1e-3):
            raise DataError(f"{path}: channel is not on the grid of {files.images[0]}")
    array = np.concatenate(arrays, axis=0)
    if not np.all(np.isfinite(array)):
        raise DataError(f"{files.images[0]}: image contains NaN or infinite values")
    return array, affine


def load_label(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(integer label map (X, Y, Z), affine)."""
    from medlsdm.data.io import read_label_map

    vol = read_label_map(path)
    arr = np.asarray(vol.array)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise DataError(f"{path}: label map must be 3D, got shape {arr.shape}")
    return arr.astype(np.int64), np.asarray(vol.affine, dtype=np.float64)


def check_same_grid(shape_a: Sequence[int], affine_a, name_a, shape_b: Sequence[int], affine_b,
                    name_b, atol_mm: float = 1e-3) -> None:
    """DataError naming both files when two volumes are not on one voxel grid (spatial shape and
    affine); voxel-wise metrics between them would compare different anatomy."""
    sa, sb = tuple(shape_a)[-3:], tuple(shape_b)[-3:]
    if sa != sb:
        raise DataError(f"grids differ: {name_a} has shape {sa}, {name_b} has shape {sb}")
    if affine_a is not None and affine_b is not None and not np.allclose(affine_a, affine_b, atol=atol_mm):
        sp_a = np.round(np.linalg.norm(np.asarray(affine_a)[:3, :3], axis=0), 3).tolist()
        sp_b = np.round(np.linalg.norm(np.asarray(affine_b)[:3, :3], axis=0), 3).tolist()
        raise DataError(f"grids differ: {name_a} and {name_b} have different affines "
                        f"(spacing {sp_a} vs {sp_b}, origin {np.round(np.asarray(affine_a)[:3, 3], 2).tolist()} "
                        f"vs {np.round(np.asarray(affine_b)[:3, 3], 2).tolist()})")


def refuse_same_folder(**folders: str | os.PathLike | None) -> None:
    """DataError when two roles (e.g. real test and synthetic) point at the same folder, or one
    is inside the other's images/ folder: the reference evaluation loaded "real" and "fake" from
    one folder, so its synthetic scores were real scores. One dataset read as two disjoint sets
    of splits (``DatasetSource.splits``, e.g. train and test of a prepared dataset) is allowed."""
    resolved = {role: Path(p).resolve() for role, p in folders.items() if p is not None}
    splits = {role: getattr(p, "splits", None) for role, p in folders.items() if p is not None}
    roles = list(resolved)
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            pa, pb = resolved[a], resolved[b]
            disjoint = splits[a] is not None and splits[b] is not None and not set(splits[a]) & set(splits[b])
            if (pa == pb and not disjoint) or pa == pb / "images" or pb == pa / "images":
                raise DataError(f"--{a.replace('_', '-')} and --{b.replace('_', '-')} point at the "
                                f"same folder ({pa}); they must hold different volumes")
