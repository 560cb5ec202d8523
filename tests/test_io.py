import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medlsdm.data.io import read_image, read_label_map, read_volume, write_nifti
from medlsdm.errors import DataError

OBLIQUE = np.array([[0.0, -2.0, 0.3, 10.0], [1.5, 0.0, 0.0, -3.0], [0.0, 0.2, 3.0, 4.0], [0, 0, 0, 1.0]])


def test_nifti_round_trip_keeps_array_affine_and_sets_both_forms(tmp_path):
    array = np.random.rand(5, 6, 7).astype(np.float32)
    write_nifti(tmp_path / "x.nii.gz", array, OBLIQUE)
    vol = read_volume(tmp_path / "x.nii.gz")
    assert np.allclose(vol.array, array, atol=1e-5) and np.allclose(vol.affine, OBLIQUE, atol=1e-5)
    header = nib.load(str(tmp_path / "x.nii.gz")).header
    assert int(header["qform_code"]) > 0 and int(header["sform_code"]) > 0
    assert np.allclose(nib.load(str(tmp_path / "x.nii.gz")).get_qform(), nib.load(str(tmp_path / "x.nii.gz")).get_sform(), atol=1e-4)
    multi = np.random.rand(2, 4, 5, 6).astype(np.float32)
    write_nifti(tmp_path / "m.nii.gz", multi, np.eye(4))
    assert read_volume(tmp_path / "m.nii.gz").array.shape == (2, 4, 5, 6)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_formats_are_converted_from_lps_to_ras(tmp_path, suffix):
    array = np.random.rand(5, 6, 7).astype(np.float32)
    image = sitk.GetImageFromArray(np.transpose(array, (2, 1, 0)))
    image.SetSpacing((2.0, 1.5, 3.0))
    image.SetOrigin((1.0, 2.0, 3.0))
    image.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    sitk.WriteImage(image, str(tmp_path / f"x{suffix}"))
    sitk.WriteImage(image, str(tmp_path / "ref.nii.gz"))  # ITK's own NIfTI writer converts LPS -> RAS
    vol, ref = read_volume(tmp_path / f"x{suffix}"), nib.load(str(tmp_path / "ref.nii.gz"))
    assert np.allclose(vol.array, array)
    assert np.allclose(vol.affine, ref.affine, atol=1e-5)
    assert vol.spacing == pytest.approx((2.0, 1.5, 3.0))
    # LPS origin (1, 2, 3) is RAS (-1, -2, 3). The direction matrix is row-major, so voxel
    # axis i (its first column) runs along LPS -y, which is RAS +A.
    np.testing.assert_allclose(vol.affine[:3, 3], [-1.0, -2.0, 3.0])
    np.testing.assert_allclose(vol.affine[:3, 0], [0.0, 2.0, 0.0])
    # Read -> write NIfTI -> read keeps array and affine.
    write_nifti(tmp_path / "again.nii.gz", vol.array, vol.affine)
    again = read_volume(tmp_path / "again.nii.gz")
    np.testing.assert_allclose(again.array, vol.array, atol=1e-5)
    np.testing.assert_allclose(again.affine, vol.affine, atol=1e-5)


def test_multichannel_itk_and_nifti_vector_images_are_channels_first(tmp_path):
    array = np.random.rand(5, 6, 7, 2).astype(np.float32)  # (k, j, i, c) as ITK stores it
    image = sitk.GetImageFromArray(array, isVector=True)
    sitk.WriteImage(image, str(tmp_path / "v.mha"))
    sitk.WriteImage(image, str(tmp_path / "v.nii.gz"))  # NIfTI vector layout (X, Y, Z, 1, C)
    expected = np.transpose(array, (3, 2, 1, 0))
    for name in ("v.mha", "v.nii.gz"):
        vol = read_volume(tmp_path / name)
        assert vol.num_channels == 2 and vol.spatial_shape == (7, 6, 5)
        np.testing.assert_allclose(vol.array, expected)


def test_dicom_series_folder(tmp_path):
    array = (np.random.rand(4, 6, 5) * 1000).astype(np.int16)  # (z, y, x) as ITK stores it
    folder = tmp_path / "series"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array.shape[0]):
        sl = sitk.GetImageFromArray(array[k])
        sl.SetSpacing((0.8, 0.9))
        for tag, value in {"0008|0060": "MR", "0020|000d": "1.2.3", "0020|000e": "1.2.3.4",
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0032": f"10\\20\\{30 + 2.5 * k}",
                           "0020|0013": str(k + 1), "0028|0030": "0.9\\0.8"}.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(sl)
    vol = read_volume(folder)
    assert vol.spatial_shape == (5, 6, 4)
    assert vol.spacing == pytest.approx((0.8, 0.9, 2.5), abs=1e-4)
    assert np.array_equal(vol.array, np.transpose(array, (2, 1, 0)))
    # Image position (10, 20, 30 + 2.5 k) in LPS, rows along +x: RAS origin (-10, -20, 30).
    expected = np.diag([-0.8, -0.9, 2.5, 1.0])
    expected[:3, 3] = [-10.0, -20.0, 30.0]
    np.testing.assert_allclose(vol.affine, expected, atol=1e-4)


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.nii.gz: file not found"):
        read_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "garbage.nii.gz").write_bytes(gzip.compress(b"garbage" * 10))
    with pytest.raises(DataError, match="garbage.nii.gz: cannot read"):
        read_volume(tmp_path / "garbage.nii.gz")
    # Truncated files: nibabel reads lazily, so the error must come from forcing the read.
    for name in ("whole.nii.gz", "whole.nii"):
        write_nifti(tmp_path / name, np.random.rand(16, 16, 16).astype(np.float32), np.eye(4))
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(DataError, match=f"cut_{name}: cannot read"):
            read_volume(tmp_path / f"cut_{name}")
    (tmp_path / "bad.nrrd").write_bytes(b"NRRD0004\nnot a header\n")
    with pytest.raises(DataError, match="bad.nrrd: cannot read .*bad.nrrd"):
        read_volume(tmp_path / "bad.nrrd")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="notes.txt: unsupported file type"):
        read_volume(tmp_path / "notes.txt")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(DataError, match="empty_folder: folder holds no DICOM series"):
        read_volume(tmp_path / "empty_folder")


def test_wrong_dimensionality_and_non_finite_values_name_the_file(tmp_path):
    write_nifti(tmp_path / "flat.nii.gz", np.zeros((4, 4), np.float32), np.eye(4))
    with pytest.raises(DataError, match="flat.nii.gz: expected a 3D volume"):
        read_volume(tmp_path / "flat.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5), np.float32)), str(tmp_path / "flat.mha"))
    with pytest.raises(DataError, match="flat.mha: expected a 3D volume"):
        read_volume(tmp_path / "flat.mha")
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3, 2, 2), np.float32), np.eye(4)), str(tmp_path / "five.nii.gz"))
    with pytest.raises(DataError, match="five.nii.gz: expected a 3D volume"):
        read_volume(tmp_path / "five.nii.gz")
    write_nifti(tmp_path / "two.nii.gz", np.zeros((2, 3, 3, 3), np.uint8), np.eye(4))
    with pytest.raises(DataError, match="two.nii.gz: a label map must be 3D"):
        read_label_map(tmp_path / "two.nii.gz")
    for name, bad in (("nan.nii.gz", np.nan), ("inf.nii.gz", np.inf)):
        array = np.zeros((3, 3, 3), np.float32)
        array[1, 1, 1] = bad
        write_nifti(tmp_path / name, array, np.eye(4))
        with pytest.raises(DataError, match=f"{name}: volume contains NaN or Inf"):
            read_image([tmp_path / name])
    write_nifti(tmp_path / "lab.nii.gz", np.full((3, 3, 3), 0.5, np.float32), np.eye(4))
    with pytest.raises(DataError, match="lab.nii.gz: label map has non-integer"):
        read_label_map(tmp_path / "lab.nii.gz")


def test_channels_on_different_grids_name_both_files(tmp_path):
    write_nifti(tmp_path / "a.nii.gz", np.zeros((3, 3, 3), np.float32), np.eye(4))
    write_nifti(tmp_path / "b.nii.gz", np.zeros((3, 3, 4), np.float32), np.eye(4))
    with pytest.raises(DataError, match="a.nii.gz and .*b.nii.gz.*shapes"):
        read_image([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"])
    write_nifti(tmp_path / "c.nii.gz", np.zeros((3, 3, 3), np.float32), np.diag([1.0, 1.0, 1.1, 1.0]))
    with pytest.raises(DataError, match="a.nii.gz and .*c.nii.gz.*affines"):
        read_image([tmp_path / "a.nii.gz", tmp_path / "c.nii.gz"])


def test_write_nifti_stores_64_bit_integers_in_a_portable_type(tmp_path):
    labels = np.arange(60, dtype=np.int64).reshape(3, 4, 5)
    write_nifti(tmp_path / "lab.nii.gz", labels, OBLIQUE)
    back = read_label_map(tmp_path / "lab.nii.gz")
    assert nib.load(str(tmp_path / "lab.nii.gz")).get_data_dtype() == np.uint8
    assert np.array_equal(back.array, labels)
    write_nifti(tmp_path / "big.nii.gz", labels * 1000 - 5, np.eye(4))
    assert nib.load(str(tmp_path / "big.nii.gz")).get_data_dtype() == np.int32
    assert np.array_equal(read_volume(tmp_path / "big.nii.gz").array, labels * 1000 - 5)
    with pytest.raises(DataError, match="huge.nii.gz"):
        write_nifti(tmp_path / "huge.nii.gz", labels + 2**40, np.eye(4))
    assert not (tmp_path / "huge.nii.gz").exists()


def test_read_image_stacks_channels(tmp_path):
    for i in range(2):
        write_nifti(tmp_path / f"c{i}.nii.gz", np.full((3, 4, 5), i, np.float32), OBLIQUE)
    vol = read_image([tmp_path / "c0.nii.gz", tmp_path / "c1.nii.gz"], ["t1", "t2"])
    assert vol.array.shape == (2, 3, 4, 5) and vol.channel_names == ["t1", "t2"]
    assert np.allclose(vol.array[1], 1)
