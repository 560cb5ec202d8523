"""`medlsdm evaluate quality`: pairing by case ID, correct paired metrics, skipped/required
metrics, FID with a (random) Inception file, report files."""

import json
import shutil

import numpy as np
import pytest
import torch

from evaluation_data import AFFINE, write_cohort, write_nifti
from medlsdm.errors import DataError, MedlsdmError
from medlsdm.evaluation import metrics as M
from medlsdm.evaluation.pairing import pair_by_case, scan_folder, split_sample_name
from medlsdm.evaluation.quality import evaluate_quality, summarise

CHEAP = "ssim,ms_ssim,psnr,rmse,mae"


@pytest.fixture(autouse=True)
def _no_weight_cache(tmp_path, monkeypatch):
    """An empty torch hub cache: no Inception/LPIPS weights unless a test provides them."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr("medlsdm.pretrained._lpips_package_dir", lambda: None)


@pytest.fixture
def cohort(tmp_path):
    real = tmp_path / "real"
    return real, write_cohort(real, ["c0", "c1", "c2"], seed=1)


def copy_as(real_dir, out_dir, names: dict):
    """Copy real images to synthetic names {synthetic stem: case ID}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stem, case in names.items():
        shutil.copy(real_dir / "images" / f"{case}.nii.gz", out_dir / f"{stem}.nii.gz")
    return out_dir


def test_split_sample_name_prefers_whole_case_ids():
    ids = {"a", "a_sample1", "b_2"}
    assert split_sample_name("a_sample0", ids) == ("a", 0)
    assert split_sample_name("a_sample1", ids) == ("a_sample1", None)  # a real case of that name
    assert split_sample_name("b_2_sample12", ids) == ("b_2", 12)
    assert split_sample_name("c_sample0", ids) is None


def test_pairing_reports_unpaired_and_refuses_empty(tmp_path, cohort):
    real, _ = cohort
    syn = copy_as(real, tmp_path / "syn", {"c0_sample0": "c0", "c0_sample1": "c0", "c1": "c1", "stray": "c2"})
    pairing = pair_by_case(scan_folder(real), scan_folder(syn), real, syn)
    assert [(p.case_id, p.sample) for p in pairing.pairs] == [("c0", 0), ("c0", 1), ("c1", None)]
    assert pairing.unpaired_synthetic == ["stray"] and pairing.unpaired_real == ["c2"]
    assert pairing.pairs[0].real.label.name == "c0.nii.gz"  # label from the generic layout
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*no synthetic volumes found"):
        scan_folder(tmp_path / "empty", "synthetic volumes")
    only_stray = copy_as(real, tmp_path / "stray", {"stray": "c2"})
    with pytest.raises(DataError, match="no synthetic volume in .*stray matches a case"):
        pair_by_case(scan_folder(real), scan_folder(only_stray), real, only_stray)


def test_identical_volumes_give_perfect_scores(tmp_path, cohort):
    real, _ = cohort
    syn = copy_as(real, tmp_path / "syn", {"c0_sample0": "c0", "c1": "c1", "c2_sample3": "c2"})
    out = tmp_path / "out"
    data = evaluate_quality(real, syn, out, metrics=CHEAP, progress=False)
    summary = data["paired"]["summary"]
    assert summary["ssim"]["mean"] == pytest.approx(1.0, abs=1e-9)
    assert summary["ms_ssim"]["mean"] == pytest.approx(1.0, abs=1e-9)
    assert summary["rmse"]["mean"] == 0.0 and summary["mae"]["mean"] == 0.0
    assert summary["psnr"]["mean"] == float("inf") and summary["psnr"]["n"] == 3
    written = json.loads((out / "metrics.json").read_text(encoding="utf-8"))  # strict JSON: no bare Infinity
    assert written["paired"]["summary"]["psnr"]["mean"] == "inf"
    assert {r["sample"] for r in written["paired"]["per_case"]} == {0, None, 3}
    assert (out / "figures" / "quality_cases.png").is_file()


def test_noisy_synthetic_matches_direct_metric_calls(tmp_path, cohort):
    real, volumes = cohort
    syn = tmp_path / "syn"
    rng = np.random.default_rng(5)
    noisy = {}
    for case, (image, _) in volumes.items():
        noisy[case] = image + rng.normal(0, 20, image.shape).astype(np.float32)
        write_nifti(syn / f"{case}_sample0.nii.gz", noisy[case])
    data = evaluate_quality(real, syn, tmp_path / "out", metrics=CHEAP, progress=False)
    rows = {r["case_id"]: r for r in data["paired"]["per_case"]}
    for case, (image, _) in volumes.items():
        dr = float(image.max() - image.min())
        assert rows[case]["data_range"] == pytest.approx(dr)
        assert rows[case]["ssim"] == pytest.approx(M.ssim3d(image, noisy[case], dr), rel=1e-6)
        assert rows[case]["psnr"] == pytest.approx(M.psnr(image, noisy[case], dr), rel=1e-6)
        assert rows[case]["rmse"] == pytest.approx(20, rel=0.1)
        assert rows[case]["ssim"] < 0.99 and np.isfinite(rows[case]["psnr"])
    assert data["paired"]["summary"]["ssim"] == pytest.approx(summarise([r["ssim"] for r in rows.values()]))


def test_foreground_mask_and_fixed_data_range(tmp_path, cohort):
    real, volumes = cohort
    syn = tmp_path / "syn"
    for case, (image, label) in volumes.items():
        fake = image.copy()
        fake[label == 0] += 50  # errors only outside the foreground
        write_nifti(syn / f"{case}.nii.gz", fake)
    data = evaluate_quality(real, syn, tmp_path / "out", metrics="rmse,mae,psnr", mask="foreground",
                            data_range=400.0, progress=False)
    assert data["paired"]["summary"]["rmse"]["mean"] == 0.0
    assert all(r["data_range"] == 400.0 for r in data["paired"]["per_case"])
    whole = evaluate_quality(real, syn, tmp_path / "out2", metrics="mae", progress=False)
    assert whole["paired"]["summary"]["mae"]["mean"] > 10


def test_different_grids_name_both_files(tmp_path, cohort):
    real, volumes = cohort
    syn = tmp_path / "syn"
    write_nifti(syn / "c0.nii.gz", volumes["c0"][0][:, :, :12])
    with pytest.raises(DataError, match=r"grids differ: .*c0\.nii\.gz.*syn/c0\.nii\.gz"):
        evaluate_quality(real, syn, tmp_path / "out", metrics="ssim", progress=False)
    write_nifti(syn / "c0.nii.gz", volumes["c0"][0], affine=AFFINE * np.array([2, 1, 1, 1])[:, None])
    with pytest.raises(DataError, match="different affines"):
        evaluate_quality(real, syn, tmp_path / "out", metrics="ssim", progress=False)


def test_missing_weights_skip_with_reason_or_fail_when_requested(tmp_path, cohort):
    real, _ = cohort
    syn = copy_as(real, tmp_path / "syn", {"c0_sample0": "c0", "c0_sample1": "c1", "c1": "c1"})
    data = evaluate_quality(real, syn, tmp_path / "out", progress=False, figures=False)
    skipped = data["skipped"]
    assert "vgg16-397923af.pth" in skipped["lpips"] and "alexnet" in skipped["lpips"]
    assert "pt_inception-2015-12-05-6726825d.pth" in skipped["fid2d"]
    assert "--medicalnet" in skipped["fid3d"]
    # MMD falls back to pooled intensities; diversity of c0's two samples (two different volumes).
    assert "pooled" in data["distribution"]["mmd"]["features"]
    assert np.isfinite(data["distribution"]["mmd"]["value"])
    assert 0 < data["diversity"]["synthetic_per_case"]["c0"] < 1
    assert 0 < data["diversity"]["real"] < 1
    with pytest.raises(MedlsdmError, match="vgg16-397923af.pth"):
        evaluate_quality(real, syn, tmp_path / "o2", metrics="ssim,lpips", progress=False)
    with pytest.raises(MedlsdmError, match="pt_inception-2015-12-05-6726825d.pth"):
        evaluate_quality(real, syn, tmp_path / "o3", metrics="fid2d", progress=False)
    with pytest.raises(MedlsdmError, match="fid3d needs --medicalnet"):
        evaluate_quality(real, syn, tmp_path / "o4", metrics="fid3d", progress=False)
    with pytest.raises(MedlsdmError, match="--metrics: unknown fid4d"):
        evaluate_quality(real, syn, tmp_path / "o5", metrics="fid4d", progress=False)


def test_lpips_with_local_weight_files(tmp_path, cohort):
    from medlsdm.models.perceptual import Backbone, Heads

    torch.manual_seed(0)
    net = Backbone("vgg")  # random weights in the published layouts (torchvision / lpips keys)
    backbone, heads = tmp_path / "vgg16.pth", tmp_path / "vgg_heads.pth"
    torch.save(net.state_dict(), backbone)
    torch.save({k: v.abs() for k, v in Heads(net.channels).state_dict().items()}, heads)  # heads are >= 0
    real, volumes = cohort
    syn = copy_as(real, tmp_path / "syn", {"c0_sample0": "c0", "c0_sample1": "c1"})
    data = evaluate_quality(real, syn, tmp_path / "out", metrics="lpips", lpips_backbone=backbone,
                            lpips_heads=heads, progress=False, figures=False)
    rows = data["paired"]["per_case"]
    assert rows[0]["lpips_vgg"] == pytest.approx(0.0, abs=1e-7)  # identical volume
    assert rows[1]["lpips_vgg"] > 1e-4  # another case's image
    assert "lpips_alex" not in rows[0]  # one backbone file: one network
    with pytest.raises(MedlsdmError, match="nope.pth"):  # a named file must exist, even unrequested
        evaluate_quality(real, syn, tmp_path / "out", lpips_backbone=tmp_path / "nope.pth", progress=False)


@pytest.fixture
def inception_file(tmp_path):
    """A random FID Inception in pytorch-fid's layout. He-initialised convolutions keep the
    activations at unit scale (the default init shrinks them into denormal numbers, which CPUs
    process a hundred times slower)."""
    from medlsdm.evaluation import features as FX

    torch.manual_seed(0)
    model = FX.InceptionV3()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path / "inception.pth"
    torch.save({k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}, path)
    return path


def test_fid2d_with_local_inception_file_and_cache(tmp_path, cohort, inception_file):
    real, volumes = cohort
    same = copy_as(real, tmp_path / "same", {c: c for c in volumes})
    out = tmp_path / "out"
    # One slice per volume along D: 3 + 3 Inception passes, then 3 more (real ones come from the cache).
    kw = dict(metrics="fid2d", inception=inception_file, fid_slices=1, fid_axes=("D",), progress=False)
    data = evaluate_quality(real, same, out, **kw)
    fid = data["distribution"]["fid2d"]
    assert set(fid["per_axis"]) == {"D"} and fid["n_real_slices"]["D"] == 3
    assert fid["mean"] == pytest.approx(0.0, abs=1e-6)
    assert len(set((out / "cache").glob("*.npz"))) == 6  # 3 real + 3 synthetic files
    noisy = tmp_path / "noisy"
    rng = np.random.default_rng(0)
    for case, (image, _) in volumes.items():
        write_nifti(noisy / f"{case}.nii.gz", image + rng.normal(0, 60, image.shape))
    other = evaluate_quality(real, noisy, out, **kw)
    assert other["distribution"]["fid2d"]["mean"] > 1e-3
    assert len(set((out / "cache").glob("*.npz"))) == 9  # real features reused, not recomputed
    assert other["distribution"]["fid2d"]["features"].startswith("inception-fid:")
    weights = other["distribution"]["fid2d"]["weights"]
    assert weights["file"] == "inception.pth" and weights["verified"] is False  # random: not published


def test_unpaired_synthetic_volumes_get_distributions_and_diversity(tmp_path, cohort):
    """Samples of an unconditional model carry no case ID: `unpaired` skips the paired metrics and
    measures the distributions and the diversity among all synthetic volumes."""
    from medlsdm.cli import main
    from medlsdm.evaluation.diversity import mean_pairwise_ms_ssim
    from medlsdm.evaluation.pairing import load_image

    real, _ = cohort
    syn = copy_as(real, tmp_path / "syn", {"sample_sample0": "c0", "sample_sample1": "c1", "sample_sample2": "c2"})
    with pytest.raises(DataError, match="matches a case"):
        evaluate_quality(real, syn, tmp_path / "paired", progress=False)
    data = evaluate_quality(real, syn, tmp_path / "out", unpaired=True, progress=False)
    assert data["paired"]["summary"] == {} and data["pairing"]["n_pairs"] == 0
    assert data["pairing"]["unpaired_synthetic"] == ["sample_sample0", "sample_sample1", "sample_sample2"]
    # the same three volumes on both sides: the unbiased MMD² is then at most 0
    assert -1.0 < data["distribution"]["mmd"]["value"] <= 1e-9
    div = data["diversity"]
    assert div["synthetic_per_case"]["all synthetic volumes"] == pytest.approx(div["real"], rel=1e-5)
    arrays = [load_image(f)[0] for f in scan_folder(syn).values()]
    lo = min(float(a.min()) for a in arrays)
    hi = max(float(a.max()) for a in arrays)
    assert div["real"] == pytest.approx(mean_pairwise_ms_ssim(arrays, hi - lo, max_pairs=50), rel=1e-5)
    assert (tmp_path / "out" / "figures" / "quality_samples.png").is_file()
    assert main(["evaluate", "quality", "--real", str(real), "--synthetic", str(syn), "--out",
                 str(tmp_path / "cli"), "--unpaired"]) == 0
    assert "synthetic, all volumes" in (tmp_path / "cli" / "report.md").read_text(encoding="utf-8")


def test_offline_3d_fid_and_recorded_settings(tmp_path, cohort):
    """A 3D distribution metric needs no downloaded weights; every metric's settings are in
    metrics.json; SSIM with the 11-voxel window of most papers on request."""
    from medlsdm.evaluation.features import RandomConv3DFeatures

    real, volumes = cohort
    same = copy_as(real, tmp_path / "same", {c: c for c in volumes})
    data = evaluate_quality(real, same, tmp_path / "a", metrics="ssim,fid3d_random", ssim_window=11,
                            progress=False, figures=False)
    assert data["distribution"]["fid3d_random"]["value"] == pytest.approx(0.0, abs=1e-6)
    noisy = tmp_path / "noisy"
    rng = np.random.default_rng(0)
    for case, (image, _) in volumes.items():
        write_nifti(noisy / f"{case}.nii.gz", image + rng.normal(0, 60, image.shape))
    other = evaluate_quality(real, noisy, tmp_path / "b", metrics="ssim,fid3d_random", ssim_window=11,
                             progress=False, figures=False)
    assert other["distribution"]["fid3d_random"]["value"] > 1e-3
    image, _ = volumes["c0"]
    noisy_c0 = evaluate_quality(real, noisy, tmp_path / "c", metrics="ssim", progress=False, figures=False)
    row = next(r for r in other["paired"]["per_case"] if r["case_id"] == "c0")
    from medlsdm.evaluation.pairing import load_image, scan_folder

    fake = load_image(scan_folder(noisy)["c0"])[0]
    assert row["ssim"] == pytest.approx(M.ssim3d(image[None], fake, row["data_range"], win_size=11), abs=1e-9)
    assert row["ssim"] != next(r for r in noisy_c0["paired"]["per_case"] if r["case_id"] == "c0")["ssim"]
    written = json.loads((tmp_path / "b" / "metrics.json").read_text(encoding="utf-8"))
    settings = written["settings"]
    assert settings["ssim"]["window"] == 11 and settings["ssim"]["sigma"] == 1.5
    assert settings["data_range_rule"] == "each real volume's max - min"
    net = settings["fid3d_random"]["network"]
    assert net["sha256"] == RandomConv3DFeatures(seed=0).provenance["sha256"] != RandomConv3DFeatures(seed=1).provenance["sha256"]
    with pytest.raises(MedlsdmError, match="--ssim-window must be an odd number"):
        evaluate_quality(real, same, tmp_path / "d", metrics="ssim", ssim_window=8, progress=False)
