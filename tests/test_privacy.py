"""Memorisation audit: copies of training volumes are flagged, new volumes are not."""

import json

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from medlsdm.errors import DataError, MedlsdmError
from medlsdm.evaluation.privacy import nearest_neighbours, privacy_audit, real_to_real_nearest

SHAPE = (16, 16, 16)


def field(rng, sigma=2.0, shape=SHAPE):
    v = gaussian_filter(rng.normal(size=shape), sigma)
    return v / v.std()


TEMPLATE = field(np.random.default_rng(100), 3.0)


def patient(rng):
    """A 'patient': the shared anatomy template plus a subject-specific smooth variation."""
    return (TEMPLATE + 0.8 * field(rng)).astype(np.float32)


@pytest.fixture(scope="module")
def train():
    rng = np.random.default_rng(0)
    return [patient(rng) for _ in range(8)]


def test_ncc_nearest_finds_copies_and_is_a_correlation(train):
    rng = np.random.default_rng(1)
    synthetic = [train[5] * 2 + 1, train[2] + 0.05 * rng.normal(size=SHAPE)]
    result = nearest_neighbours(synthetic, train)
    assert list(result.index) == [5, 2]
    assert result.similarity[0] == pytest.approx(1.0, abs=1e-5)  # invariant to gain and offset
    expected = np.corrcoef(synthetic[1].ravel(), train[2].ravel())[0, 1]
    assert result.similarity[1] == pytest.approx(expected, abs=1e-5)


def test_blocks_do_not_change_the_answer(train):
    synthetic = [train[i][::-1].copy() for i in range(5)]
    whole = nearest_neighbours(synthetic, train)
    tiny = nearest_neighbours(synthetic, train, block_bytes=1)  # one volume per block
    np.testing.assert_array_equal(whole.index, tiny.index)
    np.testing.assert_allclose(whole.similarity, tiny.similarity, atol=1e-6)


def test_real_to_real_is_leave_one_out_and_respects_groups(train):
    vols = train[:4] + [train[0].copy()]                       # volume 4 repeats subject of 0
    loo = real_to_real_nearest(vols)
    assert loo.index[0] == 4 and loo.similarity[0] == pytest.approx(1.0, abs=1e-5)
    grouped = real_to_real_nearest(vols, groups=["a", "b", "c", "d", "a"])
    assert grouped.index[0] != 4 and grouped.similarity[0] < 0.95
    assert all(grouped.index[i] != i for i in range(5))


def test_audit_flags_copies_only(train):
    rng = np.random.default_rng(2)
    copies = [train[3].copy(), train[6] + 0.05 * rng.normal(size=SHAPE).astype(np.float32)]
    noise = [rng.normal(size=SHAPE).astype(np.float32) for _ in range(3)]
    report = privacy_audit(copies + noise, train, synthetic_ids=["c3", "c6", "n0", "n1", "n2"],
                           train_ids=[f"t{i}" for i in range(8)])
    assert report["n_flagged"] == 2 and report["fraction_flagged"] == pytest.approx(0.4)
    assert [(p["synthetic_id"], p["train_id"]) for p in report["flagged"]] == [("c3", "t3"), ("c6", "t6")]
    assert report["threshold"] == pytest.approx(max(report["train_to_train"]))
    assert len(report["synthetic_to_train"]) == 5 and len(report["train_to_train"]) == 8
    json.dumps(report, allow_nan=False)                        # ready for the report writer
    clean = privacy_audit(noise, train)
    assert clean["n_flagged"] == 0 and clean["fraction_flagged"] == 0.0
    # A low quantile is stricter: it flags new patients as close as typical real pairs.
    new_patients = [patient(rng) for _ in range(3)]
    assert privacy_audit(new_patients, train)["n_flagged"] < 3
    assert privacy_audit(new_patients, train, quantile=0.05)["n_flagged"] >= 1


def test_ssim_similarity_and_mask(train):
    report = privacy_audit([train[1].copy()], train, similarity="ssim", data_range=8.0)
    assert report["flagged"][0]["train_id"] == "1" and report["flagged"][0]["similarity"] == pytest.approx(1.0)
    mask = np.zeros(SHAPE, bool)
    mask[:8] = True
    half = train[4].copy()
    half[8:] = 0                                                # differs only outside the mask
    masked = nearest_neighbours([half], train, mask=mask)
    assert masked.index[0] == 4 and masked.similarity[0] == pytest.approx(1.0, abs=1e-5)
    assert nearest_neighbours([half], train).similarity[0] < 0.9


def test_bad_inputs(train):
    with pytest.raises(MedlsdmError, match="data_range"):
        privacy_audit(train[:1], train, similarity="ssim")
    with pytest.raises(MedlsdmError, match="similarity"):
        nearest_neighbours(train[:1], train, similarity="l2")
    with pytest.raises(DataError, match="one shape"):
        nearest_neighbours([np.zeros((8, 8, 8))], train)
    with pytest.raises(DataError, match="train_ids"):
        privacy_audit(train[:1], train, train_ids=["a"])


# ----------------------------------------------------------------------------- copy audit
# Label-conditioned phantoms: anatomy from a label map (head, tissue, a "ventricle" at a random
# place), a per-subject bias field and a per-subject texture the map does not explain.

from scipy.ndimage import map_coordinates  # noqa: E402

from medlsdm.evaluation.copying import copy_audit, detail_residual, intensity_field  # noqa: E402

CSHAPE = (24, 24, 24)


def label_map(rng):
    g = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in CSHAPE], indexing="ij"), -1)
    lab = np.zeros(CSHAPE, np.int16)
    r = np.sqrt(((g / rng.uniform([9, 8, 7], [11, 10, 9])) ** 2).sum(-1))
    lab[r < 1] = 1
    lab[r < 0.75] = 2
    centre = rng.uniform(-2, 2, 3)
    lab[np.sqrt((((g - centre) / rng.uniform(2, 3.5, 3)) ** 2).sum(-1)) < 1] = 4  # labels 0/1/2/4
    return lab


COMMON = field(np.random.default_rng(99), 1.5, CSHAPE)  # anatomy-scale texture every subject shares


def bias_field(rng):
    """A smooth multiplicative bias field, log-SD 0.12 (as in the demo cohort)."""
    return np.exp(0.12 * field(rng, 6.0, CSHAPE))


def image_for(rng, lab, bias=None):
    """A new patient (or an honest sample) for label map ``lab``: the cohort's common texture (which a
    model learns, like the demo cohort's template texture) plus a fresh bias field (unless given),
    texture and noise."""
    means = {0: 0.0, 1: 0.35, 2: 0.6, 4: 0.9}
    img = np.vectorize(means.get)(lab) * rng.uniform(0.95, 1.05)
    img = img * (bias_field(rng) if bias is None else bias)
    img = img + (lab > 0) * (0.3 * gaussian_filter(rng.normal(size=CSHAPE), 1.0) + 0.1 * COMMON)
    return (img + 0.01 * rng.normal(size=CSHAPE)).astype(np.float32)


def deform(img, rng, amount=0.8):
    """A smooth random displacement of at most ``amount`` voxels."""
    disp = [gaussian_filter(rng.normal(size=img.shape), 4) for _ in range(3)]
    grid = np.meshgrid(*[np.arange(n) for n in img.shape], indexing="ij")
    coords = [g + d / np.abs(d).max() * amount for g, d in zip(grid, disp)]
    return map_coordinates(img, coords, order=1, mode="nearest").astype(np.float32)


@pytest.fixture(scope="module")
def cohort():
    rng = np.random.default_rng(0)
    train_labels = [label_map(rng) for _ in range(8)]
    held_labels = [label_map(rng) for _ in range(8)]
    train_bias = [bias_field(rng) for _ in range(8)]
    return ([image_for(rng, lab, b) for lab, b in zip(train_labels, train_bias)], train_labels,
            [image_for(rng, lab) for lab in held_labels], held_labels, train_bias)


KINDS = ("exact", "noisy", "shifted", "flipped", "scaled", "deformed", "reconstructed")


def copies_of(image, label, bias, rng):
    return {"exact": image, "noisy": image + 0.03 * rng.normal(size=image.shape).astype(np.float32),
            "shifted": np.roll(image, (1, -1, 0), (0, 1, 2)), "flipped": image[::-1].copy(),
            "scaled": 1.3 * image + 0.2, "deformed": deform(image, rng),
            # the patient's intensity field with new detail (like a memorised latent through the decoder)
            "reconstructed": image_for(rng, label, bias)}


def test_planted_copies_are_flagged_honest_samples_at_the_baseline_rate(cohort):
    train, train_labels, held, held_labels, train_bias = cohort
    rng = np.random.default_rng(5)
    synthetic, labels, ids, subjects = [], [], [], []
    for victim in (3, 6):  # copies of a training image "sampled from" that image's own label map
        for kind, volume in copies_of(train[victim], train_labels[victim], train_bias[victim], rng).items():
            synthetic.append(volume), labels.append(train_labels[victim]), ids.append(f"{kind}-of-{victim}")
            subjects.append(f"t{victim}")
    for i, lab in enumerate(train_labels):  # honest samples: the training map, the cohort's texture, new detail
        for k in range(2):
            synthetic.append(image_for(rng, lab)), labels.append(lab), ids.append(f"honest-{i}-{k}")
            subjects.append(f"t{i}")
    held_samples = [(i, image_for(rng, lab)) for i, lab in enumerate(held_labels)]  # samples of unseen maps
    result = copy_audit(synthetic, labels, train, train_labels, held, held_labels, synthetic_ids=ids,
                        train_ids=[f"t{i}" for i in range(8)], synthetic_subjects=subjects,
                        held_out_samples=held_samples)
    json.dumps(result, allow_nan=False)
    detail, field = result["bands"]["detail"], result["bands"]["field"]
    assert len(detail["held_out_samples_to_own_image"]) == 8 and result["n_calibration"] == {"detail": 16, "field": 72}
    assert field["held_out_to_train_pairs"] == 64 and field["n_tested"] == len(synthetic)
    pairs = {p["synthetic_id"]: p for p in result["pairs"]}
    for victim in (3, 6):
        for kind in KINDS:
            p = pairs[f"{kind}-of-{victim}"]
            assert p["flagged"] and p["train_id"] == f"t{victim}", (kind, p)
            # the detail band finds copies that keep the voxel-scale detail, the field band the one with
            # new detail (and the noisy one, whose noise is stronger than the image's own fine detail here)
            assert ("detail" in p["flagged_bands"]) == (kind not in ("reconstructed", "noisy")), (kind, p)
        assert pairs[f"reconstructed-of-{victim}"]["flagged_bands"] == ["field"]
    honest = [p for name, p in pairs.items() if name.startswith("honest")]
    honest_rate = np.mean([p["flagged"] for p in honest])
    # Honest samples share their training map's anatomy and the cohort's texture, yet score like
    # unseen data: flagged no more often than an unseen case would be (plus one sample's worth).
    assert honest_rate <= result["baseline_rate"] + 1 / len(honest)
    assert max(p["detail"]["similarity"] for p in honest) + 0.05 < min(
        pairs[f"{k}-of-{v}"]["detail"]["similarity"] for k in ("exact", "shifted", "flipped", "scaled", "deformed")
        for v in (3, 6))
    assert {"t3", "t6"} <= set(result["subjects_flagged"])
    assert result["n_held_out"] == 8 and 0 <= result["baseline_rate"] <= 0.25
    assert detail["threshold"] == max(detail["held_out_to_train"] + detail["held_out_samples_to_own_image"])
    assert result["baseline_rate"] == pytest.approx(1 - (1 - detail["baseline_rate"]) * (1 - field["baseline_rate"]))

    # The plain nearest-neighbour test on the images cannot tell: honest samples of a training map
    # look more like that training image than held-out patients do.
    plain = privacy_audit(synthetic[2 * len(KINDS):], train, held_out=held)
    assert plain["fraction_flagged"] > 0.5


def test_bands_remove_what_the_label_map_and_the_cohort_explain():
    rng = np.random.default_rng(1)
    lab = label_map(rng)
    a, b = image_for(rng, lab), image_for(rng, lab)
    ra, ma = detail_residual(a, lab)
    rb, _ = detail_residual(b, lab)
    assert ra.shape == (1, *CSHAPE) and ma.sum() > 100 and np.all(ra[:, ~ma] == 0)
    assert np.linalg.norm(ra) == pytest.approx(1.0, abs=1e-5)
    # same map, different patients: raw images correlate strongly, their detail does not
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.8
    assert abs(float(np.sum(ra * rb))) < 0.5   # what is left in common: the cohort texture
    # the field band does not see gain, offset or class contrast
    fa = intensity_field(a, lab)
    np.testing.assert_allclose(intensity_field(2.0 * a + 5.0, lab), fa, atol=1e-4)
    assert np.isnan(fa[0][lab == 0]).all() and np.isfinite(fa[0][lab > 0]).mean() > 0.9
    with pytest.raises(DataError, match="label map shape"):
        detail_residual(a, lab[:-1])


def test_held_out_subjects_in_training_are_left_out_and_too_few_is_an_error(cohort):
    train, train_labels, held, held_labels, _ = cohort
    result = copy_audit([train[0]], [train_labels[0]], train, train_labels, held[:3], held_labels[:3],
                        train_subjects=["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7"],
                        held_out_ids=["h0", "h1", "h2"], held_out_subjects=["s1", "x", "y"])
    assert result["held_out_left_out"] == ["h0"] and result["n_held_out"] == 2
    with pytest.raises(DataError, match="at least 2 held-out"):
        copy_audit([train[0]], [train_labels[0]], train, train_labels, held[:1], held_labels[:1])


def test_privacy_command_on_folders_uses_the_copy_audit(tmp_path, capsys):
    from evaluation_data import write_nifti
    from medlsdm.cli import main

    rng = np.random.default_rng(7)
    images = {}
    for folder, ids in (("train", [f"t{i}" for i in range(6)]), ("held", [f"h{i}" for i in range(4)])):
        for case in ids:
            lab = label_map(rng)
            images[case] = (image_for(rng, lab), lab)
            write_nifti(tmp_path / folder / "images" / f"{case}.nii.gz", images[case][0])
            write_nifti(tmp_path / folder / "labels" / f"{case}.nii.gz", lab)
    syn = tmp_path / "syn"
    write_nifti(syn / "t2_sample0.nii.gz", deform(images["t2"][0], rng))        # a copy
    for case in ("t0", "t1", "t3"):                                                   # honest samples
        write_nifti(syn / f"{case}_sample0.nii.gz", image_for(rng, images[case][1]))
    out = tmp_path / "out"
    assert main(["evaluate", "privacy", "--train", str(tmp_path / "train"), "--held-out", str(tmp_path / "held"),
                 "--synthetic", str(syn), "--out", str(out)]) == 0
    result = json.loads((out / "privacy.json").read_text(encoding="utf-8"))
    assert result["mode"] == "conditional" and result["map_cases"]["t2_sample0"] == "t2"
    assert result["train"] == "../train" and str(tmp_path) not in json.dumps(result)   # relative paths
    # the copy is flagged and far above everything else (with 4 held-out cases an honest sample
    # exceeds their maximum with probability about 1/5: the baseline rate)
    assert result["flagged"][0]["synthetic_id"] == "t2_sample0" and result["flagged"][0]["train_id"] == "t2"
    honest = [p["similarity"] for p in result["pairs"] if p["synthetic_id"] != "t2_sample0"]
    assert max(honest) + 0.2 < result["flagged"][0]["similarity"]   # copy margins
    assert f"conditional audit: {result['n_flagged']} of 4 synthetic volumes flagged" in capsys.readouterr().out
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "What this audit can and cannot detect" in report and "held-out" in report
    # without held-out cases the conditional audit cannot be calibrated: a one-line error
    assert main(["evaluate", "privacy", "--train", str(tmp_path / "train"), "--synthetic", str(syn),
                 "--mode", "conditional", "--out", str(tmp_path / "o2")]) == 2
    assert "needs --held-out" in capsys.readouterr().err
