"""`medlsdm inspect` tells images from label maps (values, DICOM modality, name, --as) and names
label values only with a table of the file's own dataset."""

import json

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medlsdm.cli import main


def _dicom_series(folder, array, modality="CT"):
    """An int16 DICOM series (z, y, x) with the given Modality tag."""
    folder.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array.shape[0]):
        sl = sitk.GetImageFromArray(array[k])
        sl.SetSpacing((0.7, 0.7))
        for tag, value in {"0008|0060": modality, "0020|000d": "1.2.3", "0020|000e": "1.2.3.4",
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0032": f"0\\0\\{5.0 * k}",
                           "0020|0013": str(k + 1), "0028|0030": "0.7\\0.7"}.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(sl)
    return folder


def test_ct_series_is_an_image_and_tables_from_elsewhere_are_not_used(tmp_path, capsys):
    rng = np.random.default_rng(0)
    # Few non-negative whole values, as in a windowed or coarsely quantised CT: still an image.
    ct = rng.integers(0, 12, size=(6, 8, 9)).astype(np.int16)
    series = _dicom_series(tmp_path / "study" / "ct", ct)
    (tmp_path / "study" / "labels.json").write_text(json.dumps({"0": "background", "1": "brain"}))
    assert main(["inspect", str(series)]) == 0
    out = capsys.readouterr().out
    assert "DICOM modality: CT" in out and "read as: image (DICOM series of modality CT)" in out
    assert "intensity" in out and "label values" not in out and "not in table" not in out
    assert main(["inspect", str(series), "--as", "label"]) == 0
    out = capsys.readouterr().out
    assert "label values" in out and "brain" not in out and "label table" not in out

    # A real CT in NIfTI: negative Hounsfield units, hundreds of values -> an image whatever its name.
    hu = rng.integers(-1024, 1500, size=(8, 9, 10)).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(tmp_path / "ct_seg.nii.gz"))
    assert main(["inspect", str(tmp_path / "ct_seg.nii.gz")]) == 0
    assert "read as: image (negative values" in capsys.readouterr().out


def test_label_maps_and_their_tables(tmp_path, capsys):
    rng = np.random.default_rng(1)
    label = rng.choice(np.array([0, 1, 2, 4], np.uint8), size=(8, 9, 10))
    # A table one folder up applies only from a dataset's label folder.
    data = tmp_path / "data"
    (data / "labels").mkdir(parents=True)
    (data / "other").mkdir()
    (data / "labels.json").write_text(json.dumps({"0": "background", "1": "liver", "2": "tumour", "4": "cyst"}))
    for folder in ("labels", "other"):
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(data / folder / "case.nii.gz"))
    assert main(["inspect", str(data / "labels" / "case.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "read as: label map (4 distinct whole values" in out and "cyst" in out
    assert main(["inspect", str(data / "other" / "case.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "label values" in out and "label table" not in out and "cyst" not in out
    # A BraTS segmentation: the BraTS table; --as image overrides the decision.
    brats = tmp_path / "BraTS2021_00000"
    brats.mkdir()
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(brats / "BraTS2021_00000_seg.nii.gz"))
    assert main(["inspect", str(brats / "BraTS2021_00000_seg.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "the brats layout's" in out and "enhancing tumour" in out
    assert main(["inspect", str(brats / "BraTS2021_00000_seg.nii.gz"), "--as", "image"]) == 0
    assert "intensity" in capsys.readouterr().out
    # Many distinct whole values without a segmentation name: an image (e.g. a uint8 MR).
    mr = rng.permutation(np.arange(720) % 200).reshape(8, 9, 10).astype(np.uint8)
    nib.save(nib.Nifti1Image(mr, np.eye(4)), str(tmp_path / "t1.nii.gz"))
    assert main(["inspect", str(tmp_path / "t1.nii.gz")]) == 0
    assert "read as: image (200 distinct values)" in capsys.readouterr().out
