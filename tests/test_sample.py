"""`medlsdm sample` end to end on tiny trained runs: outputs on the label map's own (oblique,
anisotropic) grid with de-normalised intensities, one NIfTI + PNG per sample named after its
input, trajectory GIF, seeded determinism, clear errors; the Med-DDPM (pixel) and unconditional
latent models sample too."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from diffusion_runs import EMA_NOW, INTENSITY, PIXEL, UNCOND, make_dataset, train_ae, train_dm
from medlsdm import cli
from medlsdm.inference import load_model, synthesize

LO, HI = INTENSITY["channels"][0]["lo"], INTENSITY["channels"][0]["hi"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    data = make_dataset(root / "prepared")
    ae = train_ae(data, root / "ae")
    out = {"data": data, "ae": ae}
    for name, items, autoencoder in (("semantic", EMA_NOW, ae), ("pixel", PIXEL, None), ("uncond", UNCOND, ae)):
        assert train_dm(data, root / name, "trainer.max_steps=2", "trainer.preview_every_n_steps=0", *items,
                        autoencoder=autoencoder) == 0
        out[name] = root / name
    return out


def write_label_map(path, values=(0, 1, 2), shape=(20, 14, 18), seed=0):
    """A label map on an oblique, anisotropic grid (1.5 x 2.5 x 2 mm, rotated 0.3 rad about z,
    shifted): not the prepared 2 mm 16^3 grid."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 3)
    label = np.asarray(values, dtype=np.uint8)[np.digitize(field, np.quantile(field, [0.4, 0.7]))]
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([1.5, 2.5, 2.0])
    affine[:3, 3] = [-10.0, 5.0, 3.0]
    nib.save(nib.Nifti1Image(label, affine), str(path))
    return path


def sample(model, out, *args, labels=None):
    argv = ["sample", "--model", str(model), "--out", str(out), "--steps", "3", *args]
    return cli.main(argv + (["--labels", str(labels)] if labels else []))


def load(path):
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine


def test_semantic_sample_on_label_grid_with_trajectory(runs, tmp_path):
    label = write_label_map(tmp_path / "case_a.nii.gz")
    out = tmp_path / "out"
    assert sample(runs["semantic"], out, "--n", "2", "--batch-size", "2", "--guidance", "2",
                  "--save-trajectory", labels=label) == 0
    assert sorted(p.name for p in out.iterdir()) == [".medlsdm-output.json", "case_a_sample0.json",
                                                      "case_a_sample0.nii.gz", "case_a_sample0.png",
                                                      "case_a_sample0_trajectory.gif", "case_a_sample1.json",
                                                      "case_a_sample1.nii.gz", "case_a_sample1.png",
                                                      "sampling_report.json"]
    from medlsdm.data.io import is_synthetic
    from medlsdm.files import read_json

    provenance = read_json(out / "case_a_sample1.json")
    assert is_synthetic(out / "case_a_sample1.nii.gz") and provenance["label_map_case_id"] == "case_a"
    assert provenance["sample_index"] == 1 and provenance["model"]["name"] == runs["semantic"].name
    assert str(tmp_path) not in json.dumps(provenance) + (out / "sampling_report.json").read_text()   # no paths
    reference = nib.load(str(label))
    for k in (0, 1):
        array, affine = load(out / f"case_a_sample{k}.nii.gz")
        assert array.shape == reference.shape and np.allclose(affine, reference.affine, atol=1e-5)
        # de-normalised into the training intensities [lo, hi], not left in [-1, 1]
        assert array.dtype == np.float32 and LO <= array.min() and array.max() <= HI and np.ptp(array) > 2
    a0, _ = load(out / "case_a_sample0.nii.gz")
    a1, _ = load(out / "case_a_sample1.nii.gz")
    assert not np.array_equal(a0, a1)   # two samples, two noise draws
    from PIL import Image

    assert Image.open(out / "case_a_sample0_trajectory.gif").n_frames > 1


def test_same_seed_same_output_and_folder_input(runs, tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    write_label_map(labels / "a.nii.gz", seed=0)
    write_label_map(labels / "b.nii.gz", seed=1)
    (labels / "notes.txt").write_text("not a label map", encoding="utf-8")
    assert sample(runs["semantic"], tmp_path / "one", "--seed", "7", labels=labels) == 0
    assert sample(runs["semantic"], tmp_path / "two", "--seed", "7", labels=labels / "b.nii.gz") == 0
    assert sample(runs["semantic"], tmp_path / "three", "--seed", "8", labels=labels / "b.nii.gz") == 0
    assert sorted(p.name for p in (tmp_path / "one").glob("*.nii.gz")) == ["a_sample0.nii.gz", "b_sample0.nii.gz"]
    first, second, other = (load(tmp_path / d / "b_sample0.nii.gz")[0] for d in ("one", "two", "three"))
    # same seed: identical, whether sampled alone or within a folder; another seed differs
    assert np.array_equal(first, second) and not np.array_equal(first, other)


def test_unknown_class_and_missing_labels_are_clear_errors(runs, tmp_path, capsys):
    label = write_label_map(tmp_path / "bad.nii.gz", values=(0, 1, 7))
    assert sample(runs["semantic"], tmp_path / "out", labels=label) == 2
    err = capsys.readouterr().err
    assert "bad.nii.gz" in err and "[7]" in err and "not classes of this model" in err and "--label-map" in err
    assert not list(tmp_path.glob("out/*.nii.gz"))   # checked before anything is written
    assert sample(runs["semantic"], tmp_path / "out") == 2
    assert "give --labels" in capsys.readouterr().err
    assert sample(tmp_path / "nowhere", tmp_path / "out", labels=label) == 2
    assert "weights file not found" in capsys.readouterr().err


def test_med_ddpm_pixel_model_samples(runs, tmp_path):
    label = write_label_map(tmp_path / "mask.nii.gz")
    assert sample(runs["pixel"], tmp_path / "out", "--sampler", "ddpm", labels=label) == 0
    array, affine = load(tmp_path / "out" / "mask_sample0.nii.gz")
    reference = nib.load(str(label))
    assert array.shape == reference.shape and np.allclose(affine, reference.affine, atol=1e-5)
    assert LO <= array.min() and array.max() <= HI


def test_unconditional_model_takes_n_alone(runs, tmp_path, capsys):
    assert sample(runs["uncond"], tmp_path / "out", "--n", "2", "--sampler", "dpm++") == 0
    names = sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz"))
    assert names == ["sample_sample0.nii.gz", "sample_sample1.nii.gz"]
    array, affine = load(tmp_path / "out" / "sample_sample0.nii.gz")
    # the prepared 16^3 grid at the prepared 2 mm spacing, in canonical RAS axes
    assert array.shape == (16, 16, 16) and np.allclose(np.diag(affine)[:3], [2.0, 2.0, 2.0])
    assert LO <= array.min() and array.max() <= HI
    assert sample(runs["uncond"], tmp_path / "out2", labels=write_label_map(tmp_path / "l.nii.gz")) == 2
    assert "unconditional" in capsys.readouterr().err


def test_synthesize_is_seeded_in_memory(runs):
    model = load_model(runs["semantic"])
    label = np.load(runs["data"] / "labels" / "case003.npy")
    a, b = (synthesize(model, label, n=1, steps=2, guidance=1.5, seed=3, progress=False) for _ in range(2))
    assert a.shape == (1, 1, 16, 16, 16) and (a == b).all() and a.abs().max() <= 1


def test_clip_x0_bounds_the_x0_estimates(runs, tmp_path, capsys):
    """A given bound reaches the sampler (pixel space: the last DDIM step returns the clipped x0
    estimate); the default comes from the sidecar's sampling.clip_x0, else the data range."""
    from medlsdm.errors import MedlsdmError
    from medlsdm.inference import x0_clip

    model = load_model(runs["pixel"])
    label = np.load(runs["data"] / "labels" / "case003.npy")
    free = synthesize(model, label, n=1, steps=3, seed=1, progress=False)
    tight = synthesize(model, label, n=1, steps=3, seed=1, progress=False, clip_x0=0.05)
    assert free.abs().max() > 0.05 and tight.abs().max() <= 0.05 + 1e-6
    assert x0_clip(model) == 1.0
    model.sidecar["sampling"]["clip_x0"] = 0.05
    assert x0_clip(model) == 0.05 and (synthesize(model, label, n=1, steps=3, seed=1, progress=False) == tight).all()
    latent = load_model(runs["semantic"])
    assert x0_clip(latent) == latent.scaler.bound and x0_clip(latent, 2.5) == 2.5
    with pytest.raises(MedlsdmError, match="clip-x0"):
        x0_clip(latent, 0.0)
    label_path = write_label_map(tmp_path / "l.nii.gz")
    assert sample(runs["semantic"], tmp_path / "out", "--clip-x0", "2", labels=label_path) == 0
    assert sample(runs["semantic"], tmp_path / "bad", "--clip-x0", "-1", labels=label_path) == 2
    assert "clip-x0" in capsys.readouterr().err


def test_unconditional_grid_falls_back_to_the_training_spacing(runs):
    """With no spacing in the preparation spec (each case kept its own), unconditional samples
    are written at the training cases' median voxel size recorded in the sidecar."""
    from medlsdm.data.dataset import load_manifest
    from medlsdm.inference.pipeline import unconditional_record as _unconditional_record
    from medlsdm.training.export import prepared_spacing

    manifest = load_manifest(runs["data"])
    first = np.asarray(manifest["cases"][0]["record"]["affine"])
    assert prepared_spacing(manifest) == pytest.approx(np.linalg.norm(first[:3, :3], axis=0).tolist())
    fake = {"cases": [{"split": "train", "record": {"affine": np.diag([3.0, 1.5, 1.0, 1.0]).tolist()}},
                      {"split": "train", "record": {"affine": np.diag([5.0, 1.5, 1.0, 1.0]).tolist()}},
                      {"split": "test", "record": {"affine": np.diag([9.0, 9.0, 9.0, 1.0]).tolist()}}]}
    assert prepared_spacing(fake) == pytest.approx([4.0, 1.5, 1.0])
    model = load_model(runs["uncond"])
    model.prepare_spec["spacing"] = None
    model.sidecar.pop("training_geometry")   # a run from before the training geometry was recorded
    model.sidecar["image_spacing"] = [4.0, 1.5, 1.0]
    affine = np.asarray(_unconditional_record(model, (16, 16, 16))["affine"])
    assert np.linalg.norm(affine[:3, :3], axis=0) == pytest.approx([4.0, 1.5, 1.0])   # (D, H, W) columns


def test_attach_decoder_gives_a_trained_run_a_spade_decoder(runs, tmp_path):
    """A SPADE decoder trained on the run's frozen encoder replaces the plain one; the denoiser
    is untouched and sampling now passes the label map to the decoder. An autoencoder with
    another encoder is refused."""
    import shutil

    from diffusion_runs import AE_TINY, sets
    from medlsdm.errors import ConfigError
    from medlsdm.training.export import attach_decoder

    spade = tmp_path / "spade"
    assert cli.main(["train", "autoencoder", "--data", str(runs["data"]), "--out", str(spade),
                     *sets(*AE_TINY, "model.decoder=spade", "model.spade_hidden=8", f"init.from={runs['ae']}",
                           "init.freeze_encoder=true", "trainer.max_steps=2")]) == 0
    run = tmp_path / "run"
    shutil.copytree(runs["semantic"], run)
    assert cli.main(["train", "attach-decoder", "--model", str(run), "--autoencoder", str(spade)]) == 0
    model = load_model(run)
    assert model.autoencoder.decoder_kind == "spade"
    label = np.load(runs["data"] / "labels" / "case003.npy")
    x = synthesize(model, label, n=1, steps=2, guidance=1.5, seed=3, progress=False)
    assert x.shape == (1, 1, 16, 16, 16) and bool(x.isfinite().all())
    other = tmp_path / "other"
    assert cli.main(["train", "autoencoder", "--data", str(runs["data"]), "--out", str(other),
                     *sets(*AE_TINY, "trainer.max_steps=1", "trainer.seed=7")]) == 0
    with pytest.raises(ConfigError, match="encoder or codebook differs"):
        attach_decoder(run, other)
    assert cli.main(["train", "attach-decoder", "--model", str(run), "--autoencoder", str(other)]) == 2


def test_sample_owns_its_output_folder(runs, tmp_path, capsys):
    """A foreign non-empty folder or a folder holding the label maps is refused; a folder `sample`
    wrote before is reused; --overwrite writes into a foreign one, never over an input."""
    labels = tmp_path / "maps"
    labels.mkdir()
    write_label_map(labels / "a.nii.gz")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine", encoding="utf-8")
    assert sample(runs["semantic"], foreign, labels=labels) == 2
    assert "foreign" in capsys.readouterr().err and not list(foreign.glob("*.nii.gz"))
    assert sample(runs["semantic"], labels, labels=labels) == 2          # the inputs' own folder
    capsys.readouterr()
    out = tmp_path / "out"
    assert sample(runs["semantic"], out, labels=labels) == 0
    assert sample(runs["semantic"], out, labels=labels) == 0             # its own folder again
    assert sample(runs["semantic"], foreign, "--overwrite", labels=labels) == 0
    assert (foreign / "notes.txt").read_text(encoding="utf-8") == "mine" and (foreign / "a_sample0.nii.gz").is_file()


def test_large_maps_grow_the_window_or_tile_or_crop(runs, tmp_path):
    """A map whose foreground is larger than the 16^3 training window (at 2 mm): the default grows
    the window, --tile samples it in blended tiles of the training window, --crop cuts (and says
    so); every output lands on the map's own grid with its whole foreground generated."""
    label = write_label_map(tmp_path / "big.nii.gz", shape=(40, 24, 30))   # ~60 mm across: 30 voxels at 2 mm
    reference = nib.load(str(label))
    fg = np.asarray(reference.dataobj) > 0
    reports = {}
    for name, extra in (("grow", []), ("tile", ["--tile"]), ("crop", ["--crop"])):
        out = tmp_path / name
        assert sample(runs["semantic"], out, "--guidance", "2", *extra, labels=label) == 0
        entry = json.loads((out / "sampling_report.json").read_text(encoding="utf-8"))["label_maps"][0]
        reports[name] = entry
        array, affine = load(out / "big_sample0.nii.gz")
        assert array.shape == reference.shape and np.allclose(affine, reference.affine, atol=1e-5)
        inside = np.isclose(array[fg], array.min()).mean()
        if name != "crop":
            assert inside < 0.05, f"{name}: foreground left at the fill value"
    assert reports["grow"]["grid"] == reports["tile"]["grid"] and max(reports["grow"]["grid"]) > 16
    assert any("larger than the training window" in n for n in reports["tile"]["notes"])
    assert reports["crop"]["grid"] == [16, 16, 16] and any("--crop" in w for w in reports["crop"]["warnings"])


def test_samples_take_a_drawn_appearance_and_record_it(runs, tmp_path, capsys):
    """A model with an appearance profile: each sample gets a training scan's noise, contrast and
    bias (drawn with its seed, recorded in its provenance and the report); `--appearance none`
    gives the decoder's output, as for a model without a profile; bad values are one-line errors."""
    import shutil

    run, bare = tmp_path / "run", tmp_path / "bare"
    scans = [{"noise": 0.05, "contrast": -0.2, "bias": 0.1}, {"noise": 0.2, "contrast": 0.1, "bias": 0.3}]
    for folder, profile in ((run, {"version": 1, "tissue": 1, "other": 2, "noise_model": "rician",
                                   "channels": [scans]}), (bare, None)):
        shutil.copytree(runs["semantic"], folder)
        sidecar = json.loads((folder / "diffusion.json").read_text(encoding="utf-8"))
        sidecar.pop("appearance", None)
        if profile:
            sidecar["appearance"] = profile
        (folder / "diffusion.json").write_text(json.dumps(sidecar), encoding="utf-8")
    label = write_label_map(tmp_path / "case_a.nii.gz", shape=(24, 20, 22))
    assert sample(run, tmp_path / "drawn", "--n", "3", labels=label) == 0
    assert sample(run, tmp_path / "none", "--n", "3", "--appearance", "none", labels=label) == 0
    assert sample(bare, tmp_path / "plain", "--n", "3", labels=label) == 0
    drawn = [load(tmp_path / "drawn" / f"case_a_sample{k}.nii.gz")[0] for k in range(3)]
    for k in range(3):
        plain = load(tmp_path / "plain" / f"case_a_sample{k}.nii.gz")[0]
        assert np.array_equal(load(tmp_path / "none" / f"case_a_sample{k}.nii.gz")[0], plain)
        assert not np.array_equal(drawn[k], plain)
        provenance = json.loads((tmp_path / "drawn" / f"case_a_sample{k}.json").read_text(encoding="utf-8"))
        assert provenance["appearance"][0] in scans
    report = json.loads((tmp_path / "drawn" / "sampling_report.json").read_text(encoding="utf-8"))
    assert report["appearance"] == "auto"
    capsys.readouterr()
    assert sample(run, tmp_path / "bad", "--appearance", "noise=0.1", labels=label) == 2
    assert "needs noise, contrast, bias" in capsys.readouterr().err
    assert sample(bare, tmp_path / "bad2", "--appearance", "sample", labels=label) == 2
    assert "no appearance profile" in capsys.readouterr().err
