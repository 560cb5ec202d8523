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
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0032": f"0\\0\\{2.5 * k}",
                           "0020|0013": str(k + 1), "0028|0030": "0.9\\0.8"}.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(sl)
    vol = read_volume(folder)
    assert vol.spatial_shape == (5, 6, 4)
    assert vol.spacing == pytest.approx((0.8, 0.9, 2.5), abs=1e-4)
    assert np.array_equal(vol.array, np.transpose(array, (2, 1, 0)))


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.nii.gz: file not found"):
        read_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "broken.nii.gz").write_bytes(gzip.compress(b"garbage" * 10))
    with pytest.raises(DataError, match="broken.nii.gz: cannot read"):
        read_volume(tmp_path / "broken.nii.gz")
    write_nifti(tmp_path / "flat.nii.gz", np.zeros((4, 4), np.float32), np.eye(4))
    with pytest.raises(DataError, match="flat.nii.gz: expected a 3D volume"):
        read_volume(tmp_path / "flat.nii.gz")
    nan = np.zeros((3, 3, 3), np.float32)
    nan[1, 1, 1] = np.nan
    write_nifti(tmp_path / "nan.nii.gz", nan, np.eye(4))
    with pytest.raises(DataError, match="nan.nii.gz: volume contains NaN"):
        read_image([tmp_path / "nan.nii.gz"])
    write_nifti(tmp_path / "a.nii.gz", np.zeros((3, 3, 3), np.float32), np.eye(4))
    write_nifti(tmp_path / "b.nii.gz", np.zeros((3, 3, 4), np.float32), np.eye(4))
    with pytest.raises(DataError, match="a.nii.gz and .*b.nii.gz"):
        read_image([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"])
    write_nifti(tmp_path / "lab.nii.gz", np.full((3, 3, 3), 0.5, np.float32), np.eye(4))
    with pytest.raises(DataError, match="lab.nii.gz: label map has non-integer"):
        read_label_map(tmp_path / "lab.nii.gz")


def test_read_image_stacks_channels(tmp_path):
    for i in range(2):
        write_nifti(tmp_path / f"c{i}.nii.gz", np.full((3, 4, 5), i, np.float32), OBLIQUE)
    vol = read_image([tmp_path / "c0.nii.gz", tmp_path / "c1.nii.gz"], ["t1", "t2"])
    assert vol.array.shape == (2, 3, 4, 5) and vol.channel_names == ["t1", "t2"]
    assert np.allclose(vol.array[1], 1)
