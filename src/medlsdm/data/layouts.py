"""Dataset discovery: find the (image, label map) pairs of a dataset folder in one of the layouts
public datasets come in, pairing files by case ID (never by sort order) and listing every file
that found no partner.

Layouts (``discover(root, layout)``; ``"auto"`` tries them in the order of ``LAYOUTS``):

- ``nnunet``: nnU-Net v2 raw dataset: ``imagesTr/CASE_XXXX.ext`` (one file per channel),
  ``labelsTr/CASE.ext``, optional ``imagesTs``/``labelsTs`` (test split), ``dataset.json`` with
  ``channel_names``, ``labels`` ``{name: value}`` and ``file_ending``.
- ``duke``: Duke Breast Cancer MRI converted to NIfTI/NRRD: ``images/`` and ``segmentations/``
  (or ``labels/``) whose file names (or per-patient sub-folder names) contain the patient ID
  ``Breast_MRI_NNN``. A patient with several image files (pre-contrast and post-contrast phases)
  uses the one whose name contains ``image_pattern`` (default ``pre``); one with several
  segmentation files (``..._Breast`` and ``..._Dense_and_Vessels``) uses the one whose name
  contains ``label_pattern`` (default ``Dense_and_Vessels``). Label maps are single 3D integer
  volumes in the dataset authors' convention: 0 background, 1 vessels, 2 dense (fibroglandular)
  tissue. The released ``.seg.nrrd`` files name their segments in the header and some store the
  two segments as layers or with swapped values: convert them to that convention first (as the
  authors' ``read_precontrast_mri_and_segmentation`` does); the ``duke`` preset then remaps to
  0 background, 1 fibroglandular tissue, 2 vessels.
- ``generic``: ``images/`` + ``labels/`` with the same case IDs (file name without its suffix;
  a DICOM-series folder counts as one image; ``.mhd``/``.nhdr`` headers pair, their ``.raw``
  data files are not reported); several channels as nnU-Net-like suffixes
  ``CASE_0000``, ``CASE_0001``; optional ``imagesTs/`` + ``labelsTs/`` as the test split; an
  optional ``labels.json`` (``{"0": "background", ...}``) or ``dataset.json`` (``labels``
  ``{name: value}``, ``channel_names``) gives the label table and channel names.
- ``brats``: one folder per case with ``*_t1``, ``*_t1ce``, ``*_t2``, ``*_flair``, ``*_seg``
  (BraTS 2018-2021) or ``*-t1n``, ``*-t1c``, ``*-t2w``, ``*-t2f``, ``*-seg`` (BraTS 2023); channels
  in the order t1, t1ce, t2, flair.
- ``autopet``: ``PATIENT/STUDY/{CTres,SUV,SEG}.nii.gz`` (or the files directly in ``PATIENT/``);
  channels ct, pet (option ``channels``, e.g. ``[ct]`` for CT only); the subject is the patient
  folder. Option ``labels_dir``: label maps
  ``<case_id>.nii.gz`` (or ``<patient>.nii.gz``) replacing ``SEG`` (e.g. whole-body organ maps).
- ``synthrad2023``: ``.../PATIENT/{mr,ct,cbct,mask}.nii.gz`` (e.g. ``Task1/brain/1BA001``). The
  image is ``<modality>.nii.gz`` (option ``modality``: ``ct`` by default, ``mr`` or ``cbct``). Label
  maps come separately (option ``labels_dir`` holding ``<PATIENT>.nii.gz``, e.g. TotalSegmentator
  output); without it the body ``mask`` is used as a 2-class label map.

Subjects (patients): every case has a ``subject_id``, so that splits and folds keep all scans of
one patient together. AutoPET: the patient folder; BraTS 2023: the ID without its timepoint
(``BraTS-GLI-00005-000`` and ``-001`` -> ``BraTS-GLI-00005``); otherwise the case ID. A
``subjects.csv`` in the dataset root (header ``case_id,subject_id``) or ``subject_regex`` (its
group ``subject``, else its first group, else the whole match, searched in the case ID) replaces
the layout's subjects, in any layout.

Case IDs of label files on their own (``case_id_for_label_file``, ``label_maps``) are the IDs the
layout gives the case, so that what is generated from a label map pairs with its case by name.
"""

from __future__ import annotations

import csv
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from medlsdm.data.io import VOLUME_SUFFIXES, volume_stem
from medlsdm.data.labels import LabelTable
from medlsdm.errors import ConfigError, DataError
from medlsdm.files import read_json

CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class Case:
    case_id: str
    subject_id: str
    image_paths: list[Path]
    label_path: Path | None
    channel_names: list[str]
    split: str | None = None


@dataclass
class Discovery:
    cases: list[Case]
    unmatched: list[str]
    label_table: LabelTable | None
    channel_names: list[str]
    layout: str = ""
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------- helpers


def _is_volume(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)


def _entries(folder: Path) -> list[Path]:
    """Visible entries of a folder, sorted (sorting only makes reports stable; pairing is by ID)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _is_dicom_dir(path: Path) -> bool:
    """A subfolder holding files and no subfolders is taken as one DICOM series; reading it
    checks that it really is one (with a clear error naming the folder)."""
    if not path.is_dir():
        return False
    children = [c for c in path.iterdir() if not c.name.startswith(".")]
    return bool(children) and all(c.is_file() for c in children)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


# Pixel-data files that belong to a detached header (case.mhd + case.raw, case.nhdr + case.raw.gz):
# read through the header, so they are neither cases of their own nor unmatched files.
DETACHED_DATA_SUFFIXES = (".raw", ".zraw", ".raw.gz", ".img", ".img.gz")


def _detached_data(entry: Path, header_stems: set[str]) -> bool:
    name = entry.name.lower()
    return any(name.endswith(s) and name[: -len(s)] in header_stems for s in DETACHED_DATA_SUFFIXES)


def _volumes_by_stem(folder: Path, root: Path, unmatched: list[str], dicom: bool = True) -> dict[str, Path]:
    out: dict[str, Path] = {}
    entries = _entries(folder)
    headers = {volume_stem(e).lower() for e in entries if e.name.lower().endswith((".mhd", ".nhdr"))}
    for entry in entries:
        if _detached_data(entry, headers):
            continue
        if _is_volume(entry) or (dicom and _is_dicom_dir(entry)):
            stem = volume_stem(entry)
            if stem in out:
                raise DataError(f"{folder}: two files for case '{stem}' ({out[stem].name}, {entry.name})")
            out[stem] = entry
        elif entry.name not in ("Thumbs.db", "desktop.ini"):
            unmatched.append(f"{_rel(entry, root)} (not a volume file or DICOM folder)")
    return out


def _group_channels(stems: dict[str, Path], label_ids: set[str], folder: Path, root: Path,
                    unmatched: list[str], require_suffix: bool = False) -> dict[str, list[Path]]:
    """Group ``CASE_0000``, ``CASE_0001``, ... into one case with channels in index order.

    A stem ending in ``_NNNN`` is a channel file when its case without the suffix is what the
    labels name (or when the layout requires suffixes, as nnU-Net does); otherwise the whole
    stem is the case ID, so ``patient_0001.nii.gz`` with ``labels/patient_0001.nii.gz`` works.
    """
    channels: dict[str, dict[int, Path]] = {}
    for stem, path in stems.items():
        match = CHANNEL_SUFFIX.match(stem)
        as_channel = match and (require_suffix or (match["case"] in label_ids and stem not in label_ids))
        if as_channel:
            channels.setdefault(match["case"], {})[int(match["channel"])] = path
        elif require_suffix:
            unmatched.append(f"{_rel(path, root)} (no _NNNN channel suffix)")
        else:
            channels.setdefault(stem, {})[0] = path
    out = {}
    for case_id, files in channels.items():
        indices = sorted(files)
        if indices != list(range(len(indices))):
            missing = sorted(set(range(max(indices) + 1)) - set(indices))
            unmatched.extend(f"{_rel(files[i], root)} (case '{case_id}' lacks channel(s) "
                             f"{', '.join(f'{m:04d}' for m in missing)})" for i in indices)
            continue
        out[case_id] = [files[i] for i in indices]
    return out


def _pair(images: dict[str, list[Path]], labels: dict[str, Path], root: Path, unmatched: list[str],
          channel_names: list[str], split: str | None) -> list[Case]:
    cases = []
    for case_id in sorted(images):
        if case_id not in labels:
            unmatched.extend(f"{_rel(p, root)} (no label map)" for p in images[case_id])
            continue
        cases.append(Case(case_id, case_id, images[case_id], labels[case_id], list(channel_names), split))
    unmatched.extend(f"{_rel(labels[c], root)} (no image)" for c in sorted(set(labels) - set(images)))
    return cases


def _check_channels(cases: list[Case], channel_names: list[str] | None, root: Path) -> list[str]:
    counts = {len(c.image_paths) for c in cases}
    if len(counts) > 1:
        by_count = {n: next(c.case_id for c in cases if len(c.image_paths) == n) for n in sorted(counts)}
        raise DataError(f"{root}: cases have different numbers of image channels "
                        f"({', '.join(f'{n} in {cid}' for n, cid in by_count.items())})")
    n = counts.pop() if counts else 1
    if channel_names and len(channel_names) == n:
        names = list(channel_names)
    elif channel_names and len(channel_names) != n:
        raise DataError(f"{root}: dataset.json names {len(channel_names)} channels but cases have {n} image files")
    else:
        names = ["image"] if n == 1 else [f"channel_{i}" for i in range(n)]
    for case in cases:
        case.channel_names = list(names)
    return names


def _dataset_json(root: Path) -> dict:
    path = root / "dataset.json"
    return read_json(path) if path.is_file() else {}


def _channel_names_from_json(info: dict) -> list[str] | None:
    names = info.get("channel_names") or info.get("modality")  # nnU-Net v2 / v1
    if not isinstance(names, dict):
        return None
    return [str(names[k]) for k in sorted(names, key=int)]


def _label_table_from_folder(root: Path) -> LabelTable | None:
    """``labels.json`` (``{value: name}``) first, else the ``labels`` of ``dataset.json``."""
    if (root / "labels.json").is_file():
        data = read_json(root / "labels.json")
        if not isinstance(data, dict):
            raise DataError(f"{root / 'labels.json'}: expected a mapping {{\"0\": \"background\", ...}}")
        try:
            return LabelTable.from_mapping(data)
        except DataError as exc:
            raise DataError(f"{root / 'labels.json'}: {exc}") from None
    labels = _dataset_json(root).get("labels")
    if isinstance(labels, dict) and labels:
        return LabelTable.from_nnunet(labels)
    return None


# ----------------------------------------------------------------------------------- layouts


def _discover_folders(root: Path, pairs: list[tuple[str, str, str | None]], require_suffix: bool,
                      channel_names: list[str] | None, file_ending: str | None = None) -> Discovery:
    unmatched: list[str] = []
    cases: list[Case] = []
    for image_dir, label_dir, split in pairs:
        if not (root / image_dir).is_dir():
            continue
        images = _volumes_by_stem(root / image_dir, root, unmatched)
        if not (root / label_dir).is_dir():
            unmatched.extend(f"{_rel(p, root)} (no {label_dir}/ folder)" for p in images.values())
            continue
        labels = _volumes_by_stem(root / label_dir, root, unmatched)
        if file_ending:
            other = [p for p in images.values() if not (p.name.endswith(file_ending) or p.is_dir())]
            unmatched.extend(f"{_rel(p, root)} (not a {file_ending} file, the dataset's file_ending)" for p in other)
            images = {s: p for s, p in images.items() if p not in other}
        grouped = _group_channels(images, set(labels), root / image_dir, root, unmatched, require_suffix)
        cases += _pair(grouped, labels, root, unmatched, channel_names or [], split)
    names = _check_channels(cases, channel_names, root)
    return Discovery(cases, unmatched, _label_table_from_folder(root), names)


def detect_generic(root: Path) -> bool:
    return (root / "images").is_dir() and (root / "labels").is_dir()


def discover_generic(root: Path) -> Discovery:
    names = _channel_names_from_json(_dataset_json(root))
    return _discover_folders(root, [("images", "labels", None), ("imagesTs", "labelsTs", "test")],
                             require_suffix=False, channel_names=names)


def detect_nnunet(root: Path) -> bool:
    return (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir()


def discover_nnunet(root: Path) -> Discovery:
    info = _dataset_json(root)
    if not info:
        raise DataError(f"{root}: nnU-Net layout needs dataset.json (channel_names, labels, file_ending)")
    names = _channel_names_from_json(info)
    ending = info.get("file_ending", ".nii.gz")
    return _discover_folders(root, [("imagesTr", "labelsTr", None), ("imagesTs", "labelsTs", "test")],
                             require_suffix=True, channel_names=names, file_ending=ending)


BRATS_CHANNELS = ["t1", "t1ce", "t2", "flair"]
BRATS_SUFFIXES = {  # channel -> (BraTS 2018-2021 suffix, BraTS 2023 suffix)
    "t1": ("_t1", "-t1n"), "t1ce": ("_t1ce", "-t1c"), "t2": ("_t2", "-t2w"), "flair": ("_flair", "-t2f"),
    "seg": ("_seg", "-seg"),
}
# Label values of the BraTS challenges: enhancing tumour is 4 up to 2021 and 3 from 2023.
BRATS_TABLE_2021 = LabelTable({0: "background", 1: "necrotic tumour core", 2: "peritumoral edema",
                               4: "enhancing tumour"})
BRATS_TABLE_2023 = LabelTable({0: "background", 1: "necrotic tumour core", 2: "peritumoral edema",
                               3: "enhancing tumour"})


# BraTS 2023 IDs end in a timepoint: BraTS-GLI-00005-000 and BraTS-GLI-00005-001 are two scans of
# one patient (the GLI, MEN, MET, PED and SSA tasks name them alike).
BRATS_TIMEPOINT = re.compile(r"^(?P<subject>BraTS-[A-Za-z]+-\d+)-\d+$")


def brats_subject(case_id: str) -> str:
    """The patient of a BraTS case: the BraTS 2023 ID without its timepoint, else the case ID."""
    match = BRATS_TIMEPOINT.match(case_id)
    return match["subject"] if match else case_id


def _brats_files(folder: Path) -> dict[str, tuple[Path, int]]:
    """{channel or 'seg': (path, naming era 0=2021 / 1=2023)} for the files in one case folder."""
    found = {}
    for path in folder.iterdir():
        if not _is_volume(path):
            continue
        stem = volume_stem(path).lower()
        for key, suffixes in BRATS_SUFFIXES.items():
            for era, suffix in enumerate(suffixes):
                if stem.endswith(suffix):
                    found[key] = (path, era)
    return found


def _case_folders(root: Path, marker: Callable[[Path], bool], max_depth: int = 4) -> list[Path]:
    """Folders under `root` (depth-limited) for which `marker` is true, without descending into them."""
    out, level = [], [root]
    for _ in range(max_depth):
        nxt = []
        for folder in level:
            for child in _entries(folder):
                if child.is_dir():
                    (out if marker(child) else nxt).append(child)
        level = nxt
    return sorted(out)


def detect_brats(root: Path) -> bool:
    return bool(_case_folders(root, lambda f: len(_brats_files(f)) >= 2, max_depth=2))


def discover_brats(root: Path) -> Discovery:
    unmatched, cases, eras = [], [], set()
    for folder in _case_folders(root, lambda f: len(_brats_files(f)) >= 2, max_depth=3):
        files = _brats_files(folder)
        missing = [k for k in BRATS_CHANNELS + ["seg"] if k not in files]
        if missing:
            unmatched.extend(f"{_rel(p, root)} (case folder lacks {', '.join(missing)})" for p, _ in files.values())
            continue
        eras |= {era for _, era in files.values()}
        cases.append(Case(folder.name, brats_subject(folder.name), [files[k][0] for k in BRATS_CHANNELS],
                          files["seg"][0], list(BRATS_CHANNELS)))
    if len(eras) > 1:
        raise DataError(f"{root}: mixes BraTS 2018-2021 (_t1ce, _seg) and BraTS 2023 (-t1c, -seg) file names, "
                        "whose label values differ; prepare them separately")
    table = BRATS_TABLE_2023 if eras == {1} else BRATS_TABLE_2021
    return Discovery(cases, unmatched, table, list(BRATS_CHANNELS))


AUTOPET_FILES = {"ct": "CTres", "pet": "SUV", "seg": "SEG"}
AUTOPET_TABLE = LabelTable({0: "background", 1: "lesion"})


def _nifti(folder: Path, stem: str) -> Path | None:
    for suffix in (".nii.gz", ".nii"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def _safe_id(text: str) -> str:
    """File-system-safe case ID (study folders carry dates, spaces and German words)."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")


def _labels_dir_files(labels_dir: str | Path | None, root: Path, unmatched: list[str]) -> dict[str, Path] | None:
    if labels_dir is None:
        return None
    labels_dir = Path(labels_dir)
    if not labels_dir.is_dir():
        raise DataError(f"{labels_dir}: label folder (labels_dir / --labels-dir) not found")
    return _volumes_by_stem(labels_dir, labels_dir, unmatched, dicom=False)


def detect_autopet(root: Path) -> bool:
    return bool(_case_folders(root, lambda f: _nifti(f, "CTres") is not None, max_depth=3))


def discover_autopet(root: Path, labels_dir: str | Path | None = None,
                     channels: Sequence[str] = ("ct", "pet")) -> Discovery:
    channels = list(channels)
    if not channels or any(c not in ("ct", "pet") for c in channels) or len(set(channels)) < len(channels):
        raise ConfigError(f"autopet layout: channels must be some of ct, pet (e.g. [ct] or [ct, pet]), got {channels}")
    unmatched: list[str] = []
    external = _labels_dir_files(labels_dir, root, unmatched)
    used: set[str] = set()
    cases = []
    for folder in _case_folders(root, lambda f: _nifti(f, "CTres") is not None or _nifti(f, "SUV") is not None):
        patient = folder.name if folder.parent == root else folder.parent.name
        case_id = _safe_id(patient if folder.parent == root else f"{patient}_{folder.name}")
        images = [_nifti(folder, AUTOPET_FILES[k]) for k in channels]
        if external is not None:
            key = case_id if case_id in external else patient
            label = external.get(key)
            used.add(key)
        else:
            label = _nifti(folder, AUTOPET_FILES["seg"])
        if None in images or label is None:
            names = [AUTOPET_FILES[k] for k in channels] + ["label map"]
            what = [n for n, p in zip(names, images + [label]) if p is None]
            unmatched.extend(f"{_rel(p, root)} (study lacks {', '.join(what)})" for p in images + [label] if p)
            if not any(images + [label]):
                unmatched.append(f"{_rel(folder, root)} (study lacks {', '.join(what)})")
            continue
        cases.append(Case(case_id, _safe_id(patient), images, label, list(channels)))
    if external is not None:
        unmatched.extend(f"{p} (no matching autoPET study)" for k, p in sorted(external.items()) if k not in used)
    table = _label_table_from_folder(Path(labels_dir)) if labels_dir else AUTOPET_TABLE
    return Discovery(cases, unmatched, table, list(channels))


SYNTHRAD_MODALITIES = ("ct", "mr", "cbct")
SYNTHRAD_MASK_TABLE = LabelTable({0: "background", 1: "body"})


def _is_synthrad_patient(folder: Path) -> bool:
    return _nifti(folder, "mask") is not None and any(_nifti(folder, m) for m in SYNTHRAD_MODALITIES)


def detect_synthrad2023(root: Path) -> bool:
    return bool(_case_folders(root, _is_synthrad_patient, max_depth=4))


def discover_synthrad2023(root: Path, labels_dir: str | Path | None = None, modality: str = "ct") -> Discovery:
    if modality not in SYNTHRAD_MODALITIES:
        raise ConfigError(f"synthrad2023 layout: modality must be one of {', '.join(SYNTHRAD_MODALITIES)}, got {modality!r}")
    unmatched: list[str] = []
    external = _labels_dir_files(labels_dir, root, unmatched)
    cases, seen = [], {}
    for folder in _case_folders(root, _is_synthrad_patient, max_depth=5):
        patient = folder.name
        if patient in seen:
            raise DataError(f"{root}: patient '{patient}' appears twice ({_rel(seen[patient], root)}, {_rel(folder, root)})")
        seen[patient] = folder
        image = _nifti(folder, modality)
        label = external.get(patient) if external is not None else _nifti(folder, "mask")
        if image is None or label is None:
            what = f"{modality}.nii.gz" if image is None else "a label map in labels_dir"
            unmatched.append(f"{_rel(folder, root)} (patient lacks {what})")
            continue
        cases.append(Case(patient, patient, [image], label, [modality]))
    if external is not None:
        unmatched.extend(f"{p} (no matching SynthRAD patient)" for k, p in sorted(external.items()) if k not in seen)
        table = _label_table_from_folder(Path(labels_dir))
    else:
        table = SYNTHRAD_MASK_TABLE
    return Discovery(cases, unmatched, table, [modality])


DUKE_ID = re.compile(r"Breast_MRI_\d{3}", re.IGNORECASE)
# Values of the Dense_and_Vessels segmentations as the dataset's authors fix them.
DUKE_TABLE = LabelTable({0: "background", 1: "vessels", 2: "fibroglandular tissue"})


def _duke_label_dir(root: Path) -> Path | None:
    for name in ("segmentations", "labels"):
        if (root / name).is_dir():
            return root / name
    return None


def detect_duke(root: Path) -> bool:
    if not (root / "images").is_dir() or _duke_label_dir(root) is None:
        return False
    return any(DUKE_ID.search(p.name) for p in (root / "images").iterdir())


def _duke_entries(folder: Path) -> list[tuple[Path, str | None]]:
    """(entry, patient ID or None) for the files of `folder` and of its per-patient sub-folders
    (the released segmentations come as ``Breast_MRI_NNN/Segmentation_Breast_MRI_NNN_*.seg.nrrd``)."""
    out = []
    for entry in _entries(folder):
        match = DUKE_ID.search(entry.name)
        if not entry.is_dir():
            out.append((entry, match.group(0) if match and _is_volume(entry) else None))
            continue
        children = _entries(entry)
        if not any(_is_volume(c) for c in children):  # e.g. a DICOM series: convert it first
            out.append((entry, None))
            continue
        for child in children:
            inner = DUKE_ID.search(child.name) or match
            out.append((child, inner.group(0) if inner and _is_volume(child) else None))
    return out


def _duke_pick(files: list[Path], pattern: str, root: Path, unmatched: list[str], what: str) -> Path | None:
    if len(files) == 1:
        return files[0]
    chosen = [p for p in files if pattern.lower() in p.name.lower()]
    if len(chosen) == 1:
        unmatched.extend(f"{_rel(p, root)} (another {what} of the patient used: {chosen[0].name})"
                         for p in files if p != chosen[0])
        return chosen[0]
    unmatched.extend(f"{_rel(p, root)} ({len(chosen) or 'no'} {what} names contain '{pattern}'; "
                     f"set image_pattern/label_pattern)" for p in files)
    return None


def discover_duke(root: Path, image_pattern: str = "pre", label_pattern: str = "Dense_and_Vessels") -> Discovery:
    unmatched: list[str] = []
    by_patient: dict[str, dict[str, list[Path]]] = {}
    for kind, folder in (("image", root / "images"), ("label", _duke_label_dir(root))):
        for entry, patient in _duke_entries(folder):
            if patient is None:
                unmatched.append(f"{_rel(entry, root)} (not a volume named with a Breast_MRI_NNN patient ID)")
                continue
            patient = "Breast_MRI_" + patient[-3:]  # one spelling, whatever the file's case
            by_patient.setdefault(patient, {"image": [], "label": []})[kind].append(entry)
    cases = []
    for patient, files in sorted(by_patient.items()):
        if not files["image"] or not files["label"]:
            lacks = "image" if not files["image"] else "segmentation"
            unmatched.extend(f"{_rel(p, root)} (patient has no {lacks})" for p in files["image"] + files["label"])
            continue
        image = _duke_pick(files["image"], image_pattern, root, unmatched, "image")
        label = _duke_pick(files["label"], label_pattern, root, unmatched, "segmentation")
        if image and label:
            cases.append(Case(patient, patient, [image], label, ["mr"]))
    return Discovery(cases, unmatched, DUKE_TABLE, ["mr"])


# Order matters for "auto": the more specific layouts first (Duke and nnU-Net folders would
# also look generic).
LAYOUTS: dict[str, tuple[Callable[[Path], bool], Callable[..., Discovery], str]] = {
    "nnunet": (detect_nnunet, discover_nnunet, "imagesTr/ + labelsTr/ + dataset.json"),
    "duke": (detect_duke, discover_duke, "images/ + segmentations/ named Breast_MRI_NNN"),
    "generic": (detect_generic, discover_generic, "images/ + labels/"),
    "brats": (detect_brats, discover_brats, "case folders with *_t1, *_t1ce, *_t2, *_flair, *_seg"),
    "autopet": (detect_autopet, discover_autopet, "PATIENT/STUDY/{CTres,SUV,SEG}.nii.gz"),
    "synthrad2023": (detect_synthrad2023, discover_synthrad2023, "PATIENT/{ct,mr,mask}.nii.gz"),
}


def layout_options(layout: str) -> list[str]:
    """Names of the options a layout's discovery takes (e.g. ``labels_dir``, ``modality``)."""
    return [p for p in inspect.signature(LAYOUTS[layout][1]).parameters if p != "root"]


def find_layout(root: str | Path) -> str | None:
    """The first layout whose folder structure `root` has, or None."""
    root = Path(root)
    return next((name for name, (detect, _, _) in LAYOUTS.items() if root.is_dir() and detect(root)), None)


def detect_layout(root: str | Path, layout: str = "auto") -> str:
    """The layout name: `layout` itself when given (checked), else the first one that fits."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: input folder not found")
    if layout != "auto":
        if layout not in LAYOUTS:
            raise ConfigError(f"unknown layout '{layout}' (known: auto, {', '.join(LAYOUTS)})")
        return layout
    name = find_layout(root)
    if name is None:
        tried = "; ".join(f"{name} ({what})" for name, (_, _, what) in LAYOUTS.items())
        raise DataError(f"{root}: no known dataset layout found; tried {tried}")
    return name


def discover(root: str | Path, layout: str = "auto", subject_regex: str | None = None, **options) -> Discovery:
    """Find the cases of a dataset folder; options are those of the layout (``layout_options``).
    Subjects come from the layout, ``ROOT/subjects.csv`` or `subject_regex` (module docstring)."""
    root = Path(root)
    name = detect_layout(root, layout)
    unknown = sorted(set(options) - set(layout_options(name)))
    if unknown:
        raise ConfigError(f"layout '{name}' takes no option {', '.join(unknown)} "
                          f"(it takes: {', '.join(layout_options(name)) or 'none'})")
    found = LAYOUTS[name][1](root, **options)
    found.layout = name
    if not found.cases:
        shown = "; ".join(found.unmatched[:3]) + (" ..." if len(found.unmatched) > 3 else "")
        raise DataError(f"{root}: no image/label pairs found in the {name} layout"
                        + (f" (unmatched: {shown})" if shown else ""))
    ids = [c.case_id for c in found.cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DataError(f"{root}: case IDs {duplicates} appear more than once (e.g. in both training and test folders)")
    assign_subjects(found.cases, root, subject_regex, found.notes)
    return found


# ---------------------------------------------------------------------------------- subjects

SUBJECTS_FILE = "subjects.csv"


def read_subjects_csv(path: str | Path) -> dict[str, str]:
    """``{case_id: subject_id}`` from a CSV file with the header ``case_id,subject_id``."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = [[cell.strip() for cell in row] for row in csv.reader(handle) if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if not rows or rows[0][:2] != ["case_id", "subject_id"]:
        raise DataError(f"{path}: expected a CSV file with the header case_id,subject_id and one row per case")
    out: dict[str, str] = {}
    for line, row in enumerate(rows[1:], start=2):
        case, subject = (row + ["", ""])[:2]
        if not case or not subject:
            raise DataError(f"{path}, line {line}: empty case_id or subject_id")
        if out.get(case, subject) != subject:
            raise DataError(f"{path}: case '{case}' has two subjects ({out[case]}, {subject})")
        out[case] = subject
    return out


def subject_from_regex(case_id: str, pattern: str | re.Pattern) -> str:
    """The subject in a case ID: group ``subject``, else group 1, else the whole match."""
    regex = compile_subject_regex(pattern)
    match = regex.search(case_id)
    if match is None:
        raise DataError(f"case '{case_id}': subject_regex {regex.pattern!r} does not match its ID")
    if "subject" in regex.groupindex:
        subject = match["subject"]
    else:
        subject = match.group(1) if regex.groups else match.group(0)
    if not subject:
        raise DataError(f"case '{case_id}': subject_regex {regex.pattern!r} gives an empty subject")
    return subject


def compile_subject_regex(pattern: str | re.Pattern) -> re.Pattern:
    if isinstance(pattern, re.Pattern):
        return pattern
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as exc:
        raise ConfigError(f"subject_regex {pattern!r} is not a regular expression ({exc})") from None


def assign_subjects(cases: Sequence[Case], root: Path, subject_regex: str | None = None,
                    notes: list[str] | None = None) -> None:
    """Replace the layout's subjects by `subject_regex`, else by ``root/subjects.csv`` when present.
    A case the CSV file does not name is an error: a guess could put one patient in two splits."""
    notes = notes if notes is not None else []
    table = root / SUBJECTS_FILE
    if subject_regex is not None:
        regex = compile_subject_regex(subject_regex)
        for case in cases:
            case.subject_id = subject_from_regex(case.case_id, regex)
        if table.is_file():
            notes.append(f"{table} not used: subject_regex given")
        notes.append(f"subjects from subject_regex {regex.pattern!r}")
        return
    if not table.is_file():
        return
    subjects = read_subjects_csv(table)
    missing = [c.case_id for c in cases if c.case_id not in subjects]
    if missing:
        shown = ", ".join(missing[:5]) + (f" ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise DataError(f"{table}: no subject_id for case(s) {shown}; give a row for every case")
    for case in cases:
        case.subject_id = subjects[case.case_id]
    notes.append(f"subjects from {table}")


# ------------------------------------------------------------------------- label maps alone


@dataclass(frozen=True)
class LabelMapFile:
    """A label map with the case ID (and subject) the dataset's layout gives it."""

    case_id: str
    subject_id: str
    path: Path
    split: str | None = None


def label_file_layout(path: Path) -> str:
    """The layout a lone label file's name and neighbours belong to (for ``layout="auto"``)."""
    name, stem = path.name.lower(), volume_stem(path).lower()
    folder = path.parent
    brats = _brats_files(folder) if folder.is_dir() else {}
    if ("seg" in brats and brats["seg"][0] == path and len(brats) >= 2) or (
            stem.startswith("brats") and stem.endswith(tuple(BRATS_SUFFIXES["seg"]))):
        return "brats"
    if name in ("seg.nii.gz", "seg.nii") and (_nifti(folder, "CTres") or _nifti(folder, "SUV")):
        return "autopet"
    if name in ("mask.nii.gz", "mask.nii") and any(_nifti(folder, m) for m in SYNTHRAD_MODALITIES):
        return "synthrad2023"
    if DUKE_ID.search(path.name):
        return "duke"
    return "generic"


def case_id_for_label_file(path: str | Path, layout: str = "auto", root: str | Path | None = None) -> str:
    """The case ID the `layout` gives the case of label file `path` (``"auto"``: told by the
    file's name and neighbours), so that volumes generated from it pair with the case by name.

    BraTS ``BraTS2021_00000/BraTS2021_00000_seg.nii.gz`` -> ``BraTS2021_00000`` (the case folder;
    for a file outside its case folder the stem without ``_seg``/``-seg``); AutoPET
    ``PATIENT/STUDY/SEG.nii.gz`` -> ``PATIENT_STUDY`` (``PATIENT`` when SEG lies in the patient
    folder: the folder is `root`'s child, or without `root` its name starts with ``PETCT_``);
    SynthRAD ``PATIENT/mask.nii.gz`` -> ``PATIENT``; Duke -> ``Breast_MRI_NNN``; generic and
    nnU-Net (``labelsTr/CASE.nii.gz``) -> the file name without its suffix.
    """
    path = Path(path)
    if layout == "auto":
        layout = label_file_layout(path)
    elif layout not in LAYOUTS:
        raise ConfigError(f"unknown layout '{layout}' (known: auto, {', '.join(LAYOUTS)})")
    stem, folder = volume_stem(path), path.parent
    if layout == "brats":
        brats = _brats_files(folder) if folder.is_dir() else {}
        if "seg" in brats and brats["seg"][0] == path and len(brats) >= 2:
            return folder.name
        for suffix in BRATS_SUFFIXES["seg"]:
            if stem.lower().endswith(suffix) and len(stem) > len(suffix):
                return stem[: -len(suffix)]
        return stem
    if layout == "autopet" and volume_stem(path) == AUTOPET_FILES["seg"]:
        in_patient = folder.parent == Path(root) if root is not None else folder.name.startswith("PETCT_")
        return _safe_id(folder.name if in_patient else f"{folder.parent.name}_{folder.name}")
    if layout == "synthrad2023" and stem == "mask":
        return folder.name
    if layout == "duke":
        match = DUKE_ID.search(path.name) or DUKE_ID.search(folder.name)
        return "Breast_MRI_" + match.group(0)[-3:] if match else stem
    return stem


def _label_files(root: Path, max_depth: int = 3) -> list[Path]:
    """Volume files under `root` (depth-limited; hidden entries skipped)."""
    out, level = [], [root]
    for _ in range(max_depth):
        nxt = []
        for folder in level:
            for child in _entries(folder):
                if _is_volume(child):
                    out.append(child)
                elif child.is_dir():
                    nxt.append(child)
        level = nxt
    return sorted(out)


def label_maps(source: str | Path, layout: str = "auto", subject_regex: str | None = None,
               **options) -> list[LabelMapFile]:
    """The label maps of `source` with their case IDs and subjects, for generating from them.

    `source` is a label file; a dataset root in a known layout (its cases' label maps, as
    ``discover`` pairs them); or a folder of label files (searched 3 levels deep, IDs from
    ``case_id_for_label_file``, subjects from ``subjects.csv`` / `subject_regex` or the ID).
    A prepared dataset gives the label files it was prepared from (``data.sources``).
    """
    source = Path(source)
    if source.is_file():
        case_id = case_id_for_label_file(source, layout)
        subject = subject_from_regex(case_id, subject_regex) if subject_regex else brats_subject(case_id)
        return [LabelMapFile(case_id, subject, source)]
    if not source.is_dir():
        raise DataError(f"{source}: label map file or folder not found")
    if (source / "manifest.json").is_file() or layout != "auto" or find_layout(source):
        from medlsdm.data.sources import read_dataset

        found = read_dataset(source, layout=layout, subject_regex=subject_regex, **options)
        return [LabelMapFile(c.case_id, c.subject_id, Path(c.label_path), c.split) for c in found.cases]
    if options:
        raise ConfigError(f"{source}: layout options {', '.join(sorted(options))} need a dataset layout")
    files = _label_files(source)
    if not files:
        raise DataError(f"{source}: no label map files found (NIfTI, NRRD, MHA) up to 3 folders deep")
    cases, seen = [], {}
    for path in files:
        case_id = case_id_for_label_file(path, layout)
        if case_id in seen:
            raise DataError(f"{source}: label maps {_rel(seen[case_id], source)} and {_rel(path, source)} "
                            f"have the same case ID '{case_id}'")
        seen[case_id] = path
        cases.append(Case(case_id, brats_subject(case_id), [], path, []))
    assign_subjects(cases, source, subject_regex)
    return [LabelMapFile(c.case_id, c.subject_id, c.label_path) for c in cases]
