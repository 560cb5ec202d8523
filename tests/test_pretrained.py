"""Pretrained weight files are data, never code: planted TorchScript and pickle payloads at every
searched path never run; hashes are checked; `medlsdm weights` lists, fetches (from a local HTTP
server) and imports. Opt-in tests on the real weights of ``$MEDLSDM_SHARED_WEIGHTS`` (default
``../shared/weights`` beside the repository root)."""

import functools
import http.server
import os
import pathlib
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from medlsdm import pretrained
from medlsdm.cli import main
from medlsdm.errors import MedlsdmError
from medlsdm.evaluation import features as FX
from medlsdm.models.perceptual import LPIPS

SHARED = Path(os.environ.get("MEDLSDM_SHARED_WEIGHTS", Path(__file__).resolve().parents[2] / "shared" / "weights"))
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"real weights not found at {SHARED} "
                                  "(set MEDLSDM_SHARED_WEIGHTS to the folder of offline weight copies)")


@pytest.fixture(autouse=True)
def _hermetic(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr("medlsdm.pretrained._lpips_package_dir", lambda: tmp_path / "lpips_pkg")


# ----------------------------------------------------------------------------- payloads

class _PicklePayload:
    """Unpickling it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


class _ScriptPayload(torch.nn.Module):
    def forward(self, x):
        return x


def _plant(path: Path, kind: str, marker: Path, script_bytes: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "torchscript":
        path.write_bytes(script_bytes)
    elif kind == "torch-pickle":
        torch.save({"features.0.weight": _PicklePayload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"state_dict": _PicklePayload(marker)}))


@pytest.fixture
def script_bytes(tmp_path):
    path = tmp_path / "payload.pt"
    torch.jit.script(_ScriptPayload()).save(str(path))
    return path.read_bytes()


@pytest.fixture
def jit_marker(tmp_path, monkeypatch):
    """Opening any TorchScript archive (the way it runs code) creates this marker."""
    marker = tmp_path / "jit_loaded"
    real = torch.jit.load

    def spy(*args, **kwargs):
        marker.touch()
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", spy)
    return marker


def _every_search_path():
    return [(name, path) for name in pretrained.REGISTRY for path, _ in pretrained.search_paths(name)]


@pytest.fixture(scope="module")
def lpips_parts(tmp_path_factory):
    """Random LPIPS backbones and heads in the published layouts, at unregistered names."""
    from medlsdm.models.perceptual import Backbone, Heads

    folder = tmp_path_factory.mktemp("lpips_parts")
    parts = {}
    for net in ("vgg", "alex"):
        backbone = Backbone(net)
        torch.save(backbone.state_dict(), folder / f"{net}_backbone.pth")
        torch.save(Heads(backbone.channels).state_dict(), folder / f"{net}_heads.pth")
        parts[net] = {"backbone": folder / f"{net}_backbone.pth", "heads": folder / f"{net}_heads.pth"}
    return parts


def _consume(name: str, path: Path | None, lpips_parts):
    """Load network ``name`` the way the project does (searched when ``path`` is None); LPIPS gets
    the other part (backbone or heads) as a harmless explicit file."""
    if name.startswith("lpips-"):
        net, part = name.split("-")[1], name.split("-")[2]
        other = "heads" if part == "backbone" else "backbone"
        return LPIPS(net, **{f"{other}_path": lpips_parts[net][other], f"{part}_path": path})
    if name == "inception-fid":
        return FX.InceptionFeatureExtractor(path)
    return FX.MedicalNetFeatureExtractor(path or pretrained.find_weights("medicalnet"))


@pytest.mark.parametrize("kind", ["torchscript", "torch-pickle", "pickle"])
@pytest.mark.filterwarnings("ignore:.*unverified")
def test_planted_payloads_never_run(tmp_path, kind, script_bytes, jit_marker, lpips_parts):
    marker = tmp_path / "pickle_ran"
    places = _every_search_path()
    assert len(places) >= 14  # backbones 2x2, heads 2x(2+package), Inception 3, MedicalNet 4
    for name, path in places:
        for other in places:  # one payload at a time: each path is the one found
            other[1].unlink(missing_ok=True)
        _plant(path, kind, marker, script_bytes)
        with pytest.raises(MedlsdmError) as err:
            _consume(name, None, lpips_parts)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
        # the same file handed over explicitly: refused too
        explicit = tmp_path / f"explicit-{path.name}"
        explicit.write_bytes(path.read_bytes())
        with pytest.raises(MedlsdmError):
            _consume(name, explicit, lpips_parts)
        with pytest.raises(MedlsdmError):
            pretrained.import_weights(name, explicit, FX.inception_from_torchscript)
    assert not marker.exists() and not jit_marker.exists()


def test_evaluate_quality_with_payloads_at_every_path_fails_in_one_line(tmp_path, script_bytes, jit_marker, capsys):
    from evaluation_data import write_cohort

    marker = tmp_path / "pickle_ran"
    for i, (_, path) in enumerate(_every_search_path()):
        _plant(path, ["torchscript", "torch-pickle", "pickle"][i % 3], marker, script_bytes)
    real = tmp_path / "real"
    write_cohort(real, ["c0", "c1"], seed=1)
    for metrics in ("fid2d", "lpips"):
        rc = main(["evaluate", "quality", "--real", str(real), "--synthetic", str(real), "--metrics", metrics,
                   "--out", str(tmp_path / "out")])
        lines = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if ln.strip()]
        assert rc == 2 and lines[-1].startswith("medlsdm: error:") and "Traceback" not in "".join(lines)
    assert main(["weights"]) == 0 and "hash mismatch" in capsys.readouterr().out
    assert not marker.exists() and not jit_marker.exists()


# ----------------------------------------------------------------------------- hashes

def test_hash_mismatch_under_a_published_name_is_an_error_explicit_files_are_unverified(tmp_path):
    backbone = FX.InceptionV3()
    hub = pretrained.hub_checkpoints()
    hub.mkdir(parents=True)
    torch.save(backbone.state_dict(), hub / "pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(MedlsdmError, match="SHA-256 .* is not the published inception-fid file"):
        FX.InceptionFeatureExtractor()
    mine = tmp_path / "my_inception.pth"
    torch.save(backbone.state_dict(), mine)
    with pytest.warns(UserWarning, match="unverified inception-fid weights"):
        extractor = FX.InceptionFeatureExtractor(mine)
    assert extractor.provenance["verified"] is False
    assert extractor.provenance["sha256"] == pretrained.sha256_of(mine)
    assert pretrained.KnownFile("x", "397923af").matches("397923af" + "0" * 56)  # torch.hub prefix rule
    assert not pretrained.KnownFile("x", None).matches("397923af")


def _fake_network(monkeypatch, data: bytes, name="test-net") -> pretrained.Network:
    import hashlib

    net = pretrained.Network(name, "test", "none", (pretrained.KnownFile(
        "test-file.pth", hashlib.sha256(data).hexdigest(), url="http://127.0.0.1:1/test-file.pth"),))
    monkeypatch.setitem(pretrained.REGISTRY, name, net)
    return net


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fetch_from_a_local_server_verifies_the_hash(tmp_path, monkeypatch, http_root, capsys):
    root, base = http_root
    good = pickle.dumps({"w": 1})  # bytes only: fetch never loads what it downloads
    (root / "test-file.pth").write_bytes(good)
    (root / "tampered.pth").write_bytes(good + b"x")
    _fake_network(monkeypatch, good)
    target = pretrained.hub_checkpoints() / "test-file.pth"
    rc = main(["weights", "fetch", "test-net", "--url", f"{base}/tampered.pth"])
    assert rc == 2 and "is not the published" in capsys.readouterr().err
    assert not target.exists() and not list(pretrained.hub_checkpoints().glob(".tmp-*"))
    assert main(["weights", "fetch", "test-net", "--url", f"{base}/missing.pth"]) == 2
    assert "download failed" in capsys.readouterr().err
    assert main(["weights", "fetch", "test-net", "--url", f"{base}/test-file.pth"]) == 0
    assert target.read_bytes() == good
    assert main(["weights", "fetch", "test-net", "--url", f"{base}/tampered.pth"]) == 0  # already there, verified
    capsys.readouterr()
    assert main(["weights"]) == 0
    listing = capsys.readouterr().out
    assert f"test-net             found at {target}" in listing
    assert "medicalnet           missing" in listing
    assert main(["weights", "fetch", "medicalnet"]) == 2  # no URL: says how to get it
    assert "weights import medicalnet" in capsys.readouterr().err


def test_import_copies_published_files_and_converts_allow_listed_torchscript(tmp_path, monkeypatch, jit_marker):
    from safetensors.torch import save_file

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x)

    script = tmp_path / "tiny.pt"
    torch.jit.script(Tiny()).save(str(script))
    convert = lambda module: {k.replace("lin.", "layer."): v for k, v in module.state_dict().items()}
    expected = tmp_path / "expected.safetensors"
    save_file({k: v.contiguous() for k, v in sorted(convert(torch.jit.load(str(script))).items())}, str(expected))
    jit_marker.unlink()
    net = pretrained.Network("tiny", "test", "none", (
        pretrained.KnownFile("tiny.safetensors", pretrained.sha256_of(expected), "safetensors"),
        pretrained.KnownFile("tiny.pt", pretrained.sha256_of(script), "torchscript")))
    monkeypatch.setitem(pretrained.REGISTRY, "tiny", net)
    target = pretrained.import_weights("tiny", script, convert)
    assert jit_marker.exists()  # opened: it is on the allow-list
    assert target.name == "tiny.safetensors" and pretrained.sha256_of(target) == pretrained.sha256_of(expected)
    loaded = pretrained.load_weights("tiny")  # found in the cache, read as safetensors, verified
    assert loaded.verified and loaded.source_format == "safetensors" and set(loaded.state) == {"layer.weight", "layer.bias"}
    other = tmp_path / "other.pt"
    torch.jit.script(Tiny()).save(str(other))  # same code, other weights: not allow-listed
    with pytest.raises(MedlsdmError, match="not a published tiny file"):
        pretrained.import_weights("tiny", other, convert)


# ----------------------------------------------------------------------------- real weights (opt-in)

@needs_shared
def test_real_lpips_weights_are_verified_and_behave(tmp_path):
    images = _test_images()
    values = {}
    for net in ("vgg", "alex"):
        lp = LPIPS(net, SHARED / f"{'vgg16' if net == 'vgg' else 'alexnet'}-features.pth",
                   SHARED / f"lpips-v0.1-{net}-heads.pth")
        assert lp.provenance["backbone"]["verified"] and lp.provenance["heads"]["verified"]
        ref, blurred, noisy = images
        d_blur, d_noise = lp(ref, blurred).item(), lp(ref, noisy).item()
        assert lp(ref, ref).item() == pytest.approx(0.0, abs=1e-6)
        assert d_blur < 0.01 < 0.3 < d_noise  # a slight blur is close, heavy noise is far
        values[net] = (d_blur, d_noise)
    # Regression values of this implementation with the real weights on the images built in
    # _test_images (the published example images are not available offline).
    np.testing.assert_allclose(values["vgg"], REFERENCE_LPIPS["vgg"], atol=1e-5)
    np.testing.assert_allclose(values["alex"], REFERENCE_LPIPS["alex"], atol=1e-5)


REFERENCE_LPIPS = {"vgg": (0.000880, 0.517145), "alex": (0.000118, 0.635554)}


def _test_images():
    """A smooth 64x64 colour pattern, a blurred copy and a noisy copy, in [-1, 1] (seeded)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    ref = torch.stack([torch.sin(6 * xx) * torch.cos(4 * yy), (xx - yy), torch.cos(9 * xx * yy)])[None]
    blurred = torch.nn.functional.avg_pool2d(ref, 5, stride=1, padding=2, count_include_pad=False)
    noisy = (ref + 0.4 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    return ref, blurred, noisy


@needs_shared
@pytest.mark.slow
def test_real_inception_is_converted_once_and_runs_fid(tmp_path, capsys):
    script = SHARED / "inception-2015-12-05-torchscript.pt"
    assert main(["weights", "import", "inception-fid", str(script)]) == 0
    target = pretrained.hub_checkpoints() / "inception-2015-12-05-fid.safetensors"
    assert target.is_file()
    extractor = FX.InceptionFeatureExtractor()  # found in the cache: no TorchScript opened
    assert extractor.provenance["verified"] and extractor.provenance["format"] == "safetensors"
    images = torch.rand(4, 1, 40, 40, generator=torch.Generator().manual_seed(1))
    ours = extractor(images)
    batch = torch.nn.functional.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        theirs = torch.jit.load(str(script))(batch.expand(-1, 3, -1, -1) * 2 - 1).double().numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)  # the conversion is the published network
    from medlsdm.evaluation.metrics import fid_from_features

    assert fid_from_features(ours, ours) == pytest.approx(0.0, abs=1e-6)
    assert fid_from_features(ours[:2], ours[2:]) > 1.0
