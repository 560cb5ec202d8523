"""Dataset discovery: every layout pairs images and label maps by case ID, reports what it could
not pair, and does not depend on the order files were created in."""

import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medlsdm.data.io import volume_stem
from medlsdm.data.layouts import BRATS_TABLE_2021, BRATS_TABLE_2023, detect_layout, discover
from medlsdm.errors import ConfigError, DataError


def write(path: Path, value: float = 1.0) -> Path:
    """A tiny 8^3 NIfTI file; `value` lets a test tell files apart after reading."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), value, dtype=np.float32), np.eye(4)), str(path))
    return path


def write_all(root: Path, names, reverse: bool = False) -> None:
    """Create files in the given order (or reversed), with distinct modification times, so that
    a discovery relying on creation or directory order would give different results."""
    for i, name in enumerate(reversed(names) if reverse else names):
        p = write(root / name)
        os.utime(p, (time.time() + i, time.time() + i))


GENERIC = ["images/b.nii.gz", "images/a.nii.gz", "images/aa.nii.gz", "images/c.nii.gz",
           "labels/c.nii.gz", "labels/a.nii.gz", "labels/b.nii.gz", "labels/zz.nii.gz",
           "imagesTs/t1.nii.gz", "labelsTs/t1.nii.gz"]


def _summary(found):
    return [(c.case_id, [p.name for p in c.image_paths], c.label_path.name, c.split) for c in found.cases]


@pytest.mark.parametrize("reverse", [False, True])
def test_generic_pairs_by_case_id_and_reports_unmatched(tmp_path, reverse):
    write_all(tmp_path, GENERIC, reverse)
    (tmp_path / "labels.json").write_text(json.dumps({"0": "background", "1": "organ"}), encoding="utf-8")
    found = discover(tmp_path)
    assert found.layout == "generic"
    assert _summary(found) == [
        ("a", ["a.nii.gz"], "a.nii.gz", None), ("b", ["b.nii.gz"], "b.nii.gz", None),
        ("c", ["c.nii.gz"], "c.nii.gz", None), ("t1", ["t1.nii.gz"], "t1.nii.gz", "test"),
    ]
    for case in found.cases:  # every pair shares its ID
        assert volume_stem(case.image_paths[0]) == volume_stem(case.label_path) == case.case_id
    unmatched = "\n".join(found.unmatched)
    assert "images/aa.nii.gz (no label map)" in unmatched and "labels/zz.nii.gz (no image)" in unmatched
    assert len(found.unmatched) == 2
    assert found.label_table.names == {0: "background", 1: "organ"}
    assert found.channel_names == ["image"]


def test_generic_order_independent(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_all(a, GENERIC)
    write_all(b, GENERIC, reverse=True)
    assert _summary(discover(a)) == _summary(discover(b))
    assert sorted(discover(a).unmatched) == sorted(discover(b).unmatched)


def test_generic_channels_and_ids_ending_in_digits(tmp_path):
    multi = tmp_path / "multi"
    write_all(multi, ["images/p1_0001.nii.gz", "images/p1_0000.nii.gz", "labels/p1.nii.gz",
                      "images/p2_0000.nii.gz", "images/p2_0001.nii.gz", "labels/p2.nii.gz"])
    (multi / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "FLAIR"},
                                                    "labels": {"background": 0, "lesion": 1}}), encoding="utf-8")
    found = discover(multi, "generic")
    assert [[p.name for p in c.image_paths] for c in found.cases] == [["p1_0000.nii.gz", "p1_0001.nii.gz"],
                                                                      ["p2_0000.nii.gz", "p2_0001.nii.gz"]]
    assert found.channel_names == ["T1", "FLAIR"] and found.label_table.names == {0: "background", 1: "lesion"}
    # A case ID that merely ends in 4 digits is a case, not channel 1 of "subject".
    single = tmp_path / "single"
    write_all(single, ["images/subject_0001.nii.gz", "labels/subject_0001.nii.gz"])
    assert _summary(discover(single)) == [("subject_0001", ["subject_0001.nii.gz"], "subject_0001.nii.gz", None)]


def test_generic_dicom_folder_counts_as_one_image(tmp_path):
    write_all(tmp_path, ["labels/ct1.nii.gz"])
    (tmp_path / "images" / "ct1").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "images" / "ct1" / f"IM{i:04d}.dcm").write_bytes(b"\0")
    found = discover(tmp_path)
    assert found.cases[0].image_paths == [tmp_path / "images" / "ct1"]


def test_detached_headers_pair_and_their_data_files_are_not_reported(tmp_path):
    import SimpleITK as sitk

    (tmp_path / "images").mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.float32)), str(tmp_path / "images" / "m1.mhd"))
    assert (tmp_path / "images" / "m1.raw").is_file()  # the header's pixel data beside it
    write_all(tmp_path, ["labels/m1.nii.gz"])
    (tmp_path / "images" / "stray.raw").write_bytes(b"\0")
    found = discover(tmp_path)
    assert [(c.case_id, c.image_paths[0].name) for c in found.cases] == [("m1", "m1.mhd")]
    assert found.unmatched == ["images/stray.raw (not a volume file or DICOM folder)"]


def test_nnunet(tmp_path):
    write_all(tmp_path, ["imagesTr/la_001_0001.nii.gz", "imagesTr/la_001_0000.nii.gz", "labelsTr/la_001.nii.gz",
                         "imagesTr/la_002_0000.nii.gz", "imagesTr/la_002_0001.nii.gz", "labelsTr/la_002.nii.gz",
                         "imagesTr/la_003_0001.nii.gz", "labelsTr/la_003.nii.gz",
                         "imagesTs/la_009_0000.nii.gz", "imagesTs/la_009_0001.nii.gz", "labelsTs/la_009.nii.gz"])
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "PET"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": 3, "file_ending": ".nii.gz"}), encoding="utf-8")
    found = discover(tmp_path)
    assert found.layout == "nnunet"
    assert [(c.case_id, c.split) for c in found.cases] == [("la_001", None), ("la_002", None), ("la_009", "test")]
    assert [p.name for p in found.cases[0].image_paths] == ["la_001_0000.nii.gz", "la_001_0001.nii.gz"]
    assert found.channel_names == ["CT", "PET"]
    assert found.label_table.names == {0: "background", 1: "liver", 2: "tumour"}
    joined = "\n".join(found.unmatched)
    assert "la_003_0001.nii.gz" in joined and "0000" in joined  # incomplete case listed, not used


def _brats_case(root: Path, name: str, suffixes, skip=()):
    for i, s in enumerate(suffixes):
        if s not in skip:
            write(root / name / f"{name}{s}.nii.gz", value=i)


@pytest.mark.parametrize("era", [2021, 2023])
def test_brats_channel_order_and_table(tmp_path, era):
    suffixes = (["_seg", "_flair", "_t2", "_t1ce", "_t1"] if era == 2021 else ["-seg", "-t2f", "-t2w", "-t1c", "-t1n"])
    _brats_case(tmp_path / "data", "BraTS_00001", suffixes)
    _brats_case(tmp_path / "data", "BraTS_00002", suffixes, skip=(suffixes[0],))  # no segmentation
    found = discover(tmp_path)
    assert found.layout == "brats"
    assert [c.case_id for c in found.cases] == ["BraTS_00001"]
    stems = [volume_stem(p) for p in found.cases[0].image_paths]
    expected = ["_t1", "_t1ce", "_t2", "_flair"] if era == 2021 else ["-t1n", "-t1c", "-t2w", "-t2f"]
    assert stems == [f"BraTS_00001{s}" for s in expected]
    assert found.channel_names == ["t1", "t1ce", "t2", "flair"]
    assert found.label_table == (BRATS_TABLE_2021 if era == 2021 else BRATS_TABLE_2023)
    assert len(found.unmatched) == 4 and all("BraTS_00002" in u and "seg" in u for u in found.unmatched)


def test_autopet_groups_studies_by_patient(tmp_path):
    for patient, study in [("PETCT_aa", "01-2001-NA-PET CT Ganzkoerper"), ("PETCT_aa", "02-2002-NA-PET"),
                           ("PETCT_bb", "03-2003")]:
        for name in ("SEG", "SUV", "CTres"):
            write(tmp_path / patient / study / f"{name}.nii.gz")
    (tmp_path / "PETCT_bb" / "03-2003" / "SEG.nii.gz").unlink()
    found = discover(tmp_path)
    assert found.layout == "autopet"
    assert [(c.case_id, c.subject_id) for c in found.cases] == [
        ("PETCT_aa_01-2001-NA-PET_CT_Ganzkoerper", "PETCT_aa"), ("PETCT_aa_02-2002-NA-PET", "PETCT_aa")]
    assert [p.name for p in found.cases[0].image_paths] == ["CTres.nii.gz", "SUV.nii.gz"]
    assert found.cases[0].label_path.name == "SEG.nii.gz" and found.channel_names == ["ct", "pet"]
    assert any("PETCT_bb" in u and "label map" in u for u in found.unmatched)
    ct_only = discover(tmp_path, "autopet", channels=["ct"])
    assert [p.name for p in ct_only.cases[0].image_paths] == ["CTres.nii.gz"] and ct_only.channel_names == ["ct"]
    with pytest.raises(ConfigError, match="channels must be some of ct, pet"):
        discover(tmp_path, "autopet", channels=["mr"])


def test_synthrad2023_labels_dir_and_modality(tmp_path):
    data = tmp_path / "Task1" / "brain"
    for patient in ("1BA002", "1BA001"):
        for name in ("mr", "ct", "mask"):
            write(data / patient / f"{name}.nii.gz")
    labels = tmp_path / "maps"
    write_all(labels, ["1BA002.nii.gz", "1BA001.nii.gz", "1BA999.nii.gz"])
    (labels / "labels.json").write_text(json.dumps({"0": "background", "1": "skull", "2": "brain"}), encoding="utf-8")
    assert detect_layout(tmp_path) == "synthrad2023"
    found = discover(tmp_path, labels_dir=labels)
    assert [(c.case_id, c.image_paths[0].name, c.label_path) for c in found.cases] == [
        ("1BA001", "ct.nii.gz", labels / "1BA001.nii.gz"), ("1BA002", "ct.nii.gz", labels / "1BA002.nii.gz")]
    assert any("1BA999" in u for u in found.unmatched)
    assert found.label_table.names == {0: "background", 1: "skull", 2: "brain"}
    mr = discover(tmp_path, "synthrad2023", modality="mr")  # no labels_dir: the body mask
    assert [c.image_paths[0].name for c in mr.cases] == ["mr.nii.gz"] * 2
    assert [c.label_path.name for c in mr.cases] == ["mask.nii.gz"] * 2 and mr.channel_names == ["mr"]


def test_duke(tmp_path):
    write_all(tmp_path, ["images/Breast_MRI_001_post_1.nii.gz", "images/Breast_MRI_001_pre.nii.gz",
                         "images/Breast_MRI_002.nii.gz",
                         "segmentations/Segmentation_Breast_MRI_002_Dense_and_Vessels.nii.gz",
                         "segmentations/Segmentation_Breast_MRI_001_Dense_and_Vessels.nii.gz",
                         "segmentations/Breast_MRI_001_Breast.nii.gz",
                         "segmentations/Segmentation_Breast_MRI_003_Dense_and_Vessels.nii.gz"])
    # NRRD files (discovery does not read them), segmentations in per-patient sub-folders as released
    for name in ("images/breast_mri_004_pre.nrrd",
                 "segmentations/Breast_MRI_004/Segmentation_Breast_MRI_004_Breast.seg.nrrd",
                 "segmentations/Breast_MRI_004/Segmentation_Breast_MRI_004_Dense_and_Vessels.seg.nrrd"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"NRRD0004")
    (tmp_path / "images" / "notes.txt").write_text("not a volume", encoding="utf-8")
    found = discover(tmp_path)
    assert found.layout == "duke"
    assert [(c.case_id, c.image_paths[0].name, c.label_path.name) for c in found.cases] == [
        ("Breast_MRI_001", "Breast_MRI_001_pre.nii.gz", "Segmentation_Breast_MRI_001_Dense_and_Vessels.nii.gz"),
        ("Breast_MRI_002", "Breast_MRI_002.nii.gz", "Segmentation_Breast_MRI_002_Dense_and_Vessels.nii.gz"),
        ("Breast_MRI_004", "breast_mri_004_pre.nrrd", "Segmentation_Breast_MRI_004_Dense_and_Vessels.seg.nrrd")]
    joined = "\n".join(found.unmatched)
    for name in ("Breast_MRI_001_post_1", "notes.txt", "Breast_MRI_001_Breast", "Breast_MRI_003",
                 "Segmentation_Breast_MRI_004_Breast.seg.nrrd"):
        assert name in joined
    assert len(found.unmatched) == 5
    # the dataset authors' values: 1 vessels, 2 dense tissue (the preset remaps them)
    assert found.label_table.names == {0: "background", 1: "vessels", 2: "fibroglandular tissue"}


def test_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no known dataset layout.*generic.*brats"):
        discover(tmp_path / "empty")
    with pytest.raises(ConfigError, match="unknown layout 'foo'"):
        discover(tmp_path / "empty", "foo")
    write_all(tmp_path / "g", ["images/a.nii.gz", "labels/b.nii.gz"])
    with pytest.raises(DataError, match="no image/label pairs.*a.nii.gz"):
        discover(tmp_path / "g")
    with pytest.raises(ConfigError, match="takes no option labels_dir"):
        discover(tmp_path / "g", labels_dir="x")
    with pytest.raises(DataError, match="not found"):
        discover(tmp_path / "missing")
