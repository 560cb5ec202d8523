"""Export real and synthetic cases as an nnU-Net v2 raw dataset, to train a segmentation model on
synthetic data (or on real data augmented with it).

Layout written (https://github.com/MIC-DKFZ/nnUNet, documentation/dataset_format.md)::

    DatasetNNN_NAME/
      imagesTr/CASE_0000.nii.gz, CASE_0001.nii.gz, ...   one file per channel
      labelsTr/CASE.nii.gz                               values 0..K-1
      dataset.json      {"channel_names": {"0": "T1", ...}, "labels": {"background": 0, ...},
                         "numTraining": N, "file_ending": ".nii.gz", "name": ..., "description": ...}
      medlsdm_export.json   where every case came from (nnU-Net ignores it)

Real cases come from any dataset ``medlsdm prepare`` reads (``data.sources.read_dataset``: a
dataset root in a known layout, with ``--layout``/``--preset``, or a prepared dataset), test split
left out. Synthetic volumes are the ``<case>_sample<k>.nii.gz`` files of ``medlsdm sample``
(``<case>``: the case ID, or the stem of the case's label file); their label map is the one they
were generated from, found by case ID (``--labels`` folder, else the real dataset's). They become
cases ``syn_<case>_<k>``; those of test cases are left out (they carry test labels). nnU-Net
requires consecutive label values, so a table such as BraTS's 0, 1, 2, 4 is renumbered 0..K-1 in
order (the mapping is recorded).

``splits_final.json`` (nnU-Net's cross-validation folds; copy it to
``nnUNet_preprocessed/DatasetNNN_NAME/`` after planning) groups cases by subject: all cases of a
patient, and every synthetic case with the real case whose label map made it, share a fold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from medlsdm.data.io import Volume, check_same_grid, read_label_map, read_volume, volume_stem, write_nifti
from medlsdm.data.labels import LabelTable, find_label_table, read_label_table, remap
from medlsdm.data.sources import SAMPLE_NAME, case_aliases, read_dataset, split_sample_name
from medlsdm.data.splits import assign_folds
from medlsdm.errors import DataError, MedlsdmError
from medlsdm.files import atomic_directory, write_json

FILE_ENDINGS = (".nii.gz", ".nii")
MIXES = ("real", "synthetic")
SYNTHETIC_PREFIX = "syn_"
DEFAULT_FOLDS = 5  # nnU-Net's


@dataclass
class ExportCase:
    case_id: str
    kind: str                       # "real" | "synthetic"
    image_paths: list[Path]         # files whose channels, in order, make the image
    label_path: Path
    source_case: str = ""           # the real case whose label map this is
    subject_id: str = ""            # its subject: cases of one subject share a fold


@dataclass
class SourceCases:
    """The label maps synthetic volumes can come from: names (case IDs and label stems) -> case
    ID, and each case's label map, subject and split."""

    names: dict[str, str]
    labels: dict[str, Path]
    subjects: dict[str, str]
    test: set[str] = field(default_factory=set)


@dataclass
class ExportResult:
    path: Path
    cases: list[ExportCase]
    channel_names: list[str]
    label_table: LabelTable          # as written: values 0..K-1
    label_mapping: dict[int, int] = field(default_factory=dict)
    folds: dict[str, int] = field(default_factory=dict)      # case ID -> fold (splits_final.json)
    left_out: list[str] = field(default_factory=list)        # synthetic files not exported, and why
    notes: list[str] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(c.kind == kind for c in self.cases)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``Dataset%03d_NAME`` as nnU-Net names raw datasets."""
    if not (isinstance(dataset_id, (int, np.integer)) and 1 <= dataset_id <= 999):
        raise MedlsdmError(f"--dataset-id must be an integer from 1 to 999 (nnU-Net uses 3 digits), got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name or ""):
        raise MedlsdmError(f"--name must be letters, digits, '_' or '-' (it becomes a folder name), got {name!r}")
    return f"Dataset{dataset_id:03d}_{name}"


def parse_mix(mix: str | Sequence[str]) -> set[str]:
    parts = {p.strip() for p in (mix.split(",") if isinstance(mix, str) else mix) if p.strip()}
    if not parts or parts - set(MIXES):
        raise MedlsdmError(f"--mix must be real, synthetic or real,synthetic, got {mix!r}")
    return parts


# ------------------------------------------------------------------------------ discovery


def _real_cases(real) -> tuple[list[ExportCase], SourceCases, LabelTable | None, list[str]]:
    """Training cases of the real dataset (its test split stays out of training), the source of
    every case's label map (for synthetic volumes), the dataset's label table and channel names."""
    found = read_dataset(real)
    cases = [ExportCase(c.case_id, "real", [Path(p) for p in c.image_paths], Path(c.label_path), c.case_id,
                        c.subject_id) for c in found.cases if c.split != "test"]
    sources = SourceCases(case_aliases((c.case_id, c.label_path) for c in found.cases),
                          {c.case_id: Path(c.label_path) for c in found.cases},
                          {c.case_id: c.subject_id for c in found.cases},
                          {c.case_id for c in found.cases if c.split == "test"})
    return cases, sources, found.label_table, list(found.channel_names)


def _label_folder(folder: Path) -> SourceCases:
    from medlsdm.data.layouts import label_maps

    if not folder.is_dir():
        raise DataError(f"{folder}: label folder (--labels) not found")
    maps = label_maps(folder)
    return SourceCases(case_aliases((m.case_id, m.path) for m in maps), {m.case_id: m.path for m in maps},
                       {m.case_id: m.subject_id for m in maps}, {m.case_id for m in maps if m.split == "test"})


def _synthetic_cases(folder: Path, sources: SourceCases, per_case: int | None, where: str,
                     left_out: list[str]) -> list[ExportCase]:
    """``<case>_sample<k>`` volumes of `folder`, the first `per_case` of each case by k; those of
    test cases are listed in `left_out`."""
    if not folder.is_dir():
        raise DataError(f"{folder}: synthetic folder (--synthetic) not found")
    by_case: dict[str, list[tuple[int, Path]]] = {}
    unknown = []
    for path in sorted(folder.iterdir()):
        stem = volume_stem(path)
        if not (path.is_file() and stem != path.name and SAMPLE_NAME.match(stem)) or path.name.startswith("."):
            continue
        hit = split_sample_name(stem, sources.names)
        if hit is None or hit[1] is None:
            unknown.append(SAMPLE_NAME.match(stem)["case"])
            continue
        by_case.setdefault(hit[0], []).append((hit[1], path))
    if unknown:
        shown = ", ".join(sorted(set(unknown))[:3]) + (" ..." if len(set(unknown)) > 3 else "")
        raise DataError(f"{folder}: no label map for synthetic case(s) {shown} in {where}")
    if not by_case:
        raise DataError(f"{folder}: no <case>_sample<k> volumes (the output of `medlsdm sample`)")
    cases = []
    for case, samples in sorted(by_case.items()):
        if case in sources.test:
            left_out.extend(f"{p.name} (made from the label map of test case {case})" for _, p in sorted(samples))
            continue
        for k, path in sorted(samples)[:per_case]:
            cases.append(ExportCase(f"{SYNTHETIC_PREFIX}{case}_{k}", "synthetic", [path], sources.labels[case],
                                    case, sources.subjects.get(case, case)))
    if not cases:
        raise DataError(f"{folder}: every synthetic volume was made from a test case's label map; none exported")
    return cases


def case_folds(cases: Sequence[ExportCase], n_folds: int | None, seed: int = 0,
               notes: list[str] | None = None) -> tuple[dict[str, int], int]:
    """({case ID: fold}, number of folds): folds of whole subjects (``splits.assign_folds``), so
    a synthetic case lands in the fold of the real case whose label map made it. `n_folds` None:
    ``DEFAULT_FOLDS``, or one per subject when there are fewer (none for a single subject)."""
    per_subject: dict[str, int] = {}
    for case in cases:
        per_subject[case.subject_id or case.source_case] = per_subject.get(case.subject_id or case.source_case, 0) + 1
    if n_folds is None:
        n_folds = min(DEFAULT_FOLDS, len(per_subject))
        if n_folds < DEFAULT_FOLDS and notes is not None:
            notes.append(f"only {len(per_subject)} subject(s): "
                         + (f"{n_folds} folds instead of {DEFAULT_FOLDS}" if n_folds >= 2 else "no splits_final.json"))
        if n_folds < 2:
            return {}, 0
    folds = assign_folds(per_subject, n_folds, seed)
    return {c.case_id: folds[c.subject_id or c.source_case] for c in cases}, n_folds


def splits_final(folds: dict[str, int], n_folds: int) -> list[dict[str, list[str]]]:
    """nnU-Net's splits_final.json: per fold the training and validation case IDs."""
    return [{"train": sorted(c for c, f in folds.items() if f != fold),
             "val": sorted(c for c, f in folds.items() if f == fold)} for fold in range(n_folds)]


# --------------------------------------------------------------------------------- labels


def _output_table(table: LabelTable | None, values: set[int]) -> tuple[LabelTable, dict[int, int]]:
    """The table written (values 0..K-1, 0 named "background", as nnU-Net requires) and the
    mapping from the input values to it."""
    if table is None:
        table = LabelTable({v: ("background" if v == 0 else f"label_{v}") for v in sorted(values | {0})})
    unknown = sorted(values - set(table.values))
    if unknown:
        raise DataError(f"label values {unknown} are not in the label table {table.values}")
    if 0 not in table.values:
        raise DataError(f"the label table {table.values} has no background value 0, which nnU-Net requires")
    mapping = {v: i for i, v in enumerate(table.values)}
    names, seen = {}, set()
    for value, new in mapping.items():
        name = "background" if value == 0 else table.names[value]
        if name in seen or (value != 0 and name == "background"):
            name = f"{name}_{value}"  # dataset.json maps names to values: names must be unique
        seen.add(name)
        names[new] = name
    return LabelTable(names), mapping


def _label_values(cases: Sequence[ExportCase]) -> set[int]:
    values: set[int] = set()
    for path in {c.label_path for c in cases}:
        values |= set(np.unique(read_label_map(path).array).tolist())
    return values


# ---------------------------------------------------------------------------------- writing


def _channels(paths: Sequence[Path]) -> tuple[list[np.ndarray], Volume]:
    """Every channel of the image files in order (a 4D file gives several), dtypes kept, and the
    first file's volume (its grid). Channels on another grid than the first are refused."""
    volumes = [read_volume(p) for p in paths]
    for v in volumes[1:]:
        check_same_grid(volumes[0], v, what="image channels")
    channels = [ch for v in volumes for ch in (v.array if v.array.ndim == 4 else v.array[None])]
    return channels, volumes[0]


def _write_case(case: ExportCase, root: Path, mapping: dict[int, int], n_channels: int, ending: str) -> None:
    channels, image = _channels(case.image_paths)
    if len(channels) != n_channels:
        raise DataError(f"{case.image_paths[0]}: {len(channels)} image channel(s), but the dataset has {n_channels}")
    label = read_label_map(case.label_path)
    check_same_grid(image, label, what=f"image and label map of {case.case_id}")
    # Both written with the image's affine: nnU-Net compares image and label geometry exactly,
    # and they agree within check_same_grid's tolerance already.
    for c, array in enumerate(channels):
        write_nifti(root / "imagesTr" / f"{case.case_id}_{c:04d}{ending}", array, image.affine)
    values = remap(label.array, mapping, source=str(case.label_path))
    write_nifti(root / "labelsTr" / f"{case.case_id}{ending}", values, image.affine)


def _count_channels(case: ExportCase) -> int:
    return sum(read_volume(p).num_channels for p in case.image_paths)


def _channel_names(names: Sequence[str] | None, found: Sequence[str], n: int) -> list[str]:
    if names:
        if len(names) != n:
            raise MedlsdmError(f"--channel-names gives {len(names)} names but the images have {n} channel(s)")
        return list(names)
    if len(found) == n:
        return list(found)
    return ["image"] if n == 1 else [f"channel_{i}" for i in range(n)]


def _check_target(out: Path, folder: str, force: bool) -> Path:
    target = out / folder
    if target.exists() and not force:
        raise MedlsdmError(f"{target}: dataset folder exists (use --force to overwrite it)")
    prefix = folder.split("_", 1)[0] + "_"
    clash = sorted(p.name for p in out.glob(prefix + "*") if p.is_dir() and p.name != folder) if out.is_dir() else []
    if clash:  # nnU-Net finds a dataset by its ID: two folders with one ID break it
        raise MedlsdmError(f"{out}: dataset ID {prefix[7:-1]} is already used by {clash[0]}; choose another --dataset-id")
    return target


def export_nnunet(out: str | Path, dataset_id: int, name: str, real: str | Path | None = None,
                  synthetic: str | Path | None = None, labels: str | Path | None = None,
                  mix: str | Sequence[str] = "real,synthetic", synthetic_per_case: int | None = None,
                  file_ending: str = ".nii.gz", channel_names: Sequence[str] | None = None,
                  table: str | Path | None = None, folds: int | None = None, seed: int = 0, force: bool = False,
                  progress: bool = True) -> ExportResult:
    """Write ``out/DatasetNNN_NAME`` (nnU-Net v2 raw format) with the real cases of `real`
    (training split; any dataset ``data.sources.read_dataset`` reads, a ``DatasetSource`` with
    its layout or preset included) and/or the synthetic volumes of `synthetic`, as `mix` says,
    and ``splits_final.json`` with `folds` folds grouped by subject (0: none; None: 5, fewer
    when there are fewer subjects). Label names:
    `table`, else the real dataset's labels.json/dataset.json, else one beside `labels`, else
    ``label_<v>``."""
    from tqdm.auto import tqdm

    kinds = parse_mix(mix)
    if file_ending not in FILE_ENDINGS:
        raise MedlsdmError(f"--file-ending must be one of {', '.join(FILE_ENDINGS)}, got {file_ending!r}")
    if folds is not None and (isinstance(folds, bool) or not isinstance(folds, (int, np.integer))
                              or folds == 1 or folds < 0):
        raise MedlsdmError(f"--folds must be 0 (no splits_final.json) or at least 2, got {folds!r}")
    if synthetic_per_case is not None and synthetic_per_case < 1:
        raise MedlsdmError(f"--synthetic-per-case must be at least 1, got {synthetic_per_case}")
    out = Path(out)
    target = _check_target(out, dataset_folder_name(dataset_id, name), force)
    if "real" in kinds and real is None:
        raise MedlsdmError("--mix includes real cases: give --real DIR")
    if "synthetic" in kinds and synthetic is None:
        raise MedlsdmError("--mix includes synthetic cases: give --synthetic DIR")
    if "synthetic" in kinds and real is None and labels is None:
        raise MedlsdmError("synthetic cases need their label maps: give --labels DIR or --real DIR")

    cases: list[ExportCase] = []
    found_table, found_names, real_sources, left_out = None, [], None, []
    if real is not None:
        real_cases, real_sources, found_table, found_names = _real_cases(real)
        if "real" in kinds:
            cases += real_cases
    if "synthetic" in kinds:
        sources = _label_folder(Path(labels)) if labels is not None else real_sources
        if labels is not None and real_sources is not None:  # the real dataset knows subjects and test cases
            sources.subjects.update({k: v for k, v in real_sources.subjects.items() if k in sources.labels})
            sources.test |= real_sources.test & set(sources.labels)
        where = f"--labels {labels}" if labels is not None else f"the label maps of --real {real}"
        cases += _synthetic_cases(Path(synthetic), sources, synthetic_per_case, where, left_out)
    ids = [c.case_id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DataError(f"case IDs {duplicates[:3]} would appear twice in the exported dataset")

    if table is not None:
        label_table = read_label_table(table)
    elif found_table is not None:
        label_table = found_table
    else:
        found = find_label_table([Path(labels), Path(labels).parent]) if labels is not None else None
        label_table = read_label_table(found) if found else None
    # Without a table the values present define it, so every label map is read first; with one,
    # `remap` refuses a value missing from it while writing.
    out_table, mapping = _output_table(label_table, _label_values(cases) if label_table is None else set())
    n_channels = _count_channels(cases[0])
    names = _channel_names(channel_names, found_names, n_channels)
    notes: list[str] = []
    fold_of, folds = case_folds(cases, folds, seed, notes) if folds != 0 else ({}, 0)

    with atomic_directory(target) as tmp:
        for case in tqdm(cases, desc="exporting", unit="case", disable=not progress):
            _write_case(case, tmp, mapping, n_channels, file_ending)
        n_real = sum(c.kind == "real" for c in cases)
        write_json(tmp / "dataset.json", {
            "channel_names": {str(i): n for i, n in enumerate(names)},
            "labels": {n: v for v, n in sorted(out_table.names.items())},
            "numTraining": len(cases),
            "file_ending": file_ending,
            "name": name,
            "description": f"{n_real} real and {len(cases) - n_real} synthetic (medlsdm) training cases",
        })
        if fold_of:
            write_json(tmp / "splits_final.json", splits_final(fold_of, folds))
        write_json(tmp / "medlsdm_export.json", {
            "label_mapping": {str(k): v for k, v in mapping.items()},
            "folds": {"n": folds, "seed": seed, "grouped_by": "subject"} if fold_of else None,
            "cases": {c.case_id: {"kind": c.kind, "images": [str(p) for p in c.image_paths],
                                  "label": str(c.label_path), "source_case": c.source_case,
                                  "subject_id": c.subject_id, "fold": fold_of.get(c.case_id)} for c in cases},
            "left_out": left_out,
        })
    return ExportResult(target, cases, names, out_table, mapping, fold_of, left_out, notes)
