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


def _to_model_classes(model: SynthesisModel, volume: Volume, value_map: dict[int, int] | None,
                      images: Sequence[Path] | None, notes: list[str]) -> dict[int, int] | None:
    """Map `volume`'s values onto the model's classes in place; returns the mapping applied
    (raw -> class), for writing edited maps back in the file's own values."""
    source = str(volume.path)
    scheme = model.card.scheme
    values = set(np.unique(volume.array).tolist())
    known = set(model.table.values)
    if value_map is not None:
        full = {v: value_map.get(v, v) for v in values}
        volume.array = remap(volume.array, full, source=source)
        notes.append("values mapped with --label-map " + ", ".join(f"{k}->{v}" for k, v in sorted(full.items()) if k != v))
        applied = full
    elif scheme.mapping and values <= set(scheme.mapping) and (
            any(scheme.mapping[v] != v for v in values)
            or (scheme.brain_label is not None and scheme.mapping[scheme.brain_label] not in values)):
        # Raw values of the training dataset (BraTS 2021 0,1,2,4; BraTS 2023 0..3 without the brain
        # class): prepared as prepare did. A map already in model classes that would also read as
        # raw values is taken as raw; `--label-map v=v` says otherwise.
        applied = _raw_mapping(model, volume, values, images, notes)
    else:
        applied = None
    unknown = sorted(set(np.unique(volume.array).tolist()) - known)
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
    if scheme.brain_label is not None and scheme.brain_label not in values:
        if not images:
            brain = mapping[scheme.brain_label]
            raise DataError(f"{volume.path}: this model was trained with a '{model.table.names.get(brain)}' class "
                            f"(value {brain}) made from the case's images, which were not found next to the "
                            "label map; give the case folder or dataset root as --labels, or a map that already "
                            "has that class")
        image = read_image(images)
        check_same_grid(image, volume, what="case images and label map")
        add_brain_label(image, volume, scheme.brain_label)
        notes.append(f"'brain' class added from the images ({', '.join(Path(p).name for p in images)}), "
                     "as at preparation")
    volume.array = remap(volume.array, mapping, source=str(volume.path))
    notes.append("values mapped as at preparation " +
                 ", ".join(f"{k}->{v}" for k, v in sorted(mapping.items()) if k in values and k != v))
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
    if record.get("foreground_clipped"):
        what = "--crop: " if crop else ""
        warnings.append(f"{what}the labelled foreground is larger than the {'x'.join(map(str, shape))} window "
                        "and was cut; outside it the output holds the background value")
    return notes, warnings


# ------------------------------------------------------------------------------------ jobs


def prepare_label_map(model: SynthesisModel, path: str | Path, case_id: str | None = None,
                      value_map: dict[int, int] | None = None, images: Sequence[Path] | None = None,
                      crop: bool = False, image_cache: dict | None = None) -> LabelMapJob:
    """One label map file -> a `LabelMapJob` for `model` (see the module docstring)."""
    path = Path(path)
    volume = read_label_map(path)
    notes: list[str] = []
    if images is None and model.card.scheme.brain_label is not None:
        images = _case_images(path, image_cache if image_cache is not None else {})
    applied = _to_model_classes(model, volume, value_map, images, notes)
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
