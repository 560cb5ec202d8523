"""Label-map editing showcase: the edit-following numbers and the run on the shipped model."""

import nibabel as nib
import numpy as np
import pytest

from medlsdm.data.edit import Edit
from medlsdm.errors import MedlsdmError
from medlsdm.evaluation.editing import edit_following


def _maps():
    label = np.zeros((12, 12, 12), dtype=np.int64)
    label[2:10, 2:10, 2:10] = 2
    label[5:7, 5:7, 5:7] = 1
    edited = label.copy()
    edited[4:8, 4:8, 4:8] = 1                     # class 1 grown into class 2
    return label, edited


def _image(label):
    return np.select([label == 1, label == 2], [-0.8, 0.4], default=-1.0)


def test_edit_following_is_one_when_the_image_follows_and_zero_when_it_ignores():
    label, edited = _maps()
    before = _image(label)
    follows = edit_following(label, edited, before, _image(edited))
    assert follows["target_class"] == 1 and follows["changed_voxels"] == 64 - 8
    assert follows["changed_before"] == pytest.approx(0.4) and follows["changed_after"] == pytest.approx(-0.8)
    assert follows["target_reference"] == pytest.approx(-0.8)
    assert follows["followed"] == pytest.approx(1.0) and follows["unchanged_mae"] == pytest.approx(0.0)
    ignores = edit_following(label, edited, before, before)
    assert ignores["followed"] == pytest.approx(0.0) and ignores["unchanged_mae"] == pytest.approx(0.0)
    brighter = edit_following(label, edited, before, before + 0.1)   # away from the darker class
    assert brighter["followed"] == pytest.approx(0.1 / -1.2) and brighter["unchanged_mae"] == pytest.approx(0.1)
    halfway = edit_following(label, edited, before, np.where(label != edited, -0.2, before))
    assert halfway["followed"] == pytest.approx(0.5) and halfway["mean_change"] == pytest.approx(-0.6)


def test_edit_following_has_no_fraction_when_the_classes_look_alike():
    label, edited = _maps()
    before = np.where(label == 1, 0.38, _image(label))          # class 1 about as bright as class 2
    after = np.where(label != edited, -0.5, before)
    result = edit_following(label, edited, before, after)
    assert result["followed"] is None and result["mean_change"] == pytest.approx(-0.9)


def test_edit_following_rejects_no_change_and_shape_mismatch():
    label, _ = _maps()
    with pytest.raises(MedlsdmError, match="changed no voxel"):
        edit_following(label, label, _image(label), _image(label))
    with pytest.raises(MedlsdmError, match="shapes differ"):
        edit_following(label, label[:-1], _image(label), _image(label))


def test_label_edit_showcase_on_the_shipped_model(tmp_path):
    """Edit a demo label map, sample both from the same noise, write files, figure and report."""
    from medlsdm.data.demo import write_demo_cohort
    from medlsdm.demo import SHOWCASE_EDIT, shipped_model_dir
    from medlsdm.demo import run_label_edit
    from medlsdm.evaluation.report import build_report
    from medlsdm.files import read_json

    cohort = write_demo_cohort(tmp_path / "cohort", n_subjects=2, n_test=1, shape=24, spacing=8.0, progress=False)
    label_path = cohort / "labelsTs" / "subject_001.nii.gz"
    out = tmp_path / "evaluation"
    result = run_label_edit(shipped_model_dir(), label_path, [SHOWCASE_EDIT], out, steps=2, progress=False)
    assert result["target_class"] == 1 and result["changed_voxels"] > 0
    assert np.isfinite(result["changed_before"]) and np.isfinite(result["changed_after"])
    assert read_json(out / "label_edit.json")["edits"] == ["dilate cls=1, n=2"]
    source = nib.load(str(label_path))
    edited = nib.load(str(out / result["files"]["edited_label_map"]))
    assert edited.shape == source.shape and np.allclose(edited.affine, source.affine)
    grown = np.asarray(edited.dataobj) == 1
    assert grown.sum() > (np.asarray(source.dataobj) == 1).sum()
    for key in ("original_sample", "edited_sample"):
        assert nib.load(str(out / result["files"][key])).shape == source.shape
    assert (out / "figures" / "label_edit.png").is_file()
    md, _ = build_report(out)
    text = md.read_text(encoding="utf-8")
    assert "Label-map editing" in text and "figures/label_edit.png" in text


def test_label_edit_needs_a_conditional_model_and_a_real_change(tmp_path):
    from medlsdm.data.demo import write_demo_cohort
    from medlsdm.demo import shipped_model_dir
    from medlsdm.demo import run_label_edit

    cohort = write_demo_cohort(tmp_path / "cohort", n_subjects=2, n_test=1, shape=24, spacing=8.0, progress=False)
    label_path = cohort / "labelsTs" / "subject_001.nii.gz"
    with pytest.raises(MedlsdmError, match="changed no voxel"):
        run_label_edit(shipped_model_dir(), label_path, [Edit("replace", {"old": 3, "new": 3})], tmp_path / "o",
                       steps=1, progress=False)
