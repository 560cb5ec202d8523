"""The acquisition appearance model (`medlsdm.data.appearance`): a clean synthetic volume given a
target's noise, contrast and bias reaches them; seeds vary it; the profile is fitted from data
the demo did not make (a phantom with 0, 1, 2, 4 labels and a bright tissue that is not the
largest class); samples of a trained model vary in appearance and record what they got."""

import json

import numpy as np
import pytest

from medlsdm.data.appearance import (appearance_profile, appearance_statistics, apply_appearance, choose_target,
                                     tissue_pair)
from medlsdm.errors import DataError


def _phantom(size: int = 28):
    """Nested ellipsoids, labels 0 (background), 1, 2 (the largest), 4 (brightest, inside 2)."""
    grid = np.indices((size,) * 3).astype(float) - (size - 1) / 2
    r = np.sqrt((grid[0] / 1.1) ** 2 + grid[1] ** 2 + (grid[2] / 0.9) ** 2)
    label = np.zeros((size,) * 3, dtype=np.int64)
    label[r < 11.8] = 1
    label[r < 11] = 2
    label[r < 7] = 4
    return label, grid / size


def _scan(label, grid, rng, noise, gamma, bias):
    """A 'real' scan in prepared intensities [-1, 1] (background = -1 = no signal)."""
    signal = np.choose(np.searchsorted([0, 1, 2, 4], label), [0.0, 0.3, 0.55, 0.85]) ** gamma
    field = np.exp(bias * (grid[0] + 0.5 * grid[1] ** 2 * 4))
    signal = signal * field
    signal = np.sqrt((signal + rng.normal(scale=noise, size=signal.shape)) ** 2
                     + rng.normal(scale=noise, size=signal.shape) ** 2)
    return np.clip(signal / 0.9 * 2 - 1, -1, 1)


def test_tissue_pair_is_the_thickest_class_and_the_largest_other():
    label, _ = _phantom()
    assert tissue_pair([label]) == (2, 4)
    # a thin sheet with many voxels (like cortex) loses to a thick ball with fewer
    sheet = np.zeros((30, 30, 30), dtype=np.int64)
    sheet[2:28, 2:28, 2:4] = 1                   # 1,352 voxels, 2 thick: nothing survives erosion
    sheet[10:20, 10:20, 10:20] = 3               # 1,000 voxels
    sheet[22:25, 5:9, 10:20] = 5                 # 120 voxels
    assert tissue_pair([sheet]) == (3, 1)
    with pytest.raises(DataError, match="two foreground classes"):
        tissue_pair([(label > 0).astype(int)])


def test_clean_volume_reaches_the_targets_appearance():
    label, grid = _phantom()
    rng = np.random.default_rng(0)
    reals = [_scan(label, grid, rng, noise, gamma, bias)
             for noise, gamma, bias in [(0.01, 0.9, 0.05), (0.03, 1.2, 0.25), (0.05, 1.0, 0.15)]]
    profile = appearance_profile(reals, [label] * 3, "mr")
    assert (profile["tissue"], profile["other"], profile["noise_model"]) == (2, 4, "rician")
    clean = _scan(label, grid, np.random.default_rng(1), 1e-4, 1.1, 0.0)   # what a decoder gives
    for target in profile["channels"][0]:
        out = apply_appearance(clean, label, profile, target, np.random.default_rng(5))
        got = appearance_statistics(out, label, 2, 4)
        assert got["contrast"] == pytest.approx(target["contrast"], abs=0.01)
        assert got["noise"] == pytest.approx(target["noise"], rel=0.25)
        assert got["bias"] == pytest.approx(target["bias"], rel=0.3, abs=0.01)
        assert out.min() >= -1 and out.max() <= 1 and out.dtype == np.float32
        # background stays near 'no signal' (Rician noise only), the brain keeps its order
        assert np.median(out[label == 0]) < -0.8
        assert np.median(out[label == 4]) > np.median(out[label == 2])


def test_appearance_is_seeded_and_noise_already_there_counts():
    label, grid = _phantom()
    profile = appearance_profile([_scan(label, grid, np.random.default_rng(0), 0.03, 1.0, 0.1)], [label], "mr")
    target = choose_target(profile, 0, np.random.default_rng(0))
    clean = _scan(label, grid, np.random.default_rng(1), 1e-4, 1.0, 0.0)
    a = apply_appearance(clean, label, profile, target, np.random.default_rng(7))
    b = apply_appearance(clean, label, profile, target, np.random.default_rng(7))
    c = apply_appearance(clean, label, profile, target, np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # a volume that already has the target's noise gets no more
    noisy = _scan(label, grid, np.random.default_rng(2), 0.03, 1.0, 0.1)
    again = apply_appearance(noisy, label, profile, appearance_statistics(noisy, label, 2, 4),
                             np.random.default_rng(3))
    assert appearance_statistics(again, label, 2, 4)["noise"] == pytest.approx(
        appearance_statistics(noisy, label, 2, 4)["noise"], rel=0.05)


def test_a_field_that_cancels_the_volumes_own_bias_still_reaches_the_target(monkeypatch):
    """A decoder's output has a bias field of its own; the drawn field can lie against it, so the
    measured bias first falls as the field grows. The field strength must still land on the
    target, not at its bound (a secant step from a small strength did: one bright corner, the rest
    of the brain pushed to the floor when the top was put back)."""
    import medlsdm.data.appearance as appearance

    label, grid = _phantom()
    own_log_field = grid[0] + 0.5 * grid[1] ** 2 * 4          # the field _scan multiplies by

    def against(shape, core, rng):                             # the drawn field: minus the volume's own
        f = own_log_field[core]
        return -(own_log_field - f.mean()) / f.std()

    monkeypatch.setattr(appearance, "_smooth_log_field", against)
    volume = _scan(label, grid, np.random.default_rng(1), 1e-4, 1.0, 0.15)
    own = appearance_statistics(volume, label, 2, 4)
    profile = appearance_profile([volume], [label], "mr")
    target = {**own, "bias": own["bias"] * 1.3}
    out = apply_appearance(volume, label, profile, target, np.random.default_rng(0))
    got = appearance_statistics(out, label, 2, 4)
    assert got["bias"] == pytest.approx(target["bias"], rel=0.1)
    assert np.median(out[label == 2]) == pytest.approx(np.median(volume[label == 2]), abs=0.15)


def test_ct_gets_noise_only():
    """Calibrated intensities (CT): no gamma, no bias field — only the noise level changes."""
    label, grid = _phantom()
    profile = appearance_profile([_scan(label, grid, np.random.default_rng(0), 0.03, 1.3, 0.2)], [label], "ct")
    clean = _scan(label, grid, np.random.default_rng(1), 1e-4, 1.0, 0.0)
    out = apply_appearance(clean, label, profile, profile["channels"][0][0], np.random.default_rng(2))
    before, after = appearance_statistics(clean, label, 2, 4), appearance_statistics(out, label, 2, 4)
    assert after["noise"] > 10 * before["noise"] and after["bias"] < 0.02
    # the tissues keep their values (the contrast statistic moves a little only because noise
    # widens the percentile range it is measured on)
    for c in (2, 4):
        assert np.median(out[label == c]) == pytest.approx(np.median(clean[label == c]), abs=0.02)


def test_profile_skips_cases_without_the_tissues_and_refuses_when_none_has_them():
    label, grid = _phantom()
    tiny = np.zeros_like(label)
    tiny[14, 14, 14], tiny[14, 14, 15] = 2, 4
    scan = _scan(label, grid, np.random.default_rng(0), 0.02, 1.0, 0.1)
    profile = appearance_profile([scan, scan], [label, tiny], "ct")
    assert len(profile["channels"][0]) == 1 and profile["noise_model"] == "gaussian"
    with pytest.raises(DataError, match="enough of classes"):
        appearance_profile([scan], [tiny + (tiny == 0) * (label > 0) * 2], "mr")


def test_synthesis_applies_a_drawn_appearance_per_sample(tmp_path):
    """With an appearance profile in its sidecar, samples of one label map differ in noise and
    contrast by seed, `--appearance none` gives the decoder's output, chosen values are taken, and
    each sample's provenance names its appearance."""
    import torch

    from medlsdm.inference.synthesis import appearance_targets, with_appearance
    from medlsdm.errors import MedlsdmError

    label, grid = _phantom()
    reals = [_scan(label, grid, np.random.default_rng(i), noise, gamma, 0.1)
             for i, (noise, gamma) in enumerate([(0.01, 0.8), (0.04, 1.3), (0.02, 1.0), (0.05, 1.1)])]

    class Model:
        sidecar = {"appearance": appearance_profile(reals, [label] * 4, "mr")}

    clean = torch.from_numpy(_scan(label, grid, np.random.default_rng(9), 1e-4, 1.0, 0.0)).float()
    volumes = clean[None, None].repeat(4, 1, 1, 1, 1)
    out, targets, note = with_appearance(Model(), volumes, label, seed=3)
    assert note is None and len(targets) == 4 and targets == appearance_targets(Model(), 4, 3)
    stats = [appearance_statistics(v[0].numpy(), label, 2, 4) for v in out]
    assert np.std([s["noise"] for s in stats]) > 0.005 and np.std([s["contrast"] for s in stats]) > 0.01
    assert torch.equal(with_appearance(Model(), volumes, label, seed=3)[0], out)            # seeded
    assert torch.equal(with_appearance(Model(), volumes, label, seed=3, appearance="none")[0], volumes)
    chosen = with_appearance(Model(), volumes[:1], label, seed=0,
                             appearance={"noise": 0.05, "contrast": -0.3, "bias": 0.0})[0]
    assert appearance_statistics(chosen[0, 0].numpy(), label, 2, 4)["noise"] == pytest.approx(0.05, rel=0.25)
    assert appearance_targets(Model(), 2, 3) == appearance_targets(Model(), 2, 3)
    with pytest.raises(MedlsdmError, match="needs noise, contrast, bias"):
        appearance_targets(Model(), 1, 0, {"noise": 0.1})
    with pytest.raises(MedlsdmError, match="unknown foo"):
        appearance_targets(Model(), 1, 0, {"noise": 0.1, "contrast": 0.1, "bias": 0.1, "foo": 1})
    for bad in ({"noise": -0.05, "contrast": 0.1, "bias": 0.1}, {"noise": 0.05, "contrast": float("nan"), "bias": 0.1},
                {"noise": 0.05, "contrast": 1.5, "bias": 0.1}, {"noise": 0.05, "contrast": 0.1, "bias": -0.2}):
        with pytest.raises(MedlsdmError, match="out of range"):
            appearance_targets(Model(), 1, 0, bad)
    # a map with too little of the tissues: "auto" leaves it as it is and says why; chosen values fail
    small = np.where(label == 4, 2, label)
    kept, applied, note = with_appearance(Model(), volumes[:1], small, seed=0)
    assert torch.equal(kept, volumes[:1]) and applied is None and "no appearance applied" in note
    with pytest.raises(DataError):
        with_appearance(Model(), volumes[:1], small, seed=0, appearance="sample")
    Model.sidecar = {}
    assert appearance_targets(Model(), 2, 3) is None             # auto: nothing without a profile
    with pytest.raises(MedlsdmError, match="no appearance profile"):
        appearance_targets(Model(), 1, 0, "sample")


def test_evaluate_quality_reports_appearance_spread(tmp_path):
    """`evaluate quality` (diversity): samples of one map that are all the same image vary by
    nothing, samples with their own noise and contrast vary; real scans set the yardstick."""
    from evaluation_data import write_nifti

    from medlsdm.evaluation.quality import evaluate_quality

    label, grid = _phantom()
    settings = [(0.01, 0.8, 0.05), (0.04, 1.3, 0.2), (0.02, 1.0, 0.1), (0.05, 1.1, 0.15)]
    for i, (noise, gamma, bias) in enumerate(settings):
        write_nifti(tmp_path / "real" / "images" / f"c{i}.nii.gz",
                    _scan(label, grid, np.random.default_rng(i), noise, gamma, bias).astype(np.float32))
        write_nifti(tmp_path / "real" / "labels" / f"c{i}.nii.gz", label.astype(np.int16))
    clean = _scan(label, grid, np.random.default_rng(9), 1e-4, 1.0, 0.0).astype(np.float32)
    for k in range(3):
        write_nifti(tmp_path / "same" / f"c0_sample{k}.nii.gz", clean)
        write_nifti(tmp_path / "varied" / f"c0_sample{k}.nii.gz",
                    _scan(label, grid, np.random.default_rng(20 + k), *settings[k]).astype(np.float32))
    same = evaluate_quality(tmp_path / "real", tmp_path / "same", tmp_path / "o1", metrics="diversity",
                            progress=False, figures=False)["diversity"]["appearance"]
    varied = evaluate_quality(tmp_path / "real", tmp_path / "varied", tmp_path / "o2", metrics="diversity",
                              progress=False, figures=False)["diversity"]["appearance"]
    assert (same["tissue"], same["other"]) == (2, 4)
    assert all(abs(v) < 1e-9 for v in same["ratio"].values()), same["ratio"]
    assert all(varied["ratio"][k] > 0.3 for k in ("noise", "contrast", "bias")), varied["ratio"]


def test_a_model_off_the_training_intensities_keeps_its_level():
    """An undertrained model's output — background well above the training scans', contrast
    compressed — gets the target's contrast without its background and intensity level being
    moved (a gamma pivoting at the training zero lifted both: a Med-DDPM volume's mean went from
    315 to 510 against 201 real); the brain's 99th percentile stays; voxels under zero signal keep
    their values up to the Rician floor; a contrast out of reach stops the gamma at its bound."""
    import medlsdm.data.appearance as appearance

    label, grid = _phantom()
    rng = np.random.default_rng(0)
    reals = [_scan(label, grid, rng, noise, gamma, bias)
             for noise, gamma, bias in [(0.01, 0.9, 0.05), (0.03, 1.2, 0.25), (0.05, 1.0, 0.15)]]
    profile = appearance_profile(reals, [label] * 3, "mr")
    assert profile["background"][0] == pytest.approx(-1.0, abs=0.1)   # Rician floor over -1
    clean = _scan(label, grid, np.random.default_rng(1), 1e-4, 1.1, 0.0)
    # not affine (the statistics ignore gain and offset): a compressed contrast
    under = 0.5 * (((clean + 1) / 2) ** 0.6 * 2 - 1) + 0.25 + 0.02 * np.random.default_rng(3).normal(size=clean.shape)
    under[:4, :4, :4] = -0.9          # a dark pocket, far below this volume's background
    own = appearance_statistics(under, label, 2, 4)["contrast"]
    gammas = []
    solve = appearance._solve_gamma

    def spy(contrast_of, target):
        gammas.append(solve(contrast_of, target))
        return gammas[-1]

    appearance._solve_gamma = spy
    try:
        assert max(abs(t["contrast"] - own) for t in profile["channels"][0]) > 0.03   # work for the gamma
        for target in profile["channels"][0]:
            out = apply_appearance(under, label, profile, target, np.random.default_rng(5))
            assert appearance_statistics(out, label, 2, 4)["contrast"] == pytest.approx(target["contrast"], abs=0.01)
            assert abs(float(np.median(out[label == 0])) - float(np.median(under[label == 0]))) < 0.1
            assert abs(float(out.mean()) - float(under.mean())) < 0.12
            brain = label > 0
            assert np.percentile(out[brain], 99) == pytest.approx(np.percentile(under[brain], 99), abs=0.02)
            # under zero signal: kept, plus a Rician floor (about 1.25 noise SDs)
            assert np.abs(out[:4, :4, :4] - under[:4, :4, :4]).mean() < 0.15
        # a contrast no gamma in range reaches: the nearer bound
        gammas.clear()
        apply_appearance(under, label, profile, {**profile["channels"][0][0], "contrast": 0.6},
                         np.random.default_rng(5))
        assert gammas[-1] in (pytest.approx(0.5), pytest.approx(2.0))   # a steeper one distorts
    finally:
        appearance._solve_gamma = solve


def test_unlabelled_tissue_outside_the_map_is_not_taken_for_background():
    """Label 0 holding tissue (a few structures labelled in a body field of view), as in the
    training scans: zero signal stays the range's lower end, so that tissue is reshaped like the
    rest and gets no Rayleigh noise floor."""
    label, grid = _phantom()
    block = np.zeros(label.shape, dtype=bool)
    block[:17] = True
    block &= label == 0                 # most of label 0: its median is that tissue's level
    rng = np.random.default_rng(0)

    def with_tissue(scan):
        scan = scan.copy()
        scan[block] = np.clip(0.3 / 0.9 * 2 - 1 + rng.normal(scale=0.01, size=int(block.sum())), -1, 1)
        return scan

    reals = [with_tissue(_scan(label, grid, rng, noise, 1.0, bias)) for noise, bias in [(0.01, 0.05), (0.03, 0.2)]]
    profile = appearance_profile(reals, [label] * 2, "mr")
    clean = with_tissue(_scan(label, grid, np.random.default_rng(1), 1e-4, 1.1, 0.0))
    assert profile["background"][0] > -0.5          # tissue, not air
    assert float(np.median(clean[label == 0])) == pytest.approx(profile["background"][0], abs=0.1)
    out = apply_appearance(clean, label, profile, profile["channels"][0][1], np.random.default_rng(2))
    # the noise there (high-passed: the bias field varies across the block) is symmetric, where
    # a Rayleigh floor (zero signal taken at the tissue's level) would skew it
    from medlsdm.data.appearance import _far_background, _six_neighbour_residual

    _, far = _far_background(label)
    inner = np.zeros(label.shape, dtype=bool)
    inner[1:15, 1:-1, 1:-1] = True                 # off the volume's and the tissue's edges
    values = _six_neighbour_residual(out.astype(np.float64))[block & far & inner]
    assert values.size > 500
    skew = float(np.mean((values - values.mean()) ** 3) / values.std() ** 3)
    assert abs(skew) < 0.2
    # profiles written before the background was recorded: the range's lower end, as before
    old = {k: v for k, v in profile.items() if k != "background"}
    np.testing.assert_array_equal(
        apply_appearance(clean, label, old, profile["channels"][0][1], np.random.default_rng(2)),
        apply_appearance(clean, label, {**profile, "background": [float(np.median(clean[label == 0])) + 0.1]},
                         profile["channels"][0][1], np.random.default_rng(2)))


def test_background_noise_follows_the_training_scans():
    """Away from the label map the added noise matches the training scans' background: none
    where they were zero-filled (skull-stripped data: a noisy background would give a synthetic
    scan away), a floor of about their spread where they kept the magnitude image's noise —
    while the tissue gets the target's noise either way."""
    from medlsdm.data.appearance import _background_noise, _far_background

    label, grid = _phantom()
    _, far = _far_background(label)
    assert far.sum() > 500
    rng = np.random.default_rng(0)
    noisy = [_scan(label, grid, rng, noise, 1.0, bias) for noise, bias in [(0.03, 0.1), (0.04, 0.2), (0.035, 0.15)]]
    stripped = [np.where(label > 0, scan, -1.0) for scan in noisy]
    clean = _scan(label, grid, np.random.default_rng(1), 1e-4, 1.1, 0.0)
    for reals, zero_filled in ((stripped, True), (noisy, False)):
        profile = appearance_profile(reals, [label] * 3, "mr")
        assert (profile["background_noise"][0] == 0) == zero_filled
        for target in profile["channels"][0]:
            out = apply_appearance(clean, label, profile, target, np.random.default_rng(3))
            assert appearance_statistics(out, label, 2, 4)["noise"] == pytest.approx(target["noise"], rel=0.25)
            got = _background_noise(out.astype(np.float64), label > 0, far)
            if zero_filled:
                assert got < 0.002 and np.abs(out[far] - clean[far]).max() < 5e-3   # flat, as the input
            else:
                assert got == pytest.approx(profile["background_noise"][0], rel=0.35)
    # a profile without the background noise: the tissue's level everywhere, as before
    old = {k: v for k, v in profile.items() if k != "background_noise"}
    out = apply_appearance(clean, label, old, profile["channels"][0][0], np.random.default_rng(3))
    assert _background_noise(out.astype(np.float64), label > 0, far) > 0


def test_a_faint_background_floor_is_not_lifted():
    """A decoder's smooth floor a little above zero signal stays as it is under a gamma below 1
    and a strong bias field (the gamma pivots below the brain's range, the field fades out there):
    a pure gamma lifted such a floor several-fold (a demo sample's background from 17 to 104,
    real 19), while the targets are still reached in the tissue."""
    from medlsdm.data.appearance import _far_background

    label, grid = _phantom()
    _, far = _far_background(label)
    rng = np.random.default_rng(0)
    reals = [np.where(label > 0, _scan(label, grid, rng, noise, 1.0, bias), -1.0)   # zero-filled
             for noise, bias in [(0.02, 0.1), (0.03, 0.2)]]
    profile = appearance_profile(reals, [label] * 2, "mr")
    clean = _scan(label, grid, np.random.default_rng(1), 1e-4, 1.1, 0.0)
    clean[label == 0] = -1.0 + 0.02 * (1 + grid[1][label == 0])      # a faint, smooth floor
    own = appearance_statistics(clean, label, 2, 4)
    target = {"noise": 0.03, "contrast": own["contrast"] * 0.5, "bias": 0.3}   # gamma ~0.73, strong field
    out = apply_appearance(clean, label, profile, target, np.random.default_rng(2))
    got = appearance_statistics(out, label, 2, 4)
    assert got["contrast"] == pytest.approx(target["contrast"], abs=0.01)
    assert got["bias"] == pytest.approx(target["bias"], rel=0.3)
    assert got["noise"] == pytest.approx(target["noise"], rel=0.3)
    assert np.abs(out[far] - clean[far]).max() < 0.01
    # a profile without background noise gives what one whose background noise is unknown gives
    old = {k: v for k, v in profile.items() if k != "background_noise"}
    np.testing.assert_array_equal(apply_appearance(clean, label, old, target, np.random.default_rng(2)),
                                  apply_appearance(clean, label, {**profile, "background_noise": [None]}, target,
                                                   np.random.default_rng(2)))
