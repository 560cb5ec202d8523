"""LPIPS in plain torch: torchvision-format backbones and lpips-format heads load by key through
the file search, distance properties, and clear failures when weights are missing."""

import pytest
import torch

from medlsdm.errors import MedlsdmError
from medlsdm.models.perceptual import (LPIPS, Backbone, Heads, build_perceptual_loss, find_lpips_weights,
                                       lpips_slices)

VGG_KEYS = {f"features.{i}.{p}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
            for p in ("weight", "bias")}


@pytest.fixture(autouse=True)
def _no_lpips_package(monkeypatch):
    # Hermetic search: an lpips package installed on the machine must not be found.
    monkeypatch.setattr("medlsdm.pretrained._lpips_package_dir", lambda: None)


def _write_weights(folder, net, backbone_name, heads_name):
    """Random full-size weights in the published formats: torchvision (with classifier keys,
    which LPIPS ignores) and lpips heads (non-negative, like the trained ones)."""
    folder.mkdir(parents=True, exist_ok=True)
    backbone = Backbone(net)
    state = dict(backbone.state_dict())
    state["classifier.0.weight"] = torch.zeros(2, 2)
    heads = {k: v.abs() for k, v in Heads(backbone.channels).state_dict().items()}
    torch.save(state, folder / backbone_name)
    torch.save(heads, folder / heads_name)
    return state, heads


@pytest.fixture(scope="module")
def vgg_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lpips")
    state, heads = _write_weights(folder, "vgg", "vgg16.pth", "vgg_heads.pth")
    return folder / "vgg16.pth", folder / "vgg_heads.pth", state, heads


@pytest.fixture(scope="module")
def vgg(vgg_files):
    backbone, heads, _, _ = vgg_files
    return LPIPS("vgg", backbone_path=backbone, heads_path=heads)


def test_layouts_match_torchvision_and_lpips_keys(vgg, vgg_files):
    _, _, state, heads = vgg_files
    assert set(vgg.backbone.state_dict()) == VGG_KEYS
    assert set(vgg.heads.state_dict()) == {f"lin{k}.model.1.weight" for k in range(5)}
    assert sum(p.numel() for p in vgg.backbone.parameters()) == 14_714_688  # VGG16 features
    for key, value in vgg.backbone.state_dict().items():
        assert torch.equal(value, state[key])
    for key, value in vgg.heads.state_dict().items():
        assert torch.equal(value, heads[key])


def test_lpips_distance_properties(vgg):
    x = torch.rand(2, 1, 48, 40) * 2 - 1
    y = torch.rand(2, 1, 48, 40) * 2 - 1
    assert torch.allclose(vgg(x, x), torch.zeros(2), atol=1e-6)
    d = vgg(x, y)
    assert d.shape == (2,) and (d > 0).all()
    assert torch.allclose(d, vgg(y, x), rtol=1e-5)
    assert torch.allclose(d, vgg(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)))  # grey = repeated channels
    two = torch.cat([x, y], 1), torch.cat([y, y], 1)  # 2-channel MR: mean over channels
    assert torch.allclose(vgg(*two), d / 2, rtol=1e-5)


def test_lpips_is_frozen_but_passes_gradients(vgg):
    assert all(not p.requires_grad for p in vgg.parameters())
    vgg.train()
    assert not vgg.training and not vgg.heads.lin0.model[0].training
    x = (torch.rand(1, 1, 32, 32) * 2 - 1).requires_grad_()
    vgg(x, torch.zeros(1, 1, 32, 32)).sum().backward()
    assert x.grad.abs().sum() > 0


def _publish(monkeypatch, name, path):
    """Make ``path``'s hash the published one of network ``name``'s file of that file name."""
    from dataclasses import replace

    from medlsdm import pretrained

    net = pretrained.REGISTRY[name]
    files = tuple(replace(f, sha256=pretrained.sha256_of(path)) if f.name == path.name else f for f in net.files)
    monkeypatch.setitem(pretrained.REGISTRY, name, replace(net, files=files))


def test_alexnet_loads_from_the_torch_hub_cache(tmp_path, monkeypatch):
    checkpoints = tmp_path / "hub" / "checkpoints"
    _write_weights(checkpoints, "alex", "alexnet-owt-7be5be79.pth", "lpips_alex.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    backbone, heads = find_lpips_weights("alex")
    assert backbone == checkpoints / "alexnet-owt-7be5be79.pth" and heads == checkpoints / "lpips_alex.pth"
    # random weights under the published names: refused, their hashes are not the published ones
    with pytest.raises(MedlsdmError, match="alexnet-owt-7be5be79.pth: SHA-256 .* is not the published"):
        build_perceptual_loss({"perceptual_net": "alex"})
    _publish(monkeypatch, "lpips-alex-backbone", backbone)
    _publish(monkeypatch, "lpips-alex-heads", heads)
    net = build_perceptual_loss({"perceptual_net": "alex"})
    assert isinstance(net, LPIPS) and net.net == "alex"
    assert net.provenance["backbone"]["verified"] and net.provenance["heads"]["verified"]
    assert set(net.backbone.state_dict()) == {f"features.{i}.{p}" for i in (0, 3, 6, 8, 10)
                                              for p in ("weight", "bias")}
    x = torch.rand(1, 1, 64, 64) * 2 - 1
    assert net(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert net(x, -x).item() > 0


def test_missing_weights_name_the_files(tmp_path, monkeypatch, vgg_files):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(MedlsdmError, match="vgg16-397923af.pth.*lpips_vgg.pth"):
        find_lpips_weights("vgg")
    with pytest.warns(UserWarning, match="vgg16-397923af.pth"):
        assert build_perceptual_loss({"perceptual_net": "vgg"}) is None
    # an explicitly configured file that is missing is an error, not a silent fallback
    with pytest.raises(MedlsdmError, match="nope.pth"):
        build_perceptual_loss({"perceptual_net": "vgg", "lpips_backbone": str(tmp_path / "nope.pth"),
                               "lpips_heads": str(vgg_files[1])})


def test_unreadable_or_mismatched_files_are_clear_errors(tmp_path, vgg_files):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(MedlsdmError, match="garbage.pth: cannot read"):
        LPIPS("vgg", backbone_path=garbage, heads_path=vgg_files[1])
    backbone, heads = vgg_files[:2]
    with pytest.raises(MedlsdmError, match="vgg_heads.pth: no 'features"):
        LPIPS("vgg", backbone_path=heads, heads_path=heads)
    with pytest.raises(MedlsdmError, match="vgg16.pth: keys do not match"):
        LPIPS("vgg", backbone_path=backbone, heads_path=backbone)
    with pytest.raises(MedlsdmError, match="vgg16.pth"):  # VGG weights into AlexNet: shapes differ
        LPIPS("alex", backbone_path=backbone, heads_path=heads)


def test_lpips_slices_of_volumes(vgg):
    x = torch.rand(2, 1, 8, 32, 32) * 2 - 1
    y = x.clone()
    assert lpips_slices(x, y, vgg, axes=("D",)) == pytest.approx(0.0, abs=1e-6)
    y[:, :, 3] = -y[:, :, 3]
    all_slices = lpips_slices(x, y, vgg, axes=("D",))  # 1 changed slice of 8 per volume
    only = vgg(x[:, :, 3], y[:, :, 3]).mean().item()
    assert all_slices == pytest.approx(only / 8, rel=1e-4)
    g = torch.Generator().manual_seed(0)
    assert lpips_slices(x, y, vgg, axes=("D",), n=2, generator=g) >= 0
