"""Memorisation audit: copies of training volumes are flagged, new volumes are not."""

import json

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from medlsdm.errors import DataError, MedlsdmError
from medlsdm.evaluation.privacy import nearest_neighbours, privacy_audit, real_to_real_nearest

SHAPE = (16, 16, 16)


def field(rng, sigma=2.0):
    v = gaussian_filter(rng.normal(size=SHAPE), sigma)
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
