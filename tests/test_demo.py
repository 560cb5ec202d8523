import json

import nibabel as nib
import pytest

from medlsdm.cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_tiny_budget(tmp_path, monkeypatch, capsys):
    """The whole `medlsdm demo --train` pipeline on a tiny cohort: files, report and summary."""
    from medlsdm import demo

    original = demo.run_demo

    def tiny(out, **kwargs):
        kwargs.update(n_subjects=5, n_test=1, shape=24, spacing=8.0, steps=2, segmentation_epochs=1,
                      train_overrides=["trainer.progress_bar=false"])
        return original(out, **kwargs)

    monkeypatch.setattr(demo, "run_demo", tiny)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--train", "--budget-minutes", "0.15"]) == 0
    out = tmp_path / "demo"
    synthetic = sorted((out / "synthetic").glob("*.nii.gz"))
    assert [p.name for p in synthetic] == ["subject_004_sample0.nii.gz"]
    label = nib.load(str(out / "cohort" / "labelsTs" / "subject_004.nii.gz"))
    image = nib.load(str(synthetic[0]))
    assert image.shape == label.shape and (image.affine == label.affine).all()
    assert len(list((out / "diversity").glob("*.nii.gz"))) == 3
    for name in ("metrics.json", "segmentation.json", "privacy.json", "report.html", "report.md"):
        assert (out / "evaluation" / name).is_file(), name
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{"):])
    assert set(summary) >= {"ssim", "psnr", "dice_real", "dice_synthetic", "dice_ratio", "privacy_flagged"}
    assert 0.0 <= summary["privacy_flagged"] <= 1.0
