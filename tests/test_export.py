"""nnU-Net export: the dataset folder read back (files, channel suffixes, dataset.json, label
values), real/synthetic mixing, 4D synthetic volumes split, renumbered labels, refusals."""

import json

import nibabel as nib
import numpy as np
import pytest

from medlsdm.cli import main
from medlsdm.data.export import export_nnunet
from medlsdm.data.io import write_nifti
from medlsdm.errors import MedlsdmError

AFFINE = np.array([[1.5, 0, 0, -5], [0, 1.5, 0, 3], [0, 0, 2.0, 7], [0, 0, 0, 1]])
SHAPE = (8, 9, 10)


def _label(seed, values=(0, 1, 2)):
    rng = np.random.default_rng(seed)
    return rng.choice(np.array(values, dtype=np.uint8), size=SHAPE)


@pytest.fixture
def real(tmp_path):
    """Generic layout, two channels per case (CASE_0000, CASE_0001), labels.json, plus a test case."""
    root = tmp_path / "real"
    for i, case in enumerate(["brain1", "brain2"]):
        for c in range(2):
            write_nifti(root / "images" / f"{case}_{c:04d}.nii.gz", np.full(SHAPE, 10 * i + c, np.int16), AFFINE)
        write_nifti(root / "labels" / f"{case}.nii.gz", _label(i), AFFINE)
    write_nifti(root / "imagesTs" / "held_0000.nii.gz", np.zeros(SHAPE, np.int16), AFFINE)
    write_nifti(root / "imagesTs" / "held_0001.nii.gz", np.zeros(SHAPE, np.int16), AFFINE)
    write_nifti(root / "labelsTs" / "held.nii.gz", _label(5), AFFINE)
    (root / "labels.json").write_text(json.dumps({"0": "background", "1": "grey matter", "2": "white matter"}))
    return root


@pytest.fixture
def synthetic(tmp_path):
    """`medlsdm sample` output: 4D (2-channel) volumes <case>_sample<k>, PNG previews beside them."""
    root = tmp_path / "samples"
    for case in ["brain1", "brain2"]:
        for k in range(3):
            write_nifti(root / f"{case}_sample{k}.nii.gz", np.full((2, *SHAPE), 100 + k, np.float32)
                        + np.arange(2, dtype=np.float32)[:, None, None, None], AFFINE)
            (root / f"{case}_sample{k}.png").write_bytes(b"png")
    return root


def _load(path):
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine


def test_export_mixes_real_and_synthetic_cases(real, synthetic, tmp_path):
    out = tmp_path / "nnUNet_raw"
    result = export_nnunet(out, 7, "Brain", real=real, synthetic=synthetic, synthetic_per_case=2,
                           channel_names=["T1", "T2"], progress=False)
    dataset = out / "Dataset007_Brain"
    assert result.path == dataset
    info = json.loads((dataset / "dataset.json").read_text())
    assert info["channel_names"] == {"0": "T1", "1": "T2"}
    assert info["labels"] == {"background": 0, "grey matter": 1, "white matter": 2}
    assert info["numTraining"] == 6 and info["file_ending"] == ".nii.gz"
    ids = ["brain1", "brain2", "syn_brain1_0", "syn_brain1_1", "syn_brain2_0", "syn_brain2_1"]
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == [f"{i}.nii.gz" for i in ids]
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == sorted(
        f"{i}_{c:04d}.nii.gz" for i in ids for c in range(2))
    # Real channels keep their dtype and values; the 4D synthetic volume is split channel by channel.
    real1, affine = _load(dataset / "imagesTr" / "brain2_0001.nii.gz")
    assert real1.dtype == np.int16 and np.all(real1 == 11) and real1.shape == SHAPE
    np.testing.assert_allclose(affine, AFFINE)
    for c in range(2):
        syn, _ = _load(dataset / "imagesTr" / f"syn_brain2_1_{c:04d}.nii.gz")
        assert syn.shape == SHAPE and np.all(syn == 101 + c)
    # A synthetic case's label map is the real label map it was generated from.
    for case_id, seed in [("brain1", 0), ("syn_brain1_1", 0), ("syn_brain2_0", 1)]:
        label, affine = _load(dataset / "labelsTr" / f"{case_id}.nii.gz")
        assert np.array_equal(label, _label(seed))
        np.testing.assert_allclose(affine, AFFINE)
    assert not list(dataset.glob("**/held*"))                   # the test split stays out of training
    assert result.count("real") == 2 and result.count("synthetic") == 4
    assert not [p for p in out.iterdir() if p.name.startswith(".")]   # no temporary folder left


def test_synthetic_only_with_a_labels_folder_renumbers_labels(synthetic, tmp_path, capsys):
    labels = tmp_path / "edited"
    for i, case in enumerate(["brain1", "brain2"]):
        write_nifti(labels / f"{case}.nii.gz", _label(i, values=(0, 1, 4)), AFFINE)
    out = tmp_path / "raw"
    assert main(["export", "nnunet", "--synthetic", str(synthetic), "--labels", str(labels), "--out", str(out),
                 "--dataset-id", "12", "--name", "Syn", "--mix", "synthetic", "--synthetic-per-case", "1",
                 "--file-ending", ".nii"]) == 0
    dataset = out / "Dataset012_Syn"
    info = json.loads((dataset / "dataset.json").read_text())
    assert info["numTraining"] == 2 and info["file_ending"] == ".nii"
    assert info["labels"] == {"background": 0, "label_1": 1, "label_4": 2}   # nnU-Net needs 0..K-1
    assert info["channel_names"] == {"0": "channel_0", "1": "channel_1"}
    label, _ = _load(dataset / "labelsTr" / "syn_brain2_0.nii")
    assert np.array_equal(label, np.searchsorted([0, 1, 4], _label(1, values=(0, 1, 4))))
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == [
        "syn_brain1_0_0000.nii", "syn_brain1_0_0001.nii", "syn_brain2_0_0000.nii", "syn_brain2_0_0001.nii"]
    assert "4->2" in capsys.readouterr().out


def test_real_only_from_an_nnunet_layout(real, tmp_path):
    first = export_nnunet(tmp_path / "a", 1, "First", real=real, mix="real", progress=False)
    # The exported folder is itself an nnU-Net dataset: export it again as the real input.
    again = export_nnunet(tmp_path / "b", 2, "Second", real=first.path, mix="real", progress=False)
    info = json.loads((again.path / "dataset.json").read_text())
    assert info["numTraining"] == 2 and info["channel_names"] == {"0": "channel_0", "1": "channel_1"}
    assert info["labels"]["white matter"] == 2
    for name in ["brain1_0000.nii.gz", "brain1.nii.gz"]:
        sub = "labelsTr" if name == "brain1.nii.gz" else "imagesTr"
        assert np.array_equal(_load(again.path / sub / name)[0], _load(first.path / sub / name)[0])


def test_refusals(real, synthetic, tmp_path, capsys):
    out = tmp_path / "raw"
    export_nnunet(out, 3, "Brain", real=real, mix="real", progress=False)
    with pytest.raises(MedlsdmError, match="exists .*--force"):
        export_nnunet(out, 3, "Brain", real=real, mix="real", progress=False)
    again = export_nnunet(out, 3, "Brain", real=real, synthetic=synthetic, synthetic_per_case=1, force=True,
                          channel_names=["T1", "T2"], progress=False)
    assert json.loads((again.path / "dataset.json").read_text())["numTraining"] == 4
    with pytest.raises(MedlsdmError, match="dataset ID 003 is already used by Dataset003_Brain"):
        export_nnunet(out, 3, "Other", real=real, mix="real", progress=False)
    orphan = tmp_path / "orphan"
    write_nifti(orphan / "liver_sample0.nii.gz", np.zeros((2, *SHAPE), np.float32), AFFINE)
    args = ["export", "nnunet", "--real", str(real), "--synthetic", str(orphan), "--out", str(out),
            "--dataset-id", "4", "--name", "X"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "no label map for synthetic case(s) liver" in err and "\n" not in err
    assert main(args[:-4] + ["--dataset-id", "1000", "--name", "X"]) == 2
    assert "--dataset-id" in capsys.readouterr().err
    assert not (out / "Dataset004_X").exists()


def test_channel_count_mismatch_is_refused(real, tmp_path):
    samples = tmp_path / "one_channel"
    write_nifti(samples / "brain1_sample0.nii.gz", np.zeros(SHAPE, np.float32), AFFINE)
    with pytest.raises(MedlsdmError, match="1 image channel\\(s\\), but the dataset has 2"):
        export_nnunet(tmp_path / "raw", 5, "Mixed", real=real, synthetic=samples, progress=False)
    assert not (tmp_path / "raw" / "Dataset005_Mixed").exists()
