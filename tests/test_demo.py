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
        # two held-out subjects: the privacy audit then calibrates on held-out cases, as in the real demo
        kwargs.update(n_subjects=6, n_test=2, shape=24, spacing=8.0, steps=2, segmentation_epochs=1,
                      train_overrides=["trainer.progress_bar=false"])
        return original(out, **kwargs)

    monkeypatch.setattr(demo, "run_demo", tiny)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--train", "--budget-minutes", "0.15"]) == 0
    out = tmp_path / "demo"
    synthetic = sorted((out / "synthetic").glob("*.nii.gz"))
    assert [p.name for p in synthetic] == ["subject_004_sample0.nii.gz", "subject_005_sample0.nii.gz"]
    label = nib.load(str(out / "cohort" / "labelsTs" / "subject_004.nii.gz"))
    image = nib.load(str(synthetic[0]))
    assert image.shape == label.shape and (image.affine == label.affine).all()
    assert len(list((out / "diversity").glob("*.nii.gz"))) == 3
    for name in ("metrics.json", "segmentation.json", "privacy.json", "label_edit.json", "report.html", "report.md"):
        assert (out / "evaluation" / name).is_file(), name
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{"):])
    assert set(summary) >= {"ssim", "psnr", "dice_real", "dice_synthetic", "dice_ratio", "checkerboard_ratio",
                            "privacy_flagged",
                            "edit_mean_change", "edit_followed"}
    assert (out / "evaluation" / "label_edit" / "subject_004_edited.nii.gz").is_file()
    from medlsdm.inference import load_model

    assert load_model(out / "runs" / "diffusion").autoencoder.decoder_kind == "spade"   # attached last
    assert "Label-map editing" in (out / "evaluation" / "report.md").read_text(encoding="utf-8")
    page = (out / "evaluation" / "report.html").read_text(encoding="utf-8")   # the interactive 3D viewer
    assert 'class="mv-data"' in page and "samples of one label map (subject_004)" in page
    assert 0.0 <= summary["privacy_flagged"] <= 1.0

    # Re-running into the same folder reuses the trained stages as they are (the diffusion run's
    # autoencoder must not change under it) and succeeds.
    import hashlib

    def digests():
        return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((out / "runs").glob("*/*.safetensors"))}

    before = digests()
    assert main(["demo", "--out", str(out), "--train", "--budget-minutes", "0.15"]) == 0
    assert digests() == before
    assert {"runs/autoencoder/autoencoder.safetensors", "runs/diffusion/diffusion.safetensors",
            "runs/diffusion/autoencoder.safetensors"} <= set(before)
    assert [p.name for p in sorted((out / "synthetic").glob("*.nii.gz"))] == ["subject_004_sample0.nii.gz",
                                                                           "subject_005_sample0.nii.gz"]


def test_shipped_demo_model_samples_on_the_label_maps_grid(tmp_path):
    """The model shipped in the package loads (float16 file, float32 model) and generates."""
    from medlsdm.data.demo import write_demo_cohort
    from medlsdm.demo import shipped_model_dir
    from medlsdm.inference import sample_to_files

    model = shipped_model_dir()
    assert model is not None
    cohort = write_demo_cohort(tmp_path / "cohort", n_subjects=2, n_test=1, shape=24, spacing=8.0, progress=False)
    label_path = cohort / "labelsTs" / "subject_001.nii.gz"
    [out] = sample_to_files(model, label_path, tmp_path / "out", n=1, steps=2, progress=False)
    label, image = nib.load(str(label_path)), nib.load(str(out))
    assert image.shape == label.shape and (image.affine == label.affine).all()
    data = image.get_fdata()
    assert data.std() > 0 and data.min() >= -1e-3  # de-normalised MR intensities, not [-1, 1] noise
