"""Label maps at sampling time, as users' files come: another voxel size (1 mm, 0.7 x 0.7 x 5 mm),
oblique axes, a foreground larger than the training window, another label scheme, BraTS raw
values whose "brain" class comes from the case's images. The model here is a stand-in (no
weights are needed to prepare a map): trained at 3 mm on 16^3 windows with 4 classes."""

import nibabel as nib
import numpy as np
import pytest
import torch

from medlsdm.data.labels import LabelTable
from medlsdm.data.preprocess import MODEL_FROM_VOXEL, prepared_affine
from medlsdm.data.statistics import class_statistics, label_statistics, scheme_warnings, training_geometry
from medlsdm.errors import ConfigError, DataError, MedlsdmError
from medlsdm.inference.labelmaps import label_sources, parse_label_map, prepare_label_map
from medlsdm.inference.model import SynthesisModel
from medlsdm.inference.synthesis import TiledDenoiser

TABLE = {"0": "background", "1": "csf", "2": "grey matter", "3": "white matter"}


class _Denoiser(torch.nn.Module):
    conditioning = "semantic"
    multiple = (1, 2, 2)


def _brain(shape, spacing, radius_mm=(24.0, 27.0, 21.0), affine=None):
    """Three nested ellipsoids (1 outer rim, 2 middle, 3 core) on a grid of `shape` at `spacing`,
    centred; returns (label, affine)."""
    if affine is None:
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = -np.asarray(spacing) * (np.asarray(shape) - 1) / 2
    idx = np.indices(shape).reshape(3, -1).T
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    r = np.sqrt(((world / np.asarray(radius_mm)) ** 2).sum(axis=1)).reshape(shape)
    label = np.zeros(shape, np.uint8)
    label[r < 1.0] = 1
    label[r < 0.85] = 2
    label[r < 0.55] = 3
    return label, affine


def _stats():
    label, _ = _brain((16, 20, 16), (3.0, 3.0, 3.0))
    return class_statistics([label, label], [(3.0, 3.0, 3.0)] * 2, 4)


# A prepared case's affine maps model-layout (d, h, w) to world: axis-aligned RAS data has these
# direction cosines (D = S, H = A, W = R).
PREPARED_3MM = np.diag([3.0, 3.0, 3.0, 1.0]) @ MODEL_FROM_VOXEL


def _model(**sidecar):
    card = {"kind": "diffusion", "space": "pixel", "label_table": TABLE, "channels": ["t1"],
            "prepare_spec": {"spacing": None, "shape": [16, 16, 16], "shape_mode": "crop_pad"},
            "training_geometry": training_geometry([PREPARED_3MM], [(16, 16, 16)]),
            "class_statistics": _stats(), **sidecar}
    return SynthesisModel(denoiser=_Denoiser(), schedule=None, sidecar=card, table=LabelTable.from_mapping(TABLE))


def _save(path, label, affine):
    nib.save(nib.Nifti1Image(label, affine), str(path))
    return path


def _world_centroid(label, affine):
    idx = np.argwhere(label > 0)
    return (idx @ affine[:3, :3].T + affine[:3, 3]).mean(axis=0)


def test_a_1mm_map_is_resampled_to_the_training_voxel_size_and_keeps_all_its_foreground(tmp_path):
    label, affine = _brain((56, 62, 50), (1.0, 1.0, 1.0))
    job = prepare_label_map(_model(), _save(tmp_path / "case.nii.gz", label, affine))
    spacing = np.linalg.norm(prepared_affine(job.record)[:3, :3], axis=0)
    assert spacing == pytest.approx([3.0, 3.0, 3.0])
    assert job.label.shape == (16, 18, 16)      # H (A-P): a 54 mm brain is 18 voxels > 16: grown (to a multiple of 2)
    assert np.allclose(prepared_affine(job.record)[:3, :3], PREPARED_3MM[:3, :3])   # D = S, H = A, W = R
    assert not job.record["foreground_clipped"]
    # the whole foreground is there: its volume in mm^3 within 10 % of the 1 mm map's
    assert (job.label > 0).sum() * 27 == pytest.approx((label > 0).sum(), rel=0.1)
    assert np.allclose(_world_centroid(job.label, prepared_affine(job.record)), _world_centroid(label, affine), atol=1.5)
    assert any("resampled from 1 x 1 x 1 mm" in n for n in job.notes)
    assert any("larger than the training window" in n for n in job.notes)
    assert job.warnings == []                   # same scheme, same anatomy as the training maps


def test_crop_keeps_the_training_window_and_says_what_it_cut(tmp_path):
    label, affine = _brain((56, 62, 50), (1.0, 1.0, 1.0))
    job = prepare_label_map(_model(), _save(tmp_path / "case.nii.gz", label, affine), crop=True)
    assert job.label.shape == (16, 16, 16) and job.record["foreground_clipped"]
    assert any("--crop" in w and "cut" in w for w in job.warnings)


def test_anisotropic_and_oblique_maps_land_on_the_training_axes(tmp_path):
    aniso, a_aff = _brain((70, 80, 10), (0.7, 0.7, 5.0))
    job = prepare_label_map(_model(), _save(tmp_path / "aniso.nii.gz", aniso, a_aff))
    assert np.linalg.norm(prepared_affine(job.record)[:3, :3], axis=0) == pytest.approx([3.0, 3.0, 3.0])
    # oblique: 25 degrees about the z axis, 1.5 mm
    c, s = np.cos(np.radians(25)), np.sin(np.radians(25))
    oblique = np.eye(4)
    oblique[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([1.5, 1.5, 1.5])
    oblique[:3, 3] = oblique[:3, :3] @ -(np.array([40, 40, 34]) - 1) / 2
    label, _ = _brain((40, 40, 34), None, affine=oblique)
    job = prepare_label_map(_model(), _save(tmp_path / "oblique.nii.gz", label, oblique))
    out = prepared_affine(job.record)
    directions = out[:3, :3] / np.linalg.norm(out[:3, :3], axis=0)
    assert np.allclose(directions, np.asarray(_model().card.directions), atol=1e-6)   # axis-aligned like training
    assert np.allclose(_world_centroid(job.label, out), _world_centroid(label, oblique), atol=1.5)
    assert not job.record["foreground_clipped"]


def test_maps_of_another_scheme_are_flagged_and_can_be_mapped(tmp_path):
    model = _model()
    brain, affine = _brain((48, 54, 42), (1.0, 1.0, 1.0))
    mask = _save(tmp_path / "mask.nii.gz", (brain > 0).astype(np.uint8), affine)   # a binary brain mask
    job = prepare_label_map(model, mask)
    assert any("class 2 (grey matter) is missing" in w for w in job.warnings)
    assert any("--label-map" in w for w in job.warnings)
    # a chest CT scheme (0 air, 1 body, 2 lesion) with the model's class range: body far too large
    chest = np.zeros((60, 60, 40), np.uint8)
    chest[5:55, 8:52, :] = 1
    chest[30:34, 30:34, 18:22] = 2
    job = prepare_label_map(model, _save(tmp_path / "chest.nii.gz", chest, np.diag([3.0, 3.0, 3.0, 1.0])), crop=True)
    assert any("class 2 (grey matter) is 1.6% of the labelled volume" in w for w in job.warnings)
    assert any("class 3 (white matter) is missing" in w for w in job.warnings)
    # values the model does not know: refused, naming the file and the way out
    odd = (brain.astype(np.uint8) * 2 + 3 * (brain == 3)).astype(np.uint8)   # 0, 2, 4, 9
    with pytest.raises(DataError, match=r"odd.nii.gz: label values \[4, 9\].*--label-map"):
        prepare_label_map(model, _save(tmp_path / "odd.nii.gz", odd, affine))
    job = prepare_label_map(model, tmp_path / "odd.nii.gz", value_map=parse_label_map("2=1,4=2,9=3"))
    assert set(np.unique(job.label).tolist()) == {0, 1, 2, 3} and job.warnings == []


def test_label_map_option_parsing(tmp_path):
    assert parse_label_map("4=3, 2=1") == {4: 3, 2: 1}
    (tmp_path / "m.yaml").write_text("4: 3\n1: 1\n", encoding="utf-8")
    assert parse_label_map(str(tmp_path / "m.yaml")) == {4: 3, 1: 1}
    for bad in ("4:3", "a=1", "-1=2"):
        with pytest.raises(ConfigError, match="--label-map"):
            parse_label_map(bad)


def _brats_case(folder, case, seg_values=(0, 1, 2, 4)):
    """A BraTS 2021 case folder: four 1 mm modalities (brain = non-zero) and a tumour seg."""
    folder.mkdir(parents=True)
    brain, affine = _brain((40, 46, 36), (1.0, 1.0, 1.0), radius_mm=(18.0, 20.0, 16.0))
    for k, modality in enumerate(("t1", "t1ce", "t2", "flair")):
        _save(folder / f"{case}_{modality}.nii.gz", ((brain > 0) * (100.0 + k)).astype(np.float32), affine)
    seg = np.zeros(brain.shape, np.uint8)
    seg[14:26, 16:30, 12:24] = seg_values[1]
    seg[16:24, 18:28, 14:22] = seg_values[2]
    seg[18:22, 20:26, 16:20] = seg_values[3]
    return _save(folder / f"{case}_seg.nii.gz", seg, affine), brain


BRATS_TABLE = {"0": "background", "1": "necrotic", "2": "edema", "3": "enhancing", "4": "brain"}


def _brats_model():
    scheme = {"source_table": {"0": "background", "1": "necrotic", "2": "edema", "4": "enhancing", "5": "brain"},
              "mapping": {"0": 0, "1": 1, "2": 2, "3": 3, "4": 3, "5": 4}, "brain_label": 5}
    card = {"kind": "diffusion", "space": "pixel", "label_table": BRATS_TABLE, "channels": ["t1", "t1ce", "t2", "flair"],
            "prepare_spec": {"spacing": [2.0, 2.0, 2.0], "shape": [16, 16, 16], "shape_mode": "crop_pad",
                             "label_mapping": scheme["mapping"]},
            "label_scheme": scheme}
    return SynthesisModel(denoiser=_Denoiser(), schedule=None, sidecar=card, table=LabelTable.from_mapping(BRATS_TABLE))


def test_brats_seg_gets_the_brain_class_from_its_case_images_as_at_preparation(tmp_path):
    model = _brats_model()
    seg, brain = _brats_case(tmp_path / "BraTS2021_00007", "BraTS2021_00007")
    job = prepare_label_map(model, seg)
    values, counts = np.unique(job.label, return_counts=True)
    assert values.tolist() == [0, 1, 2, 3, 4]           # 4 -> 3 (enhancing), brain added as 4
    assert counts[4] * 8 == pytest.approx((brain > 0).sum() - (np.asarray(nib.load(str(seg)).dataobj) > 0).sum(),
                                          rel=0.15)
    assert any("brain" in n and "from the images" in n for n in job.notes)
    # a dataset root: case IDs from the layout, images found by it
    (tmp_path / "root").mkdir()
    _brats_case(tmp_path / "root" / "BraTS2021_00008", "BraTS2021_00008")
    sources = label_sources(tmp_path / "root")
    assert [(c, p.name) for c, p in sources] == [("BraTS2021_00008", "BraTS2021_00008_seg.nii.gz")]
    assert set(np.unique(prepare_label_map(model, sources[0][1], case_id=sources[0][0]).label)) == {0, 1, 2, 3, 4}
    # a seg file alone, with no images beside it: the brain cannot be made, said in one line
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "x_seg.nii.gz").write_bytes(seg.read_bytes())
    with pytest.raises(DataError, match="'brain' class.*made from the case's images"):
        prepare_label_map(model, lone / "x_seg.nii.gz")


def test_a_run_without_a_recorded_voxel_size_says_how_to_fix_it(tmp_path):
    model = _model(training_geometry=None)
    label, affine = _brain((20, 20, 20), (3.0, 3.0, 3.0))
    with pytest.raises(MedlsdmError, match="does not record the voxel size"):
        prepare_label_map(model, _save(tmp_path / "a.nii.gz", label, affine))


def test_class_statistics_and_warnings_are_computed_in_mm():
    label = np.zeros((10, 10, 10), np.uint8)
    label[2:6, 2:4, 2:3] = 1   # 4 x 2 x 1 voxels
    label[6:8, 2:4, 2:4] = 2
    stats = label_statistics(label, (2.0, 1.0, 3.0), 3)
    assert stats[1]["extent_mm"] == [8.0, 2.0, 3.0] and stats[1]["fraction"] == pytest.approx(8 / 16)
    summary = class_statistics([label, label], [(2.0, 1.0, 3.0)] * 2, 3)
    assert summary["classes"]["1"]["present"] == 1.0
    assert scheme_warnings(label, (2.0, 1.0, 3.0), summary, {1: "a", 2: "b"}) == []
    assert scheme_warnings(label, (20.0, 1.0, 3.0), summary, {1: "a", 2: "b"})   # 10x the extent


class _Conv(torch.nn.Module):
    conditioning = "semantic"

    def __init__(self, kernel):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 1, kernel, padding=kernel // 2)
        torch.nn.init.normal_(self.conv.weight)

    def forward(self, x, t, cond):
        return self.conv(torch.cat([x, cond[:, :2, ::2, ::2, ::2]], 1))


def test_one_voxel_tiles_and_volumes_smaller_than_a_tile():
    x, cond, t = torch.randn(2, 1, 5, 3, 2), torch.rand(2, 2, 10, 6, 4), torch.zeros(2)
    pointwise = _Conv(1)
    tiled = TiledDenoiser(pointwise, (1, 8, 8), (2, 2, 2))
    assert len(tiled.windows(x.shape[2:])) == 5
    assert torch.allclose(tiled(x, t, cond), pointwise(x, t, cond), atol=1e-5)


def test_tiled_denoiser_blends_without_seams():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 12, 20, 28)
    cond = torch.rand(1, 2, 24, 40, 56)
    t = torch.zeros(1)
    pointwise = _Conv(1)
    tiled = TiledDenoiser(pointwise, (8, 8, 8), (2, 2, 2))
    assert len(tiled.windows(x.shape[2:])) > 4
    # blending weights sum to one: a pointwise network gives the untiled result exactly
    assert torch.allclose(tiled(x, t, cond), pointwise(x, t, cond), atol=1e-5)
    # a 3x3x3 network differs from the untiled one only within a voxel of tile borders, and there
    # by a blend of two valid predictions, not a jump
    conv = _Conv(3)
    full, out = conv(x, t, cond), TiledDenoiser(conv, (8, 8, 8), (2, 2, 2))(x, t, cond)
    border = torch.zeros(x.shape[2:], dtype=torch.bool)   # within a voxel of a tile's inner edge
    for window in tiled.windows(x.shape[2:]):
        for axis, w in enumerate(window):
            for edge, inside in ((w.start, w.start > 0), (w.stop - 1, w.stop < x.shape[2 + axis])):
                if inside:
                    index = [slice(None)] * 3
                    index[axis] = slice(max(edge - 1, 0), edge + 2)
                    sub = [window[a] if a != axis else index[axis] for a in range(3)]
                    border[tuple(sub)] = True
    d = (out - full).abs()[0, 0]
    assert d[~border].max() < 1e-5 and d[border].max() > 1e-3
    # and there a blend of valid predictions, no jump: neighbour differences like the untiled ones
    for axis in (2, 3, 4):
        assert out.diff(dim=axis).abs().max() <= full.diff(dim=axis).abs().max() * 1.25


def test_maps_land_on_oblique_training_axes(tmp_path):
    """Training cases that shared an oblique orientation: an axis-aligned map is resampled onto
    those axes (a non-symmetric rotation, so a transposed direction matrix would show)."""
    rotation = np.array([[np.cos(0.4), -np.sin(0.4), 0], [np.sin(0.4), np.cos(0.4), 0], [0, 0, 1]])
    rotation = rotation @ np.array([[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]])
    trained = np.eye(4)
    trained[:3, :3] = rotation @ PREPARED_3MM[:3, :3]
    model = _model(training_geometry=training_geometry([trained], [(16, 16, 16)]))
    label, affine = _brain((40, 44, 36), (1.0, 1.0, 1.0))
    job = prepare_label_map(model, _save(tmp_path / "a.nii.gz", label, affine))
    out = prepared_affine(job.record)
    assert np.allclose(out[:3, :3], trained[:3, :3], atol=1e-6)
    assert np.allclose(_world_centroid(job.label, out), _world_centroid(label, affine), atol=1.5)


def _brats_model_with_stats(tmp_path):
    """The BraTS stand-in with the class statistics of its prepared training maps (made from a
    case like the test's: tumour classes inside a large brain class)."""
    model = _brats_model()
    seg, _ = _brats_case(tmp_path / "train" / "BraTS2021_00001", "BraTS2021_00001")
    job = prepare_label_map(model, seg)
    spacing = np.linalg.norm(prepared_affine(job.record)[:3, :3], axis=0)
    model.sidecar["class_statistics"] = class_statistics([job.label], [spacing], 5)
    return model, job.label, job.record


def test_values_that_read_both_ways_are_read_the_way_closer_to_the_training_maps(tmp_path):
    model, prepared, record = _brats_model_with_stats(tmp_path)
    # a raw BraTS seg (0, 1, 2, 4) beside its images: the dataset's own values, brain added
    seg, _ = _brats_case(tmp_path / "BraTS2021_00002", "BraTS2021_00002")
    job = prepare_label_map(model, seg)
    assert set(np.unique(job.label).tolist()) == {0, 1, 2, 3, 4}
    assert any("read as the training dataset's own values" in n for n in job.notes)
    # the same case as a map in the model's classes (0..4, 4 = brain), alone in a folder: model classes
    mine = tmp_path / "mine"
    mine.mkdir()
    path = _save(mine / "prepared_map.nii.gz", prepared.astype(np.uint8), prepared_affine(record))
    job = prepare_label_map(model, path)
    assert np.array_equal(np.unique(job.label), [0, 1, 2, 3, 4])
    assert (job.label == 4).sum() > (job.label == 3).sum() * 5          # the brain stayed the brain
    assert any("could not be prepared" in w for w in job.warnings)
    # without training statistics the two readings cannot be told apart: the dataset's own values
    # where they can be prepared (with a warning that says how to choose), else an error saying it
    with pytest.raises(DataError, match="--label-map 1=1,2=2,3=3,4=4 says they are model classes"):
        prepare_label_map(_brats_model(), path)
    job = prepare_label_map(_brats_model(), seg)
    assert any("could also be" in w and "--label-map 1=1,2=2,4=4" in w for w in job.warnings)
    assert set(np.unique(job.label).tolist()) == {0, 1, 2, 3, 4}
    job = prepare_label_map(_brats_model(), path, value_map=parse_label_map("4=4"))
    assert (job.label == 4).sum() > (job.label == 3).sum() * 5


def test_brain_label_without_a_mapping_and_in_older_sidecars(tmp_path):
    seg, _ = _brats_case(tmp_path / "BraTS2021_00003", "BraTS2021_00003", seg_values=(0, 1, 2, 3))
    # BraTS 2023 values (0..3) prepared with a brain label and no mapping: the brain is class 4
    table = {"0": "background", "1": "a", "2": "b", "3": "c", "4": "brain"}
    model = _brats_model()
    model.sidecar["label_scheme"] = {"source_table": table, "mapping": None, "brain_label": 4}
    model.sidecar["prepare_spec"]["label_mapping"] = None
    assert set(np.unique(prepare_label_map(model, seg).label).tolist()) == {0, 1, 2, 3, 4}
    # a run from before the label scheme was recorded: the brain is the raw value mapped to "brain"
    old = _brats_model()
    del old.sidecar["label_scheme"]
    assert old.card.scheme.brain_label == 5
    seg21, _ = _brats_case(tmp_path / "BraTS2021_00004", "BraTS2021_00004")
    assert set(np.unique(prepare_label_map(old, seg21).label).tolist()) == {0, 1, 2, 3, 4}


def test_a_stray_label_far_from_the_rest_grows_the_window_with_a_warning(tmp_path):
    label, affine = _brain((90, 90, 90), (1.0, 1.0, 1.0))
    label[2:6, 2:6, 2:6] = 1   # a few voxels in a far corner
    job = prepare_label_map(_model(), _save(tmp_path / "stray.nii.gz", label, affine))
    assert any("training window's voxels" in w and "--crop" in w for w in job.warnings)
