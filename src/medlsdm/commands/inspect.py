"""`medlsdm inspect`: geometry and contents of a volume file (or of a prepared case), and a
three-plane picture, to check data before training and outputs after sampling."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="print a volume's geometry and values; write a three-plane PNG",
        description=(
            "Print shape, spacing, orientation (RAS axis codes), affine, dtype and the intensity range "
            "(or, for an integer volume, each label value with its voxel count) of FILE (NIfTI, NRRD, "
            "MHA or a DICOM-series folder), or of case ID of a prepared dataset with --case."
        ),
    )
    parser.add_argument("file", metavar="FILE", help="volume file, DICOM folder or prepared dataset folder")
    parser.add_argument("--labels", metavar="LABELFILE", help="label map on the same grid, overlaid on the PNG")
    parser.add_argument("--table", metavar="JSON", help="label table {\"0\": \"background\", ...} naming the values")
    parser.add_argument("--case", metavar="ID", help="case ID, when FILE is a prepared dataset")
    parser.add_argument("--png", metavar="OUT.png", help="write axial | coronal | sagittal planes here")
    parser.set_defaults(func=run)


def _is_label_like(array) -> bool:
    """Integer dtype, or float holding few whole values (label maps saved as float)."""
    import numpy as np

    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        return True
    if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)):
        return False
    sample = array.ravel()[:: max(1, array.size // 200_000)]
    return bool(np.all(sample == np.round(sample))) and np.unique(sample).size <= 64 and np.all(array == np.round(array))


def describe_values(array, names: dict[int, str] | None = None, channel_names=None) -> list[str]:
    """Lines: label values with voxel counts (and names), or per-channel intensity ranges."""
    import numpy as np

    array = np.asarray(array)
    if _is_label_like(array) and array.ndim == 3:
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


def _model_layout(volume):
    """(C,)X, Y, Z file array -> canonical RAS in model layout (C,)D, H, W for the pictures."""
    import numpy as np

    from medlsdm.data.geometry import to_canonical

    canonical, _, _ = to_canonical(np.asarray(volume.array), volume.affine)
    return np.swapaxes(canonical, -1, -3)


def _read_table(path: str | None) -> dict[int, str] | None:
    if path is None:
        return None
    from medlsdm.data.labels import LabelTable
    from medlsdm.errors import DataError
    from medlsdm.files import read_json

    data = read_json(path)
    try:
        table = LabelTable.from_nnunet(data["labels"]) if isinstance(data.get("labels"), dict) else LabelTable.from_mapping(data)
    except (DataError, AttributeError) as exc:
        raise DataError(f"{path}: not a label table ({exc})") from None
    return table.names


def _inspect_file(args) -> tuple[list[str], object, object]:
    import numpy as np

    from medlsdm.data.io import check_same_grid, read_volume

    volume = read_volume(args.file)
    names = _read_table(args.table)
    lines = [f"file: {args.file}", *describe_geometry(volume.array.shape, volume.affine, volume.array.dtype)]
    if volume.array.ndim == 4:
        lines.append(f"channels: {volume.array.shape[0]}")
    lines += describe_values(volume.array, names)
    image, label = _model_layout(volume), None
    if args.labels:
        label_volume = read_volume(args.labels)
        check_same_grid(volume, label_volume, what="image and --labels")
        lines += [f"labels: {args.labels}", *describe_values(np.round(label_volume.array).astype(np.int64), names)]
        label = _model_layout(label_volume)
    elif _is_label_like(volume.array) and volume.array.ndim == 3:
        image, label = None, image
    return lines, image, label


def _inspect_prepared(args) -> tuple[list[str], object, object]:
    import numpy as np

    from medlsdm.data.dataset import load_manifest
    from medlsdm.errors import MedlsdmError

    root = Path(args.file)
    manifest = load_manifest(root)
    by_id = {c["case_id"]: c for c in manifest["cases"]}
    if args.case not in by_id:
        shown = ", ".join(list(by_id)[:10]) + (" ..." if len(by_id) > 10 else "")
        raise MedlsdmError(f"{root}: no case '{args.case}' in the prepared dataset (cases: {shown})")
    case = by_id[args.case]
    image, label = np.load(root / case["image"]), np.load(root / case["label"])
    names = {int(k): v for k, v in manifest["label_table"].items()}
    lines = [f"prepared case: {args.case} (subject {case['subject_id']}, split {case['split']}) in {root}",
             *describe_geometry(image.shape, case["record"]["affine"], image.dtype),
             "axes: (C, D, H, W) = channels, inferior->superior, posterior->anterior, left->right",
             *describe_values(image, channel_names=manifest["channels"]), *describe_values(label, names)]
    return lines, image, label


def _summary(root: Path) -> list[str]:
    from medlsdm.data.dataset import load_manifest

    manifest = load_manifest(root)
    counts = {s: sum(c["split"] == s for c in manifest["cases"]) for s in ("train", "val", "test")}
    return [f"prepared dataset: {root}", f"modality: {manifest['modality']}, channels: {manifest['channels']}",
            f"label table: {manifest['label_table']}",
            f"cases: {len(manifest['cases'])} (train {counts['train']}, val {counts['val']}, test {counts['test']})",
            "give --case ID to inspect one; IDs: " + ", ".join(c["case_id"] for c in manifest["cases"][:20])]


def run(args: argparse.Namespace) -> int:
    from medlsdm.errors import MedlsdmError

    path = Path(args.file)
    prepared = path.is_dir() and (path / "manifest.json").is_file()
    if args.case and not prepared:
        raise MedlsdmError(f"{path}: --case needs a prepared dataset folder (with manifest.json)")
    if prepared and not args.case:
        print("\n".join(_summary(path)))
        return 0
    lines, image, label = _inspect_prepared(args) if prepared else _inspect_file(args)
    print("\n".join(lines))
    if args.png:
        from medlsdm.viz import label_picture, save_png, three_plane

        picture = label_picture(label) if image is None else three_plane(image, label)
        save_png(args.png, picture)
        print(f"picture: {args.png}")
    return 0
