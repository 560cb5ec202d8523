"""`medlsdm labels`: show a label map, edit it (move, scale, dilate, erode, paste, replace a
class region) to ask a model for new anatomy, and picture the difference between two maps."""

from __future__ import annotations

import argparse
from pathlib import Path

from medlsdm.errors import MedlsdmError

EDIT_HELP = """\
Operations run in the order given, each naming a class by its label value. Shifts are voxels along
the file's i, j, k axes, or with --mm a world displacement in mm (RAS: +x right, +y anterior,
+z superior). Voxels a class leaves (move, scale < 1, erode) take --fill CLASS, or by default the
class most common in the one-voxel shell around the region before the edit (background 0 when it has
none); voxels a class enters are overwritten. The result may hold only classes of --table, or else
of the input and background 0; it keeps the input's grid and affine, ready for `medlsdm sample`.
Example: medlsdm labels edit --in case.nii.gz --out moved.nii.gz --move 3 10 0 -5 --mm --dilate 3 1"""


class _EditAction(argparse.Action):
    """Collect every operation flag into one ordered list (`args.edits`), because argparse keeps
    no order between different options and edits do not commute."""

    def __call__(self, parser, namespace, values, option_string=None):
        edits = list(getattr(namespace, self.dest, None) or [])
        edits.append((self.const, option_string, list(values)))
        setattr(namespace, self.dest, edits)


def register(subparsers) -> None:
    parser = subparsers.add_parser("labels", help="show, edit and compare label maps",
                                   description="Show, edit and compare label maps (integer volumes).")
    sub = parser.add_subparsers(dest="labels_command", metavar="ACTION")
    sub.required = True

    show = sub.add_parser("show", help="print classes with voxel counts; write a picture",
                          description="Print the classes of a label map (value, name, voxels, mL) and "
                                      "optionally write axial | coronal | sagittal planes as a PNG.")
    show.add_argument("label", metavar="LABEL", help="label map (NIfTI, NRRD, MHA)")
    show.add_argument("--table", metavar="JSON", help="labels.json or dataset.json naming the values "
                                                      "(default: one beside the file or one folder up)")
    show.add_argument("--png", metavar="OUT.png", help="write a three-plane picture here")
    show.set_defaults(func=run_show)

    edit = sub.add_parser("edit", help="move, scale, dilate, erode, paste or replace class regions",
                          description="Edit a label map and write it with the input's affine.", epilog=EDIT_HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    edit.add_argument("--in", dest="input", required=True, metavar="LABEL", help="label map to edit")
    edit.add_argument("--out", required=True, metavar="LABEL", help="edited label map to write (.nii.gz); "
                                                                    "an existing file is refused without --overwrite")
    edit.add_argument("--overwrite", action="store_true", help="replace an existing --out file (never the input)")
    edit.add_argument("--table", metavar="JSON", help="labels.json or dataset.json: the classes allowed in the result")
    edit.add_argument("--fill", type=int, metavar="CLASS", help="class for voxels a region leaves (default: see below)")
    edit.add_argument("--mm", action="store_true", help="shifts (--move, --at) are world millimetres, not voxels")
    edit.add_argument("--element", choices=["ball", "cube"], default="ball",
                      help="structuring element of --dilate/--erode: ball (radius N; N=1 is the 6-connected "
                           "cross) or cube ((2N+1)^3 box); default ball")
    ops = [
        ("move", ("CLASS", "DX", "DY", "DZ"), "shift the class region"),
        ("scale", ("CLASS", "FACTOR"), "scale the region about its centroid (nearest neighbour)"),
        ("dilate", ("CLASS", "N"), "grow the region by N voxels (over any class)"),
        ("erode", ("CLASS", "N"), "shrink the region by N voxels"),
        ("paste", ("SOURCE", "CLASS"), "copy the CLASS region of label map SOURCE (same grid, or resampled "
                                       "with nearest neighbour through the affines)"),
        ("at", ("DX", "DY", "DZ"), "right after --paste: shift the pasted region"),
        ("replace", ("OLD", "NEW"), "relabel class OLD as NEW"),
    ]
    for op, metavar, text in ops:
        edit.add_argument(f"--{op}", dest="edits", action=_EditAction, const=op, nargs=len(metavar), metavar=metavar,
                          help=text)
    edit.set_defaults(func=run_edit)

    diff = sub.add_parser("diff", help="compare two label maps; write a before/after picture",
                          description="Print per-class voxel counts of two label maps on the same grid and "
                                      "the voxels that differ; with --png, a picture before | after | changed.")
    diff.add_argument("before", metavar="A", help="label map before the edit")
    diff.add_argument("after", metavar="B", help="label map after the edit (same grid)")
    diff.add_argument("--table", metavar="JSON", help="labels.json or dataset.json naming the values")
    diff.add_argument("--png", metavar="OUT.png", help="write the before | after | changed picture here")
    diff.set_defaults(func=run_diff)


# ------------------------------------------------------------------------------ arguments


def _number(text: str, flag: str, what: str, kind=int):
    try:
        value = float(text)
    except ValueError:
        raise MedlsdmError(f"{flag}: {what} must be a number, got '{text}'") from None
    if kind is int:
        if value != int(value):
            raise MedlsdmError(f"{flag}: {what} must be a whole number, got '{text}'")
        return int(value)
    return value


def _parse_edits(args) -> list:
    """(op, flag, strings) in command-line order -> `Edit`s; paste sources are read here."""
    from medlsdm.data.edit import Edit
    from medlsdm.data.io import read_label_map

    raw = args.edits or []
    if not raw:
        raise MedlsdmError("labels edit: give at least one operation (--move, --scale, --dilate, --erode, "
                           "--paste, --replace)")
    shift_kind = float if args.mm else int
    edits: list[Edit] = []
    for op, flag, values in raw:
        if op == "at":
            if not edits or edits[-1].op != "paste" or "shift" in edits[-1].params:
                raise MedlsdmError("--at must follow a --paste (once)")
            shift = tuple(_number(v, flag, "DX DY DZ", shift_kind) for v in values)
            edits[-1] = Edit("paste", {**edits[-1].params, "shift": shift})
            continue
        if op == "paste":
            source = read_label_map(values[0])
            params = {"cls": _number(values[1], flag, "CLASS"), "source": source.array,
                      "source_affine": source.affine, "mm": args.mm}
        elif op == "move":
            params = {"cls": _number(values[0], flag, "CLASS"), "mm": args.mm, "fill": args.fill,
                      "shift": tuple(_number(v, flag, "DX DY DZ", shift_kind) for v in values[1:])}
        elif op == "scale":
            params = {"cls": _number(values[0], flag, "CLASS"), "factor": _number(values[1], flag, "FACTOR", float),
                      "fill": args.fill}
        elif op in ("dilate", "erode"):
            params = {"cls": _number(values[0], flag, "CLASS"), "n": _number(values[1], flag, "N"),
                      "element": args.element}
            if op == "erode":
                params["fill"] = args.fill
        else:  # replace
            params = {"old": _number(values[0], flag, "OLD"), "new": _number(values[1], flag, "NEW")}
        edits.append(Edit(op, params))
    return edits


# ------------------------------------------------------------------------------ describing


def _names(table_arg: str | None, label_path: Path) -> tuple[dict[int, str] | None, str | None]:
    from medlsdm.data.labels import find_label_table, read_label_table

    path = Path(table_arg) if table_arg else find_label_table([label_path.parent, label_path.parent.parent])
    return (read_label_table(path).names, str(path)) if path else (None, None)


def _counts(array) -> dict[int, int]:
    import numpy as np

    values, counts = np.unique(array, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


def _voxel_ml(volume) -> float:
    import numpy as np

    return float(abs(np.linalg.det(volume.affine[:3, :3]))) / 1000.0


def run_show(args) -> int:
    from medlsdm.data.io import read_label_map
    from medlsdm.data.preprocess import volume_in_model_layout
    from medlsdm.viz import label_picture, save_png

    volume = read_label_map(args.label)
    names, table_path = _names(args.table, Path(args.label))
    print(f"label map: {args.label}")
    print(f"shape: {volume.spatial_shape}, spacing (mm): {tuple(round(s, 4) for s in volume.spacing)}")
    if table_path:
        print(f"label table: {table_path}")
    print("class  voxels  volume (mL)  name")
    for value, count in _counts(volume.array).items():
        name = names.get(value, "(not in table)") if names is not None else ""
        print(f"{value:5d}  {count:6d}  {count * _voxel_ml(volume):11.3f}  {name}".rstrip())
    if args.png:
        save_png(args.png, label_picture(volume_in_model_layout(volume)))
        print(f"picture: {args.png}")
    return 0


def run_edit(args) -> int:
    from medlsdm.data.edit import apply_edits
    from medlsdm.data.labels import read_label_table
    from medlsdm.data.io import read_label_map, write_nifti
    from medlsdm.files import owned_target

    table = read_label_table(args.table) if args.table else None
    if args.fill is not None and table is not None and args.fill not in table.values:
        raise MedlsdmError(f"--fill {args.fill}: not a class of {args.table} ({table.values})")
    volume = read_label_map(args.input, table)
    edits = _parse_edits(args)
    with owned_target(args.out, inputs=[args.input], overwrite=args.overwrite):
        result = apply_edits(volume, edits, table)
        write_nifti(args.out, result.array, volume.affine)
    before, after = _counts(volume.array), _counts(result.array)
    print(f"{len(edits)} edit(s): " + "; ".join(e.describe() for e in edits))
    for value in sorted(set(before) | set(after)):
        print(f"  class {value}: {before.get(value, 0)} -> {after.get(value, 0)} voxels")
    print(f"wrote {args.out}")
    return 0


def run_diff(args) -> int:
    import numpy as np

    from medlsdm.data.io import check_same_grid, read_label_map
    from medlsdm.data.preprocess import volume_in_model_layout
    from medlsdm.viz import label_picture, montage, save_png

    a, b = read_label_map(args.before), read_label_map(args.after)
    check_same_grid(a, b, what="labels diff")
    names, _ = _names(args.table, Path(args.before))
    changed = a.array != b.array
    before, after = _counts(a.array), _counts(b.array)
    print(f"{int(changed.sum())} of {changed.size} voxels differ")
    for value in sorted(set(before) | set(after)):
        name = f"  {names.get(value, '')}" if names else ""
        delta = after.get(value, 0) - before.get(value, 0)
        print(f"  class {value}: {before.get(value, 0)} -> {after.get(value, 0)} ({delta:+d}){name}")
    if args.png:
        la, lb = volume_in_model_layout(a), volume_in_model_layout(b)
        moved = la != lb
        # One cut for all panels, through the changed voxels, so before and after are comparable.
        centre = tuple(int(round(c)) for c in np.argwhere(moved).mean(axis=0)) if moved.any() else None
        # Changed voxels in their new class, or their old one where they became background.
        changes = np.where(moved, np.where(lb > 0, lb, la), 0)
        panels = [label_picture(la, centre), label_picture(lb, centre), label_picture(changes, centre)]
        save_png(args.png, montage([panels], titles=["before", "after", "changed voxels"]))
        print(f"picture: {args.png}")
    return 0
