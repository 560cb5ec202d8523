"""Downstream segmentation test on a toy set where the label is a simple function of the image
(bright balls): a tiny U-Net learns it, synthetic copies show no domain gap, noise does."""

import json
import shutil

import numpy as np
import pytest

from evaluation_data import write_cohort, write_nifti
from medlsdm.errors import DataError, MedlsdmError
from medlsdm.evaluation.segmentation import evaluate_segmentation, normalise_percentiles

TINY = {"channels": (16, 32), "strides": (2,), "num_res_units": 1, "lr": 1e-2, "batch_size": 2}
EPOCHS = 20  # 6 training volumes, batch 2: 60 steps of 16^3 (about a second)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    train = write_cohort(root / "train", [f"tr{i}" for i in range(6)], seed=10)
    test = write_cohort(root / "test", ["te0", "te1"], seed=20)
    copies = root / "synthetic_copies"
    copies.mkdir()
    for case in test:
        shutil.copy(root / "test" / "images" / f"{case}.nii.gz", copies / f"{case}_sample0.nii.gz")
    for case in train:  # synthetic training volumes: named after training label maps
        shutil.copy(root / "train" / "images" / f"{case}.nii.gz", copies / f"{case}_sample0.nii.gz")
    rng = np.random.default_rng(3)
    noise = root / "synthetic_noise"
    for case, (image, _) in test.items():
        write_nifti(noise / f"{case}_sample0.nii.gz", rng.normal(150, 60, image.shape))
    return root, copies, noise


@pytest.fixture(scope="module")
def copies_result(toy, tmp_path_factory):
    root, copies, _ = toy
    out = tmp_path_factory.mktemp("seg_out")
    data = evaluate_segmentation(root / "train", root / "test", copies, out, epochs=EPOCHS, seed=0,
                                 config=TINY, progress=False)
    return out, data


def test_normalise_percentiles_maps_each_channel_to_unit_range():
    rng = np.random.default_rng(0)
    image = np.stack([rng.normal(0, 1, (8, 8, 8)), rng.normal(500, 100, (8, 8, 8)), np.full((8, 8, 8), 3.0)])
    out = normalise_percentiles(image)
    for c in range(2):
        assert out[c].min() == -1.0 and out[c].max() == 1.0
        order = np.argsort(image[c].ravel())
        assert np.all(np.diff(out[c].ravel()[order]) >= 0)  # monotone: contrast kept
        lo, hi = np.percentile(image[c], [0.5, 99.5])
        assert out[c].ravel()[order[len(order) // 2]] == pytest.approx(2 * (np.median(image[c]) - lo) / (hi - lo) - 1, abs=0.02)
    assert np.all(out[2] == -1.0)


def test_real_network_learns_and_copies_show_no_gap(copies_result):
    out, data = copies_result
    real = data["protocols"]["real"]
    assert real["steps"] == EPOCHS * 3 and real["n_train_volumes"] == 6
    dice_real = real["tests"]["real"]["mean"]["dice"]
    assert dice_real > 0.6  # chance (random labels) is under 0.1: each ball fills ~3 % of the volume
    assert set(real["tests"]["real"]["per_class"]) == {1, 2}  # background excluded
    assert data["domain_gap"]["ratio"] == pytest.approx(1.0)  # identical images, identical predictions
    written = json.loads((out / "segmentation.json").read_text(encoding="utf-8"))
    assert written["domain_gap"]["dice_synthetic"] == pytest.approx(written["domain_gap"]["dice_real"])
    assert written["num_classes"] == 3 and written["settings"]["patch"] == [16, 16, 16]
    assert (out / written["figures"][0]["path"]).is_file()
    assert not any(str(v).startswith("/") for v in (written["train_real"], written["test_real"], written["synthetic"]))


def test_synthetic_training_protocols_use_training_label_maps_only(copies_result):
    _, data = copies_result
    assert data["n_synthetic_train"] == 6  # tr*_sample0; te*_sample0 carry test labels: excluded
    for name in ("real+synthetic", "synthetic"):
        proto = data["protocols"][name]
        assert proto["n_train_volumes"] == (12 if name == "real+synthetic" else 6)
        assert proto["tests"]["real"]["mean"]["dice"] > 0.5


def test_noise_synthetic_scores_lower(toy, copies_result, tmp_path):
    root, _, noise = toy
    data = evaluate_segmentation(root / "train", root / "test", noise, tmp_path, epochs=EPOCHS, seed=0,
                                 config=TINY, progress=False, protocols=["real"], figures=False)
    _, copies = copies_result
    # Same seed and data: the same network as in the copies run.
    assert data["domain_gap"]["dice_real"] == pytest.approx(copies["domain_gap"]["dice_real"])
    assert data["domain_gap"]["dice_synthetic"] < 0.5 * data["domain_gap"]["dice_real"]
    assert data["domain_gap"]["ratio"] < 0.5


def test_refuses_same_folders_and_impossible_protocols(toy, tmp_path):
    root, copies, noise = toy
    with pytest.raises(DataError, match="--test-real and --synthetic point at the same folder"):
        evaluate_segmentation(root / "train", root / "test", root / "test", tmp_path, epochs=1)
    with pytest.raises(DataError, match="same folder"):
        evaluate_segmentation(root / "train", root / "test", root / "test" / "images", tmp_path, epochs=1)
    with pytest.raises(DataError, match="protocol synthetic: no synthetic training volume"):
        evaluate_segmentation(root / "train", root / "test", noise, tmp_path, epochs=1, config=TINY,
                              protocols=["synthetic"], progress=False)
    with pytest.raises(MedlsdmError, match="--patch 9 16 16"):
        evaluate_segmentation(root / "train", root / "test", noise, tmp_path, epochs=1, config=TINY,
                              patch=(9, 16, 16), progress=False)


def test_synthetic_test_cases_pair_with_their_test_label_maps(toy):
    """The building blocks used to score several models with one segmenter: each synthetic test
    volume carries the label map of the test case it was generated from."""
    from medlsdm.evaluation.pairing import scan_folder
    from medlsdm.evaluation.segmentation import load_real_cases, load_synthetic_test_cases

    root, copies, _ = toy
    real = {c.case_id: c for c in load_real_cases(scan_folder(root / "test", "real test cases"))}
    synthetic = load_synthetic_test_cases(copies, root / "test")
    assert sorted(c.case_id for c in synthetic) == ["te0_sample0", "te1_sample0"]
    for case in synthetic:
        twin = real[case.case_id.removesuffix("_sample0")]
        assert np.array_equal(case.label, twin.label) and np.allclose(case.image, twin.image)


def test_per_case_mean_dice_with_bootstrap_ci_beside_the_pooled_figure(copies_result):
    from medlsdm.evaluation.metrics import bootstrap_mean_ci

    _, data = copies_result
    res = data["protocols"]["real"]["tests"]["real"]
    per_case = res["per_case"]
    assert set(per_case) == {"te0", "te1"}
    for case in per_case.values():
        finite = [v for v in case["dice_per_class"].values() if np.isfinite(v)]
        assert case["dice"] == pytest.approx(np.mean(finite))
    values = [c["dice"] for c in per_case.values()]
    assert res["case_mean"]["mean"] == pytest.approx(np.mean(values)) and res["case_mean"]["n"] == 2
    assert res["case_mean"]["ci_low"] <= res["case_mean"]["mean"] <= res["case_mean"]["ci_high"]
    for c, summary in res["per_class_case_mean"].items():
        assert summary["mean"] == pytest.approx(np.nanmean([p["dice_per_class"][c] for p in per_case.values()]))
    assert data["domain_gap"]["dice_real"] == res["case_mean"]["mean"]
    assert "mean" in res and "dice" in res["mean"]  # pooled Dice kept beside
    # the bootstrap: a known spread gives an interval inside the data's range, seeded
    ci = bootstrap_mean_ci([0.2, 0.4, 0.6, 0.8, 1.0], seed=1)
    assert 0.2 <= ci["ci_low"] < 0.6 < ci["ci_high"] <= 1.0
    assert ci == bootstrap_mean_ci([0.2, 0.4, 0.6, 0.8, 1.0], seed=1)
    assert np.isnan(bootstrap_mean_ci([0.5])["ci_low"])


def test_default_is_a_fixed_number_of_steps(toy, tmp_path):
    root, _, noise = toy
    data = evaluate_segmentation(root / "train", root / "test", noise, tmp_path, seed=0, progress=False,
                                 config={**TINY, "steps": 3}, protocols=["real"], figures=False)
    assert data["protocols"]["real"]["steps"] == 3
    assert data["settings"]["steps"] == 3 and data["settings"]["budget_minutes"] is None
    with pytest.raises(MedlsdmError, match="one of --steps, --epochs, --budget-minutes"):
        evaluate_segmentation(root / "train", root / "test", noise, tmp_path, steps=2, epochs=1, config=TINY)


def test_augmentation_study_table_and_plot(toy, tmp_path):
    root, copies, _ = toy
    data = evaluate_segmentation(root / "train", root / "test", copies, tmp_path, steps=8, seed=0, progress=False,
                                 config={**TINY, "augmentation_sizes": (2, 4, "all", 50)},
                                 protocols=["augmentation"])
    study = data["augmentation"]
    assert study["sizes"] == [2, 4, 6]  # 50 > the 6 training cases: dropped; "all" = 6
    rows = study["rows"]
    assert [(r["n_real"], r["synthetic"]) for r in rows] == [(2, False), (2, True), (4, False), (4, True),
                                                            (6, False), (6, True), (0, True)]
    assert [r["n_train_volumes"] for r in rows] == [2, 8, 4, 10, 6, 12, 6]
    assert all(r["steps"] == 8 for r in rows)  # the same training length for every network
    assert all(r["case_mean"]["n"] == 2 for r in rows)  # scored on the real test cases
    assert sorted(study["subset_order"]) == [f"tr{i}" for i in range(6)]
    figure = [f for f in data["figures"] if "augmentation" in f["path"]]
    assert figure and (tmp_path / figure[0]["path"]).is_file()
    from medlsdm.evaluation.report import build_report

    _, page = build_report(tmp_path)
    assert "Augmentation study" in page.read_text(encoding="utf-8")


@pytest.mark.slow
def test_same_result_on_a_quiet_and_a_loaded_machine(toy, tmp_path):
    """Two busy processes compete for the CPUs during the second run: the numbers must not move."""
    import subprocess
    import sys

    root, _, noise = toy
    kw = dict(steps=12, seed=0, progress=False, config=TINY, protocols=["real"], figures=False)
    quiet = evaluate_segmentation(root / "train", root / "test", noise, tmp_path / "quiet", **kw)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        loaded = evaluate_segmentation(root / "train", root / "test", noise, tmp_path / "loaded", **kw)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    for result in (quiet, loaded):
        result["protocols"]["real"].pop("seconds")
    assert loaded["protocols"] == quiet["protocols"]
