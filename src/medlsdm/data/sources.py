"""One reader for the datasets every command takes: the cases (image channels, label map,
subject, split) of the original files, in whatever form a user has them.

- A dataset root in a layout ``data.layouts`` knows: detected, or named by ``layout``, or by a
  dataset ``preset`` whose ``prepare:`` section gives the layout, its options and
  ``subject_regex`` (what ``medlsdm prepare`` reads, read the same way).
- A prepared dataset (``manifest.json``): the original files it was prepared from, found again
  in its source folder with the layout and options recorded in its ``prepare.yaml``, with the
  subjects and splits of its manifest (so evaluation and export see the split training saw).

A folder in neither form (a flat folder of volumes) is for the caller (``evaluation.pairing``).

Synthetic volumes are named ``<case_id>_sample<k>`` (``sample_name``): the case ID the layout
gives the label map they were generated from (``layouts.case_id_for_label_file``), so that they
pair with their real case by name. ``split_sample_name`` reads such a name back; it also accepts
the label file's stem in place of the case ID (``<label stem>_sample<k>``, as older versions named
samples), through ``case_aliases``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from medlsdm.data.io import volume_stem
from medlsdm.data.layouts import Discovery, detect_layout, discover, find_layout
from medlsdm.errors import ConfigError, DataError
from medlsdm.files import read_json

SPLITS = ("train", "val", "test")
SAMPLE_NAME = re.compile(r"^(?P<case>.+)_sample(?P<k>\d+)$")


@dataclass(frozen=True)
class DatasetSource(os.PathLike):
    """A dataset folder and how to read it. Path-like (``os.fspath`` gives the folder), so that a
    function taking a folder takes a source too and hands it on to ``read_dataset`` unchanged.

    ``splits``: only cases of these splits (a case without a recorded split counts as ``train``:
    a raw dataset's cases outside its explicit test folder)."""

    path: Path
    layout: str = "auto"
    preset: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    subject_regex: str | None = None
    splits: tuple[str, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        if self.splits is not None:
            splits = tuple(self.splits)
            if not splits or set(splits) - set(SPLITS):
                raise ConfigError(f"splits must be some of {', '.join(SPLITS)}, got {list(splits)}")
            object.__setattr__(self, "splits", splits)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def names_layout(self) -> bool:
        """True when the layout is given (by name or preset) rather than detected."""
        return self.layout != "auto" or self.preset is not None or bool(self.options)


def as_source(source: str | os.PathLike, **settings) -> DatasetSource:
    """`source` as a DatasetSource (a DatasetSource keeps its own settings)."""
    if isinstance(source, DatasetSource):
        return source
    return DatasetSource(Path(source), **settings)


def is_prepared(folder: str | os.PathLike) -> bool:
    """True for a folder written by ``medlsdm prepare`` (a manifest.json of that format)."""
    from medlsdm.data.dataset import MANIFEST_FORMAT

    path = Path(folder) / "manifest.json"
    if not path.is_file():
        return False
    data = read_json(path)
    return isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT


def read_dataset(source: str | os.PathLike, layout: str = "auto", preset: str | None = None,
                 subject_regex: str | None = None, splits: Sequence[str] | None = None, **options) -> Discovery:
    """The cases of a dataset root or a prepared dataset (module docstring), every case with its
    subject and, where known, its split. Keyword settings apply when `source` is a plain path."""
    src = as_source(source, layout=layout, preset=preset, options=options, subject_regex=subject_regex,
                    splits=None if splits is None else tuple(splits))
    if is_prepared(src.path):
        if src.names_layout or src.subject_regex:
            raise ConfigError(f"{src.path}: a prepared dataset records its layout and subjects; "
                              f"drop --layout/--preset/--labels-dir/--subject-regex for it")
        found = _read_prepared(src.path)
    else:
        name, layout_options, regex = _resolve(src)
        found = discover(src.path, name, subject_regex=regex, **layout_options)
    return _select(found, src)


def find_dataset(source: str | os.PathLike) -> Discovery | None:
    """``read_dataset(source)`` when `source` is a dataset (prepared, a layout named or detected),
    else None (a flat folder of volumes)."""
    src = as_source(source)
    if not src.path.is_dir():
        raise DataError(f"{src.path}: folder not found")
    if is_prepared(src.path) or src.names_layout or find_layout(src.path):
        return read_dataset(src)
    return None


def _resolve(src: DatasetSource) -> tuple[str, dict, str | None]:
    """(layout, layout options, subject_regex): the source's own, over its preset's."""
    cfg = {}
    if src.preset is not None:
        from medlsdm.data.prepare import prepare_config

        cfg = prepare_config(src.preset)
    layout = src.layout if src.layout != "auto" else cfg.get("layout", "auto")
    layout = detect_layout(src.path, layout)
    options = _layout_options(cfg, layout) if cfg else {}
    options.update(src.options)
    return layout, options, src.subject_regex or cfg.get("subject_regex")


def _layout_options(cfg: Mapping, layout: str) -> dict:
    from medlsdm.data.prepare import layout_options_for

    return layout_options_for(cfg, layout)


def _read_prepared(root: Path) -> Discovery:
    """The source files of a prepared dataset's cases, with its subjects and splits."""
    import yaml

    from medlsdm.data.dataset import load_manifest

    manifest = load_manifest(root)
    source = root / (manifest.get("source") or "")   # relative to the prepared folder (absolute before)
    if not manifest.get("source") or not source.is_dir():
        raise DataError(f"{root}: prepared from {source}, which is not found; give the original dataset folder "
                        f"(with --layout/--preset) instead")
    cfg_path = root / "prepare.yaml"
    cfg = (yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}).get("prepare", {}) if cfg_path.is_file() else {}
    layout = manifest.get("layout") or cfg.get("layout", "auto")
    found = discover(source, layout, **(_layout_options(cfg, layout) if cfg else {}))
    by_id = {c.case_id: c for c in found.cases}
    cases = []
    for entry in manifest["cases"]:
        case = by_id.get(entry["case_id"])
        if case is None:
            raise DataError(f"{root}: case '{entry['case_id']}' is no longer in its source folder {source}")
        cases.append(dataclasses.replace(case, subject_id=str(entry["subject_id"]), split=entry["split"]))
    if found.label_table is None and cfg.get("label_names") is not None:
        from medlsdm.data.prepare import table_from_names

        found.label_table = table_from_names(cfg["label_names"])
    found.cases = cases
    found.notes.append(f"original files of the prepared dataset {root} (subjects and splits from its manifest)")
    return found


def _select(found: Discovery, src: DatasetSource) -> Discovery:
    if src.splits is None:
        return found
    cases = [c for c in found.cases if (c.split or "train") in src.splits]
    if not cases:
        have = sorted({c.split or "train" for c in found.cases})
        raise DataError(f"{src.path}: no cases in split {' or '.join(src.splits)} (it has {', '.join(have)})")
    found.cases = cases
    return found


# ----------------------------------------------------------------------------- sample names


def sample_name(case_id: str, k: int) -> str:
    """The file stem of sample `k` generated from the label map of case `case_id`."""
    return f"{case_id}_sample{k}"


def case_aliases(cases: Iterable[tuple[str, str | os.PathLike | None]]) -> dict[str, str]:
    """``{name: case ID}`` for ``(case ID, label file)`` pairs: every case ID, and every label file
    stem that names one case only and is no other case's ID (``BraTS2021_00000_seg`` ->
    ``BraTS2021_00000``; AutoPET's ``SEG`` is shared by all cases, so it names none)."""
    cases = list(cases)
    ids = {case_id for case_id, _ in cases}
    stems: dict[str, set[str]] = {}
    for case_id, label in cases:
        if label is not None:
            stems.setdefault(volume_stem(label), set()).add(case_id)
    aliases = {stem: next(iter(owners)) for stem, owners in stems.items() if len(owners) == 1 and stem not in ids}
    return {**aliases, **{i: i for i in ids}}


def split_sample_name(stem: str, case_ids: Mapping[str, str] | Iterable[str]) -> tuple[str, int | None] | None:
    """(case ID, sample index or None) of a synthetic file stem, or None when it names no case.
    `case_ids`: the case IDs, or ``case_aliases`` (name -> case ID). A stem that is a whole case
    name pairs with it even if it ends in ``_sample<k>``."""
    names = case_ids if isinstance(case_ids, Mapping) else {i: i for i in case_ids}
    if stem in names:
        return names[stem], None
    match = SAMPLE_NAME.match(stem)
    if match and match["case"] in names:
        return names[match["case"]], int(match["k"])
    return None
