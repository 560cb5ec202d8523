"""Paired, overlap and distribution metrics against closed forms, scikit-image, scipy and MONAI."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import linalg
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from medlsdm.errors import DataError, MedlsdmError
from medlsdm.evaluation import metrics as M
from medlsdm.evaluation.diversity import mean_pairwise_ms_ssim, pairwise_ms_ssim, sample_pairs


def smooth_volume(shape, seed, sigma=2.0):
    """Smooth random volume scaled to [-1, 1] (structure for SSIM to see)."""
    v = gaussian_filter(np.random.default_rng(seed).normal(size=shape), sigma)
    return v / np.abs(v).max()


@pytest.fixture(scope="module")
def pair():
    x = smooth_volume((24, 24, 24), 1)
    y = np.clip(x + 0.2 * np.random.default_rng(2).normal(size=x.shape), -1, 1)
    return x, y


# ------------------------------------------------------------------ SSIM / MS-SSIM / PSNR

def test_identical_volumes_give_perfect_scores(pair):
    x, _ = pair
    assert M.ssim3d(x, x, 2.0) == pytest.approx(1.0, abs=1e-12)
    assert M.ms_ssim3d(x, x, 2.0) == pytest.approx(1.0, abs=1e-12)
    assert M.psnr(x, x, 2.0) == math.inf
    assert M.rmse(x, x) == 0.0 and M.mae(x, x) == 0.0


def test_ssim_matches_skimage_gaussian_and_uniform(pair):
    x, y = pair
    # skimage's Gaussian filter has 11 taps (truncate 3.5 at sigma 1.5) and crops 5 voxels.
    ref = structural_similarity(x, y, data_range=2.0, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    assert M.ssim3d(x, y, 2.0, win_size=11) == pytest.approx(ref, abs=1e-6)
    ref_u = structural_similarity(x, y, data_range=2.0, win_size=7, use_sample_covariance=False)
    assert M.ssim3d(x, y, 2.0, win_size=7, gaussian=False) == pytest.approx(ref_u, abs=1e-6)
    assert M.ssim3d(x, y, 2.0) < 0.9  # the noise is visible


def test_ssim_accepts_torch_and_channels(pair):
    x, y = pair
    ref = M.ssim3d(x, y, 2.0)
    assert M.ssim3d(torch.tensor(x, dtype=torch.float32), torch.tensor(y), 2.0) == pytest.approx(ref, abs=1e-5)
    # Two identical channels average to the single-channel value.
    assert M.ssim3d(np.stack([x, x]), np.stack([y, y]), 2.0) == pytest.approx(ref, abs=1e-12)


def test_data_range_matters_like_the_reference_bug(pair):
    x, y = pair
    right = M.ssim3d(x, y, data_range=2.0)
    wrong = M.ssim3d(x, y, data_range=255.0)  # what the reference used on [-1, 1] data
    assert wrong > 0.99 and right < wrong - 0.2
    with pytest.raises(MedlsdmError, match="data_range"):
        M.ssim3d(x, y, data_range=None)
    # PSNR with peak 1 instead of 2 on [-1, 1] data is 20·log10(2) = 6.02 dB too low.
    assert M.psnr(x, y, 2.0) - M.psnr(x, y, 1.0) == pytest.approx(20 * math.log10(2))


def test_ssim_mask_averages_inside_foreground(pair):
    x, y = pair
    y2 = y.copy()
    y2[:, :, 12:] = x[:, :, 12:]  # right half identical
    mask = np.zeros(x.shape, bool)
    mask[:, :, 16:] = True  # window radius 3: the masked valid region only sees identical voxels
    assert M.ssim3d(x, y2, 2.0, mask=mask) == pytest.approx(1.0, abs=1e-12)
    smap = M.ssim_map3d(x, y2, 2.0)[0, 0].numpy()
    assert M.ssim3d(x, y2, 2.0, mask=~mask) == pytest.approx(smap[:, :, :13].mean())
    with pytest.raises(DataError, match="empty"):
        M.ssim3d(x, y, 2.0, mask=np.zeros(x.shape, bool))
    with pytest.raises(DataError, match="mask shape"):
        M.ssim3d(x, y, 2.0, mask=np.ones((4, 4, 4), bool))


def test_ms_ssim_matches_monai_with_renormalised_weights():
    from monai.metrics import MultiScaleSSIMMetric

    x = smooth_volume((32, 32, 32), 3)
    y = np.clip(x + 0.1 * np.random.default_rng(4).normal(size=x.shape), -1, 1)
    w = np.array(M.MS_SSIM_WEIGHTS[:3])
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=2.0, kernel_size=3, weights=tuple(w / w.sum()))
    t = lambda a: torch.tensor(a, dtype=torch.float32)[None, None]  # noqa: E731
    ref = float(metric(t(y), t(x)))
    assert M.ms_ssim3d(x, y, 2.0, scales=3, win_size=3) == pytest.approx(ref, abs=1e-5)
    assert M.ms_ssim3d(x, -x, 2.0) == 0.0  # anti-correlated: clipped to 0, not NaN


def test_ms_ssim_settings_rule():
    assert M.ms_ssim_settings((64, 64, 64)) == (5, 3)
    assert M.ms_ssim_settings((128, 128, 128)) == (5, 7)
    assert M.ms_ssim_settings((32, 256, 256)) == (4, 3)
    assert M.ms_ssim_settings((16, 16, 16)) == (3, 3)
    assert M.ms_ssim_settings((16, 16, 16), scales=2) == (2, 7)
    assert M.ms_ssim_settings((64, 64, 64), win_size=7) == (4, 7)
    with pytest.raises(DataError, match="too small"):
        M.ms_ssim_settings((2, 16, 16))
    with pytest.raises(DataError, match="too small"):
        M.ms_ssim_settings((16, 16, 16), scales=5, win_size=3)


def test_psnr_rmse_mae_against_numpy_and_skimage(pair):
    x, y = pair
    assert M.psnr(x, y, 2.0) == pytest.approx(peak_signal_noise_ratio(x, y, data_range=2.0), abs=1e-9)
    assert M.rmse(x, y) == pytest.approx(np.sqrt(((x - y) ** 2).mean()))
    assert M.mae(x, y) == pytest.approx(np.abs(x - y).mean())
    mask = np.zeros(x.shape, bool)
    mask[:8] = True
    assert M.mae(x, y, mask=mask) == pytest.approx(np.abs(x - y)[:8].mean())


def test_json_safe_turns_infinities_into_null_or_string():
    data = {"psnr": math.inf, "dice": {1: float("nan"), 2: np.float32(0.5)}, "arr": np.array([1.0, -np.inf])}
    safe = M.json_safe(data)
    assert json.loads(json.dumps(safe, allow_nan=False)) == {
        "psnr": None, "dice": {"1": None, "2": 0.5}, "arr": [1.0, None]}
    assert M.json_safe(data, nonfinite="string")["arr"] == [1.0, "-inf"]


# ------------------------------------------------------------------ overlap

def test_dice_analytic_background_excluded():
    ref = np.zeros((4, 4, 4), np.int64)
    pred = np.zeros_like(ref)
    ref[0, :2] = 1          # 8 voxels of class 1
    pred[0, :1] = 1         # 4 of them predicted
    ref[3, 3, 3] = 2        # class 2 missed entirely
    pred[2, 2, 2] = 2       # and predicted elsewhere
    scores = M.overlap_per_class(pred, ref, num_classes=4)
    assert set(scores) == {1, 2, 3}                          # background left out
    assert scores[1]["dice"] == pytest.approx(2 * 4 / (4 + 8))
    assert scores[1]["iou"] == pytest.approx(4 / 8)
    assert scores[1]["precision"] == 1.0 and scores[1]["recall"] == 0.5
    assert scores[2]["dice"] == 0.0
    assert math.isnan(scores[3]["dice"])                     # absent from both
    dice = M.dice_per_class(pred, ref, 4)
    assert M.mean_over_classes(dice) == pytest.approx((2 / 3 + 0.0) / 2)
    with_bg = M.dice_per_class(pred, ref, 4, include_background=True)
    assert with_bg[0] > 0.9                                  # the easy class the reference counted


def test_dice_rejects_bad_label_values():
    with pytest.raises(DataError, match="outside 0..2"):
        M.dice_per_class(np.full((2, 2, 2), 3), np.zeros((2, 2, 2), int), 3)
    with pytest.raises(DataError, match="non-integer"):
        M.dice_per_class(np.full((2, 2, 2), 0.5), np.zeros((2, 2, 2), int), 3)


# ------------------------------------------------------------------ Fréchet distance, MMD

def test_frechet_closed_form_diagonal():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert M.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_matches_scipy_sqrtm_on_random_features():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(200, 16))
    b = rng.normal(size=(150, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    mu1, s1 = M.feature_statistics(a)
    mu2, s2 = M.feature_statistics(b)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert M.fid_from_features(a, b) == pytest.approx(expected, rel=1e-8)


def test_fid_uses_each_sets_own_rows_and_leaves_inputs_alone():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(40, 8)).astype(np.float32)
    copy = real.copy()
    assert M.fid_from_features(real, real) == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_array_equal(real, copy)                # no in-place centring
    shifted = real + 3.0
    # Fake mean taken from the fake set (the reference reused the real mean: 0 here).
    assert M.fid_from_features(real, shifted) == pytest.approx(8 * 9.0, rel=1e-6)
    mu, sigma = M.feature_statistics(real[:5])
    assert mu.dtype == np.float64 and np.allclose(mu, real[:5].mean(0))
    assert np.allclose(sigma, np.cov(real[:5].astype(np.float64), rowvar=False))


def test_frechet_with_fewer_samples_than_dims_is_finite():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(10, 64)), rng.normal(size=(12, 64))
    value = M.fid_from_features(a, b)
    assert np.isfinite(value) and value > 0
    assert M.fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)


def test_mmd_same_vs_shifted():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(100, 5)), rng.normal(size=(100, 5))
    z = rng.normal(size=(100, 5)) + 1.0
    for kernel in ("rbf", "poly"):
        same, shifted = M.mmd(x, y, kernel=kernel), M.mmd(x, z, kernel=kernel)
        assert abs(same) < 0.02 and shifted > 10 * max(abs(same), 1e-3), kernel
    # Unbiased estimator by hand (RBF, fixed bandwidth).
    k = lambda a, b: np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / 2)  # noqa: E731
    kxx, kzz, kxz = k(x, x), k(z, z), k(x, z)
    by_hand = ((kxx.sum() - 100) + (kzz.sum() - 100)) / (100 * 99) - 2 * kxz.mean()
    assert M.mmd(x, z, bandwidth=1.0) == pytest.approx(by_hand, rel=1e-10)


# ------------------------------------------------------------------ diversity

def test_diversity_identical_samples_and_pair_sampling():
    v = smooth_volume((16, 16, 16), 5)
    assert mean_pairwise_ms_ssim([v, v, v], data_range=2.0) == pytest.approx(1.0)
    vols = [smooth_volume((16, 16, 16), s) for s in range(4)]
    values = pairwise_ms_ssim(vols, 2.0)
    assert values.shape == (6,) and values.max() < 0.9
    all_pairs = sample_pairs(30)
    assert len(all_pairs) == 435 and len(set(all_pairs)) == 435
    some = sample_pairs(30, max_pairs=50, seed=1)
    assert len(set(some)) == 50 and set(some) <= set(all_pairs)
    assert some == sample_pairs(30, max_pairs=50, seed=1)
    with pytest.raises(DataError, match="at least 2"):
        mean_pairwise_ms_ssim([v], 2.0)


def test_checkerboard_energy_finds_a_two_voxel_period():
    """Noise has a flat spectrum (Nyquist peak ~1); adding a checkerboard along H of half its
    amplitude raises that axis peak only, and the ratio synthetic / real shows it."""
    from medlsdm.evaluation.metrics import checkerboard_ratio, nyquist_energy

    rng = np.random.default_rng(0)
    noise = rng.standard_normal((24, 26, 25))
    board = noise + 0.5 * ((-1.0) ** np.arange(26))[None, :, None]
    e_noise, e_board = nyquist_energy(noise), nyquist_energy(board)
    assert np.all((0.5 < e_noise) & (e_noise < 2.0))
    assert e_board[1] > 5 * e_noise[1]
    assert e_board[0] == pytest.approx(e_noise[0], rel=0.05) and e_board[2] == pytest.approx(e_noise[2], rel=0.05)
    smooth = gaussian_filter(noise, 2)                               # smoothing lowers the peak, not raises it
    assert np.all(nyquist_energy(smooth) < 1.0)
    assert checkerboard_ratio([e_noise, e_noise], [e_noise, e_noise])["value"] == pytest.approx(1.0)
    worse = checkerboard_ratio([e_noise], [e_board])
    assert worse["per_axis"]["H"] > 5 and worse["per_axis"]["D"] == pytest.approx(1.0, rel=0.05)


def _two_tissue_phantom(seed: int = 0, size: int = 24):
    """Nested spheres: class 3 (bright, 'white matter') inside class 2 ('grey matter') inside 1."""
    grid = np.indices((size,) * 3).astype(float) - (size - 1) / 2
    r = np.sqrt((grid**2).sum(0))
    label = np.zeros((size,) * 3, dtype=np.int64)
    label[r < 11] = 1
    label[r < 9.5] = 2
    label[r < 6.5] = 3
    base = np.choose(label, [0.0, 0.3, 0.55, 0.8])
    return base, label, grid / size


def test_appearance_statistics_follow_noise_bias_and_contrast():
    from medlsdm.evaluation.diversity import appearance_spread, appearance_statistics

    base, label, grid = _two_tissue_phantom()
    rng = np.random.default_rng(0)
    noise = rng.normal(size=base.shape)
    stats = lambda img: appearance_statistics(img, label, tissue=3, other=2)  # noqa: E731
    clean, noisy, noisier = stats(base), stats(base + 0.01 * noise), stats(base + 0.04 * noise)
    assert clean["noise"] < 1e-6 < noisy["noise"] < noisier["noise"]
    # grows with the noise SD (less than 4x: noise also widens the percentile range it is scaled by)
    assert 2.5 * noisy["noise"] < noisier["noise"] < 4.5 * noisy["noise"]
    # gain and offset are normalised away; a smooth multiplicative field is what `bias` measures
    assert stats(3.0 * base + 7.0)["bias"] == pytest.approx(clean["bias"], abs=1e-9)
    field = np.exp(0.3 * grid[0] + 0.2 * grid[1] ** 2)
    assert clean["bias"] < 1e-6 and stats(base * field)["bias"] > 0.02
    assert stats(base * field)["noise"] < 0.01          # a smooth field is not noise
    # a gamma changes the tissue contrast
    assert stats(base**1.5)["contrast"] > clean["contrast"] > stats(base**0.6)["contrast"]
    # spread: identical volumes vary by nothing; volumes with different noise levels do
    same = appearance_spread([[clean, clean, clean]])
    assert same == {"noise": 0.0, "contrast": 0.0, "bias": 0.0}
    assert appearance_spread([[noisy, noisier]])["noise"] > 0


def test_appearance_statistics_refuse_missing_tissue():
    from medlsdm.errors import DataError
    from medlsdm.evaluation.diversity import appearance_statistics

    base, label, _ = _two_tissue_phantom()
    with pytest.raises(DataError, match="at least 50 voxels"):
        appearance_statistics(base, label, tissue=3, other=7)
