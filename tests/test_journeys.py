"""Journeys as a user makes them, one command's output feeding the next, on small datasets in
the layouts users bring (tests/journey_data.py): prepare (at 2 mm) -> train both stages (tiny)
-> sample on the ORIGINAL label files at their native 1 mm (and an oblique, anisotropic copy)
-> check what came out."""

import json

import nibabel as nib
import numpy as np
import pytest

import journey_data
from diffusion_runs import AE_TINY, TINY, sets
from medlsdm import cli

pytestmark = pytest.mark.slow

TINY_PREP = ["--set", "spacing=[2, 2, 2]", "--set", "shape=[16, 16, 16]", "--no-progress"]


def _train(prepared, runs):
    assert cli.main(["train", "autoencoder", "--data", str(prepared), "--out", str(runs / "ae"), *sets(*AE_TINY)]) == 0
    assert cli.main(["train", "diffusion", "--data", str(prepared), "--out", str(runs / "dm"),
                     "--autoencoder", str(runs / "ae"), *sets(*TINY, "trainer.max_steps=2",
                                                                "trainer.preview_every_n_steps=0")]) == 0
    return runs / "dm"


def _training_classes(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text(encoding="utf-8"))
    classes = set()
    for case in manifest["cases"]:
        if case["split"] == "train":
            classes |= set(np.unique(np.load(prepared / case["label"])).tolist())
    return sorted(classes)


def _subjects_stay_together(split_of: dict, subject_of: dict) -> None:
    splits = {}
    for case, split in split_of.items():
        splits.setdefault(subject_of[case], set()).add(split)
    assert all(len(s) == 1 for s in splits.values()), splits


def _check_outputs(out, pairs):
    """Every output on its label file's grid, its labelled foreground generated (not the fill
    value written outside the generated window)."""
    for name, label_path in pairs:
        out_image = nib.load(str(out / f"{name}_sample0.nii.gz"))
        label = nib.load(str(label_path))
        assert out_image.shape[:3] == label.shape
        assert np.allclose(out_image.affine, label.affine, atol=1e-4)
        data = np.asarray(out_image.dataobj, dtype=np.float32)
        data = data if data.ndim == 3 else data[..., 0]
        fg = np.asarray(label.dataobj) > 0
        fill = data[~fg].min() if (~fg).any() else data.min()
        assert np.isclose(data[fg], fill).mean() < 0.05, f"{name}: foreground left at the fill value"
        assert data[fg].std() > 0


def test_brats2021_journey_native_1mm_seg_files_with_the_brain_class(tmp_path):
    root = journey_data.brats2021(tmp_path / "BraTS2021")
    prepared = tmp_path / "prepared"
    assert cli.main(["prepare", str(root), "--out", str(prepared), "--preset", "brats", *TINY_PREP]) == 0
    model = _train(prepared, tmp_path / "runs")
    out = tmp_path / "synthetic"
    # the dataset root itself: case IDs from the layout, the brain class from each case's images
    assert cli.main(["sample", "--model", str(model), "--labels", str(root), "--out", str(out), "--steps", "2"]) == 0
    report = json.loads((out / "sampling_report.json").read_text(encoding="utf-8"))
    cases = sorted(p.name for p in root.iterdir())
    assert sorted(e["case_id"] for e in report["label_maps"]) == cases
    training = _training_classes(prepared)
    assert training == [0, 1, 2, 3, 4]
    for entry in report["label_maps"]:
        assert entry["classes"] == training          # 0,1,2,4 -> 0..3, plus the brain class, as at training
        assert any("brain" in n for n in entry["notes"]) and any("resampled" in n for n in entry["notes"])
    _check_outputs(out, [(c, root / c / f"{c}_seg.nii.gz") for c in cases])
    # one seg file on its own: its case folder's images are found beside it
    single = tmp_path / "single"
    seg = root / cases[0] / f"{cases[0]}_seg.nii.gz"
    assert cli.main(["sample", "--model", str(model), "--labels", str(seg), "--out", str(single), "--steps", "2"]) == 0
    entry = json.loads((single / "sampling_report.json").read_text(encoding="utf-8"))["label_maps"][0]
    assert entry["classes"] == training


def test_brats2023_journey_follow_ups_and_labels_0_to_3(tmp_path):
    root = journey_data.brats2023(tmp_path / "BraTS2023")
    prepared = tmp_path / "prepared"
    assert cli.main(["prepare", str(root), "--out", str(prepared), "--preset", "brats", *TINY_PREP]) == 0
    manifest = json.loads((prepared / "manifest.json").read_text(encoding="utf-8"))
    model = _train(prepared, tmp_path / "runs")
    out = tmp_path / "synthetic"
    assert cli.main(["sample", "--model", str(model), "--labels", str(root), "--out", str(out), "--steps", "2"]) == 0
    report = json.loads((out / "sampling_report.json").read_text(encoding="utf-8"))
    for entry in report["label_maps"]:
        assert entry["classes"] == _training_classes(prepared) == [0, 1, 2, 3, 4]
    _check_outputs(out, [(e["case_id"], root / e["case_id"] / f"{e['case_id']}-seg.nii.gz")
                         for e in report["label_maps"]])
    assert len(manifest["cases"]) == 8
    _subjects_stay_together({c["case_id"]: c["split"] for c in manifest["cases"]},
                            {c["case_id"]: c["subject_id"] for c in manifest["cases"]})
    # evaluate on the original dataset root: every synthetic volume pairs with its 4-channel case
    evaluation = tmp_path / "evaluation"
    assert cli.main(["evaluate", "quality", "--real", str(root), "--synthetic", str(out), "--out", str(evaluation),
                     "--metrics", "ssim,psnr"]) == 0
    metrics = json.loads((evaluation / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["pairing"]["n_pairs"] == 8 and not metrics["pairing"]["unpaired_synthetic"]
    # export nnU-Net from the prepared dataset: synthetic cases in the fold of the case whose map made
    # them, subjects whole
    export = tmp_path / "nnUNet_raw"
    assert cli.main(["export", "nnunet", "--real", str(prepared), "--synthetic", str(out), "--out", str(export),
                     "--dataset-id", "501", "--name", "Journey", "--folds", "2"]) == 0
    folds = json.loads((export / "Dataset501_Journey" / "splits_final.json").read_text(encoding="utf-8"))
    fold_of = {case: k for k, fold in enumerate(folds) for case in fold["val"]}
    subject = {c["case_id"]: c["subject_id"] for c in manifest["cases"]}
    real_folds = {}
    for case, k in fold_of.items():
        source = case[len("syn_"):].rsplit("_", 1)[0] if case.startswith("syn_") else case
        real_folds.setdefault(subject[source], set()).add(k)
    assert real_folds and all(len(k) == 1 for k in real_folds.values())   # a subject, its samples: one fold


def test_generic_journey_oblique_anisotropic_map_and_another_scheme(tmp_path):
    subjects = {f"pat{i // 2}_scan{i % 2}": f"patient{i // 2}" for i in range(6)}
    root = journey_data.generic(tmp_path / "generic", subjects=subjects)
    prepared = tmp_path / "prepared"
    assert cli.main(["prepare", str(root), "--out", str(prepared), "--layout", "generic", *TINY_PREP]) == 0
    manifest = json.loads((prepared / "manifest.json").read_text(encoding="utf-8"))
    assert {c["case_id"]: c["subject_id"] for c in manifest["cases"]} == subjects      # from subjects.csv
    _subjects_stay_together({c["case_id"]: c["split"] for c in manifest["cases"]}, subjects)
    model = _train(prepared, tmp_path / "runs")
    maps = tmp_path / "maps"
    maps.mkdir()
    native = root / "labels" / "pat0_scan0.nii.gz"
    (maps / "native.nii.gz").write_bytes(native.read_bytes())
    journey_data.oblique_anisotropic(native, maps / "oblique.nii.gz")
    out = tmp_path / "synthetic"
    assert cli.main(["sample", "--model", str(model), "--labels", str(maps), "--out", str(out), "--steps", "2"]) == 0
    _check_outputs(out, [("native", maps / "native.nii.gz"), ("oblique", maps / "oblique.nii.gz")])
    report = json.loads((out / "sampling_report.json").read_text(encoding="utf-8"))
    assert all(e["classes"] == _training_classes(prepared) for e in report["label_maps"])
    # another scheme: values 0, 10, 20, 30 are refused, then mapped with --label-map
    other = np.asarray(nib.load(str(native)).dataobj).astype(np.uint8) * 10
    nib.save(nib.Nifti1Image(other, nib.load(str(native)).affine), str(tmp_path / "other.nii.gz"))
    assert cli.main(["sample", "--model", str(model), "--labels", str(tmp_path / "other.nii.gz"),
                     "--out", str(tmp_path / "o2"), "--steps", "1"]) == 2
    assert cli.main(["sample", "--model", str(model), "--labels", str(tmp_path / "other.nii.gz"),
                     "--out", str(tmp_path / "o3"), "--steps", "1", "--label-map", "10=1,20=2,30=3"]) == 0
    _check_outputs(tmp_path / "o3", [("other", tmp_path / "other.nii.gz")])
    # labels edit on the 1 mm map, then sample the edited map: the same rules apply
    edited = tmp_path / "edited" / "native_grown.nii.gz"
    assert cli.main(["labels", "edit", "--in", str(native), "--out", str(edited), "--dilate", "3", "1"]) == 0
    assert cli.main(["sample", "--model", str(model), "--labels", str(edited), "--out", str(tmp_path / "o4"),
                     "--steps", "1"]) == 0
    _check_outputs(tmp_path / "o4", [("native_grown", edited)])


def test_autopet_and_nnunet_journeys(tmp_path):
    for name, make, args in (("autopet", journey_data.autopet, ["--preset", "autopet"]),
                             ("nnunet", journey_data.nnunet, ["--layout", "nnunet"])):
        root = make(tmp_path / name)
        prepared = tmp_path / f"{name}_prepared"
        assert cli.main(["prepare", str(root), "--out", str(prepared), *args, *TINY_PREP]) == 0
        model = _train(prepared, tmp_path / f"{name}_runs")
        out = tmp_path / f"{name}_synthetic"
        assert cli.main(["sample", "--model", str(model), "--labels", str(root), "--out", str(out), "--steps", "2"]) == 0
        report = json.loads((out / "sampling_report.json").read_text(encoding="utf-8"))
        manifest = json.loads((prepared / "manifest.json").read_text(encoding="utf-8"))
        by_id = {c["case_id"]: c for c in manifest["cases"]}
        assert sorted(e["case_id"] for e in report["label_maps"]) == sorted(by_id)   # the layout's case IDs
        for entry in report["label_maps"]:
            assert set(entry["classes"]) <= set(_training_classes(prepared))
        source = prepared / manifest["source"]   # case files are recorded relative to the dataset root
        _check_outputs(out, [(e["case_id"], source / by_id[e["case_id"]]["record"]["source"]["label"])
                             for e in report["label_maps"]])
