"""The built-in demo cohort (medlsdm.data.demo) and `medlsdm demo-data`, on tiny grids (24^3 at 8 mm)."""

import json

import nibabel as nib
import numpy as np
import pytest

from medlsdm.cli import main
from medlsdm.data import demo
from medlsdm.errors import ConfigError, MedlsdmError

SMALL = dict(shape=24, spacing=8.0)


def _load(path):
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "cohort"
    return demo.write_demo_cohort(out, n_subjects=4, n_test=1, seed=3, progress=False, **SMALL)


def _subjects(root):
    pairs = []
    for images, labels in (("images", "labels"), ("imagesTs", "labelsTs")):
        for path in sorted((root / images).glob("*.nii.gz")):
            pairs.append((_load(path), _load(root / labels / path.name)))
    return pairs


def test_layout_and_metadata(cohort):
    names = [f"subject_{i:03d}.nii.gz" for i in range(4)]
    assert sorted(p.name for p in (cohort / "images").iterdir()) == names[:3]
    assert sorted(p.name for p in (cohort / "labels").iterdir()) == names[:3]
    assert sorted(p.name for p in (cohort / "imagesTs").iterdir()) == names[3:]
    assert sorted(p.name for p in (cohort / "labelsTs").iterdir()) == names[3:]
    assert json.loads((cohort / "labels.json").read_text(encoding="utf-8")) == {
        "0": "background", "1": "csf_other_brain", "2": "grey_matter", "3": "white_matter"
    }
    meta = json.loads((cohort / "dataset.json").read_text(encoding="utf-8"))
    assert meta["generator"] == demo.GENERATOR
    assert (meta["numTraining"], meta["numTest"]) == (3, 1)
    assert meta["parameters"]["shape"] == [24, 24, 24] and meta["parameters"]["seed"] == 3
    assert "ICBM152" in (cohort / "README.txt").read_text(encoding="utf-8")
    assert not [p for p in cohort.parent.iterdir() if p.name.startswith(".tmp")]  # atomic write cleaned up


def test_labels_plausible_and_aligned_with_intensities(cohort):
    for (image, image_affine), (labels, label_affine) in _subjects(cohort):
        assert image.shape == labels.shape == (24, 24, 24)
        assert image.dtype == np.float32 and np.issubdtype(labels.dtype, np.integer)
        np.testing.assert_array_equal(image_affine, label_affine)
        assert set(np.unique(labels)) == {0, 1, 2, 3}
        counts = np.bincount(labels.ravel(), minlength=4)
        brain = counts[1:].sum()
        brain_ml = brain * 8.0**3 / 1000
        assert 1200 < brain_ml < 2500  # an adult brain, not the whole box or a blob
        assert (counts[2] + counts[3]) / brain > 0.75  # grey + white matter dominate the brain
        # At 8 mm partial volumes favour grey matter; at 3 mm the split is about 60/34.
        assert 0.15 < counts[3] / brain < 0.55 and 0.3 < counts[2] / brain < 0.8
        # T1 weighting: white matter > grey matter > CSF/other > background, only if aligned.
        means = [image[labels == k].mean() for k in range(4)]
        assert means[3] > means[2] > means[1] > means[0]


def _explained_variance(image, labels):
    """Share of the image's variance explained by the label classes (correlation ratio)."""
    fitted = np.zeros_like(image, dtype=np.float64)
    for k in np.unique(labels):
        fitted[labels == k] = image[labels == k].mean()
    return 1 - np.var(image - fitted) / np.var(image)


def test_each_image_fits_its_own_label_map_best(cohort):
    subjects = _subjects(cohort)
    for i, ((image, _), (labels, _)) in enumerate(subjects):
        own = _explained_variance(image, labels)
        others = [_explained_variance(image, other) for j, (_, (other, _)) in enumerate(subjects) if j != i]
        assert own > max(others) + 0.01


def test_subjects_differ_from_each_other_and_from_template(cohort):
    template_image, template_labels, _ = demo.build_template(**SMALL)
    subjects = _subjects(cohort)
    for (image, _), (labels, _) in subjects:
        assert np.mean(labels != template_labels) > 0.02
        assert np.corrcoef(image.ravel(), template_image.ravel())[0, 1] < 0.999
    (_, (first, _)), (_, (second, _)) = subjects[0], subjects[1]
    assert np.mean(first != second) > 0.02


def test_seeded_determinism_and_subject_independent_of_cohort_size(cohort, tmp_path):
    smaller = demo.write_demo_cohort(tmp_path / "again", n_subjects=3, n_test=0, seed=3, progress=False, **SMALL)
    for i in range(3):  # same seed: identical subjects, though the cohort and its split differ
        for folder in ("images", "labels"):
            np.testing.assert_array_equal(
                _load(smaller / folder / f"subject_{i:03d}.nii.gz")[0], _load(cohort / folder / f"subject_{i:03d}.nii.gz")[0]
            )
    template_image, template_labels, _ = demo.build_template(**SMALL)
    again = demo.make_subject(template_image, template_labels, demo.subject_rng(3, 3), spacing=8.0)
    np.testing.assert_array_equal(again[0], _load(cohort / "imagesTs" / "subject_003.nii.gz")[0])
    other_seed = demo.make_subject(template_image, template_labels, demo.subject_rng(4, 0), spacing=8.0)
    assert not np.array_equal(other_seed[1], _load(cohort / "labels" / "subject_000.nii.gz")[0])


def test_expected_scan_is_the_scans_mean_over_its_noise():
    """`_vary_intensity(noise="expected")` (the benchmarks' reconstruction ceiling) draws the same
    bias field, gamma and gain, and gives the Rician mean: averaged over many noise draws of one
    scan (same field, gamma and gain: the generator's draws before the noise replayed), the scan
    is the expected one, in the dark background (Rayleigh: about 1.25 noise SDs) as in tissue;
    other draws give another scan."""
    template_image, _, _ = demo.build_template(**SMALL)
    anatomy = np.asarray(template_image, dtype=np.float64)
    expected = demo._vary_intensity(anatomy, np.random.default_rng(7), demo.VARIATION, noise="expected")

    class Replay:   # the generator's first draws (field, gamma, gain, sigma) again, fresh noise after
        def __init__(self, k):
            self.first, self.noise, self.calls = np.random.default_rng(7), np.random.default_rng(100 + k), 0

        def normal(self, *args, **kwargs):
            self.calls += 1
            source = self.first if self.calls <= 2 else self.noise   # the bias field, the gamma
            return source.normal(*args, **kwargs)

        def uniform(self, *args, **kwargs):
            return self.first.uniform(*args, **kwargs)

    mean = np.mean([demo._vary_intensity(anatomy, Replay(k), demo.VARIATION) for k in range(200)], axis=0)
    scale = float(expected.max())
    dark, bright = anatomy == 0, anatomy > 0.3
    assert dark.sum() > 100 and bright.sum() > 100
    assert np.abs(mean - expected)[bright].mean() < 0.01 * scale
    assert np.abs(mean - expected)[dark].mean() < 0.01 * scale
    assert expected[dark].mean() > 0.005 * scale                 # the Rayleigh floor, not zero
    other = demo._vary_intensity(anatomy, np.random.default_rng(8), demo.VARIATION, noise="expected")
    assert not np.allclose(expected, other)
    with pytest.raises(ValueError, match="noise must be"):
        demo._vary_intensity(anatomy, np.random.default_rng(7), demo.VARIATION, noise="none")


def test_grid_geometry_follows_shape_and_spacing():
    image, labels, affine = demo.build_template(shape=(20, 24, 16), spacing=(9.0, 8.0, 10.0))
    assert image.shape == labels.shape == (20, 24, 16)
    np.testing.assert_allclose(affine[:3, :3], np.diag([9.0, 8.0, 10.0]))
    # World coordinates are MNI mm: the origin lies on a voxel centre inside the grid, and the
    # left and right halves of the brain are about equally large (the template is symmetric).
    origin = np.linalg.inv(affine) @ [0, 0, 0, 1]
    np.testing.assert_allclose(origin[:3], np.round(origin[:3]), atol=1e-9)
    assert np.all((origin[:3] >= 0) & (origin[:3] < [20, 24, 16]))
    x0 = int(round(origin[0]))
    left, right = (labels[:x0] > 0).sum(), (labels[x0 + 1:] > 0).sum()
    assert abs(left - right) / (left + right) < 0.1
    with pytest.raises(ConfigError, match="shape"):
        demo.build_template(shape=(20, 24), spacing=8.0)


def test_missing_template_file_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "template_dir", lambda: tmp_path)
    with pytest.raises(MedlsdmError, match="mni_icbm152_t1.*missing"):
        demo._read_template("t1")


def test_cli_end_to_end_and_rerun(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo-data", "--out", str(out), "--n-subjects", "3", "--n-test", "1", "--shape", "24", "24", "20",
            "--spacing", "8", "--seed", "5"]
    assert main(args) == 0
    labels, affine = _load(out / "labelsTs" / "subject_002.nii.gz")
    assert labels.shape == (24, 24, 20)
    np.testing.assert_allclose(np.diag(affine)[:3], 8.0)
    assert len(list((out / "images").glob("*.nii.gz"))) == 2
    assert main(args[:-1] + ["6"]) == 0  # an earlier demo cohort is replaced
    assert json.loads((out / "dataset.json").read_text(encoding="utf-8"))["parameters"]["seed"] == 6


def _error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("medlsdm: error:")
    return err


def test_cli_errors_are_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x", encoding="utf-8")
    assert main(["demo-data", "--out", str(blocker / "demo"), "--shape", "16", "--spacing", "8"]) == 2
    assert "a_file" in _error_line(capsys)
    assert not list(tmp_path.glob(".tmp*"))

    assert main(["demo-data", "--out", str(tmp_path / "d"), "--n-subjects", "2", "--n-test", "2"]) == 2
    assert "--n-test" in _error_line(capsys)

    # A folder that is not an earlier demo cohort is never replaced (writing replaces it whole).
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("keep", encoding="utf-8")
    assert main(["demo-data", "--out", str(precious), "--shape", "16", "--spacing", "8"]) == 2
    assert "not an earlier demo cohort" in _error_line(capsys)
    assert (precious / "keep.txt").read_text(encoding="utf-8") == "keep"
