"""`medlsdm prepare` and `medlsdm inspect` end to end through the command line, on tiny volumes."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from medlsdm.cli import main
from medlsdm.data.dataset import PreparedDataset, load_manifest

SHAPE = (12, 12, 12)


def _pair(rng, values=(1, 2)):
    """Image and label map: a box per label value, image brighter where labelled."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    for k, v in enumerate(values):
        label[3 + 3 * k:6 + 3 * k, 3:9, 3:9] = v
    image = rng.normal(100.0, 10.0, SHAPE) + 50.0 * label
    return image.astype(np.float32), label


def _save(path: Path, array, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine), str(path))


def make_generic(root: Path, n: int = 6, n_test: int = 1, values=(1, 2), table=True) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n + n_test):
        suffix = "Ts" if i >= n else ""
        image, label = _pair(rng, values)
        _save(root / f"images{suffix}" / f"case{i}.nii.gz", image)
        _save(root / f"labels{suffix}" / f"case{i}.nii.gz", label)
    _save(root / "images" / "orphan.nii.gz", image)  # no label map: reported, not used
    if table:
        (root / "labels.json").write_text(json.dumps({"0": "background", "1": "liver", "2": "tumour"}), encoding="utf-8")
    return root


def test_prepare_generic_end_to_end(tmp_path, caplog):
    data = make_generic(tmp_path / "data")
    out = tmp_path / "prepared"
    assert main(["prepare", str(data), "--out", str(out), "--set", "shape=[8,8,8]", "--seed", "5", "--no-progress"]) == 0
    manifest = load_manifest(out)
    assert manifest["format"] == "medlsdm-prepared" and manifest["version"] == 1
    assert manifest["channels"] == ["image"] and manifest["modality"] == "mr"
    assert manifest["label_table"] == {"0": "background", "1": "liver", "2": "tumour"}
    assert manifest["spec"]["shape"] == [8, 8, 8]
    splits = {c["case_id"]: c["split"] for c in manifest["cases"]}
    assert splits["case6"] == "test" and len(splits) == 7
    assert {"train", "val"} <= set(splits.values()) and list(splits.values()).count("test") == 1
    for case in manifest["cases"]:
        image, label = np.load(out / case["image"]), np.load(out / case["label"])
        assert image.shape == (1, 8, 8, 8) and image.dtype == np.float32
        assert image.min() >= -1.0 and image.max() <= 1.0 and image.max() > 0.5
        assert label.shape == (8, 8, 8) and label.dtype == np.uint8 and set(np.unique(label)) == {0, 1, 2}
        # brighter where labelled survives preprocessing: image and label stay aligned
        assert image[0][label > 0].mean() > image[0][label == 0].mean()
    summary = manifest["intensity"]["channels"][0]
    assert 50.0 < summary["lo"] < summary["hi"] < 250.0
    assert "orphan.nii.gz" in (out / "unmatched.txt").read_text(encoding="utf-8")
    assert "images/orphan.nii.gz (no label map)" in caplog.text  # reported, not only stored
    assert yaml.safe_load((out / "prepare.yaml").read_text(encoding="utf-8"))["prepare"]["split"]["seed"] == 5
    assert len(PreparedDataset(out, "train")) == sum(v == "train" for v in splits.values())
    # The same seed again gives the same splits (files rewritten atomically in place).
    assert main(["prepare", str(data), "--out", str(out), "--set", "shape=[8,8,8]", "--seed", "5", "--no-progress"]) == 0
    assert {c["case_id"]: c["split"] for c in load_manifest(out)["cases"]} == splits


def test_prepare_demo_cohort(tmp_path):
    from medlsdm.data.demo import write_demo_cohort

    demo = write_demo_cohort(tmp_path / "demo", n_subjects=4, n_test=1, shape=24, spacing=8.0, progress=False)
    out = tmp_path / "prepared"
    assert main(["prepare", str(demo), "--out", str(out), "--config", "demo", "--set", "shape=[16,16,16]",
                 "--no-progress"]) == 0
    manifest = load_manifest(out)
    assert manifest["label_table"] == json.loads((demo / "labels.json").read_text(encoding="utf-8"))
    splits = {c["case_id"]: c["split"] for c in manifest["cases"]}
    assert splits["subject_003"] == "test" and sorted(splits.values()) == ["test", "train", "train", "val"]
    label = np.load(out / manifest["cases"][0]["label"])
    assert label.shape == (16, 16, 16) and set(np.unique(label)) <= {0, 1, 2, 3} and label.max() == 3


def test_non_contiguous_labels_need_a_mapping(tmp_path, capsys):
    data = make_generic(tmp_path / "data", n=3, n_test=0, values=(1, 4), table=False)
    out = tmp_path / "prepared"
    assert main(["prepare", str(data), "--out", str(out), "--no-progress"]) == 2
    assert "label_mapping" in capsys.readouterr().err and not out.exists()
    assert main(["prepare", str(data), "--out", str(out), "--no-progress",
                 "--set", "label_mapping={0: 0, 1: 1, 4: 2}"]) == 0
    manifest = load_manifest(out)
    assert manifest["label_table"] == {"0": "background", "1": "label_1", "2": "label_2"}
    assert set(np.unique(np.load(out / manifest["cases"][0]["label"]))) == {0, 1, 2}
    # Names from the config when the layout has no table; the mapping carries them along.
    assert main(["prepare", str(data), "--out", str(out), "--no-progress", "--set", "label_mapping={0: 0, 1: 1, 4: 2}",
                 "--set", "label_names={0: background, 1: liver, 4: tumour}"]) == 0
    assert load_manifest(out)["label_table"] == {"0": "background", "1": "liver", "2": "tumour"}


def _corrupt(data: Path) -> Path:
    bad = data / "images" / "case2.nii.gz"
    bad.write_bytes(b"\x1f\x8b this is not a NIfTI file")
    return bad


def test_corrupt_case_stops_with_one_line_and_leaves_nothing(tmp_path, capsys):
    data = make_generic(tmp_path / "data")
    _corrupt(data)
    out = tmp_path / "out" / "prepared"
    assert main(["prepare", str(data), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "case2.nii.gz" in err[0] and err[0].startswith("medlsdm: error:")
    assert not out.exists() and list((tmp_path / "out").iterdir()) == []  # no temporary folder left


def test_skip_bad(tmp_path):
    data = make_generic(tmp_path / "data")
    _corrupt(data)
    out = tmp_path / "prepared"
    assert main(["prepare", str(data), "--out", str(out), "--skip-bad", "--no-progress"]) == 0
    manifest = load_manifest(out)
    assert [s["case_id"] for s in manifest["skipped"]] == ["case2"]
    assert "case2.nii.gz" in manifest["skipped"][0]["error"]
    assert "case2" not in {c["case_id"] for c in manifest["cases"]} and len(manifest["cases"]) == 6


def test_unknown_preset(tmp_path, capsys):
    data = make_generic(tmp_path / "data", n=2, n_test=0)
    assert main(["prepare", str(data), "--out", str(tmp_path / "p"), "--config", "nosuchpreset"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nosuchpreset'" in err and "brats" in err


def test_presets_resolve():
    from medlsdm.data.prepare import prepare_config

    for name in ("brats", "autopet", "synthrad2023", "duke", "med-ddpm-head", "demo"):
        cfg = prepare_config(name)
        assert cfg["layout"] in ("brats", "autopet", "synthrad2023", "duke", "generic")
    assert prepare_config("duke")["shape"] == [32, 256, 256]
    assert prepare_config("med-ddpm-head")["shape"] == [128, 128, 128]


def test_brats_brain_label_four_channels(tmp_path):
    rng = np.random.default_rng(1)
    for case in ("BraTS2021_00001", "BraTS2021_00002", "BraTS2021_00003"):
        brain = np.zeros(SHAPE, dtype=np.float32)
        brain[3:9, 3:9, 3:9] = 1.0  # the 8^3 crop keeps some background around it
        seg = np.zeros(SHAPE, dtype=np.uint8)
        seg[5:7, 5:7, 5:7] = 1
        seg[7, 5:7, 5:7] = 2
        seg[4, 5:7, 5:7] = 4
        for k, modality in enumerate(("t1", "t1ce", "t2", "flair")):
            _save(tmp_path / "brats" / case / f"{case}_{modality}.nii.gz",
                  brain * (100.0 * (k + 1) + rng.normal(0, 5, SHAPE).astype(np.float32)))
        _save(tmp_path / "brats" / case / f"{case}_seg.nii.gz", seg)
    out = tmp_path / "prepared"
    assert main(["prepare", str(tmp_path / "brats"), "--out", str(out), "--preset", "brats",
                 "--set", "shape=[8,8,8]", "--set", "spacing=null", "--no-progress"]) == 0
    manifest = load_manifest(out)
    assert manifest["channels"] == ["t1", "t1ce", "t2", "flair"]
    assert manifest["label_table"] == {"0": "background", "1": "necrotic tumour core", "2": "peritumoral edema",
                                       "3": "enhancing tumour", "4": "brain"}
    image, label = (np.load(out / manifest["cases"][0][k]) for k in ("image", "label"))
    assert image.shape == (4, 8, 8, 8)
    assert set(np.unique(label)) == {0, 1, 2, 3, 4}
    # the brain label fills the non-zero image voxels (a 6^3 box) outside the tumour, and nothing else
    assert [int((label == v).sum()) for v in range(5)] == [512 - 216, 8, 4, 4, 216 - 16]
    assert np.all(image[:, label == 0] == -1.0)


def test_inspect_file_and_prepared_case(tmp_path, capsys):
    from PIL import Image

    affine = np.diag([-2.0, 2.0, 3.0, 1.0])  # flipped x: left-anterior-superior
    rng = np.random.default_rng(0)
    image, label = _pair(rng)
    _save(tmp_path / "img.nii.gz", image, affine)
    _save(tmp_path / "seg.nii.gz", label, affine)
    (tmp_path / "labels.json").write_text(json.dumps({"0": "background", "1": "liver", "2": "tumour"}), encoding="utf-8")
    png = tmp_path / "view.png"
    assert main(["inspect", str(tmp_path / "img.nii.gz"), "--labels", str(tmp_path / "seg.nii.gz"),
                 "--table", str(tmp_path / "labels.json"), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "shape: (12, 12, 12)" in out and "spacing (mm): (2.0, 2.0, 3.0)" in out and "orientation: LAS" in out
    assert "float32" in out and "intensity" in out and f"1: {(label == 1).sum()} " in out and "tumour" in out
    picture = np.asarray(Image.open(png))
    assert picture.ndim == 3 and picture.shape[2] == 3 and picture.shape[1] > picture.shape[0]

    assert main(["inspect", str(tmp_path / "seg.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "label values" in out and "intensity" not in out

    data = make_generic(tmp_path / "data", n=3, n_test=0)
    prepared = tmp_path / "prepared"
    assert main(["prepare", str(data), "--out", str(prepared), "--set", "shape=[8,8,8]", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(prepared), "--case", "case1", "--png", str(tmp_path / "case.png")]) == 0
    out = capsys.readouterr().out
    assert "shape: (1, 8, 8, 8)" in out and "orientation: SAR" in out and "liver" in out
    assert (tmp_path / "case.png").is_file()
    assert main(["inspect", str(prepared), "--case", "nope"]) == 2


def test_autopet_studies_of_one_patient_share_a_split(tmp_path):
    rng = np.random.default_rng(2)
    for p in range(5):
        for s in range(1 + p % 2):  # patients 1 and 3 have two studies
            image, label = _pair(rng, values=(1,))
            study = tmp_path / "autopet" / f"PETCT_{p:03d}" / f"0{s}-2020-NA-PET"
            _save(study / "CTres.nii.gz", image - 1000.0)
            _save(study / "SUV.nii.gz", image / 100.0)
            _save(study / "SEG.nii.gz", label)
    out = tmp_path / "prepared"
    assert main(["prepare", str(tmp_path / "autopet"), "--out", str(out), "--preset", "autopet",
                 "--set", "spacing=null", "--set", "shape=[8,8,8]", "--seed", "1", "--no-progress",
                 "--set", "layout_options.channels=[ct, pet]", "--modality", "mr"]) == 0
    manifest = load_manifest(out)
    assert manifest["channels"] == ["ct", "pet"] and manifest["label_table"] == {"0": "background", "1": "lesion"}
    assert len(manifest["cases"]) == 7 and np.load(out / manifest["cases"][0]["image"]).shape == (2, 8, 8, 8)
    by_split = {s: {c["subject_id"] for c in manifest["cases"] if c["split"] == s} for s in ("train", "val", "test")}
    assert by_split["train"] and by_split["val"] and by_split["test"]
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"]
                or by_split["val"] & by_split["test"])
    assert manifest["split"]["subjects"] == {s: len(v) for s, v in by_split.items()}
    # the preset itself: CT only, in a CT window
    assert main(["prepare", str(tmp_path / "autopet"), "--out", str(out), "--preset", "autopet",
                 "--set", "spacing=null", "--set", "shape=[8,8,8]", "--no-progress"]) == 0
    manifest = load_manifest(out)
    assert manifest["channels"] == ["ct"] and manifest["modality"] == "ct"
    assert np.load(out / manifest["cases"][0]["image"]).shape == (1, 8, 8, 8)


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--layout", "--preset", "--config", "--set", "--seed", "--labels-dir", "--modality",
                   "--skip-bad", "synthrad2023", "duke"):
        assert option in text
    with pytest.raises(SystemExit):  # a preset and a config file are alternatives
        main(["prepare", "in", "--out", "out", "--preset", "brats", "--config", "x.yaml"])


def test_split_counts_from_the_command_line(tmp_path):
    data = make_generic(tmp_path / "data", n=6, n_test=0)
    out = tmp_path / "prepared"
    assert main(["prepare", str(data), "--out", str(out), "--set", "shape=[8,8,8]", "--no-progress",
                 "--set", "split.counts=[null, 1, 2]"]) == 0
    assert load_manifest(out)["split"]["cases"] == {"train": 3, "val": 1, "test": 2}


def test_inspect_prepared_case_by_path_and_array(tmp_path, capsys):
    data = make_generic(tmp_path / "data", n=3, n_test=0)
    prepared = tmp_path / "prepared"
    assert main(["prepare", str(data), "--out", str(prepared), "--set", "shape=[8,8,8]", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(prepared)]) == 0
    assert "cases: 3" in capsys.readouterr().out
    for target in (prepared / "case1", prepared / "images" / "case1.npy", prepared / "labels" / "case1.npy"):
        assert main(["inspect", str(target)]) == 0
        out = capsys.readouterr().out
        assert "prepared case: case1" in out and "shape: (1, 8, 8, 8)" in out and "tumour" in out
    label = np.load(prepared / "labels" / "case1.npy")
    assert f"2: {(label == 2).sum()} " in out
    # an array outside a prepared dataset: values, no geometry
    np.save(tmp_path / "loose.npy", label)
    assert main(["inspect", str(tmp_path / "loose.npy"), "--png", str(tmp_path / "loose.png")]) == 0
    out = capsys.readouterr().out
    assert "no geometry" in out and "label values" in out and (tmp_path / "loose.png").is_file()


def test_inspect_finds_the_label_table_and_reports_lps(tmp_path, capsys):
    data = make_generic(tmp_path / "data", n=1, n_test=0)  # data/labels.json names 1 liver, 2 tumour
    assert main(["inspect", str(data / "labels" / "case0.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert f"label table: {data / 'labels.json'}" in out and "liver" in out and "tumour" in out
    image, _ = _pair(np.random.default_rng(0))
    _save(tmp_path / "lps.nii.gz", image, np.diag([-1.0, -1.0, 2.0, 1.0]))
    assert main(["inspect", str(tmp_path / "lps.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "orientation: LPS" in out and "spacing (mm): (1.0, 1.0, 2.0)" in out
    assert f"{image.min():.4g} / " in out  # the minimum opens the intensity line


def test_duke_preset_remaps_to_background_tissue_vessels(tmp_path):
    rng = np.random.default_rng(3)
    for patient in ("Breast_MRI_001", "Breast_MRI_002", "Breast_MRI_003"):
        seg = np.zeros(SHAPE, dtype=np.uint8)
        seg[2:10, 2:10, 2:6] = 2  # dense tissue (authors' value 2)
        seg[2:10, 2:10, 6:8] = 1  # vessels (authors' value 1)
        _save(tmp_path / "duke" / "images" / f"{patient}_pre.nii.gz",
              (rng.normal(100, 5, SHAPE) + 50 * seg).astype(np.float32))
        _save(tmp_path / "duke" / "segmentations" / f"Segmentation_{patient}_Dense_and_Vessels.nii.gz", seg)
    out = tmp_path / "prepared"
    assert main(["prepare", str(tmp_path / "duke"), "--out", str(out), "--preset", "duke",
                 "--set", "shape=[12,12,12]", "--no-progress"]) == 0
    manifest = load_manifest(out)
    assert manifest["label_table"] == {"0": "background", "1": "fibroglandular tissue", "2": "vessels"}
    label = np.load(out / manifest["cases"][0]["label"])
    assert [int((label == v).sum()) for v in range(3)] == [12 ** 3 - 8 * 8 * 6, 8 * 8 * 4, 8 * 8 * 2]
