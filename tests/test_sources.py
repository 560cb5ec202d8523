"""One reader for datasets: evaluate and export read what prepare reads (BraTS 2021/2023 with 4
modalities, AutoPET, nnU-Net, generic, prepared datasets), multi-channel cases stay one case,
samples named <case_id>_sample<k> pair, and subjects never straddle splits or folds."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medlsdm.cli import main
from medlsdm.data.export import export_nnunet
from medlsdm.data.layouts import case_id_for_label_file, discover, label_maps
from medlsdm.data.prepare import _splits
from medlsdm.data.sources import DatasetSource, case_aliases, read_dataset, split_sample_name
from medlsdm.data.splits import assign_folds
from medlsdm.errors import ConfigError, DataError
from medlsdm.evaluation.pairing import pair_by_case, refuse_same_folder, scan_folder

SHAPE = (8, 9, 10)
# 0.7 x 0.7 x 5 mm, rotated 20 degrees about z (oblique), off-centre origin.
_C, _S = np.cos(np.radians(20)), np.sin(np.radians(20))
AFFINE = np.array([[0.7 * _C, -0.7 * _S, 0, -30.0], [0.7 * _S, 0.7 * _C, 0, 12.0], [0, 0, 5.0, -40.0], [0, 0, 0, 1]])
BRATS_2021 = {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair", "seg": "_seg"}
BRATS_2023 = {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f", "seg": "-seg"}


def _save(path: Path, array: np.ndarray, affine=AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 4:  # (C, X, Y, Z) -> NIfTI (X, Y, Z, C)
        array = np.moveaxis(array, 0, -1)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _label(seed: int, values=(0, 1, 2, 4)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, np.uint8)
    label[2:6, 2:7, 3:8] = rng.choice(np.array(values[1:], np.uint8), size=(4, 5, 5))
    return label


def _image(seed: int, channel: int) -> np.ndarray:
    rng = np.random.default_rng(1000 * seed + channel)
    image = np.zeros(SHAPE, np.float32)
    image[1:7, 1:8, 1:9] = rng.uniform(10, 100, size=(6, 7, 8)) + 50 * channel  # "brain", zero outside
    return image


def brats_tree(root: Path, case_ids, suffixes) -> Path:
    """BraTS case folders; labels 0, 1, 2, 4 (2018-2021) or 0, 1, 2, 3 (2023: enhancing tumour is 3)."""
    values = (0, 1, 2, 4) if suffixes is BRATS_2021 else (0, 1, 2, 3)
    for i, case in enumerate(case_ids):
        for c, key in enumerate(["t1", "t1ce", "t2", "flair"]):
            _save(root / case / f"{case}{suffixes[key]}.nii.gz", _image(i, c))
        _save(root / case / f"{case}{suffixes['seg']}.nii.gz", _label(i, values))
    return root


def _sample(path: Path, seed: int, channels: int = 4) -> Path:
    rng = np.random.default_rng(seed)
    return _save(path, rng.uniform(0, 150, size=(channels, *SHAPE)).astype(np.float32))


BRATS23_IDS = ["BraTS-GLI-00005-000", "BraTS-GLI-00005-001", "BraTS-GLI-00006-000", "BraTS-GLI-00007-000",
               "BraTS-GLI-00007-001", "BraTS-MEN-00008-000"]


# --------------------------------------------------------------------------- subjects, case IDs


def test_brats_case_ids_subjects_and_label_files(tmp_path):
    root21 = brats_tree(tmp_path / "b21", ["BraTS2021_00000", "BraTS2021_00001"], BRATS_2021)
    root23 = brats_tree(tmp_path / "b23", BRATS23_IDS, BRATS_2023)
    found = discover(root23)
    assert found.layout == "brats"
    assert {c.case_id: c.subject_id for c in found.cases} == {
        "BraTS-GLI-00005-000": "BraTS-GLI-00005", "BraTS-GLI-00005-001": "BraTS-GLI-00005",
        "BraTS-GLI-00006-000": "BraTS-GLI-00006", "BraTS-GLI-00007-000": "BraTS-GLI-00007",
        "BraTS-GLI-00007-001": "BraTS-GLI-00007", "BraTS-MEN-00008-000": "BraTS-MEN-00008"}
    assert [c.subject_id for c in discover(root21).cases] == ["BraTS2021_00000", "BraTS2021_00001"]

    seg21 = root21 / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz"
    seg23 = root23 / "BraTS-GLI-00005-001" / "BraTS-GLI-00005-001-seg.nii.gz"
    assert case_id_for_label_file(seg21) == "BraTS2021_00000"
    assert case_id_for_label_file(seg23) == "BraTS-GLI-00005-001"
    # Outside its case folder (a folder of label maps): the name without the -seg suffix.
    flat = tmp_path / "maps"
    flat.mkdir()
    (flat / seg23.name).write_bytes(seg23.read_bytes())
    (flat / seg21.name).write_bytes(seg21.read_bytes())
    assert case_id_for_label_file(flat / seg23.name) == "BraTS-GLI-00005-001"
    assert case_id_for_label_file(flat / seg21.name, layout="generic") == "BraTS2021_00000_seg"
    # label_maps: a dataset root gives the layout's case IDs; a folder of label files the same IDs.
    from_root = label_maps(root23)
    assert [(m.case_id, m.subject_id, m.path.name) for m in from_root][:2] == [
        ("BraTS-GLI-00005-000", "BraTS-GLI-00005", "BraTS-GLI-00005-000-seg.nii.gz"),
        ("BraTS-GLI-00005-001", "BraTS-GLI-00005", "BraTS-GLI-00005-001-seg.nii.gz")]
    assert {(m.case_id, m.subject_id) for m in label_maps(flat)} == {
        ("BraTS-GLI-00005-001", "BraTS-GLI-00005"), ("BraTS2021_00000", "BraTS2021_00000")}
    assert [m.case_id for m in label_maps(seg21)] == ["BraTS2021_00000"]


def test_autopet_label_file_ids_match_discovery(tmp_path):
    for patient, study in [("PETCT_aa", "01-2001-NA-PET CT"), ("PETCT_aa", "02-2002-NA-PET"), ("PETCT_bb", "03-2003")]:
        for i, name in enumerate(["CTres", "SUV"]):
            _save(tmp_path / patient / study / f"{name}.nii.gz", _image(0, i))
        _save(tmp_path / patient / study / "SEG.nii.gz", _label(1, (0, 1)))
    found = discover(tmp_path)
    assert found.layout == "autopet"
    for case in found.cases:
        assert case_id_for_label_file(case.label_path) == case.case_id
        assert case_id_for_label_file(case.label_path, "autopet", root=tmp_path) == case.case_id
    assert [(m.case_id, m.subject_id) for m in label_maps(tmp_path)] == [
        ("PETCT_aa_01-2001-NA-PET_CT", "PETCT_aa"), ("PETCT_aa_02-2002-NA-PET", "PETCT_aa"),
        ("PETCT_bb_03-2003", "PETCT_bb")]
    assert {k: v.subject_id for k, v in scan_folder(tmp_path).items()} == {
        "PETCT_aa_01-2001-NA-PET_CT": "PETCT_aa", "PETCT_aa_02-2002-NA-PET": "PETCT_aa", "PETCT_bb_03-2003": "PETCT_bb"}
    # Every study's label file is called SEG: a sample named SEG_sample0 cannot say which case it is.
    aliases = case_aliases((c.case_id, c.label_path) for c in found.cases)
    assert "SEG" not in aliases
    assert split_sample_name("PETCT_aa_02-2002-NA-PET_sample3", aliases) == ("PETCT_aa_02-2002-NA-PET", 3)


def nnunet_tree(root: Path, case_ids, subjects: dict | None) -> Path:
    for i, case in enumerate(case_ids):
        for c in range(2):
            _save(root / "imagesTr" / f"{case}_{c:04d}.nii.gz", _image(i, c))
        _save(root / "labelsTr" / f"{case}.nii.gz", _label(i, (0, 1, 2)))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "a": 1, "b": 2},
        "numTraining": len(case_ids), "file_ending": ".nii.gz"}))
    if subjects is not None:
        rows = "".join(f"{case},{subject}\n" for case, subject in subjects.items())
        (root / "subjects.csv").write_text("case_id,subject_id\n" + rows)
    return root


NNUNET_SUBJECTS = {"scan_001": "P1", "scan_002": "P1", "scan_003": "P1", "scan_004": "P2", "scan_005": "P3",
                   "scan_006": "P3", "scan_007": "P4", "scan_008": "P5"}


def test_subjects_csv_and_subject_regex(tmp_path):
    root = nnunet_tree(tmp_path / "nn", list(NNUNET_SUBJECTS), NNUNET_SUBJECTS)
    found = discover(root)
    assert {c.case_id: c.subject_id for c in found.cases} == NNUNET_SUBJECTS
    assert any("subjects.csv" in n for n in found.notes)
    # The regex replaces the CSV file; a case it does not match is an error naming the case.
    regex = {c.case_id: c.subject_id for c in discover(root, subject_regex=r"_0*(?P<subject>[0-9])$").cases}
    assert regex == {case: case[-1] for case in NNUNET_SUBJECTS}
    with pytest.raises(DataError, match="scan_005.*empty subject"):
        discover(root, subject_regex=r"scan_00([1-4])?")
    with pytest.raises(DataError, match="scan_005.*does not match"):
        discover(root, subject_regex=r"scan_00[1-4]")
    with pytest.raises(ConfigError, match="not a regular expression"):
        discover(root, subject_regex="(")
    # A CSV file that leaves a case out is refused: a guessed subject could straddle splits.
    (root / "subjects.csv").write_text("case_id,subject_id\nscan_001,P1\n")
    with pytest.raises(DataError, match="no subject_id for case.*scan_002"):
        discover(root)
    (root / "subjects.csv").write_text("case,patient\nscan_001,P1\n")
    with pytest.raises(DataError, match="header case_id,subject_id"):
        discover(root)


def test_subject_groups_never_straddle_splits(tmp_path):
    found = discover(brats_tree(tmp_path, BRATS23_IDS, BRATS_2023))
    cfg = {"split": {"fractions": [0.5, 0.25, 0.25], "seed": 0, "counts": None}}
    for seed in range(20):
        cfg["split"]["seed"] = seed
        splits = _splits(found.cases, cfg)
        assert set(splits) == {c.subject_id for c in found.cases}  # one split per subject, not per scan


def test_assign_folds_grouped_balanced_seeded():
    counts = {"A": 3, "B": 1, "C": 2, "D": 1, "E": 1, "F": 2}
    folds = assign_folds(counts, 3, seed=0)
    assert set(folds) == set(counts) and set(folds.values()) == {0, 1, 2}
    load = [sum(counts[s] for s, f in folds.items() if f == k) for k in range(3)]
    assert sorted(load) == [3, 3, 4]  # 10 cases in whole subjects: as even as possible
    assert folds == assign_folds(dict(reversed(list(counts.items()))), 3, seed=0)  # order-independent
    assert any(assign_folds(counts, 3, seed=s) != folds for s in range(1, 10))  # the seed matters
    with pytest.raises(DataError, match="cannot fill 7 folds"):
        assign_folds(counts, 7)
    with pytest.raises(ConfigError, match="folds"):
        assign_folds(counts, 1)


# ------------------------------------------------------------------------------ reading datasets


def test_scan_folder_reads_brats_as_four_channel_cases_and_pairs_samples(tmp_path):
    root = brats_tree(tmp_path / "BraTS2021", ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"], BRATS_2021)
    real = scan_folder(root, "real volumes")
    assert sorted(real) == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
    case = real["BraTS2021_00001"]
    assert [p.name for p in case.images] == [f"BraTS2021_00001{s}.nii.gz" for s in ("_t1", "_t1ce", "_t2", "_flair")]
    assert case.label.name == "BraTS2021_00001_seg.nii.gz" and case.subject_id == "BraTS2021_00001"
    assert case.channel_names == ("t1", "t1ce", "t2", "flair")
    syn = tmp_path / "synthetic"
    _sample(syn / "BraTS2021_00000_sample0.nii.gz", 0)
    _sample(syn / "BraTS2021_00000_sample1.nii.gz", 1)
    _sample(syn / "BraTS2021_00001_seg_sample0.nii.gz", 2)  # named after the label file, as before
    _sample(syn / "unrelated_sample0.nii.gz", 3)
    pairing = pair_by_case(real, scan_folder(syn, "synthetic volumes"), root, syn)
    assert [(p.case_id, p.sample) for p in pairing.pairs] == [
        ("BraTS2021_00000", 0), ("BraTS2021_00000", 1), ("BraTS2021_00001", 0)]
    assert pairing.unpaired_synthetic == ["unrelated_sample0"] and pairing.unpaired_real == ["BraTS2021_00002"]


def test_explicit_layout_preset_and_splits(tmp_path):
    root = brats_tree(tmp_path / "b23", BRATS23_IDS, BRATS_2023)
    by_preset = read_dataset(DatasetSource(root, preset="brats"))
    assert by_preset.layout == "brats" and len(by_preset.cases) == 6
    with pytest.raises(DataError, match="no image/label pairs found in the nnunet layout|nnU-Net layout needs"):
        scan_folder(DatasetSource(root, layout="nnunet"))
    regex = scan_folder(DatasetSource(root, subject_regex=r"BraTS-(?P<subject>[A-Z]+)"))
    assert {v.subject_id for v in regex.values()} == {"GLI", "MEN"}
    # A generic dataset with an explicit test folder: its test split, or the rest.
    generic = tmp_path / "generic"
    for i, (images, labels, case) in enumerate([("images", "labels", "a"), ("images", "labels", "b"),
                                                ("imagesTs", "labelsTs", "t")]):
        _save(generic / images / f"{case}.nii.gz", _image(i, 0))
        _save(generic / labels / f"{case}.nii.gz", _label(i))
    assert sorted(scan_folder(DatasetSource(generic, splits=("test",)))) == ["t"]
    assert sorted(scan_folder(DatasetSource(generic, splits=("train", "val")))) == ["a", "b"]
    refuse_same_folder(train_real=DatasetSource(generic, splits=("train", "val")),
                       test_real=DatasetSource(generic, splits=("test",)))
    with pytest.raises(DataError, match="same folder"):
        refuse_same_folder(train_real=DatasetSource(generic), test_real=DatasetSource(generic, splits=("test",)))


def test_prepared_dataset_reads_back_its_original_files_subjects_and_splits(tmp_path):
    root = brats_tree(tmp_path / "b23", BRATS23_IDS, BRATS_2023)
    prepared = tmp_path / "prepared"
    assert main(["prepare", str(root), "--out", str(prepared), "--preset", "brats", "--set", "spacing=null",
                 "--set", "shape=[8,8,8]", "--set", "split.counts=[null,1,1]", "--no-progress"]) == 0
    manifest = json.loads((prepared / "manifest.json").read_text())
    found = read_dataset(prepared)
    assert found.layout == "brats" and len(found.channel_names) == 4
    recorded = {c["case_id"]: (c["subject_id"], c["split"]) for c in manifest["cases"]}
    assert {c.case_id: (c.subject_id, c.split) for c in found.cases} == recorded
    assert recorded["BraTS-GLI-00005-000"] == recorded["BraTS-GLI-00005-001"]  # timepoints: one subject, one split
    assert recorded["BraTS-GLI-00005-000"][0] == "BraTS-GLI-00005"
    for subject in {s for s, _ in recorded.values()}:  # one split per subject
        assert len({split for s, split in recorded.values() if s == subject}) == 1
    for case in found.cases:  # the original 4-modality files, not the prepared arrays
        assert [p.parent.name for p in case.image_paths] == [case.case_id] * 4
        assert case.label_path.name.endswith("-seg.nii.gz")
    test_ids = [c for c, (_, split) in recorded.items() if split == "test"]
    assert sorted(scan_folder(DatasetSource(prepared, splits=("test",)))) == sorted(test_ids)
    assert sorted(m.case_id for m in label_maps(prepared)) == sorted(recorded)
    with pytest.raises(ConfigError, match="records its layout and subjects"):
        scan_folder(DatasetSource(prepared, preset="brats"))


# ------------------------------------------------------------------------------ the commands


def test_evaluate_quality_reads_a_brats_tree(tmp_path, capsys):
    root = brats_tree(tmp_path / "BraTS2023", BRATS23_IDS[:3], BRATS_2023)
    syn = tmp_path / "synthetic"
    _sample(syn / "BraTS-GLI-00005-000_sample0.nii.gz", 0)
    _sample(syn / "BraTS-GLI-00005-001_sample0.nii.gz", 1)
    out = tmp_path / "eval"
    assert main(["evaluate", "quality", "--real", str(root), "--synthetic", str(syn), "--out", str(out),
                 "--metrics", "ssim,psnr", "--preset", "brats"]) == 0
    data = json.loads((out / "metrics.json").read_text())
    assert data["pairing"]["n_pairs"] == 2 and data["pairing"]["unpaired_real"] == ["BraTS-GLI-00006-000"]
    assert [r["case_id"] for r in data["paired"]["per_case"]] == ["BraTS-GLI-00005-000", "BraTS-GLI-00005-001"]
    assert all(np.isfinite(r["ssim"]) and r["ssim"] < 0.9 for r in data["paired"]["per_case"])
    # A 1-channel synthetic volume does not pass for a 4-modality case.
    _sample(syn / "BraTS-GLI-00006-000_sample0.nii.gz", 2, channels=1)
    assert main(["evaluate", "quality", "--real", str(root), "--synthetic", str(syn), "--out", str(out),
                 "--metrics", "ssim"]) == 2
    assert "1 channels" in capsys.readouterr().err


def test_export_groups_subjects_and_synthetic_cases_in_folds(tmp_path, capsys):
    root = nnunet_tree(tmp_path / "nn", list(NNUNET_SUBJECTS), NNUNET_SUBJECTS)
    syn = tmp_path / "synthetic"
    for i, case in enumerate(NNUNET_SUBJECTS):
        for k in range(2):
            _sample(syn / f"{case}_sample{k}.nii.gz", 10 * i + k, channels=2)
    out = tmp_path / "nnUNet_raw"
    assert main(["export", "nnunet", "--real", str(root), "--synthetic", str(syn), "--out", str(out),
                 "--dataset-id", "12", "--name", "Grouped", "--folds", "3", "--seed", "4"]) == 0
    assert "splits_final.json: 3 folds" in capsys.readouterr().out
    dataset = out / "Dataset012_Grouped"
    splits = json.loads((dataset / "splits_final.json").read_text())
    info = json.loads((dataset / "medlsdm_export.json").read_text())["cases"]
    assert len(splits) == 3 and len(info) == 8 + 16
    exported = {p.name[: -len(".nii.gz")] for p in (dataset / "labelsTr").iterdir()}
    for fold in splits:
        assert set(fold["train"]) | set(fold["val"]) == exported and not set(fold["train"]) & set(fold["val"])
        val_subjects = {info[c]["subject_id"] for c in fold["val"]}
        train_subjects = {info[c]["subject_id"] for c in fold["train"]}
        assert not val_subjects & train_subjects  # a subject never straddles a fold
    fold_of = {c: v["fold"] for c, v in info.items()}
    for case, subject in NNUNET_SUBJECTS.items():
        assert fold_of[f"syn_{case}_0"] == fold_of[f"syn_{case}_1"] == fold_of[case]
        assert info[f"syn_{case}_0"]["source_case"] == case and info[f"syn_{case}_0"]["subject_id"] == subject
    assert fold_of["scan_001"] == fold_of["scan_002"] == fold_of["scan_003"]


def test_export_from_autopet_and_brats_roots(tmp_path):
    autopet = tmp_path / "autopet"
    studies = [("PETCT_aa", "01-2001"), ("PETCT_aa", "02-2002"), ("PETCT_bb", "03-2003"), ("PETCT_cc", "04-2004")]
    for i, (patient, study) in enumerate(studies):
        _save(autopet / patient / study / "CTres.nii.gz", _image(i, 0))
        _save(autopet / patient / study / "SUV.nii.gz", _image(i, 1))
        _save(autopet / patient / study / "SEG.nii.gz", _label(i, (0, 1)))
    syn = tmp_path / "syn_pet"
    _sample(syn / "PETCT_aa_02-2002_sample0.nii.gz", 0, channels=1)
    result = export_nnunet(tmp_path / "out", 3, "Pet", real=DatasetSource(autopet, preset="autopet"),
                           synthetic=syn, folds=2, progress=False)
    assert result.channel_names == ["ct"] and result.count("real") == 4 and result.count("synthetic") == 1
    folds = result.folds
    assert folds["PETCT_aa_01-2001"] == folds["PETCT_aa_02-2002"] == folds["syn_PETCT_aa_02-2002_0"]
    # Organ maps from --labels-dir (named by case ID) replace SEG, as for prepare.
    organs = tmp_path / "organs"
    for i, (patient, study) in enumerate(studies):
        _save(organs / f"{patient}_{study}.nii.gz", _label(i, (0, 1, 2, 3)))
    (organs / "labels.json").write_text(json.dumps({"0": "background", "1": "liver", "2": "lung", "3": "bone"}))
    assert main(["export", "nnunet", "--real", str(autopet), "--preset", "autopet", "--labels-dir", str(organs),
                 "--mix", "real", "--out", str(tmp_path / "out"), "--dataset-id", "9", "--name", "Organs"]) == 0
    dataset_json = json.loads((tmp_path / "out" / "Dataset009_Organs" / "dataset.json").read_text())
    assert dataset_json["labels"] == {"background": 0, "liver": 1, "lung": 2, "bone": 3}
    assert dataset_json["channel_names"] == {"0": "ct"} and dataset_json["numTraining"] == 4

    # BraTS 2023, multi-channel cases stay one case; samples of test cases stay out of training data.
    root = brats_tree(tmp_path / "b23", BRATS23_IDS[:4], BRATS_2023)
    (root / "subjects.csv").write_text("case_id,subject_id\n" + "".join(
        f"{c},{c[:15]}\n" for c in BRATS23_IDS[:4]))  # same grouping as the timepoint rule
    syn = tmp_path / "syn_brats"
    _sample(syn / "BraTS-GLI-00005-001_sample0.nii.gz", 0)
    _sample(syn / "BraTS-GLI-00007-000-seg_sample0.nii.gz", 1)  # old name: the label file's stem
    result = export_nnunet(tmp_path / "out", 4, "Brats", real=root, synthetic=syn, progress=False)
    assert result.count("real") == 4 and result.count("synthetic") == 2
    dataset = result.path
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir() if p.name.startswith("BraTS-GLI-00005-000")) == [
        f"BraTS-GLI-00005-000_{c:04d}.nii.gz" for c in range(4)]
    assert (dataset / "labelsTr" / "syn_BraTS-GLI-00007-000_0.nii.gz").is_file()
    assert result.label_mapping == {0: 0, 1: 1, 2: 2, 3: 3}
    assert any("3 folds instead of 5" in n for n in result.notes)  # 3 subjects
    assert result.folds["BraTS-GLI-00005-000"] == result.folds["BraTS-GLI-00005-001"] == \
        result.folds["syn_BraTS-GLI-00005-001_0"]


def test_export_leaves_out_samples_of_test_label_maps(tmp_path):
    generic = tmp_path / "generic"
    for i, (images, labels, case) in enumerate([("images", "labels", "a"), ("images", "labels", "b"),
                                                ("imagesTs", "labelsTs", "t")]):
        _save(generic / images / f"{case}.nii.gz", _image(i, 0))
        _save(generic / labels / f"{case}.nii.gz", _label(i))
    syn = tmp_path / "syn"
    _sample(syn / "a_sample0.nii.gz", 0, channels=1)
    _sample(syn / "t_sample0.nii.gz", 1, channels=1)
    result = export_nnunet(tmp_path / "out", 5, "G", real=generic, synthetic=syn, folds=0, progress=False)
    assert [c.case_id for c in result.cases] == ["a", "b", "syn_a_0"]
    assert result.left_out == ["t_sample0.nii.gz (made from the label map of test case t)"]
    assert not (result.path / "splits_final.json").exists() and result.folds == {}


def test_prepare_subject_regex_option(tmp_path, capsys):
    data = tmp_path / "generic"
    ids = [f"sub-{s:02d}_ses-{t}" for s in range(1, 5) for t in (1, 2)]
    for i, case in enumerate(ids):
        _save(data / "images" / f"{case}.nii.gz", _image(i, 0))
        _save(data / "labels" / f"{case}.nii.gz", _label(i))
    out = tmp_path / "prepared"
    assert main(["prepare", str(data), "--out", str(out), "--set", "shape=[8,8,8]", "--set", "spacing=null",
                 "--set", "label_mapping={0: 0, 1: 1, 2: 2, 4: 3}", "--set", "split.counts=[2,1,1]",
                 "--subject-regex", "^(sub-[0-9]+)_", "--no-progress"]) == 0
    cases = json.loads((out / "manifest.json").read_text())["cases"]
    assert {c["case_id"]: c["subject_id"] for c in cases} == {c: c[:6] for c in ids}
    for subject in {c["subject_id"] for c in cases}:
        assert len({c["split"] for c in cases if c["subject_id"] == subject}) == 1
    assert sorted(c["split"] for c in cases).count("train") == 4  # 2 subjects x 2 sessions
    assert main(["prepare", str(data), "--out", str(tmp_path / "p2"), "--subject-regex", "^(sub-9)",
                 "--no-progress"]) == 2
    assert "does not match" in capsys.readouterr().err
    # export reads the subjects from the regex (dataset root) or from the manifest (prepared dataset).
    for i, (real, options) in enumerate([(data, ["--subject-regex", "^(sub-[0-9]+)_"]), (out, [])]):
        target = tmp_path / f"raw{i}"
        assert main(["export", "nnunet", "--real", str(real), *options, "--mix", "real", "--out", str(target),
                     "--dataset-id", "1", "--name", "Sessions", "--folds", "2"]) == 0
        dataset = target / "Dataset001_Sessions"
        info = json.loads((dataset / "medlsdm_export.json").read_text())["cases"]
        train_ids = sorted(c["case_id"] for c in cases if c["split"] != "test") if real == out else ids
        assert sorted(info) == train_ids
        for fold in json.loads((dataset / "splits_final.json").read_text()):
            val = {c[:6] for c in fold["val"]}
            assert val and not val & {c[:6] for c in fold["train"]}  # sessions of a subject share a fold


def test_evaluate_segmentation_splits_one_dataset_into_train_and_test(tmp_path, monkeypatch):
    """The command hands the same dataset on as its test split and the rest, with the dataset options."""
    import medlsdm.evaluation.segmentation as segmentation

    seen = {}

    def fake(train_real, test_real, synthetic, out, **kwargs):
        seen.update(train=train_real, test=test_real)
        return {"domain_gap": None, "protocols": {}}

    monkeypatch.setattr(segmentation, "evaluate_segmentation", fake)
    monkeypatch.setattr("medlsdm.commands.evaluate._finish", lambda out: None)
    data = tmp_path / "data"
    assert main(["evaluate", "segmentation", "--train-real", str(data), "--test-real", str(data) + "/",
                 "--synthetic", str(tmp_path / "syn"), "--out", str(tmp_path / "out"), "--preset", "brats"]) == 0
    assert seen["train"].splits == ("train", "val") and seen["test"].splits == ("test",)
    assert seen["train"].preset == seen["test"].preset == "brats"
    assert main(["evaluate", "segmentation", "--train-real", str(data), "--test-real", str(tmp_path / "other"),
                 "--synthetic", str(tmp_path / "syn"), "--out", str(tmp_path / "out")]) == 0
    assert seen["train"].splits is None and seen["test"].splits is None
