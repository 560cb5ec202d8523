"""Feature extractors load published weight layouts by key; slicing and caching."""

import os

import numpy as np
import pytest
import torch

from medlsdm.errors import DataError, MedlsdmError
from medlsdm.evaluation import features as FX

# Keys of pytorch-fid's pt_inception-2015-12-05 state dict (torchvision Inception3 layout).
EXPECTED_INCEPTION_KEYS = [
    "Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.running_var", "Conv2d_2b_3x3.bn.bias",
    "Conv2d_3b_1x1.conv.weight", "Conv2d_4a_3x3.conv.weight",
    "Mixed_5b.branch1x1.conv.weight", "Mixed_5b.branch5x5_2.conv.weight",
    "Mixed_5b.branch3x3dbl_3.bn.running_mean", "Mixed_5b.branch_pool.conv.weight",
    "Mixed_6a.branch3x3.conv.weight", "Mixed_6a.branch3x3dbl_3.conv.weight",
    "Mixed_6e.branch7x7_3.conv.weight", "Mixed_6e.branch7x7dbl_5.conv.weight",
    "Mixed_7a.branch3x3_2.conv.weight", "Mixed_7a.branch7x7x3_4.conv.weight",
    "Mixed_7b.branch3x3_2a.conv.weight", "Mixed_7c.branch3x3dbl_3b.bn.weight",
    "Mixed_7c.branch_pool.conv.weight",
]
EXPECTED_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_7c.branch1x1.conv.weight": (320, 2048, 1, 1),
}


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A random FID Inception saved the way pytorch-fid's file is: with the 1008-way fc and,
    being written by torch 0.4, without BatchNorm's num_batches_tracked."""
    torch.manual_seed(0)
    state = {k: v for k, v in FX.InceptionV3().state_dict().items() if "num_batches_tracked" not in k}
    state["fc.weight"] = torch.zeros(1008, 2048)
    state["fc.bias"] = torch.zeros(1008)
    path = tmp_path_factory.mktemp("inception") / FX.INCEPTION_WEIGHTS_FILE
    torch.save(state, path)
    return path


def test_inception_state_dict_layout():
    state = FX.InceptionV3().state_dict()
    for key in EXPECTED_INCEPTION_KEYS:
        assert key in state, key
    for key, shape in EXPECTED_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    # 21,785,568 = torchvision inception_v3 (27,161,264) minus AuxLogits and the 1000-way fc.
    assert sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked")
               and "running" not in k) == 21_785_568


def test_inception_loads_by_path_and_extracts(inception_file):
    extractor = FX.InceptionFeatureExtractor(inception_file, batch_size=2)
    images = np.random.default_rng(0).uniform(0, 1, (2, 40, 48)).astype(np.float32)
    feats = extractor(images)
    assert feats.shape == (2, 2048) and np.all(np.isfinite(feats))
    assert not np.allclose(feats[0], feats[1])
    # Grey input equals the same image given as 3 identical channels; torch input accepted.
    again = extractor(torch.from_numpy(images[:1, None].repeat(3, axis=1)))
    np.testing.assert_allclose(again[0], feats[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        extractor(images * 255)  # the reference's 0..255 input
    assert "inception-fid" in extractor.name


def test_inception_rejects_wrong_keys_and_missing_file(tmp_path, inception_file):
    state = torch.load(inception_file, weights_only=True)
    del state["Mixed_7c.branch_pool.conv.weight"]
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(MedlsdmError, match="bad.pth.*Mixed_7c.branch_pool"):
        FX.InceptionFeatureExtractor(bad)
    with pytest.raises(MedlsdmError, match=r"nope\.pth: inception-fid weights file not found"):
        FX.InceptionFeatureExtractor(tmp_path / "nope.pth")


def test_default_inception_path_follows_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / FX.INCEPTION_WEIGHTS_FILE
    assert FX.default_inception_path() == expected
    with pytest.raises(MedlsdmError, match=FX.INCEPTION_WEIGHTS_FILE):
        FX.InceptionFeatureExtractor()


class _TinyFeatures(torch.nn.Module):
    def forward(self, x):
        return torch.stack([x.mean((1, 2, 3)), x.amin((1, 2, 3)), x.amax((1, 2, 3))], 1)


def test_torchscript_file_not_on_the_allow_list_is_refused(tmp_path):
    path = tmp_path / "inception.pt"
    torch.jit.script(_TinyFeatures()).save(str(path))
    with pytest.raises(MedlsdmError, match="inception.pt: TorchScript archive refused"):
        FX.InceptionFeatureExtractor(path)


@pytest.mark.parametrize("depth,feature_dim", [(10, 512), (50, 2048)])
def test_medicalnet_checkpoint_with_module_prefix_loads(tmp_path, depth, feature_dim):
    torch.manual_seed(0)
    net = FX.MedicalNetResNet(depth)
    keys = net.state_dict().keys()
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer4.0.bn2.weight"} <= set(keys)
    # Shortcut A for ResNet-10 has no parameters; B (ResNet-50) has a 1×1 conv + BN.
    assert any(".downsample." in k for k in keys) == (depth == 50)
    state = {"module." + k: v for k, v in net.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(1)  # segmentation head of the released files
    path = tmp_path / f"resnet_{depth}.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    extractor = FX.MedicalNetFeatureExtractor(path)
    assert extractor.model.depth == depth
    vols = [np.random.default_rng(i).normal(size=(16, 16, 16)).astype(np.float32) for i in range(2)]
    feats = extractor(vols)
    assert feats.shape == (2, feature_dim)
    with torch.no_grad():
        direct = net.eval()(torch.from_numpy((vols[0] - vols[0].mean()) / vols[0].std(ddof=1))[None, None])
    np.testing.assert_allclose(feats[0], direct[0].numpy(), rtol=1e-4, atol=1e-5)
    # z-scoring per volume: an affine intensity change does not change the features.
    np.testing.assert_allclose(extractor([vols[0] * 3 + 5])[0], feats[0], rtol=1e-3, atol=1e-4)


def test_medicalnet_bare_state_dict_depth_check_and_missing_file(tmp_path):
    path = tmp_path / "r10.pth"
    torch.save(FX.MedicalNetResNet(10).state_dict(), path)
    assert FX.MedicalNetFeatureExtractor(path, depth=10).model.depth == 10
    with pytest.raises(MedlsdmError, match="ResNet-10, not the requested ResNet-50"):
        FX.MedicalNetFeatureExtractor(path, depth=50)
    with pytest.raises(MedlsdmError, match=r"resnet_50_23dataset\.pth.*not found"):
        FX.MedicalNetFeatureExtractor(tmp_path / "resnet_50_23dataset.pth")


def test_slices_for_fid_axes_range_and_step():
    vol = np.linspace(-1, 1, 8 * 6 * 4).reshape(8, 6, 4).astype(np.float32)
    vol[0] = -1.0  # a blank axial slice
    s = FX.slices_for_fid(vol, every=2)
    assert s["D"].shape == (4, 6, 4) and s["H"].shape == (3, 8, 4) and s["W"].shape == (2, 8, 6)
    assert s["D"].min() >= 0 and s["D"].max() <= 1
    np.testing.assert_allclose(s["D"][1], (vol[2] + 1) / 2, atol=1e-6)
    np.testing.assert_allclose(s["W"][1], (vol[:, :, 2] + 1) / 2, atol=1e-6)
    assert FX.slices_for_fid(vol, axes=("D",), skip_blank=True)["D"].shape[0] == 7
    hu = FX.slices_for_fid(np.full((2, 3, 3), 500.0), axes=("D",), data_range=(-1000, 1000))
    np.testing.assert_allclose(hu["D"], 0.75)
    with pytest.raises(MedlsdmError, match="axis"):
        FX.slices_for_fid(vol, axes=("Z",))


def test_feature_cache_recomputes_only_when_file_changes(tmp_path):
    source = tmp_path / "case.npy"
    np.save(source, np.zeros(3))
    cache = FX.FeatureCache(tmp_path / "cache")
    calls = []

    def compute():
        calls.append(1)
        return np.arange(4.0) + len(calls)

    first = cache.load_or_compute(source, "net-a", compute, params={"every": 2})
    again = cache.load_or_compute(source, "net-a", compute, params={"every": 2})
    np.testing.assert_array_equal(first, again)
    assert len(calls) == 1
    cache.load_or_compute(source, "net-b", compute, params={"every": 2})   # other extractor
    cache.load_or_compute(source, "net-a", compute, params={"every": 1})   # other slicing
    assert len(calls) == 3
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))        # file touched
    cache.load_or_compute(source, "net-a", compute, params={"every": 2})
    assert len(calls) == 4
    with pytest.raises(DataError, match="not found"):
        cache.load_or_compute(tmp_path / "missing.npy", "net-a", compute)
