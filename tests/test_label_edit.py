"""Label-map editing: each operation on tiny maps with exact expected voxels, the edit list, and
the `medlsdm labels` command (files, affines, one-line errors)."""

import numpy as np
import pytest

from medlsdm.cli import main
from medlsdm.data.edit import (Edit, apply_edits, dilate_class, erode_class, move_class, paste_class,
                               replace_class, scale_class, surrounding_class)
from medlsdm.data.io import Volume, read_volume, write_nifti
from medlsdm.data.labels import LabelTable
from medlsdm.errors import DataError

EYE = np.eye(4)


def cube(shape=(12, 12, 12), lo=4, hi=7, value=1, background=0):
    label = np.full(shape, background, dtype=np.uint8)
    label[lo:hi, lo:hi, lo:hi] = value
    return label


def voxels(label, cls):
    return {tuple(v) for v in np.argwhere(label == cls).tolist()}


def box(lo, hi):
    return {(i, j, k) for i in range(lo[0], hi[0]) for j in range(lo[1], hi[1]) for k in range(lo[2], hi[2])}


# ------------------------------------------------------------------------------- operations


def test_move_lands_exactly_and_vacated_voxels_take_the_surrounding_class():
    label = np.full((12, 12, 12), 2, dtype=np.uint8)   # the cube sits inside tissue 2
    label[:, :, :2] = 0
    label[4:7, 4:7, 4:7] = 1
    moved = move_class(label, EYE, 1, (2, 0, 0))
    assert voxels(moved, 1) == box((6, 4, 4), (9, 7, 7))
    assert np.all(moved[4:6, 4:7, 4:7] == 2)            # left behind: tissue, not background
    assert (moved == 0).sum() == (label == 0).sum()
    assert np.all(move_class(label, EYE, 1, (2, 0, 0), fill=0)[4:6, 4:7, 4:7] == 0)


def test_move_in_millimetres_goes_through_the_affine():
    affine = np.diag([-2.0, 1.0, 3.0, 1.0])             # i runs right-to-left at 2 mm, k at 3 mm
    moved = move_class(cube(), affine, 1, (4.0, 0.0, 6.0), mm=True)   # +4 mm right, +6 mm superior
    assert voxels(moved, 1) == box((2, 4, 6), (5, 7, 9))


def test_move_beyond_the_edge_drops_the_outside_part_and_refuses_to_lose_the_class():
    moved = move_class(cube(), EYE, 1, (0, 0, 7))
    assert voxels(moved, 1) == box((4, 4, 11), (7, 7, 12))
    with pytest.raises(DataError, match="leave the grid"):
        move_class(cube(), EYE, 1, (0, 12, 0))
    with pytest.raises(DataError, match="whole numbers"):
        move_class(cube(), EYE, 1, (0.5, 0, 0))


def test_dilate_grows_by_the_structuring_element():
    point = cube(lo=5, hi=6)
    assert (dilate_class(point, EYE, 1, 1) == 1).sum() == 7            # 6-connected cross
    assert (dilate_class(point, EYE, 1, 2) == 1).sum() == 33           # lattice points with |x|^2 <= 4
    assert (dilate_class(point, EYE, 1, 1, element="cube") == 1).sum() == 27
    two = cube(value=2)
    two[5, 5, 5] = 1
    assert np.array_equal(dilate_class(two, EYE, 1, 1), np.where(dilate_class(point, EYE, 1, 1) == 1, 1, two))


def test_erode_then_dilate_of_a_big_cube():
    label = cube(lo=3, hi=9)                                            # 6^3
    eroded = erode_class(label, EYE, 1, 1, element="cube")
    assert voxels(eroded, 1) == box((4, 4, 4), (8, 8, 8))
    assert np.array_equal(dilate_class(eroded, EYE, 1, 1, element="cube"), label)
    # With the ball (cross) the cube comes back without its 12 edges (4 voxels each) and 8 corners.
    opened = dilate_class(erode_class(label, EYE, 1, 1), EYE, 1, 1)
    assert (opened == 1).sum() == 6 ** 3 - 12 * 4 - 8


def test_eroded_voxels_take_the_surrounding_class():
    label = cube(shape=(12, 12, 12), lo=1, hi=11, value=3)
    label[3:9, 3:9, 3:9] = 1
    assert surrounding_class(label, label == 1) == 3
    eroded = erode_class(label, EYE, 1, 1, element="cube")
    assert voxels(eroded, 1) == box((4, 4, 4), (8, 8, 8))
    assert (eroded == 3).sum() == (label == 3).sum() + 6 ** 3 - 4 ** 3


def test_scale_about_the_centroid():
    doubled = scale_class(cube(lo=4, hi=7), EYE, 1, 2.0)                # 3^3 centred on 5
    assert voxels(doubled, 1) == box((2, 2, 2), (8, 8, 8))              # extents 3 -> 6
    halved = scale_class(cube(lo=3, hi=9), EYE, 1, 0.5)                 # 6^3 centred on 5.5
    assert voxels(halved, 1) == box((4, 4, 4), (7, 7, 7))
    assert (halved == 0).sum() == 12 ** 3 - 27


def test_paste_from_another_map_same_grid_and_resampled():
    target = np.zeros((12, 12, 12), dtype=np.uint8)
    target[0] = 2
    source = cube(lo=2, hi=4, value=2)
    pasted = paste_class(target, EYE, 2, source, EYE, shift=(5, 0, 1))
    assert voxels(pasted, 2) == box((0, 0, 0), (1, 12, 12)) | box((7, 2, 3), (9, 4, 5))
    # A coarser source (2 mm voxels, 6^3) covering the same field: its voxel 2 spans 3.5..5.5 mm.
    coarse = np.zeros((6, 6, 6), dtype=np.uint8)
    coarse[2, 2, 2] = 2
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = 0.5
    resampled = paste_class(np.zeros((12, 12, 12), np.uint8), EYE, 2, coarse, affine)
    assert voxels(resampled, 2) == box((4, 4, 4), (6, 6, 6))
    with pytest.raises(DataError, match="not in the pasted"):
        paste_class(target, EYE, 5, source, EYE)


def test_replace():
    label = cube()
    out = replace_class(label, EYE, 1, 3)
    assert voxels(out, 3) == voxels(label, 1) and not (out == 1).any()
    assert label.max() == 1  # pure: the input is untouched


def test_apply_edits_runs_in_order_and_checks_classes():
    volume = Volume(cube(), np.diag([2.0, 2.0, 2.0, 1.0]), path="case.nii.gz")
    edits = [Edit("move", {"cls": 1, "shift": (1, 0, 0)}), Edit("dilate", {"cls": 1, "n": 1})]
    out = apply_edits(volume, edits)
    assert (out.array == 1).sum() == 27 + 6 * 9 and voxels(out.array, 1) >= box((5, 4, 4), (8, 7, 7))
    assert np.array_equal(out.affine, volume.affine)
    with pytest.raises(DataError, match=r"case.nii.gz: replace .*\[5\] not in the input"):
        apply_edits(volume, [Edit("replace", {"old": 1, "new": 5})])
    table = LabelTable({0: "background", 1: "a", 5: "b"})
    assert voxels(apply_edits(volume, [Edit("replace", {"old": 1, "new": 5})], table).array, 5) == voxels(cube(), 1)
    with pytest.raises(DataError, match="class 4 is not in the label map"):
        apply_edits(volume, [Edit("erode", {"cls": 4, "n": 1})])


# ---------------------------------------------------------------------------------- command


@pytest.fixture
def label_file(tmp_path):
    affine = np.array([[0, 0, 1.5, -10], [-1.0, 0, 0, 20], [0, 2.0, 0, 5], [0, 0, 0, 1]])
    label = np.full((10, 10, 10), 2, dtype=np.uint8)
    label[3:6, 3:6, 3:6] = 1
    path = tmp_path / "case.nii.gz"
    write_nifti(path, label, affine)
    return path, label, affine


def test_cli_edit_writes_the_result_with_the_input_affine(label_file, tmp_path, capsys):
    path, label, affine = label_file
    out = tmp_path / "edited.nii.gz"
    assert main(["labels", "edit", "--in", str(path), "--out", str(out), "--move", "1", "2", "0", "-1",
                 "--replace", "2", "0", "--dilate", "1", "1"]) == 0
    edited = read_volume(out)
    np.testing.assert_allclose(edited.affine, affine)
    expected = np.zeros_like(label)
    expected[5:8, 3:6, 2:5] = 1
    expected = dilate_class(expected, affine, 1, 1)
    assert np.array_equal(edited.array, expected)
    assert "class 1: 27 -> " in capsys.readouterr().out


def test_cli_paste_at_and_mm(label_file, tmp_path):
    path, label, affine = label_file
    source = tmp_path / "source.nii.gz"
    write_nifti(source, np.where(label == 1, 1, 0).astype(np.uint8), affine)
    out = tmp_path / "pasted.nii.gz"
    # +3 mm along world x is +2 voxels along k (column 2 of the affine holds 1.5 mm in x).
    assert main(["labels", "edit", "--in", str(path), "--out", str(out), "--mm",
                 "--paste", str(source), "1", "--at", "3", "0", "0"]) == 0
    result = read_volume(out).array
    assert voxels(result, 1) == box((3, 3, 3), (6, 6, 8))


@pytest.mark.parametrize("args, message", [
    (["--replace", "1", "7"], "class(es) [7] not in the input label map"),
    (["--erode", "9", "1"], "class 9 is not in the label map"),
    (["--at", "1", "0", "0"], "--at must follow a --paste"),
    (["--scale", "1", "x"], "--scale: FACTOR must be a number"),
    ([], "give at least one operation"),
])
def test_cli_edit_errors_are_one_line_exit_2(label_file, tmp_path, capsys, args, message):
    path, _, _ = label_file
    out = tmp_path / "edited.nii.gz"
    assert main(["labels", "edit", "--in", str(path), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("medlsdm: error:")
    assert not out.exists()


def test_cli_table_allows_new_classes_and_diff_refuses_other_grids(label_file, tmp_path, capsys):
    path, label, affine = label_file
    table = tmp_path / "table.json"
    table.write_text('{"0": "background", "1": "tumour", "2": "tissue", "7": "new"}')
    out = tmp_path / "edited.nii.gz"
    assert main(["labels", "edit", "--in", str(path), "--out", str(out), "--table", str(table),
                 "--replace", "1", "7"]) == 0
    assert voxels(read_volume(out).array, 7) == voxels(label, 1)
    other = tmp_path / "other.nii.gz"
    write_nifti(other, label[:8], affine)
    assert main(["labels", "diff", str(path), str(other)]) == 2
    assert "different grids" in capsys.readouterr().err


def test_cli_show_and_diff_print_counts_and_write_pictures(label_file, tmp_path, capsys):
    path, label, _ = label_file
    (tmp_path / "labels.json").write_text('{"0": "background", "1": "tumour", "2": "tissue"}')
    png = tmp_path / "show.png"
    assert main(["labels", "show", str(path), "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert "27" in text and "tumour" in text and str(10 ** 3 - 27) in text
    assert png.stat().st_size > 0
    out, diff_png = tmp_path / "moved.nii.gz", tmp_path / "diff.png"
    assert main(["labels", "edit", "--in", str(path), "--out", str(out), "--move", "1", "1", "0", "0"]) == 0
    assert main(["labels", "diff", str(path), str(out), "--png", str(diff_png)]) == 0
    text = capsys.readouterr().out
    assert "18 of 1000 voxels differ" in text               # 9 voxels left, 9 entered
    from PIL import Image

    assert Image.open(diff_png).size[0] > Image.open(png).size[0]
