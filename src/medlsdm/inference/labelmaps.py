"""Label maps given at sampling time, put where the model has seen data.

For each label map file (any grid, any orientation):
1. values -> the model's classes: a user's ``--label-map`` (another scheme), else the training
   preparation's own mapping when every value is a raw value of the dataset (BraTS 0,1,2,4 ->
   0..3), with the "brain" label taken from the case's images as at preparation (Med-DDPM's
   BraTS conditioning); values that are no class of the model are refused;
2. geometry: reoriented to the model layout, resampled (nearest neighbour) to the training voxel
   size and axes, and a window of the training shape centred on the foreground — larger where the
   foreground is larger, so nothing is cut (``crop`` keeps the training window and says what it
   cut);
3. the scheme check: the prepared map against the training maps' per-class statistics.
Every step is noted in the job, for the sampling report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from medlsdm.data.io import Volume, read_image, read_label_map, volume_stem
from medlsdm.data.labels import remap
from medlsdm.data.preprocess import SamplingGrid, preprocess_label_map, prepared_affine
from medlsdm.data.statistics import scheme_warnings
from medlsdm.errors import ConfigError, DataError, MedlsdmError
from medlsdm.inference.model import SynthesisModel

log = logging.getLogger(__name__)

WINDOW_GROWTH_WARNING = 2.0   # warn when covering the foreground needs more than this many training windows


@dataclass
class LabelMapJob:
    """One label map ready for sampling: its case ID (names the outputs), source file, the
    prepared map (D, H, W) of model classes, the record that maps results back onto the file's own
    grid, and what was done and found (for the report)."""

    case_id: str
    source: Path
    label: np.ndarray
    record: dict
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.record["shape"])


# ------------------------------------------------------------------------------ value mapping


def parse_label_map(text: str | Mapping | None) -> dict[int, int] | None:
    """``--label-map``: ``"old=new,old=new"`` or a JSON/YAML file ``{old: new}``; values not
    listed keep their value."""
    if text is None:
        return None
    if isinstance(text, Mapping):
        items = text.items()
    elif Path(text).is_file():
        import yaml

        try:
            data = yaml.safe_load(Path(text).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"--label-map {text}: cannot read it ({exc})") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"--label-map {text}: expected a mapping {{old value: model class}}")
        items = data.items()
    else:
        items = []
        for part in str(text).split(","):
            if "=" not in part:
                raise ConfigError(f"--label-map: expected old=new pairs separated by commas or a file, got {text!r}")
            items.append(tuple(part.split("=", 1)))
    try:
        mapping = {int(str(k).strip()): int(str(v).strip()) for k, v in items}
    except ValueError:
        raise ConfigError(f"--label-map: values must be integers, got {text!r}") from None
    if any(k < 0 or v < 0 for k, v in mapping.items()):
        raise ConfigError(f"--label-map: values must be non-negative, got {text!r}")
    return mapping


def _case_images(path: Path, cache: dict) -> list[Path] | None:
    """The image files of the case whose label map is `path`, found by the dataset layouts in the
    folders above it (a BraTS case folder's modalities, an nnU-Net case's channels), or None."""
    from medlsdm.data.layouts import detect_layout, discover

    target = path.resolve()
    for root in (path.parent, path.parent.parent):
        key = root.resolve()
        if key not in cache:
            try:
                cache[key] = discover(root, detect_layout(root, "auto"))
            except MedlsdmError:
                cache[key] = None
        found = cache[key]
        for case in (found.cases if found is not None else []):
            if case.label_path is not None and Path(case.label_path).resolve() == target:
                return list(case.image_paths)
    return None


def _readings(model: SynthesisModel, values: set[int], value_map: dict[int, int] | None) -> list[str]:
    """How the values of a label map can be read: ``user`` (--label-map), ``raw`` (the training
    dataset's own values, prepared as prepare did) and/or ``model`` (already the model's classes).
    Both ``raw`` and ``model`` when the values fit either and the raw reading changes them (a
    BraTS 2021 seg 0,1,2,4 and a prepared map 0..4 with its brain class look alike)."""
    if value_map is not None:
        return ["user"]
    scheme = model.card.scheme
    raw = bool(scheme.mapping) and values <= set(scheme.mapping) and (
        any(scheme.mapping[v] != v for v in values)
        or (scheme.brain_label is not None and scheme.mapping[scheme.brain_label] not in values))
    model_classes = values <= set(model.table.values)
    return (["raw"] if raw else []) + (["model"] if model_classes or not raw else [])


def _to_model_classes(model: SynthesisModel, volume: Volume, reading: str, value_map: dict[int, int] | None,
                      images: Sequence[Path] | None, notes: list[str]) -> dict[int, int] | None:
    """Map `volume`'s values onto the model's classes in place, as `reading` says (see
    `_readings`); returns the mapping applied (raw -> class), for writing edited maps back in the
    file's own values."""
    source = str(volume.path)
    values = set(np.unique(volume.array).tolist())
    applied = None
    if reading == "user":
        applied = {v: value_map.get(v, v) for v in values}
        volume.array = remap(volume.array, applied, source=source)
        notes.append("values mapped with --label-map " +
                     ", ".join(f"{k}->{v}" for k, v in sorted(applied.items()) if k != v))
    elif reading == "raw":
        applied = _raw_mapping(model, volume, values, images, notes)
    unknown = sorted(set(np.unique(volume.array).tolist()) - set(model.table.values))
    if unknown:
        raise DataError(f"{source}: label values {unknown} are not classes of this model "
                        f"({model.table.to_json()}); map them with --label-map old=new,...")
    return applied


def _raw_mapping(model: SynthesisModel, volume: Volume, values: set[int], images: Sequence[Path] | None,
                 notes: list[str]) -> dict[int, int]:
    from medlsdm.data.io import check_same_grid
    from medlsdm.data.prepare import add_brain_label

    scheme = model.card.scheme
    mapping = dict(scheme.mapping)
    present = set(values)
    if scheme.brain_label is not None and scheme.brain_label not in values:
        if not images:
            brain = mapping[scheme.brain_label]
            raise DataError(f"{volume.path}: read as the training dataset's own values, this map lacks the "
                            f"'{model.table.names.get(brain)}' class (value {brain}) that preparation made from "
                            "the case's images, which were not found next to it; give the case folder or dataset "
                            "root as --labels, or say what the values are with --label-map")
        image = read_image(images)
        check_same_grid(image, volume, what="case images and label map")
        add_brain_label(image, volume, scheme.brain_label)
        present.add(scheme.brain_label)
        notes.append(f"'brain' class added from the images ({', '.join(Path(p).name for p in images)}), "
                     "as at preparation")
    volume.array = remap(volume.array, mapping, source=str(volume.path))
    changed = ", ".join(f"{k}->{v}" for k, v in sorted(mapping.items()) if k in present and k != v)
    notes.append("values mapped as at preparation" + (f" {changed}" if changed else ""))
    return mapping


# -------------------------------------------------------------------------------- geometry


def sampling_grid(model: SynthesisModel, crop: bool = False) -> SamplingGrid | None:
    """The training geometry as a `SamplingGrid` (None for `resize` preparations, whose rule —
    the whole extent to the training shape — is applied as it is)."""
    card = model.card
    if card.prepare_spec.get("shape_mode", "crop_pad") != "crop_pad":
        return None
    if card.spacing is None:
        raise MedlsdmError("the model does not record the voxel size it was trained at (a run from before that "
                           "was recorded, prepared with each case's own spacing); add "
                           '"training_geometry": {"spacing": [D, H, W]} (mm) to its diffusion.json')
    if card.shape is None:
        raise MedlsdmError("the model does not record the image shape it was trained at; add "
                           '"training_geometry": {"shape": [D, H, W]} to its diffusion.json')
    return SamplingGrid(spacing=tuple(card.spacing), shape=tuple(card.shape), directions=card.directions,
                        cover=not crop, multiple=model.grid_multiple)


def _mm(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.3g}" for v in values) + " mm"


def _geometry_notes(volume: Volume, record: dict, grid: SamplingGrid | None, crop: bool) -> tuple[list, list]:
    notes, warnings = [], []
    spacing = np.linalg.norm(prepared_affine(record)[:3, :3], axis=0)
    if record["resampled"]:
        notes.append(f"resampled from {_mm(volume.spacing)} (file axes) to {_mm(spacing)} (D, H, W), "
                     "the training voxel size")
    shape = tuple(record["shape"])
    if grid is not None and shape != tuple(grid.shape):
        notes.append(f"generated on a {'x'.join(map(str, shape))} grid, larger than the training window "
                     f"{'x'.join(map(str, grid.shape))}, to cover the whole labelled foreground")
        growth = float(np.prod(shape) / np.prod(grid.shape))
        if growth > WINDOW_GROWTH_WARNING:
            warnings.append(f"the labelled foreground needs {growth:.1f}x the training window's voxels (time and "
                            "memory grow with it; a stray label far from the rest?); --crop keeps the training "
                            "window, --tile samples in tiles of it")
    if record.get("foreground_clipped"):
        what = "--crop: " if crop else ""
        warnings.append(f"{what}the labelled foreground is larger than the {'x'.join(map(str, shape))} window "
                        "and was cut; outside it the output holds the background value")
    return notes, warnings


# ------------------------------------------------------------------------------------ jobs


def prepare_label_map(model: SynthesisModel, path: str | Path, case_id: str | None = None,
                      value_map: dict[int, int] | None = None, images: Sequence[Path] | None = None,
                      crop: bool = False, image_cache: dict | None = None) -> LabelMapJob:
    """One label map file -> a `LabelMapJob` for `model` (see the module docstring). Values that
    read both as the dataset's raw values and as model classes are read the way whose prepared
    map is closer to the training maps' statistics (refused without statistics)."""
    path = Path(path)
    volume = read_label_map(path)
    values = set(np.unique(volume.array).tolist())
    readings = _readings(model, values, value_map)
    if "raw" in readings and images is None and model.card.scheme.brain_label is not None:
        images = _case_images(path, image_cache if image_cache is not None else {})
    if len(readings) == 1:
        return _job(model, volume, readings[0], path, case_id, value_map, images, crop)
    what = {"raw": "the training dataset's own values", "model": "the model's classes"}
    hint = f"--label-map {','.join(f'{v}={v}' for v in sorted(values) if v)} says they are model classes"
    jobs, failed = {}, {}
    for reading in readings:
        copy = Volume(array=volume.array.copy(), affine=volume.affine, path=volume.path)
        try:
            jobs[reading] = _job(model, copy, reading, path, case_id, value_map, images, crop)
        except DataError as exc:
            failed[reading] = exc
    if not jobs:
        raise failed[readings[0]]
    other_of = {"raw": "model", "model": "raw"}
    if not model.card.class_statistics:
        # Nothing to compare with (a run from before statistics were recorded): the dataset's own
        # values, as the files of the training dataset would hold them, said as a warning.
        if "raw" in failed:
            raise DataError(f"{failed['raw']} ({hint})")
        chosen = "raw"
        jobs[chosen].warnings.insert(0, f"values {sorted(values)} read as {what[chosen]}; they could also be "
                                        f"{what[other_of[chosen]]} and the model records no statistics to tell "
                                        f"({hint})")
        return jobs[chosen]
    chosen = min(jobs, key=lambda r: len(jobs[r].warnings))   # ties: raw, listed first
    other = other_of[chosen]
    if other in failed:
        jobs[chosen].warnings.insert(0, f"values {sorted(values)} read as {what[chosen]}; as {what[other]} they "
                                        f"could not be prepared ({failed[other]})")
    else:
        jobs[chosen].notes.insert(0, f"values {sorted(values)} read as {what[chosen]}: {len(jobs[chosen].warnings)} "
                                     f"differences from the training maps against {len(jobs[other].warnings)} as "
                                     f"{what[other]} ({hint})")
    return jobs[chosen]


def _job(model: SynthesisModel, volume: Volume, reading: str, path: Path, case_id: str | None,
         value_map: dict[int, int] | None, images: Sequence[Path] | None, crop: bool) -> LabelMapJob:
    notes: list[str] = []
    applied = _to_model_classes(model, volume, reading, value_map, images, notes)
    grid = sampling_grid(model, crop)
    spec = {**model.prepare_spec, "label_mapping": None}
    label, record = preprocess_label_map(volume, spec, grid=grid)
    record["label_mapping"] = None if applied is None else {str(k): int(v) for k, v in applied.items()}
    geo_notes, warnings = _geometry_notes(volume, record, grid, crop)
    stats = model.card.class_statistics
    if stats:
        spacing = np.linalg.norm(prepared_affine(record)[:3, :3], axis=0)
        found = scheme_warnings(label, spacing, stats, model.table.names)
        if found:
            warnings.extend(found)
            warnings.append("this map is unlike the training maps (another label scheme?); map values with "
                            "--label-map old=new,... if they mean other classes")
    return LabelMapJob(case_id=case_id or volume_stem(path), source=path, label=label, record=record,
                       notes=notes + geo_notes, warnings=warnings)


def label_sources(labels: str | Path, layout: str = "auto") -> list[tuple[str, Path]]:
    """(case ID, label file) for `labels`: one file, a folder of label map files, a dataset root
    in any layout `medlsdm prepare` reads, or a prepared dataset (`medlsdm.data.layouts.label_maps`:
    case IDs are the layout's, e.g. ``BraTS2021_00000`` for ``BraTS2021_00000_seg.nii.gz``)."""
    from medlsdm.data.layouts import label_maps

    return [(m.case_id, Path(m.path)) for m in label_maps(labels, layout)]


def label_jobs(model: SynthesisModel, labels: str | Path, layout: str = "auto",
               value_map: dict[int, int] | None = None, crop: bool = False) -> list[LabelMapJob]:
    """A `LabelMapJob` per label map of `labels` (see `label_sources`), its notes and warnings
    logged one line each."""
    cache: dict = {}
    jobs = []
    for case_id, path in label_sources(labels, layout):
        job = prepare_label_map(model, path, case_id=case_id, value_map=value_map, crop=crop, image_cache=cache)
        for note in job.notes:
            log.info("%s: %s", path, note)
        for warning in job.warnings:
            log.warning("warning: %s: %s", path, warning)
        jobs.append(job)
    return jobs
