"""Geometry (reorientation, grids, resampling) and invertible preprocessing on tiny volumes."""

import json

import numpy as np
import pytest

from medlsdm.data.geometry import from_canonical, resample_to_grid, resampled_grid, resized_grid, to_canonical
from medlsdm.data.io import Volume
from medlsdm.data.labels import LabelTable
from medlsdm.data.preprocess import (
    intensity_summary,
    invert_image,
    invert_label,
    prepared_affine,
    preprocess_case,
    preprocess_label_map,
)
from medlsdm.errors import ConfigError, DataError

SHAPE = (12, 14, 10)


def rotation_z(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    r = np.eye(4)
    r[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return r


def axis_affine(codes: str, spacing=(1.0, 1.0, 1.0), origin=(3.0, -7.0, 11.0)) -> np.ndarray:
    """Affine whose voxel axes point along `codes` (e.g. "LPS", "PIR") with `spacing`."""
    directions = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    affine = np.eye(4)
    affine[:3, :3] = 0
    for axis, code in enumerate(codes):
        world, sign = directions[code]
        affine[world, axis] = sign * spacing[axis]
    affine[:3, 3] = origin
    return affine


AFFINES = {
    "ras": axis_affine("RAS"),
    "lps_aniso": axis_affine("LPS", (0.8, 1.2, 2.5)),
    "pir_aniso": axis_affine("PIR", (1.5, 0.9, 1.1)),
    "oblique_asl": rotation_z(20) @ axis_affine("ASL", (1.0, 2.0, 1.3)),
}


def world(affine, index) -> np.ndarray:
    return (np.asarray(affine) @ np.r_[np.asarray(index, dtype=float), 1.0])[:3]


def smooth_image(shape, affine) -> np.ndarray:
    """A smooth function of world position (so every grid samples the same field)."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    xyz = idx @ affine[:3, :3].T + affine[:3, 3]
    return (100.0 + 40.0 * np.sin(xyz[..., 0] / 9.0) + 30.0 * np.cos(xyz[..., 1] / 11.0) + 0.8 * xyz[..., 2]).astype(np.float32)


def blob_label(shape, centre=(6, 7, 5), radius=(3, 3, 2)) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    d = (((idx - np.asarray(centre)) / np.asarray(radius)) ** 2).sum(-1)
    label = np.zeros(shape, np.uint8)
    label[d <= 1.0] = 1
    label[d <= 0.3] = 2
    return label


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_canonical_round_trip_is_exact_and_keeps_world_positions(name):
    affine = AFFINES[name]
    array = np.random.default_rng(0).random((2,) + SHAPE)
    canonical, canonical_affine, ornt = to_canonical(array, affine)
    # Closest-RAS: each canonical axis points mostly along +R, +A, +S respectively.
    assert np.all(np.argmax(np.abs(canonical_affine[:3, :3]), axis=0) == [0, 1, 2])
    assert np.all(np.diag(canonical_affine[:3, :3]) > 0)
    value = array[1, 2, 9, 7]
    position = np.argwhere(canonical[1] == value)[0]
    np.testing.assert_allclose(world(canonical_affine, position), world(affine, (2, 9, 7)), atol=1e-9)
    back, back_affine = from_canonical(canonical, canonical_affine, np.asarray(ornt).tolist())
    assert np.array_equal(back, array)
    np.testing.assert_allclose(back_affine, affine, atol=1e-12)


def test_resampled_grid_keeps_directions_and_extent():
    affine = AFFINES["oblique_asl"]
    new_affine, new_shape = resampled_grid(affine, SHAPE, [2.0, None, 0.65])
    assert new_shape == (6, 14, 20)
    np.testing.assert_allclose(np.linalg.norm(new_affine[:3, :3], axis=0), [2.0, 2.0, 0.65])
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    np.testing.assert_allclose(new_affine[:3, :3] / [2.0, 2.0, 0.65], directions, atol=1e-12)
    # Corner-aligned: the outer corner of voxel 0 and (here, exact ratios) the far corner agree.
    np.testing.assert_allclose(world(new_affine, [-0.5] * 3), world(affine, [-0.5] * 3), atol=1e-9)
    np.testing.assert_allclose(world(new_affine, np.array(new_shape) - 0.5), world(affine, np.array(SHAPE) - 0.5), atol=1e-9)
    exact = resized_grid(affine, SHAPE, (5, 7, 4))
    np.testing.assert_allclose(world(exact, [4.5, 6.5, 3.5]), world(affine, np.array(SHAPE) - 0.5), atol=1e-9)


def test_resample_to_grid_matches_a_smooth_field_and_fills_outside():
    src = AFFINES["lps_aniso"]
    image = smooth_image(SHAPE, src)
    dst, dst_shape = resampled_grid(src, SHAPE, 1.0)
    for order in (1, 3):
        out = resample_to_grid(np.stack([image, -image]), src, dst, dst_shape, order=order)
        truth = smooth_image(dst_shape, dst)
        interior = (slice(None), slice(2, -2), slice(2, -2), slice(3, -3))
        assert np.abs(out[0][interior[1:]] - truth[interior[1:]]).max() < 2.0  # range ~ 150
        np.testing.assert_allclose(out[1], -out[0], atol=1e-4)
    # A grid shifted half-way out of the source: the part outside gets cval.
    shifted = dst.copy()
    shifted[:3, 3] = world(dst, np.array(dst_shape) / 2.0)
    out = resample_to_grid(image, src, shifted, dst_shape, order=1, cval=-5.0)
    assert out[-1, -1, -1] == -5.0 and out[0, 0, 0] != -5.0
    labels = blob_label(SHAPE)
    nearest = resample_to_grid(labels, src, dst, dst_shape, order=0)
    assert nearest.dtype == labels.dtype and set(np.unique(nearest)) == {0, 1, 2}


# ---------------------------------------------------------------------- preprocessing


def make_case(affine, channels=1):
    image = smooth_image(SHAPE, affine)
    array = np.stack([image * (c + 1) for c in range(channels)]) if channels > 1 else image
    label = blob_label(SHAPE)
    return (Volume(array, affine, path="img.nii.gz"), Volume(label, affine, path="case_007_seg.nii.gz"))


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_crop_pad_only_is_exactly_invertible(name):
    affine = AFFINES[name]
    image, label = make_case(affine, channels=2)
    spec = {"shape": [8, 16, 8], "mr_percentiles": [0.0, 100.0]}
    prepared, prepared_label, record = preprocess_case(image, label, spec)
    assert prepared.shape == (2, 8, 16, 8) and prepared.dtype == np.float32
    assert prepared_label.shape == (8, 16, 8) and prepared_label.dtype == np.uint8
    assert prepared.min() >= -1.0 and prepared.max() <= 1.0
    json.dumps(record)  # stored in the manifest
    back = invert_label(prepared_label, record)
    np.testing.assert_allclose(back.affine, affine, atol=1e-9)
    assert back.array.shape == SHAPE
    assert np.array_equal(back.array, label.array)  # whole foreground kept by the crop
    back_image = invert_image(prepared, record)
    assert back_image.array.shape == (2,) + SHAPE
    np.testing.assert_allclose(back_image.affine, affine, atol=1e-9)
    # Percentiles 0..100: no clipping, so voxels inside the crop come back (float32 round-off).
    inside = invert_label(np.ones_like(prepared_label), record).array.astype(bool)
    np.testing.assert_allclose(back_image.array[:, inside], image.array[:, inside], rtol=1e-5, atol=1e-3)
    # Outside the crop: each channel's original minimum.
    assert (~inside).any()
    for c in range(2):
        assert record["normalisation"]["channels"][c]["min"] == pytest.approx(float(image.array[c].min()))
        assert np.allclose(back_image.array[c][~inside], image.array[c].min())


@pytest.mark.parametrize("name", ["lps_aniso", "oblique_asl", "pir_aniso"])
def test_bright_voxel_keeps_its_world_position(name):
    affine = AFFINES[name]
    array = np.zeros(SHAPE, np.float32)
    array[4, 9, 3] = 1000.0
    label = Volume(blob_label(SHAPE), affine, path="lab.nii.gz")
    target = world(affine, (4, 9, 3))
    prepared, _, record = preprocess_case(Volume(array, affine), label, {"shape": [10, 10, 10], "modality": "ct",
                                                                         "ct_window": [0.0, 1000.0]})
    peak = np.unravel_index(np.argmax(prepared[0]), prepared.shape[1:])
    np.testing.assert_allclose(world(prepared_affine(record), peak), target, atol=1e-9)
    # With resampling to 0.5 mm the intensity centroid stays within a small fraction of a voxel.
    prepared, _, record = preprocess_case(Volume(array, affine), label, {"spacing": 0.5, "modality": "ct",
                                                                         "ct_window": [0.0, 1000.0]})
    weights = prepared[0] + 1.0
    idx = np.argwhere(weights > 0)
    centroid = (idx * weights[weights > 0][:, None]).sum(0) / weights.sum()
    np.testing.assert_allclose(world(prepared_affine(record), centroid), target, atol=0.3)


@pytest.mark.parametrize("name", ["oblique_asl", "pir_aniso"])
def test_resampling_round_trip_is_close_for_images_and_affine_is_restored(name):
    affine = AFFINES[name]
    image, label = make_case(affine)
    spec = {"spacing": [1.2, 0.9, 0.8], "mr_percentiles": [0.0, 100.0]}
    prepared, prepared_label, record = preprocess_case(image, label, spec)
    assert record["resampled"]
    np.testing.assert_allclose(np.linalg.norm(prepared_affine(record)[:3, :3], axis=0), [1.2, 0.9, 0.8])
    back = invert_image(prepared, record)
    np.testing.assert_allclose(back.affine, affine, atol=1e-9)
    value_range = float(np.ptp(image.array))
    error = np.abs(back.array - image.array)
    interior = (slice(1, -1),) * 3
    assert error[interior].max() < 0.01 * value_range
    # The rim (beyond the prepared grid's edge centres, or lost to rounding its shape) is
    # extended from the edge: larger error, but no voxel falls back to the fill value.
    assert error.max() < 0.05 * value_range
    back_label = invert_label(prepared_label, record)
    assert back_label.array.shape == SHAPE
    assert (back_label.array == label.array).mean() > 0.9


def test_mr_percentile_and_ct_window_normalisation():
    affine = AFFINES["ras"]
    image, label = make_case(affine)
    image.array[:3] = 0.0  # MR background (air) at the minimum: left out of the percentiles
    body = image.array[image.array > 0]
    prepared, _, record = preprocess_case(image, label, {"mr_percentiles": [5.0, 95.0]})
    lo, hi = record["normalisation"]["channels"][0]["lo"], record["normalisation"]["channels"][0]["hi"]
    np.testing.assert_allclose([lo, hi], np.percentile(body, [5.0, 95.0]), rtol=1e-5)
    assert prepared.min() == -1.0 and prepared.max() == 1.0
    assert np.isclose((prepared[0] >= 1.0 - 1e-6).sum() / body.size, 0.05, atol=0.01)
    back = invert_image(prepared, record).array
    within = (image.array > lo) & (image.array < hi)
    np.testing.assert_allclose(back[within], image.array[within], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(back[~within], np.clip(image.array, lo, hi)[~within], rtol=1e-5, atol=1e-3)

    # CT: -1500 .. 1000 HU, so the window [-1000, 500] clips on both sides.
    ct_image = Volume(np.linspace(-1500.0, 1000.0, np.prod(SHAPE)).reshape(SHAPE).astype(np.float32), affine)
    prepared, _, record = preprocess_case(ct_image, label, {"modality": "ct", "ct_window": [-1000.0, 500.0]})
    expected = 2.0 * (np.clip(ct_image.array, -1000.0, 500.0) + 1000.0) / 1500.0 - 1.0
    # RAS input, no crop: the prepared array is the (Z, Y, X) transpose.
    np.testing.assert_allclose(prepared[0], expected.transpose(2, 1, 0), atol=1e-5)
    assert record["normalisation"] == {"modality": "ct", "channels": [{"lo": -1000.0, "hi": 500.0, "min": -1500.0}]}
    back = invert_image(prepared, record).array
    np.testing.assert_allclose(back, np.clip(ct_image.array, -1000.0, 500.0), atol=1e-3)
    other = {"modality": "ct", "channels": [{"lo": -900.0, "hi": 700.0, "min": -1100.0}]}
    summary = intensity_summary([record, {"normalisation": other}, record])
    assert summary == record["normalisation"]  # the median per value


def test_resize_mode_shape_and_extent():
    affine = AFFINES["pir_aniso"]
    image, label = make_case(affine)
    prepared, prepared_label, record = preprocess_case(image, label, {"shape": 16, "shape_mode": "resize"})
    assert prepared.shape == (1, 16, 16, 16) and prepared_label.shape == (16, 16, 16)
    canonical = np.asarray(record["canonical_affine"])
    prep = prepared_affine(record)
    np.testing.assert_allclose(world(prep, [-0.5] * 3), world(canonical, [-0.5] * 3), atol=1e-9)
    far = np.array(record["canonical_shape"]) - 0.5
    np.testing.assert_allclose(world(prep, [15.5] * 3), world(canonical, far), atol=1e-9)
    assert invert_image(prepared, record).array.shape == SHAPE
    with pytest.raises(ConfigError, match="resize"):
        preprocess_case(image, label, {"shape": 16, "shape_mode": "resize", "spacing": 1.0})


def test_label_mapping_and_its_inverse_and_table_check():
    affine = AFFINES["lps_aniso"]
    image, label = make_case(affine)
    raw = label.array.copy()
    raw[raw == 2] = 4
    label = Volume(raw, affine, path="raw_labels.nii.gz")
    spec = {"label_mapping": {"0": 0, "1": 1, "4": 2}}
    table = LabelTable({0: "bg", 1: "a", 2: "b"})
    _, prepared_label, record = preprocess_case(image, label, spec, table)
    assert set(np.unique(prepared_label)) == {0, 1, 2}
    assert np.array_equal(invert_label(prepared_label, record).array, raw)
    with pytest.raises(DataError, match="raw_labels.nii.gz"):
        preprocess_case(image, label, {}, table)  # value 4 not in the table
    # Sampling path: raw values are mapped; already-prepared values are left alone.
    only, record = preprocess_label_map(label, spec)
    assert np.array_equal(only, prepared_label) and record["normalisation"] is None
    already = Volume(np.where(raw == 4, 2, raw).astype(np.uint8), affine, path="prepared.nii.gz")
    only, record = preprocess_label_map(already, {"label_mapping": {"0": 0, "1": 1, "4": 2}})
    assert np.array_equal(only, prepared_label) and record["label_mapping"] is None
    assert np.array_equal(invert_label(only, record).array, already.array)
    # An image from a label-map-only record needs typical intensities.
    with pytest.raises(DataError, match="intensity"):
        invert_image(np.zeros((1,) + only.shape, np.float32), record)
    back = invert_image(np.zeros((1,) + only.shape, np.float32), record, {"modality": "mr", "channels": [{"lo": 0.0, "hi": 10.0}]})
    assert np.allclose(back.array, 5.0)


def test_empty_foreground_error_names_the_label_file():
    affine = AFFINES["ras"]
    image, _ = make_case(affine)
    empty = Volume(np.zeros(SHAPE, np.uint8), affine, path="empty_case_seg.nii.gz")
    with pytest.raises(DataError, match="empty_case_seg.nii.gz"):
        preprocess_case(image, empty, {"shape": [8, 8, 8]})
    with pytest.raises(DataError, match="empty_case_seg.nii.gz"):
        preprocess_label_map(empty, {"shape": [8, 8, 8]})
    # Without a target shape there is nothing to centre, so an empty map is fine.
    _, prepared_label, _ = preprocess_case(image, empty, {})
    assert prepared_label.shape == SHAPE[::-1] and not prepared_label.any()


def test_bad_spec_and_mismatched_grids_are_errors():
    image, label = make_case(AFFINES["ras"])
    with pytest.raises(ConfigError, match="unknown"):
        preprocess_case(image, label, {"spcing": 1.0})
    with pytest.raises(ConfigError, match="image_interpolation"):
        preprocess_case(image, label, {"image_interpolation": "cubic"})
    moved = Volume(label.array, AFFINES["lps_aniso"], path="other_seg.nii.gz")
    with pytest.raises(DataError, match="other_seg.nii.gz"):
        preprocess_case(image, moved, {})


def test_records_read_from_files_are_checked_before_inversion():
    """A record missing a key or with a malformed affine is a one-line DataError naming the key."""
    from medlsdm.data.preprocess import check_record, grid_record, invert_image

    record = grid_record((4, 5, 6), (2.0, 1.0, 1.5))
    assert check_record(record, "x") is record
    volume = invert_image(np.zeros((4, 5, 6), np.float32), record, intensity={"channels": [{"lo": 0, "hi": 1}]})
    assert volume.array.shape == (6, 5, 4) and np.allclose(volume.spacing, (1.5, 1.0, 2.0))
    broken = {k: v for k, v in record.items() if k != "crop_start"}
    with pytest.raises(DataError, match="'crop_start'"):
        invert_image(np.zeros((4, 5, 6), np.float32), broken, intensity={"channels": [{"lo": 0, "hi": 1}]})
    with pytest.raises(DataError, match="'affine' must be a 4x4"):
        check_record({**record, "affine": [[1, 0], [0, 1]]}, "x")


def test_label_maps_go_to_coarser_grids_by_partial_volumes():
    """1.5 mm -> 3 mm (an even factor): nearest neighbour would put every new centre on a boundary
    between two old voxels and shift the map; partial volumes keep each class's volume and place."""
    from medlsdm.data.geometry import resample_labels

    label = np.zeros((40, 40, 40), np.uint8)
    label[9:31, 11:29, 13:33] = 2
    label[15:25, 15:25, 16:26] = 1
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    dst, shape = resampled_grid(affine, label.shape, 3.0)
    out = resample_labels(label, affine, dst, shape)

    def centroid(lab, aff, value):
        idx = np.argwhere(lab == value)
        return (idx @ aff[:3, :3].T + aff[:3, 3]).mean(axis=0)

    for value in (1, 2):
        assert (out == value).sum() * 27 == pytest.approx((label == value).sum() * 1.5 ** 3, rel=0.3)
        assert np.allclose(centroid(out, dst, value), centroid(label, affine, value), atol=0.3)
    # a finer grid: nearest neighbour, every value exact
    fine, fine_shape = resampled_grid(affine, label.shape, 0.75)
    up = resample_labels(label, affine, fine, fine_shape)
    assert np.array_equal(up[::2, ::2, ::2], label)
