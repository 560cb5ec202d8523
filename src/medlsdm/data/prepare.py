"""`medlsdm prepare`: a dataset folder -> a prepared dataset (docs/architecture.md).

Discovery (``data.layouts``) -> per case: read image channels and label map -> optional BraTS
brain label -> ``data.preprocess.preprocess_case`` -> ``images/ID.npy``, ``labels/ID.npy`` ->
subject-level seeded splits (``data.splits``) -> ``manifest.json``. The output folder is owned
(``files.owned_output``): new, empty, or prepared before; the dataset is built in a temporary folder
inside it and moved in at the end (manifest last), so a failed run leaves the folder as it was.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from medlsdm.config import save_config, stage_config
from medlsdm.data.dataset import MANIFEST_FORMAT
from medlsdm.data.io import Volume, read_image, read_label_map
from medlsdm.data.labels import LabelTable, label_dtype
from medlsdm.data.layouts import Case, Discovery, compile_subject_regex, detect_layout, discover
from medlsdm.data.preprocess import PREPROCESS_DEFAULTS, intensity_summary, preprocess_case, resolve_spec
from medlsdm.data.splits import SPLITS, assign_splits
from medlsdm.errors import ConfigError, DataError
from medlsdm.files import install, owned_output, relative_path, save_array, staging, write_json

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
PREPARE_DEFAULTS = {
    "layout": "auto",
    # Options of the layouts (data.layouts); null ones are not passed. `modality` of the
    # synthrad2023 layout defaults to the preprocessing `modality` below; `channels` is autopet's.
    "layout_options": {"labels_dir": None, "modality": None, "image_pattern": None, "label_pattern": None,
                       "channels": None},
    "label_names": None,  # [name0, name1, ...] or {value: name}, when the layout gives no label table
    # Subject (patient) of each case, searched in its case ID: the group "subject", else group 1,
    # else the whole match (e.g. '^(sub-\d+)_'). Null: the layout's subjects, or subjects.csv
    # (case_id,subject_id) in the dataset root. Splits keep all cases of a subject together.
    "subject_regex": None,
    # Subject-level split: fractions (train, val, test), or subject counts (one may be null for
    # "the rest") that replace the fractions; cases with a split from the layout keep it.
    "split": {"fractions": [0.7, 0.15, 0.15], "counts": None, "seed": 0},
    # Med-DDPM's BraTS label maps: non-zero image voxels outside the labelled foreground (the
    # tumour) become an extra "brain" label, so the model is conditioned on the whole brain.
    "add_brain_label": False,
    **PREPROCESS_DEFAULTS,
}


# ------------------------------------------------------------------------------- label tables


def table_from_names(names) -> LabelTable:
    if isinstance(names, (list, tuple)):
        return LabelTable({i: str(n) for i, n in enumerate(names)})
    if isinstance(names, Mapping):
        return LabelTable.from_mapping(names)
    raise ConfigError(f"label_names: expected a list of names or a mapping {{value: name}}, got {names!r}")


def mapped_table(table: LabelTable, mapping: Mapping[int, int] | None) -> LabelTable:
    """The table after `label_mapping`; raw labels merged into one value keep all their names."""
    if mapping is None:
        return table
    names: dict[int, list[str]] = {}
    for raw, name in sorted(table.names.items()):
        if raw not in mapping:
            raise ConfigError(f"label_mapping has no entry for label value {raw} ({name}); "
                              f"give one for every value of the table {table.values}")
        names.setdefault(int(mapping[raw]), [])
        if name not in names[int(mapping[raw])]:
            names[int(mapping[raw])].append(name)
    return LabelTable({value: " + ".join(n) for value, n in sorted(names.items())})


def check_contiguous(table: LabelTable, where: str = "prepared label table") -> None:
    if not table.is_contiguous():
        raise ConfigError(f"{where}: label values {table.values} are not contiguous 0..K-1; "
                          f"set label_mapping (e.g. --set 'label_mapping={{0: 0, 1: 1, 2: 2, 4: 3}}')")


def _brain_label(table: LabelTable, mapping: dict | None) -> tuple[LabelTable, dict | None, int]:
    """Add the "brain" label after the raw values (and to the mapping, after its values)."""
    brain = max(table.values + list(mapping or {})) + 1
    table = LabelTable({**table.names, brain: "brain"})
    if mapping is not None:
        mapping = {**mapping, brain: max(mapping.values()) + 1}
    return table, mapping, brain


def add_brain_label(image: Volume, label: Volume, value: int) -> None:
    """Voxels outside the label foreground where any image channel is non-zero get `value`
    (Med-DDPM's whole-brain + tumour conditioning for skull-stripped BraTS images)."""
    array = np.asarray(image.array)
    inside = np.any(array != 0, axis=0) if array.ndim == 4 else array != 0
    out = label.array.astype(np.int64)
    out[(out == 0) & inside] = value
    label.array = out.astype(label_dtype(out, str(label.path)))


# ---------------------------------------------------------------------------------- config


def prepare_config(config: str | Mapping | None = None, overrides: Iterable[str] = ()) -> dict:
    cfg = stage_config(PREPARE_DEFAULTS, config, overrides, section="prepare")
    resolve_spec(_spec(cfg))  # fail before reading any file
    if cfg["subject_regex"] is not None:
        compile_subject_regex(cfg["subject_regex"])
    return cfg


def _spec(cfg: Mapping) -> dict:
    return {key: cfg[key] for key in PREPROCESS_DEFAULTS}


def layout_options_for(cfg: Mapping, layout: str) -> dict:
    """The options a prepare configuration gives the layout's discovery."""
    options = {k: v for k, v in (cfg.get("layout_options") or {}).items() if v is not None}
    if layout == "synthrad2023" and cfg.get("modality") is not None:
        options.setdefault("modality", cfg["modality"])
    return options  # discover() refuses options the layout does not take


# --------------------------------------------------------------------------------- per case


def _file_name(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", case_id)


def _case_error(case: Case, exc: Exception) -> DataError:
    """One-line error naming the file: reader errors already do; add the label path otherwise."""
    message = str(exc)
    paths = [str(p) for p in case.image_paths] + [str(case.label_path)]
    if not any(p in message for p in paths):
        message = f"{case.label_path} (case {case.case_id}): {message}"
    return DataError(message)


def _prepare_case(case: Case, root: Path, raw_table: LabelTable | None, table: LabelTable | None, spec: dict,
                  brain: int | None) -> tuple[np.ndarray, np.ndarray, dict]:
    try:
        image = read_image(case.image_paths, case.channel_names)
        label = read_label_map(case.label_path, raw_table)
        if brain is not None:
            add_brain_label(image, label, brain)
        image_array, label_array, record = preprocess_case(image, label, spec, table)
    except DataError as exc:
        raise _case_error(case, exc) from None
    except (ValueError, MemoryError) as exc:  # scipy/numpy failures on odd inputs
        raise _case_error(case, DataError(f"{type(exc).__name__}: {exc}")) from None
    record["source"] = {"images": [relative_path(p, root) for p in case.image_paths],
                        "label": relative_path(case.label_path, root)}
    for key in ("path", "image_path"):  # the readers' absolute paths: relative to the dataset root
        if record.get("original", {}).get(key):
            record["original"][key] = relative_path(record["original"][key], root)
    return image_array, label_array, record



def _resolve_tables(found: Discovery, cfg: dict) -> tuple[LabelTable | None, LabelTable | None, dict, int | None]:
    """(raw table for checking label files, prepared table, spec, brain value); the prepared table
    is None when it must be inferred from the values found."""
    spec = resolve_spec(_spec(cfg))
    raw = found.label_table
    if raw is None and cfg["label_names"] is not None:
        raw = table_from_names(cfg["label_names"])
    brain = None
    if cfg["add_brain_label"]:
        if raw is None:
            raise ConfigError("add_brain_label needs a label table (from the layout or label_names)")
        raw, spec["label_mapping"], brain = _brain_label(raw, spec["label_mapping"])
    if raw is None:
        return None, None, spec, brain
    table = mapped_table(raw, spec["label_mapping"])
    check_contiguous(table)
    return raw, table, spec, brain


def _inferred_table(values: set[int]) -> LabelTable:
    table = LabelTable({v: "background" if v == 0 else f"label_{v}" for v in sorted(values | {0})})
    check_contiguous(table, "label values found in the prepared label maps")
    return table


# ---------------------------------------------------------------------------------- splits


def _splits(cases: list[Case], cfg: dict) -> dict[str, str]:
    fixed: dict[str, str] = {}
    for case in cases:
        if case.split is None:
            continue
        if fixed.get(case.subject_id, case.split) != case.split:
            raise DataError(f"subject '{case.subject_id}' has cases in two explicit splits "
                            f"({fixed[case.subject_id]} and {case.split})")
        fixed[case.subject_id] = case.split
    split = cfg["split"]
    return assign_splits([c.subject_id for c in cases], split["fractions"], int(split["seed"]), fixed,
                         counts=split.get("counts"))


# ------------------------------------------------------------------------------------- main


def _report_unmatched(found: Discovery) -> None:
    if found.unmatched:
        log.warning("%d file(s) not used (see unmatched.txt):", len(found.unmatched))
        for line in found.unmatched[:20]:
            log.warning("  %s", line)
        if len(found.unmatched) > 20:
            log.warning("  ... and %d more", len(found.unmatched) - 20)


def _is_prepared(folder: Path) -> bool:
    """A prepared dataset written before output folders were marked."""
    try:
        return json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("format") == MANIFEST_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def prepare_dataset(root: str | Path, out: str | Path, config: str | Mapping | None = None,
                    overrides: Iterable[str] = (), layout: str | None = None, seed: int | None = None,
                    skip_bad: bool = False, progress: bool = True, subject_regex: str | None = None,
                    overwrite: bool = False, **layout_options) -> Path:
    """Prepare the dataset in `root` into `out`; returns `out`.

    `out` must be new, empty or a prepared dataset (replaced); `overwrite` allows any other
    folder (only the entries a prepared dataset has are replaced; inputs never are).
    `layout`, `seed`, `subject_regex` and `layout_options` (e.g. ``labels_dir``, ``modality``)
    override the config.
    """
    from tqdm.auto import tqdm

    root, out = Path(root), Path(out)
    cfg = prepare_config(config, overrides)
    if layout is not None:
        cfg["layout"] = layout
    if seed is not None:
        cfg["split"]["seed"] = int(seed)
    for key, value in layout_options.items():
        if key not in cfg["layout_options"]:
            raise ConfigError(f"unknown layout option '{key}' (known: {', '.join(cfg['layout_options'])})")
        cfg["layout_options"][key] = str(value) if isinstance(value, Path) else value
    if subject_regex is not None:
        cfg["subject_regex"] = subject_regex
        compile_subject_regex(subject_regex)
    if cfg["layout_options"].get("labels_dir"):  # absolute, so the recorded config finds it again
        cfg["layout_options"]["labels_dir"] = str(Path(cfg["layout_options"]["labels_dir"]).resolve())
    if not root.is_dir():
        raise DataError(f"{root}: input folder not found")
    if out.resolve() == root.resolve() or root.resolve() in out.resolve().parents:
        raise ConfigError(f"{out}: the output folder must not be inside the input folder {root}")
    inputs = [root] + [cfg["layout_options"][k] for k in ("labels_dir",) if cfg["layout_options"][k]]
    cfg["layout"] = detect_layout(root, cfg["layout"])
    found = discover(root, cfg["layout"], subject_regex=cfg["subject_regex"], **layout_options_for(cfg, cfg["layout"]))
    _report_unmatched(found)
    for note in found.notes:
        log.info("%s", note)
    raw_table, table, spec, brain = _resolve_tables(found, cfg)
    log.info("%s layout: %d case(s) in %s", found.layout, len(found.cases), root)

    names = {}
    for case in found.cases:
        name = _file_name(case.case_id)
        if name in names:
            raise DataError(f"{root}: case IDs '{names[name]}' and '{case.case_id}' give the same file name")
        names[name] = case.case_id

    with owned_output(out, "prepare", inputs, overwrite, recognise=_is_prepared), staging(out) as tmp:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        done, skipped, values = [], [], set()
        for case in tqdm(found.cases, desc="prepare", unit="case", disable=not progress):
            try:
                image, label, record = _prepare_case(case, root, raw_table, table, spec, brain)
            except DataError as exc:
                if not skip_bad:
                    raise
                log.warning("skipped: %s", exc)
                skipped.append({"case_id": case.case_id, "error": str(exc)})
                continue
            name = _file_name(case.case_id)
            save_array(tmp / "images" / f"{name}.npy", image.astype(np.float32))
            save_array(tmp / "labels" / f"{name}.npy", label)  # uint8: preprocess_case refuses values > 255
            values |= set(np.unique(label).tolist())
            done.append((case, name, record))
        if not done:
            raise DataError(f"{root}: every case failed (first: {skipped[0]['error']})")
        table = table or _inferred_table(values)
        splits = _splits([c for c, _, _ in done], cfg)
        cases = [{"case_id": c.case_id, "subject_id": c.subject_id, "split": splits[c.subject_id],
                  "image": f"images/{n}.npy", "label": f"labels/{n}.npy", "record": r} for c, n, r in done]
        # Typical intensities for inverting generated images: from training cases only, so no
        # test statistics leak (all cases when the dataset is a test set only).
        train_records = [c["record"] for c in cases if c["split"] == "train"] or [c["record"] for c in cases]
        manifest = {
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "modality": spec["modality"],
            "channels": list(found.channel_names), "label_table": table.to_json(),
            "spec": {**spec, "label_mapping": None if spec["label_mapping"] is None else
                     {str(k): v for k, v in spec["label_mapping"].items()}},
            "intensity": intensity_summary(train_records),
            "layout": found.layout, "source": relative_path(root, out),  # case sources are relative to it
            # How label files became the prepared classes, for sampling from such files later.
            "label_scheme": {"source_table": None if raw_table is None else raw_table.to_json(),
                             "mapping": None if spec["label_mapping"] is None else
                             {str(k): v for k, v in spec["label_mapping"].items()},
                             "brain_label": brain},
            "split": {**cfg["split"], "cases": {s: sum(c["split"] == s for c in cases) for s in SPLITS},
                      "subjects": {s: len({c["subject_id"] for c in cases if c["split"] == s}) for s in SPLITS}},
            "skipped": skipped,
            "cases": cases,
        }
        write_json(tmp / "manifest.json", manifest)
        save_config({"prepare": cfg}, tmp / "prepare.yaml")
        (tmp / "unmatched.txt").write_text("".join(f"{line}\n" for line in found.unmatched), encoding="utf-8")
        install(tmp, out, inputs, last=["manifest.json"])
    counts = manifest["split"]["cases"]
    log.info("prepared %d case(s) (train %d, val %d, test %d%s) in %s", len(cases), counts["train"], counts["val"],
             counts["test"], f", {len(skipped)} skipped" if skipped else "", out)
    return out
