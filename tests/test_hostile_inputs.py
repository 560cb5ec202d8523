"""Hostile and unusual inputs through the commands and readers, each with its exact outcome: a
one-line error naming the file or option with exit status 2 (no traceback), or correct output
with the geometry kept. Every input is built here from small arrays; "bombs" are bombs by
header (a header claiming a huge volume), never by size."""

from __future__ import annotations

import errno
import gzip
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medlsdm.cli import main
from medlsdm.data.io import read_image, read_label_map, read_volume
from medlsdm.errors import DataError, MedlsdmError
from medlsdm.files import LOCK, MARKER, OutputLock

SHAPE = (10, 10, 8)
OBLIQUE = np.array([[0.6062, -0.35, 0.0, -20.0],
                    [0.35, 0.6062, 0.0, 10.0],
                    [0.0, 0.0, 5.0, -30.0],
                    [0.0, 0.0, 0.0, 1.0]])  # 0.7 x 0.7 x 5 mm, rotated 30 degrees in-plane


# ------------------------------------------------------------------------------- helpers


def fails(capsys, argv, *expected) -> str:
    """Run the command; assert exit 2 and a last stderr line 'medlsdm: error: ...' holding every
    `expected` text, and no traceback. Returns that line."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("medlsdm: error: "), err
    for text in expected:
        assert text in lines[-1], lines[-1]
    return lines[-1]


def nifti(path: Path, array, affine=np.eye(4), qform=None, sform=None, pixdim=None, descrip=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.asarray(array), affine)
    if qform is not None:
        image.set_qform(qform[0], code=qform[1])
    if sform is not None:
        image.set_sform(sform[0], code=sform[1])
    if descrip is not None:
        image.header["descrip"] = descrip
    nib.save(image, str(path))
    if pixdim is not None:  # nibabel sets pixdim from the affine on saving: patch the header's bytes
        assert path.suffix == ".nii"
        raw = bytearray(path.read_bytes())
        raw[80:92] = np.asarray(pixdim, dtype="<f4").tobytes()  # pixdim[1:4], header offset 76 + 4
        path.write_bytes(bytes(raw))
    return path


def header_bomb(path: Path, shape, dtype=np.float32) -> Path:
    """A NIfTI whose header claims `shape` but which holds a few bytes of data."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    data = header.binaryblock + b"\0" * 4 + b"\0" * 64
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def label_pair(root: Path, label: np.ndarray, case="case0", affine=np.eye(4)):
    image = (np.random.default_rng(0).normal(100, 10, label.shape) + 20 * label).astype(np.float32)
    nifti(root / "images" / f"{case}.nii.gz", image, affine)
    nifti(root / "labels" / f"{case}.nii.gz", label, affine)


def small_dataset(root: Path, n: int = 3) -> Path:
    for i in range(n):
        label = np.zeros(SHAPE, np.uint8)
        label[2:6, 2:6, 2 + i % 2:5] = 1
        label[6:8, 3:7, 3:6] = 2
        label_pair(root, label, f"case{i}")
    return root


def dicom_series(folder: Path, z_positions, spacing=(0.8, 0.9)) -> Path:
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    rng = np.random.default_rng(0)
    for k, z in enumerate(z_positions):
        sl = sitk.GetImageFromArray((rng.random((6, 5)) * 1000).astype(np.int16))
        sl.SetSpacing(spacing)
        for tag, value in {"0008|0060": "MR", "0020|000d": "1.2.3", "0020|000e": "1.2.3.4",
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0032": f"10\\20\\{z}",
                           "0020|0013": str(k + 1), "0028|0030": f"{spacing[1]}\\{spacing[0]}"}.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(sl)
    return folder


# ------------------------------------------------------- size limits before allocation (bombs)


@pytest.mark.parametrize("name", ["bomb.nii.gz", "bomb.nii"])
def test_nifti_header_bomb_is_refused_before_reading(tmp_path, capsys, name):
    path = header_bomb(tmp_path / name, (4096, 4096, 4096))
    fails(capsys, ["inspect", path], str(path), "header claims a volume of (4096, 4096, 4096)", "256 GiB",
          "over the limit of 4 GiB")


def test_nifti_header_bomb_as_label_map(tmp_path, capsys):
    path = header_bomb(tmp_path / "bomb.nii.gz", (30000, 30000, 300), np.uint8)
    fails(capsys, ["labels", "show", path], str(path), "over the limit")


def test_nrrd_header_bomb(tmp_path, capsys):
    path = tmp_path / "bomb.nrrd"
    path.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 5000 5000 5000\nspacings: 1 1 1\n"
                     b"endian: little\nencoding: gzip\n\n" + gzip.compress(b"\0" * 64))
    fails(capsys, ["inspect", path], str(path), "(5000, 5000, 5000)", "over the limit")


def test_mha_header_bomb(tmp_path, capsys):
    path = tmp_path / "bomb.mha"
    path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 3000 3000 3000\nElementType = MET_SHORT\n"
                     b"ElementSpacing = 1 1 1\nElementDataFile = LOCAL\n" + b"\0" * 64)
    fails(capsys, ["inspect", path], str(path), "(3000, 3000, 3000) voxels x 2 bytes", "over the limit")


def test_dicom_series_size_counts_every_slice(tmp_path, monkeypatch):
    folder = dicom_series(tmp_path / "series", [30 + 2.5 * k for k in range(4)])
    monkeypatch.setenv("MEDLSDM_MAX_VOLUME_GB", str(6 * 5 * 3 * 2 / 2**30))  # three slices' worth
    with pytest.raises(DataError, match=r"\(5, 6, 4\) voxels x 2 bytes"):
        read_volume(folder)


def test_size_limit_is_raised_by_env_and_option(tmp_path, capsys, monkeypatch):
    path = nifti(tmp_path / "v.nii.gz", np.zeros((16, 16, 16), np.float32))  # 16 KiB
    monkeypatch.setenv("MEDLSDM_MAX_VOLUME_GB", "0.00001")
    fails(capsys, ["inspect", path], "over the limit", "MEDLSDM_MAX_VOLUME_GB")
    assert main(["--max-volume-gb", "1", "inspect", str(path)]) == 0
    monkeypatch.setenv("MEDLSDM_MAX_VOLUME_GB", "lots")
    fails(capsys, ["inspect", path], "MEDLSDM_MAX_VOLUME_GB='lots'", "expected a number")


# ------------------------------------------------------------------------------ geometry


@pytest.mark.parametrize("pixdim", [(0.0, 1.0, 1.0), (1.0, -2.0, 1.0), (1.0, 1.0, float("nan"))])
def test_nifti_zero_negative_or_nan_voxel_size_is_refused(tmp_path, capsys, pixdim):
    path = nifti(tmp_path / "v.nii", np.zeros(SHAPE, np.float32), qform=(np.eye(4), 0), sform=(np.eye(4), 0),
                 pixdim=pixdim)
    fails(capsys, ["inspect", path], str(path), "voxel size", "zero, negative or non-finite")


def test_singular_sform_is_refused(tmp_path, capsys):
    affine = np.diag([1.0, 1.0, 0.0, 1.0])
    path = nifti(tmp_path / "v.nii.gz", np.zeros(SHAPE, np.float32), qform=(np.eye(4), 0), sform=(affine, 1))
    fails(capsys, ["inspect", path], str(path), "singular")


def test_nrrd_zero_spacing_is_refused(tmp_path, capsys):
    path = tmp_path / "v.nrrd"
    path.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nspace: left-posterior-superior\n"
                     b"space directions: (0,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\nencoding: raw\n\n"
                     + b"\0" * 128)
    fails(capsys, ["inspect", path], str(path))


def test_qform_sform_disagreement_uses_sform_and_warns(tmp_path, caplog):
    q, s = np.diag([1.0, 1.0, 1.0, 1.0]), np.diag([2.0, 2.0, 2.0, 1.0])
    s[:3, 3] = [5, 0, 0]
    path = nifti(tmp_path / "v.nii.gz", np.zeros(SHAPE, np.float32), qform=(q, 1), sform=(s, 1))
    with caplog.at_level(logging.WARNING):
        vol = read_volume(path)
    np.testing.assert_allclose(vol.affine, s)
    assert "qform and sform disagree (up to 5 mm); using the sform" in caplog.text


def test_no_qform_no_sform_warns_orientation_unknown(tmp_path, caplog):
    path = nifti(tmp_path / "v.nii", np.zeros(SHAPE, np.float32), qform=(np.eye(4), 0), sform=(np.eye(4), 0),
                 pixdim=(0.7, 0.7, 5.0))
    with caplog.at_level(logging.WARNING):
        vol = read_volume(path)
    assert vol.spacing == pytest.approx((0.7, 0.7, 5.0), rel=1e-5)
    assert "neither qform nor sform is set" in caplog.text


def test_dicom_missing_slice_is_refused(tmp_path, capsys):
    folder = dicom_series(tmp_path / "series", [30.0, 32.5, 35.0, 40.0, 42.5])  # 37.5 missing
    fails(capsys, ["inspect", folder], str(folder), "irregular slice spacing", "usual gap 2.5 mm", "also 5 mm")


def test_dicom_duplicate_slice_position_is_refused(tmp_path):
    folder = dicom_series(tmp_path / "series", [30.0, 32.5, 32.5, 35.0])
    with pytest.raises(DataError, match="irregular slice spacing"):
        read_volume(folder)


def test_dicom_regular_series_keeps_its_geometry(tmp_path):
    folder = dicom_series(tmp_path / "series", [30 + 2.5 * k for k in range(5)])
    vol = read_volume(folder)
    expected = np.diag([-0.8, -0.9, 2.5, 1.0])
    expected[:3, 3] = [-10.0, -20.0, 30.0]
    np.testing.assert_allclose(vol.affine, expected, atol=1e-4)
    assert vol.spatial_shape == (5, 6, 5)


def test_oblique_anisotropic_four_modalities_keep_their_grid(tmp_path):
    rng = np.random.default_rng(1)
    paths = [nifti(tmp_path / f"m{c}.nii.gz", rng.normal(size=SHAPE).astype(np.float32), OBLIQUE)
             for c in range(4)]
    vol = read_image(paths, ["t1", "t1ce", "t2", "flair"])
    assert vol.array.shape == (4,) + SHAPE
    np.testing.assert_allclose(vol.affine, OBLIQUE, atol=1e-4)
    assert vol.spacing == pytest.approx((0.7, 0.7, 5.0), abs=1e-3)


def test_modality_on_another_grid_is_refused(tmp_path):
    shifted = OBLIQUE.copy()
    shifted[0, 3] += 10
    a = nifti(tmp_path / "a.nii.gz", np.zeros(SHAPE, np.float32), OBLIQUE)
    b = nifti(tmp_path / "b.nii.gz", np.zeros(SHAPE, np.float32), shifted)
    with pytest.raises(DataError, match="different voxel-to-world affines"):
        read_image([a, b])


def test_lps_nrrd_becomes_ras(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16))
    image.SetSpacing((0.7, 0.7, 5.0))
    image.SetOrigin((10.0, 20.0, 30.0))
    sitk.WriteImage(image, str(tmp_path / "v.nrrd"))
    vol = read_volume(tmp_path / "v.nrrd")
    np.testing.assert_allclose(vol.affine[:3, 3], [-10.0, -20.0, 30.0])
    np.testing.assert_allclose(np.diag(vol.affine)[:3], [-0.7, -0.7, 5.0])


# --------------------------------------------------------------------------- label values


@pytest.mark.parametrize("value,dtype", [(300, np.uint16), (65539, np.uint32), (4, np.uint8)])
def test_label_values_are_kept_exactly(tmp_path, value, dtype):
    label = np.zeros(SHAPE, np.int32)
    label[2:4, 2:4, 2:4] = value
    label[5, 5, 5] = 1
    vol = read_label_map(nifti(tmp_path / "l.nii.gz", label, OBLIQUE))
    assert vol.array.dtype == dtype
    assert sorted(np.unique(vol.array).tolist()) == [0, 1, value]  # 65539 is not class 3
    np.testing.assert_allclose(vol.affine, OBLIQUE, atol=1e-4)


def test_label_value_beyond_32_bits_is_named(tmp_path, capsys):
    label = np.zeros(SHAPE, np.int64)
    label[1, 1, 1] = 2**33 + 3
    path = tmp_path / "l.nii.gz"
    image = nib.Nifti1Image(label, np.eye(4), dtype=np.int64)
    nib.save(image, str(path))
    fails(capsys, ["labels", "show", path], str(path), f"label values [{2**33 + 3}] do not fit in 32 bits")


@pytest.mark.parametrize("value,text", [(-1, "negative values"), (1.5, "non-integer values"),
                                        (float("nan"), "NaN or Inf")])
def test_bad_label_values_are_named(tmp_path, capsys, value, text):
    label = np.zeros(SHAPE, np.float32)
    label[1, 1, 1] = value
    path = nifti(tmp_path / "l.nii.gz", label)
    fails(capsys, ["labels", "show", path], str(path), text)


def test_label_map_with_a_wide_value_through_prepare_is_refused_not_wrapped(tmp_path, capsys):
    data = tmp_path / "data"
    label = np.zeros(SHAPE, np.int32)
    label[2:5, 2:5, 2:5] = 65539
    label_pair(data, label)
    fails(capsys, ["prepare", data, "--out", tmp_path / "prep", "--no-progress"], "case0.nii.gz",
          "prepared label values must be below 256 (max 65539)")
    assert not (tmp_path / "prep").exists()


# ----------------------------------------------------------------------------- corrupt files


@pytest.mark.parametrize("name,content", [("empty.nii.gz", b""), ("random.nii", b"\x01" * 400),
                                          ("random.nrrd", b"NRRD0004\nnot a header\n"),
                                          ("text.mha", b"hello")])
def test_corrupt_files_give_one_line(tmp_path, capsys, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    fails(capsys, ["inspect", path], str(path), "cannot read")


def test_truncated_nifti_gives_one_line(tmp_path, capsys):
    path = nifti(tmp_path / "whole.nii.gz", np.random.default_rng(0).random((16, 16, 16)).astype(np.float32))
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(path.read_bytes()[:200])
    fails(capsys, ["inspect", cut], str(cut), "cannot read")


def test_two_dimensional_image_is_refused(tmp_path, capsys):
    path = nifti(tmp_path / "flat.nii.gz", np.zeros((8, 8), np.float32))
    fails(capsys, ["inspect", path], str(path), "expected a 3D volume")


def test_pickled_npy_in_a_prepared_dataset_is_refused(tmp_path, capsys):
    from medlsdm.data.dataset import PreparedDataset

    import prepared_data

    root = prepared_data.make_prepared_dataset(tmp_path / "prep", n_train=2, n_val=0, shape=(8, 8, 8))
    marker = tmp_path / "ran"
    np.save(root / "images" / "case000.npy", np.array([_Payload(str(marker))], dtype=object), allow_pickle=True)
    with pytest.raises(MedlsdmError, match=r"case000.npy: cannot read as an array \(holds pickled Python objects"):
        PreparedDataset(root, split="train")[0]
    fails(capsys, ["inspect", root / "images" / "case000.npy"], "case000.npy")
    assert not marker.exists()


class _Payload:
    """Unpickling this object would create a file: it must never happen."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


# ------------------------------------------------------------------------ owned outputs


def test_prepare_into_the_folder_above_its_input_is_refused_and_deletes_nothing(tmp_path, capsys):
    ds = small_dataset(tmp_path / "DATA" / "ds")
    before = sorted(p.relative_to(ds) for p in ds.rglob("*"))
    fails(capsys, ["prepare", ds, "--out", tmp_path / "DATA", "--no-progress"], "contains the input", "--overwrite")
    assert sorted(p.relative_to(ds) for p in ds.rglob("*")) == before


def test_prepare_above_its_input_with_overwrite_keeps_the_input(tmp_path):
    ds = small_dataset(tmp_path / "DATA" / "ds")
    before = {p.relative_to(ds): p.read_bytes() for p in ds.rglob("*") if p.is_file()}
    assert main(["prepare", str(ds), "--out", str(tmp_path / "DATA"), "--no-progress", "--overwrite"]) == 0
    assert {p.relative_to(ds): p.read_bytes() for p in ds.rglob("*") if p.is_file()} == before
    assert (tmp_path / "DATA" / "manifest.json").is_file() and (tmp_path / "DATA" / "images").is_dir()
    assert not list((tmp_path / "DATA").glob(".tmp-*"))


@pytest.mark.parametrize("where", ["same", "inside"])
def test_prepare_into_its_input_is_refused(tmp_path, capsys, where):
    ds = small_dataset(tmp_path / "ds")
    out = ds if where == "same" else ds / "prepared"
    fails(capsys, ["prepare", ds, "--out", out, "--no-progress", "--overwrite"], "inside the input folder")
    assert not (ds / "manifest.json").exists() and not (ds / "prepared").exists()


def test_prepare_refuses_an_existing_file(tmp_path, capsys):
    ds = small_dataset(tmp_path / "ds")
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    fails(capsys, ["prepare", ds, "--out", target, "--no-progress"], "exists and is a file", "--overwrite")
    assert target.read_text() == "keep me"


def test_prepare_refuses_a_foreign_folder_and_keeps_it(tmp_path, capsys):
    ds = small_dataset(tmp_path / "ds")
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("months of work")
    fails(capsys, ["prepare", ds, "--out", foreign, "--no-progress"], "folder is not empty",
          "not created by medlsdm prepare", "chapter1.tex")
    assert [p.name for p in foreign.iterdir()] == ["chapter1.tex"]


def test_prepare_reruns_into_its_own_folder_and_replaces_only_its_entries(tmp_path):
    ds = small_dataset(tmp_path / "ds")
    out = tmp_path / "prep"
    assert main(["prepare", str(ds), "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / MARKER).read_text())["command"] == "prepare"
    (out / "notes.md").write_text("mine")
    (out / "images" / "stale.npy").write_bytes(b"old")
    assert main(["prepare", str(ds), "--out", str(out), "--no-progress"]) == 0
    assert (out / "notes.md").read_text() == "mine"
    assert not (out / "images" / "stale.npy").exists()  # images/ was replaced as a whole
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "../ds"  # relative to the manifest's folder
    assert manifest["cases"][0]["record"]["source"]["label"] == "labels/case0.nii.gz"
    assert str(tmp_path) not in (out / "manifest.json").read_text()
    assert not (out / LOCK).exists() and not list(out.glob(".tmp-*"))


def test_second_concurrent_writer_fails_fast(tmp_path, capsys):
    ds = small_dataset(tmp_path / "ds")
    out = tmp_path / "prep"
    out.mkdir()
    held = OutputLock(out / LOCK, out)  # another process writing there
    try:
        fails(capsys, ["prepare", ds, "--out", out, "--no-progress"], "another medlsdm command is writing there")
    finally:
        held.release()
    assert main(["prepare", str(ds), "--out", str(out), "--no-progress"]) == 0


def test_output_under_a_file_gives_one_line(tmp_path, capsys):
    ds = small_dataset(tmp_path / "ds")
    (tmp_path / "afile").write_text("x")
    fails(capsys, ["prepare", ds, "--out", tmp_path / "afile" / "sub", "--no-progress"], "afile",
          "cannot create output folder")


def test_labels_edit_refuses_existing_output_and_never_replaces_its_input(tmp_path, capsys):
    label = np.zeros(SHAPE, np.uint8)
    label[3:6, 3:6, 3:6] = 1
    src = nifti(tmp_path / "case.nii.gz", label, OBLIQUE, descrip="Doe^John 1970-01-01")
    original = src.read_bytes()
    out = tmp_path / "edited.nii.gz"
    out.write_bytes(b"precious")
    fails(capsys, ["labels", "edit", "--in", src, "--out", out, "--dilate", "1", "1"], "edited.nii.gz: exists", "--overwrite")
    assert out.read_bytes() == b"precious"
    fails(capsys, ["labels", "edit", "--in", src, "--out", src, "--dilate", "1", "1", "--overwrite"],
          "would replace the input")
    assert src.read_bytes() == original
    assert main(["labels", "edit", "--in", str(src), "--out", str(out), "--dilate", "1", "1", "--overwrite"]) == 0
    edited = nib.load(str(out))
    np.testing.assert_allclose(edited.affine, OBLIQUE, atol=1e-4)
    assert bytes(edited.header["descrip"]).strip(b"\0") == b""  # no input header field copied


def test_evaluate_refuses_to_write_into_its_input(tmp_path, capsys):
    real = small_dataset(tmp_path / "real")
    syn = tmp_path / "syn"
    syn.mkdir()
    for i in range(3):
        (syn / f"case{i}.nii.gz").write_bytes((real / "images" / f"case{i}.nii.gz").read_bytes())
    fails(capsys, ["evaluate", "quality", "--real", real, "--synthetic", syn, "--out", syn, "--metrics", "psnr"],
          "is the input")
    fails(capsys, ["evaluate", "quality", "--real", real, "--synthetic", syn, "--out", real / "eval",
                   "--metrics", "psnr"], "is inside the input")


@pytest.mark.parametrize("how", ["shift", "rotate"])
def test_quality_mask_must_lie_on_the_image_grid(tmp_path, capsys, how):
    real = small_dataset(tmp_path / "real")
    moved = np.eye(4)
    if how == "shift":
        moved[0, 3] = 10.0
    else:
        c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
        moved[:2, :2] = [[c, -s], [s, c]]
    label_file = real / "labels" / "case0.nii.gz"
    nifti(label_file, np.asarray(nib.load(str(label_file)).dataobj), moved)
    syn = tmp_path / "syn"
    syn.mkdir()
    (syn / "case0.nii.gz").write_bytes((real / "images" / "case0.nii.gz").read_bytes())
    fails(capsys, ["evaluate", "quality", "--real", real, "--synthetic", syn, "--out", tmp_path / "eval",
                   "--metrics", "psnr", "--mask", "foreground"], "case0.nii.gz", "different affines")


# --------------------------------------------------------------------- environment errors


def test_disk_full_names_the_file(tmp_path, capsys, monkeypatch):
    ds = small_dataset(tmp_path / "ds")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    line = fails(capsys, ["prepare", ds, "--out", tmp_path / "prep", "--no-progress"], "no space left on device")
    assert ".npy" in line
    assert not (tmp_path / "prep").exists()


def test_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    path = nifti(tmp_path / "v.nii.gz", np.zeros(SHAPE, np.float32))

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr("medlsdm.data.io._read_nifti", no_memory)
    fails(capsys, ["inspect", path], "out of memory")


def test_unreadable_input_names_the_file(tmp_path, capsys, monkeypatch):
    path = nifti(tmp_path / "v.nii.gz", np.zeros(SHAPE, np.float32))

    def denied(p):
        raise PermissionError(errno.EACCES, "Permission denied", str(p))

    monkeypatch.setattr("medlsdm.data.io._read_nifti", denied)
    fails(capsys, ["inspect", path], str(path), "Permission denied")


def test_debug_shows_the_traceback(tmp_path, capsys):
    path = header_bomb(tmp_path / "bomb.nii.gz", (4096, 4096, 4096))
    assert main(["--debug", "inspect", str(path)]) == 2
    assert "Traceback" in capsys.readouterr().err


# ------------------------------------------------------------------------------- configs


def test_config_value_of_the_wrong_type_names_key_type_and_value(tmp_path, capsys):
    ds = small_dataset(tmp_path / "ds")
    fails(capsys, ["prepare", ds, "--out", tmp_path / "p", "--set", "split.seed=abc"],
          "config key 'split.seed' expects an integer, got 'abc' (str)")
    fails(capsys, ["prepare", ds, "--out", tmp_path / "p", "--set", "antialias=3"],
          "config key 'antialias' expects true or false, got 3 (int)")


def test_misspelt_top_level_section_is_refused_with_a_suggestion(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("autoencoder:\n  model:\n    latent_channels: 4\ntrainr:\n  max_steps: 10\n")
    fails(capsys, ["train", "autoencoder", "--data", tmp_path / "none", "--out", tmp_path / "run", "--config", cfg],
          "unknown top-level key 'trainr' (did you mean 'trainer' inside 'autoencoder:'?)")
    cfg.write_text("prepare:\n  shape: [8, 8, 8]\nautoencodr:\n  model: {}\n")
    fails(capsys, ["prepare", tmp_path, "--out", tmp_path / "p", "--config", cfg],
          "unknown top-level key 'autoencodr' (did you mean 'autoencoder'?)")
    assert not (tmp_path / "run").exists()


def test_misspelt_nested_key_gets_the_nearest_valid_one(tmp_path, capsys):
    ds = small_dataset(tmp_path / "ds")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("prepare:\n  split:\n    sead: 3\n")
    fails(capsys, ["prepare", ds, "--out", tmp_path / "p", "--config", cfg],
          "unknown config key 'prepare.split.sead' (did you mean 'seed'?)")
    assert not (tmp_path / "p").exists()


def test_config_values_of_the_right_type_still_load(tmp_path):
    from medlsdm.config import stage_config
    from medlsdm.training.runner import TRAINER_DEFAULTS

    cfg = stage_config({"trainer": dict(TRAINER_DEFAULTS), "optim": {"lr": 1e-4}}, None,
                       ["optim.lr=3e-5", "trainer.devices=auto", "trainer.precision=32", "trainer.max_minutes=0.5"])
    assert cfg["optim"]["lr"] == pytest.approx(3e-5) and cfg["trainer"]["devices"] == "auto"


# --------------------------------------------------------------------------- checkpoints


def _checkpoint(path: Path, step: int) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {"w": torch.ones(3)}}, path)
    return path


@pytest.mark.parametrize("damage", ["truncated", "empty", "pickled"])
def test_unreadable_last_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    import torch

    from medlsdm.training.runner import resume_checkpoint

    ckpts = tmp_path / "checkpoints"
    last = _checkpoint(ckpts / "last.ckpt", 40)
    _checkpoint(ckpts / "previous.ckpt", 30)
    marker = tmp_path / "ran"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "empty":
        last.write_bytes(b"")
    else:
        torch.save({"global_step": 99, "payload": _Payload(str(marker))}, last)
    with caplog.at_level(logging.WARNING):
        chosen = resume_checkpoint(ckpts)
    assert chosen == ckpts / "last.ckpt"
    assert torch.load(chosen, weights_only=True)["global_step"] == 30
    assert "last.ckpt cannot be read" in caplog.text and "resuming from previous.ckpt (step 30) instead" in caplog.text
    assert (ckpts / "last.corrupt.ckpt").is_file() and not (ckpts / "previous.ckpt").exists()
    assert not marker.exists()


def test_unreadable_checkpoint_without_a_good_one_is_a_one_line_error(tmp_path):
    import torch

    from medlsdm.cli import user_error
    from medlsdm.training.runner import resume_checkpoint

    marker = tmp_path / "ran"
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({"global_step": 5, "payload": _Payload(str(marker))}, ckpts / "last.ckpt")
    with pytest.raises(MedlsdmError) as info:
        resume_checkpoint(ckpts)
    message = user_error(info.value)
    assert "last.ckpt cannot be read (it holds Python objects, refused" in message
    assert "no earlier good checkpoint" in message and "\n" not in message
    assert not marker.exists()
    assert resume_checkpoint(tmp_path / "none") is None  # a new run starts at step 0, as it should


def test_training_into_a_foreign_folder_is_refused(tmp_path):
    from medlsdm.training.runner import prepare_run_dir

    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "paper.pdf").write_bytes(b"%PDF")
    with pytest.raises(MedlsdmError, match="folder is not empty and not created by medlsdm train"):
        prepare_run_dir(foreign, {"trainer": {}, "data_dir": str(tmp_path / "data")})
    with pytest.raises(MedlsdmError, match="is inside the input"):
        prepare_run_dir(tmp_path / "data" / "run", {"trainer": {}, "data_dir": str(tmp_path / "data")})
    # asked for (`train ... --overwrite`): the run goes in beside what the folder holds, which stays
    run_dir, resume = prepare_run_dir(foreign, {"trainer": {}, "data_dir": str(tmp_path / "data")}, overwrite=True)
    assert resume is None and (foreign / "config.yaml").is_file() and (foreign / "paper.pdf").read_bytes() == b"%PDF"


# ---------------------------------------------------------------------------- provenance


def test_synthetic_volumes_say_so_without_identity(tmp_path):
    from medlsdm.data.io import (SYNTHETIC_DESCRIP, is_synthetic, provenance_path, synthetic_provenance,
                                 write_synthetic_nifti)

    model = tmp_path / "models" / "brats-lsdm"
    model.mkdir(parents=True)
    (model / "diffusion.safetensors").write_bytes(b"weights")
    out = tmp_path / "syn" / "BraTS-0042_sample1.nii.gz"
    provenance = synthetic_provenance(model, "ddim", 50, 2.5, 7, "/data/patients/BraTS-0042.nii.gz", 1)
    sidecar = write_synthetic_nifti(out, np.zeros(SHAPE, np.float32), OBLIQUE, provenance)
    assert sidecar == provenance_path(out) == tmp_path / "syn" / "BraTS-0042_sample1.json"
    data = json.loads(sidecar.read_text())
    assert data["synthetic"] is True and data["label_map_case_id"] == "BraTS-0042" and data["seed"] == 7
    assert data["model"]["name"] == "brats-lsdm" and len(data["model"]["weights_sha256"]) == 64
    assert data["sampler"] == {"name": "ddim", "steps": 50, "guidance": 2.5}
    assert str(tmp_path) not in sidecar.read_text() and "/data/patients" not in sidecar.read_text()
    image = nib.load(str(out))
    assert is_synthetic(out) and bytes(image.header["descrip"]).rstrip(b"\0").decode() == SYNTHETIC_DESCRIP
    np.testing.assert_allclose(image.affine, OBLIQUE, atol=1e-4)
    assert not is_synthetic(nifti(tmp_path / "real.nii.gz", np.zeros(SHAPE, np.float32)))


def test_types_are_those_of_the_documented_defaults_not_of_a_preset(tmp_path):
    from medlsdm.config import stage_config
    from medlsdm.data.prepare import PREPARE_DEFAULTS

    # The brats preset sets a spacing list; null (keep the file's spacing) is still a valid value.
    cfg = stage_config(PREPARE_DEFAULTS, "brats", ["spacing=null"], section="prepare")
    assert cfg["spacing"] is None


def test_disk_full_while_writing_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    import builtins

    import torch

    from medlsdm.training.runner import AtomicCheckpointIO

    last = _checkpoint(tmp_path / "checkpoints" / "last.ckpt", 10)
    good = last.read_bytes()
    real_open = builtins.open

    def full_disk(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if "w" in mode and ".tmp-" in str(file):
            def write(data):
                raise OSError(errno.ENOSPC, "No space left on device")
            handle.write = write
        return handle

    monkeypatch.setattr(builtins, "open", full_disk)
    with pytest.raises(MedlsdmError, match=r"last.ckpt: cannot write \(no space left on device\)"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 12, "w": torch.ones(2)}, last)
    monkeypatch.undo()
    assert last.read_bytes() == good and not list(last.parent.glob(".tmp-*"))


def test_out_of_memory_from_torch_is_a_user_error():
    from medlsdm.cli import user_error

    text = user_error(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 TB"))
    assert text.startswith("out of memory (DefaultCPUAllocator") and "smaller" in text
    assert user_error(RuntimeError("shape mismatch in a bug")) is None  # a bug keeps its traceback


def test_second_training_into_a_locked_run_dir_fails_fast(tmp_path):
    from medlsdm.training.runner import prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    held = OutputLock(run / LOCK, run)  # another training process
    try:
        with pytest.raises(MedlsdmError, match="another medlsdm command is writing there"):
            prepare_run_dir(run, {"trainer": {}, "data_dir": str(tmp_path / "data")})
    finally:
        held.release()
