"""The demo: the whole pipeline on built-in real data (the MNI152 template shipped with nilearn).

cohort (medlsdm demo-data) → prepare → models (shipped demo weights, or trained here with
--train) → synthetic volumes from the held-out label maps → quality, segmentation and privacy
evaluation → a label-map edit sampled from the same noise → report with pictures, and a short
summary with the headline numbers.
Every step is the library function behind the corresponding `medlsdm` command.
"""

from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path

from medlsdm.data.edit import Edit
from medlsdm.files import owned_output

log = logging.getLogger(__name__)


def shipped_model_dir() -> Path | None:
    """The demo model shipped inside the package (diffusion + autoencoder), if present."""
    folder = Path(str(resources.files("medlsdm") / "weights" / "demo"))
    return folder if (folder / "diffusion.safetensors").is_file() else None


# The showcase edit: grow the CSF class (1) by two voxels (6 mm on the demo grid) into the
# tissue around it, as in atrophy; on a T1 image the grown region should turn dark (with the
# shipped model its mean falls by about 0.37 on the [-1, 1] scale).
SHOWCASE_EDIT = Edit("dilate", {"cls": 1, "n": 2})


def _step(i: int, n: int, text: str) -> None:
    log.info("[%d/%d] %s", i, n, text)


def _generic_view(out: Path, images: Path, labels: Path) -> Path:
    """A generic-layout folder (images/, labels/) pointing at existing folders (symlinks)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, target in (("images", images), ("labels", labels)):
        link = out / name
        if not link.exists():
            os.symlink(target.resolve(), link, target_is_directory=True)
    return out


# The demo's decoder: SPADE (it sees the label map at full resolution), trained after the
# diffusion stage on the frozen encoder, so the latents the denoiser learned stay the same.
SPADE_DECODER = ["model.decoder=spade", "model.spade_hidden=32", "init.freeze_encoder=true"]


def train_demo_models(prepared: Path, runs: Path, budget_minutes: float, overrides=(), patch: int = 32) -> Path:
    """Train the demo model on the demo cohort within `budget_minutes`: the autoencoder (30 %),
    the latent diffusion model (50 %), then a SPADE decoder on the frozen encoder (20 %), which
    replaces the plain decoder in the diffusion run. Autoencoders train on random patches of at
    most `patch`^3 voxels."""
    from medlsdm.training.autoencoder import train_autoencoder
    from medlsdm.training.diffusion import train_diffusion
    from medlsdm.training.export import attach_decoder

    patches = f"data.patch_size=[{patch}, {patch}, {patch}]"
    # A stage whose weights exist finished in an earlier run of the demo: it is reused as it is
    # (resuming it would train it further under a fresh time budget and change the autoencoder
    # the diffusion run was trained on). A stage that was interrupted resumes from its checkpoint.
    if not _finished(runs / "autoencoder", "autoencoder"):
        train_autoencoder(prepared, runs / "autoencoder", "demo",
                          [f"trainer.max_minutes={0.3 * budget_minutes}", patches, *overrides])
    if not _finished(runs / "diffusion", "diffusion"):
        train_diffusion(prepared, runs / "diffusion", runs / "autoencoder", "demo",
                        [f"trainer.max_minutes={0.5 * budget_minutes}", *overrides])
    if not _finished(runs / "decoder_spade", "autoencoder"):
        train_autoencoder(prepared, runs / "decoder_spade", "demo",
                          [f"trainer.max_minutes={0.2 * budget_minutes}", patches, *SPADE_DECODER,
                           f"init.from={runs / 'autoencoder'}", *overrides])
    attach_decoder(runs / "diffusion", runs / "decoder_spade")  # the same files again on a re-run
    return runs / "diffusion"


def _finished(run: Path, kind: str) -> bool:
    return (run / f"{kind}.safetensors").is_file() and (run / f"{kind}.json").is_file()


def run_demo(out: str | Path = "demo_output", train: bool = False, budget_minutes: float = 15.0,
             n_subjects: int = 24, n_test: int = 4, shape: int = 64, spacing: float = 3.0,
             steps: int | None = None, seed: int = 0, segmentation_steps: int | None = None,
             segmentation_epochs: int | None = None,
             train_overrides=()) -> dict:
    """Run the demo into `out` (new, or an earlier demo's folder: what it holds is reused);
    returns the headline numbers."""
    with owned_output(out, "demo", recognise=lambda folder: (folder / "cohort" / "dataset.json").is_file()):
        return _run_demo(Path(out), train, budget_minutes, n_subjects, n_test, shape, spacing, steps, seed,
                         segmentation_steps, segmentation_epochs, train_overrides)


def _run_demo(out: Path, train, budget_minutes, n_subjects, n_test, shape, spacing, steps, seed,
              segmentation_steps, segmentation_epochs, train_overrides) -> dict:
    from medlsdm.data.demo import write_demo_cohort
    from medlsdm.data.prepare import prepare_dataset
    from medlsdm.evaluation.audit import audit_folders
    from medlsdm.evaluation.quality import evaluate_quality
    from medlsdm.evaluation.report import build_report
    from medlsdm.evaluation.segmentation import evaluate_segmentation
    from medlsdm.evaluation.viewer import record_samples
    from medlsdm.inference import sample_to_files

    n = 7
    cohort = out / "cohort"
    _step(1, n, f"building the demo cohort ({n_subjects} subjects, {shape}^3 at {spacing} mm) in {cohort}")
    if not (cohort / "dataset.json").is_file():
        write_demo_cohort(cohort, n_subjects=n_subjects, n_test=n_test, shape=shape, spacing=spacing, seed=seed)

    prepared = out / "prepared"
    _step(2, n, f"preparing it for training in {prepared}")
    if not (prepared / "manifest.json").is_file():
        prepare_dataset(cohort, prepared, config="demo", overrides=[f"shape=[{shape}, {shape}, {shape}]"],
                        layout="generic", seed=seed)

    model_dir = shipped_model_dir()
    if train or model_dir is None:
        why = "as asked" if train else "no demo weights are shipped with this installation"
        _step(3, n, f"training both stages within {budget_minutes:g} minutes ({why})")
        model_dir = train_demo_models(prepared, out / "runs", budget_minutes, train_overrides, patch=min(32, shape))
    else:
        _step(3, n, f"using the shipped demo model in {model_dir}")

    synthetic = out / "synthetic"
    _step(4, n, f"generating synthetic volumes from the {n_test} held-out label maps into {synthetic}")
    sample_to_files(model_dir, cohort / "labelsTs", synthetic, n=1, steps=steps, seed=seed)
    diversity = out / "diversity"
    first = sorted((cohort / "labelsTs").iterdir())[0]
    sample_to_files(model_dir, first, diversity, n=3, steps=steps, seed=seed + 1)

    evaluation = out / "evaluation"
    _step(5, n, "evaluating: paired and distributional quality, downstream segmentation, privacy")
    quality = evaluate_quality(cohort / "imagesTs", synthetic, evaluation, labels=cohort / "labelsTs")
    test_real = _generic_view(out / "test_real", cohort / "imagesTs", cohort / "labelsTs")
    train_real = _generic_view(out / "train_real", cohort / "images", cohort / "labels")
    # A fixed number of steps (not a time budget): the same Dice on a quiet and on a busy machine.
    segmentation = evaluate_segmentation(train_real, test_real, synthetic, evaluation, steps=segmentation_steps,
                                         epochs=segmentation_epochs, seed=seed, protocols=["real"])
    # The held-out cases calibrate the copy audit (the synthetic volumes come from their label maps).
    privacy = audit_folders(train_real, synthetic, evaluation, held_out=test_real)
    _step(6, n, f"label-map editing: {SHOWCASE_EDIT.describe()} in {first.name}, sampled from the same noise")
    edit = run_label_edit(model_dir, first, [SHOWCASE_EDIT], evaluation, seed=seed, steps=steps)
    _step(7, n, "writing the report")
    record_samples(evaluation, first, sorted(diversity.glob("*.nii.gz")))  # for the report's 3D viewer
    build_report(evaluation)
    summary = headline(quality, segmentation, privacy, edit)
    summary["report"] = str(evaluation / "report.html")
    return summary


def run_label_edit(model_dir: str | Path, label_path: str | Path, edits, out: str | Path, seed: int = 0,
                   steps: int | None = None, progress: bool = True, **sampling) -> dict:
    """Edit one label map, sample original and edited from the same noise
    (`medlsdm.inference.editing`), then measure and picture the pair (`medlsdm.evaluation.editing`)."""
    from medlsdm.evaluation.editing import label_edit_result
    from medlsdm.inference.editing import sample_label_edit

    pair = sample_label_edit(model_dir, label_path, edits, out, seed=seed, steps=steps, progress=progress, **sampling)
    return label_edit_result(pair, edits, out)


def headline(quality: dict, segmentation: dict, privacy: dict, edit: dict | None = None) -> dict:
    """The few numbers the demo prints."""
    paired = quality.get("paired", {}).get("summary", {})
    gap = segmentation.get("domain_gap", {})
    return {
        "ssim": paired.get("ssim", {}).get("mean"),
        "psnr": paired.get("psnr", {}).get("mean"),
        "dice_real": gap.get("dice_real"),
        "dice_synthetic": gap.get("dice_synthetic"),
        "dice_ratio": gap.get("ratio"),
        # 2-voxel-period spectral peak, synthetic / real (1 = as real; > 1: a checkerboard)
        "checkerboard_ratio": quality.get("distribution", {}).get("checkerboard", {}).get("value"),
        "privacy_flagged": privacy.get("fraction_flagged"),
        "edit_mean_change": (edit or {}).get("mean_change"),
        "edit_followed": (edit or {}).get("followed"),
    }
