"""`medlsdm inspect`: geometry and contents of a volume file (or of a prepared case), and a
three-plane picture, to check data before training and outputs after sampling."""

from __future__ import annotations

import argparse
from pathlib import Path

# Files naming label values belong to a label map's dataset when they lie beside it, or one folder
# up when the map is in a dataset's label folder (generic: DATA/labels.json beside DATA/labels/;
# nnU-Net: dataset.json beside labelsTr/). A table elsewhere up the tree names another dataset.
LABEL_FOLDERS = ("labels", "labelsTr", "labelsTs", "segmentations")
# DICOM modalities (0008,0060) of images, never label maps.
IMAGE_MODALITIES = {"CT", "MR", "PT", "NM", "US", "CR", "DX", "MG", "XA", "RF", "OT", "SC", "ST"}
# Label maps hold few non-negative values; an image with few values is rare and the name or an
# explicit --as tells. Above MAX_LABELS distinct values a file is an image whatever its name.
FEW_VALUES, MAX_LABELS = 32, 256
LABEL_NAME = ("seg", "label", "mask", "annotation")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="print a volume's geometry and values; write a three-plane PNG",
        description=(
            "Print shape, spacing, orientation (axis codes such as RAS or LPS), affine, dtype and the "
            "intensity range (min, percentiles, max), or for a label map each value with its voxel count "
            "and name, of FILE: a NIfTI/NRRD/MHA file or DICOM-series folder, a prepared dataset "
            "(PREPARED: summary; PREPARED/ID or --case ID: one case) or a prepared .npy array "
            "(PREPARED/images/ID.npy, PREPARED/labels/ID.npy). A file is read as a label map when it holds "
            "few non-negative whole values and is no DICOM image series (or with --as label). Label names "
            "come from --table, else labels.json/dataset.json beside the label map (or one folder up from a "
            "labels/, labelsTr/ folder), else the layout's own table (BraTS, autoPET), else the manifest."
        ),
    )
    parser.add_argument("file", metavar="FILE", help="volume file, DICOM folder, prepared dataset, PREPARED/ID or .npy")
    parser.add_argument("--labels", metavar="LABELFILE", help="label map on the same grid, overlaid on the PNG")
    parser.add_argument("--table", metavar="JSON",
                        help="label table {\"0\": \"background\", ...} or dataset.json naming the values")
    parser.add_argument("--case", metavar="ID", help="case ID, when FILE is a prepared dataset")
    parser.add_argument("--png", metavar="OUT.png", help="write axial | coronal | sagittal planes here")
    parser.add_argument("--as", dest="kind", choices=["image", "label"],
                        help="read FILE as an image or a label map (default: decided from its values, its DICOM "
                             "modality and its name; the decision is printed)")
    parser.set_defaults(func=run)


# ------------------------------------------------------------------------------- describing


def _is_label_like(array) -> bool:
    """Integer dtype, or float holding few whole values (label maps saved as float)."""
    import numpy as np

    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        return True
    if not np.issubdtype(array.dtype, np.floating):
        return False
    sample = np.asarray(array.ravel()[:: max(1, array.size // 200_000)])
    if not (np.all(np.isfinite(sample)) and np.all(sample == np.round(sample)) and np.unique(sample).size <= 64):
        return False  # cheap test on a sample first: most images fail it here
    return bool(np.all(np.isfinite(array)) and np.all(array == np.round(array)))


def label_map_verdict(array, path: Path | None = None, modality: str | None = None) -> tuple[bool, str]:
    """(is it a label map?, why): integer-like 3D values, no negative ones, few distinct values
    (up to FEW_VALUES, or MAX_LABELS when the name says segmentation), not a DICOM image series."""
    import numpy as np

    if array.ndim != 3:
        return False, f"{array.ndim}D array"
    if modality in IMAGE_MODALITIES:
        return False, f"DICOM series of modality {modality}"
    if not _is_label_like(array):
        return False, f"{array.dtype} values, not a few whole numbers"
    lo = array.min()
    if lo < 0:
        return False, f"negative values (min {lo})"
    sample = np.asarray(array.ravel()[:: max(1, array.size // 200_000)])
    if np.unique(sample).size > MAX_LABELS:  # cheap on a sample: a CT or MR image stops here
        return False, f"more than {MAX_LABELS} distinct values"
    n = np.unique(array).size
    named = path is not None and (any(w in path.name.lower() for w in LABEL_NAME) or path.parent.name in LABEL_FOLDERS)
    if n > MAX_LABELS or (n > FEW_VALUES and not named):
        return False, f"{n} distinct values"
    return True, f"{n} distinct whole values" + (", named as a segmentation" if named else "")


def _dicom_modality(folder: Path) -> str | None:
    """The Modality (0008,0060) of the first file of a DICOM series folder, if it has one."""
    import SimpleITK as sitk

    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    reader = sitk.ImageFileReader()
    for path in files[:1]:
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            return None
        if reader.HasMetaDataKey("0008|0060"):
            return reader.GetMetaData("0008|0060").strip().upper()
    return None


def describe_values(array, names: dict[int, str] | None = None, channel_names=None,
                    as_label: bool | None = None) -> list[str]:
    """Lines: label values with voxel counts (and names), or per-channel intensity ranges.
    `as_label` None: label values when ``label_map_verdict`` says so."""
    import numpy as np

    array = np.asarray(array)
    if as_label is None:
        as_label = label_map_verdict(array)[0]
    if as_label:
        values, counts = np.unique(array.astype(np.int64), return_counts=True)
        lines = ["label values (value: voxels, fraction[, name]):"]
        for v, c in zip(values.tolist(), counts.tolist()):
            name = f"  {names.get(v, '(not in table)')}" if names is not None else ""
            lines.append(f"  {v}: {c} ({c / array.size:.2%}){name}")
        return lines
    channels = array if array.ndim == 4 else array[None]
    lines = ["intensity (min / p0.5 / p50 / p99.5 / max, mean):"]
    for i, channel in enumerate(channels):
        channel = channel.astype(np.float64)
        finite = channel[np.isfinite(channel)]
        label = channel_names[i] if channel_names and i < len(channel_names) else f"channel {i}"
        if finite.size < channel.size:
            lines.append(f"  {label}: {channel.size - finite.size} NaN/Inf voxels")
        if finite.size:
            p = np.percentile(finite, [0.5, 50, 99.5])
            lines.append(f"  {label}: {finite.min():.4g} / {p[0]:.4g} / {p[1]:.4g} / {p[2]:.4g} / {finite.max():.4g}, "
                         f"mean {finite.mean():.4g}")
    return lines


def describe_geometry(shape, affine, dtype) -> list[str]:
    import nibabel as nib
    import numpy as np

    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    rows = [" ".join(f"{v:10.4f}" for v in row) for row in affine]
    return [f"shape: {tuple(int(s) for s in shape)}", f"dtype: {dtype}",
            f"spacing (mm): {tuple(round(float(s), 4) for s in spacing)}",
            f"orientation: {''.join(nib.aff2axcodes(affine))}", "affine (voxel -> world RAS mm):",
            *(f"  {r}" for r in rows)]


# ------------------------------------------------------------------------------ label tables


def _table_lines(args, label_path: Path) -> tuple[dict[int, str] | None, list[str]]:
    from medlsdm.data.labels import find_label_table, read_label_table

    if args.table:
        return read_label_table(args.table).names, [f"label table: {args.table}"]
    if label_path.is_dir():  # a DICOM series: a table beside its folder names other files
        return None, []
    folder = label_path.parent
    path = find_label_table([folder] + ([folder.parent] if folder.name in LABEL_FOLDERS else []))
    if path is not None:
        return read_label_table(path).names, [f"label table: {path}"]
    layout, table = _layout_table(label_path)
    if table is not None:
        return table.names, [f"label table: the {layout} layout's"]
    return None, []


def _layout_table(label_path: Path):
    """(layout, its label table) for a label file named as a known dataset names them."""
    from medlsdm.data import layouts

    layout = layouts.label_file_layout(label_path)
    if layout == "brats":
        is_2023 = layouts.volume_stem(label_path).lower().endswith("-seg")
        return layout, layouts.BRATS_TABLE_2023 if is_2023 else layouts.BRATS_TABLE_2021
    tables = {"autopet": layouts.AUTOPET_TABLE, "synthrad2023": layouts.SYNTHRAD_MASK_TABLE,
              "duke": layouts.DUKE_TABLE}
    return layout, tables.get(layout)


# --------------------------------------------------------------------------------- targets


def _inspect_file(args) -> tuple[list[str], object, object]:
    import numpy as np

    from medlsdm.data.io import check_same_grid, read_volume
    from medlsdm.data.preprocess import volume_in_model_layout
    from medlsdm.errors import MedlsdmError

    if args.kind == "label" and args.labels:
        raise MedlsdmError("--as label and --labels: FILE is the image when --labels names its label map")
    volume = read_volume(args.file)
    path = Path(args.file)
    modality = _dicom_modality(path) if path.is_dir() else None
    lines = [f"file: {args.file}", *describe_geometry(volume.array.shape, volume.affine, volume.array.dtype)]
    if modality:
        lines.append(f"DICOM modality: {modality}")
    if volume.array.ndim == 4:
        lines.append(f"channels: {volume.array.shape[0]}")
    image, label = volume_in_model_layout(volume), None
    if args.kind == "label" or (args.kind is None and not args.labels):
        as_label, why = ((True, "--as label") if args.kind == "label"
                         else label_map_verdict(volume.array, path, modality))
        if as_label and volume.array.ndim != 3:
            raise MedlsdmError(f"{path}: --as label needs a 3D volume, got shape {volume.array.shape}")
        lines.append(f"read as: {'label map' if as_label else 'image'} ({why})"
                     + ("" if args.kind else f"; --as {'image' if as_label else 'label'} to read it otherwise"))
    else:
        as_label = False
    if args.labels:
        names, table_lines = _table_lines(args, Path(args.labels))
        label_volume = read_volume(args.labels)
        check_same_grid(volume, label_volume, what="image and --labels")
        lines += describe_values(volume.array, as_label=False)
        lines += [f"labels: {args.labels}", *table_lines,
                  *describe_values(np.round(label_volume.array).astype(np.int64), names, as_label=True)]
        label = volume_in_model_layout(label_volume)
    elif as_label:
        names, table_lines = _table_lines(args, path)
        lines += [*table_lines, *describe_values(np.round(volume.array).astype(np.int64), names, as_label=True)]
        image, label = None, image
    else:
        lines += describe_values(volume.array, as_label=False)
    return lines, image, label


def _prepared_case(root: Path, case_id: str) -> tuple[dict, dict]:
    from medlsdm.data.dataset import load_manifest
    from medlsdm.errors import MedlsdmError

    manifest = load_manifest(root)
    by_id = {c["case_id"]: c for c in manifest["cases"]}
    if case_id not in by_id:
        shown = ", ".join(list(by_id)[:10]) + (" ..." if len(by_id) > 10 else "")
        raise MedlsdmError(f"{root}: no case '{case_id}' in the prepared dataset (cases: {shown})")
    return manifest, by_id[case_id]


def _inspect_prepared(root: Path, case_id: str, table: str | None) -> tuple[list[str], object, object]:
    from medlsdm.data.labels import read_label_table
    from medlsdm.data.preprocess import prepared_affine
    from medlsdm.files import load_array

    manifest, case = _prepared_case(root, case_id)
    image, label = load_array(root / case["image"]), load_array(root / case["label"])  # never a pickle
    names = read_label_table(table).names if table else {int(k): v for k, v in manifest["label_table"].items()}
    lines = [f"prepared case: {case_id} (subject {case['subject_id']}, split {case['split']}) in {root}",
             f"image: {root / case['image']}", f"label map: {root / case['label']}",
             *describe_geometry(image.shape, prepared_affine(case["record"]), image.dtype),
             "axes: (C, D, H, W) = channels, inferior->superior, posterior->anterior, left->right",
             *describe_values(image, channel_names=manifest["channels"], as_label=False),
             *describe_values(label, names, as_label=True)]
    return lines, image, label


def _inspect_array(path: Path) -> tuple[list[str], object, object]:
    """A .npy outside a prepared dataset: values only (an array file holds no geometry)."""
    import numpy as np

    from medlsdm.errors import DataError

    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read as a .npy array ({exc})") from None
    lines = [f"array: {path} (no manifest.json two folders up, so no geometry; axes taken as (C,) D, H, W)",
             f"shape: {array.shape}", f"dtype: {array.dtype}"]
    as_label, why = label_map_verdict(array, path)
    lines += [f"read as: {'label map' if as_label else 'image'} ({why})", *describe_values(array, as_label=as_label)]
    if array.ndim not in (3, 4):
        return lines, None, None
    if as_label:
        return lines, None, array
    return lines, array, None


def _case_of_array(path: Path) -> tuple[Path, str] | None:
    """(prepared root, case ID) for PREPARED/images/ID.npy or PREPARED/labels/ID.npy."""
    from medlsdm.data.dataset import load_manifest

    root = path.parent.parent
    if not (root / "manifest.json").is_file():
        return None
    relative = path.resolve().relative_to(root.resolve()).as_posix()
    for case in load_manifest(root)["cases"]:
        if relative in (case["image"], case["label"]):
            return root, case["case_id"]
    return None


def _summary(root: Path) -> list[str]:
    from medlsdm.data.dataset import load_manifest

    manifest = load_manifest(root)
    counts = {s: sum(c["split"] == s for c in manifest["cases"]) for s in ("train", "val", "test")}
    return [f"prepared dataset: {root}", f"modality: {manifest['modality']}, channels: {manifest['channels']}",
            f"label table: {manifest['label_table']}",
            f"cases: {len(manifest['cases'])} (train {counts['train']}, val {counts['val']}, test {counts['test']})",
            "give PREPARED/ID or --case ID to inspect one; IDs: "
            + ", ".join(c["case_id"] for c in manifest["cases"][:20])
            + (" ..." if len(manifest["cases"]) > 20 else "")]


def run(args: argparse.Namespace) -> int:
    from medlsdm.errors import MedlsdmError

    path = Path(args.file)
    prepared = path.is_dir() and (path / "manifest.json").is_file()
    if args.case and not prepared:
        raise MedlsdmError(f"{path}: --case needs a prepared dataset folder (with manifest.json)")
    if prepared and not args.case:
        print("\n".join(_summary(path)))
        return 0
    if prepared:
        lines, image, label = _inspect_prepared(path, args.case, args.table)
    elif not path.exists() and (path.parent / "manifest.json").is_file():  # PREPARED/ID
        lines, image, label = _inspect_prepared(path.parent, path.name, args.table)
    elif path.is_file() and path.name.endswith(".npy"):
        found = _case_of_array(path)
        lines, image, label = _inspect_prepared(*found, args.table) if found else _inspect_array(path)
    else:
        lines, image, label = _inspect_file(args)
    print("\n".join(lines))
    if args.png and image is None and label is None:
        raise MedlsdmError(f"{path}: no picture for an array of this shape (need (D, H, W) or (C, D, H, W))")
    if args.png:
        from medlsdm.viz import label_picture, save_png, three_plane

        picture = label_picture(label) if image is None else three_plane(image, label)
        zoom = max(1, 256 // picture.shape[0])  # small volumes: enlarge (nearest) so voxels can be seen
        save_png(args.png, picture.repeat(zoom, axis=0).repeat(zoom, axis=1))
        print(f"picture: {args.png}")
    return 0
