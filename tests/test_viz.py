"""Three-plane pictures: sizes, orientation, label overlay through the label's centroid, fixed
palette; montages and atomic PNG writing."""

import numpy as np
import pytest
from PIL import Image

from medlsdm.viz import PALETTE, label_picture, montage, save_png, three_plane

D, H, W = 10, 12, 14


def _grey(picture):
    return (picture[..., 0] == picture[..., 1]) & (picture[..., 1] == picture[..., 2])


def test_three_plane_size_and_channels():
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(D, H, W)).astype(np.float32)
    picture = three_plane(volume)
    # axial (H x W) | coronal (D x W) | sagittal (D x H), padded to the tallest
    assert picture.shape == (max(H, D), W + W + H, 3) and picture.dtype == np.uint8
    assert _grey(picture).all()  # no label: grey only
    multi = np.stack([volume, -volume])
    assert np.array_equal(three_plane(multi), picture)  # first channel shown


def test_planes_are_oriented_anterior_and_superior_up():
    volume = np.zeros((D, H, W), dtype=np.float32)
    volume[:, -1, :] = 1.0  # the most anterior row (H = posterior -> anterior)
    volume[-1, :, :] = 1.0  # the most superior slice (D = inferior -> superior)
    picture = three_plane(volume, centre=(D // 2, H // 2, W // 2))
    axial, coronal = picture[:, :W, 0], picture[:, W:2 * W, 0]
    assert axial[0].min() == 255 and axial[1:].max() == 0  # anterior row at the top
    top = (max(H, D) - D) // 2  # coronal plane is padded vertically to the axial height
    assert coronal[top].min() == 255 and coronal[top + 1:top + D].max() == 0  # superior at the top


def test_label_overlay_through_the_label_centroid():
    volume = np.full((D, H, W), 0.5, dtype=np.float32)
    volume[0, 0, 0] = 0.0
    label = np.zeros((D, H, W), dtype=np.uint8)
    label[1:3, 1:3, 10:12] = 2  # a small blob away from the volume centre
    picture = three_plane(volume, label)
    coloured = ~_grey(picture)
    # each of the three planes cuts the blob, so each shows coloured pixels
    for part in (picture[:, :W], picture[:, W:2 * W], picture[:, 2 * W:]):
        assert (~_grey(part)).sum() == 4
    assert coloured.sum() == 12
    # through the volume centre instead, the blob is not cut by any plane
    assert _grey(three_plane(volume, label, centre=(D // 2, H // 2, W // 2))).all()
    # the colour is the palette's colour for value 2, blended over grey
    pixel = picture[coloured][0].astype(float)
    assert np.argmax(pixel) == np.argmax(PALETTE[2])
    with pytest.raises(ValueError, match="differ in shape"):
        three_plane(volume, label[:-1])


def test_label_picture_uses_the_fixed_palette():
    label = np.zeros((D, H, W), dtype=np.uint8)
    label[4:6, 4:6, 4:6] = 1
    label[6:8, 4:6, 4:6] = 3
    picture = label_picture(label)
    colours = {tuple(c) for c in picture.reshape(-1, 3).tolist()}
    assert colours <= {tuple(PALETTE[v]) for v in (0, 1, 3)} and tuple(PALETTE[1]) in colours
    assert picture.shape == (max(H, D), W + W + H, 3)


def test_montage_and_save_png(tmp_path):
    panel = three_plane(np.random.default_rng(1).normal(size=(D, H, W)))
    figure = montage([[panel, panel, panel], [panel, panel, panel]], titles=["real", "label", "synthetic"])
    assert figure.ndim == 3 and figure.shape[2] == 3 and figure.dtype == np.uint8
    assert figure.shape[1] > figure.shape[0]  # three panels side by side, each wider than tall
    path = save_png(tmp_path / "fig.png", figure)
    assert np.array_equal(np.asarray(Image.open(path)), figure)
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]  # no temporary file left behind
