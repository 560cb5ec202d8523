"""Weights that users share: a safetensors file plus a JSON sidecar (config, label table,
normalisation and latent statistics, versions). Never unpickles anything."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Mapping

import torch

from medlsdm import __version__
from medlsdm.errors import MedlsdmError
from medlsdm.files import atomic_output, write_json


def versions() -> dict:
    import monai

    return {"medlsdm": __version__, "torch": torch.__version__, "monai": monai.__version__,
            "python": platform.python_version()}


def sidecar_path(weights_path: str | Path) -> Path:
    return Path(weights_path).with_suffix(".json")


def save_weights(path: str | Path, state_dict: Mapping[str, torch.Tensor], sidecar: Mapping) -> Path:
    """Write ``path`` (.safetensors) and its sidecar ``path.with_suffix('.json')``, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    # safetensors refuses tensors that share memory; clone those (tied weights are not used here).
    seen: dict[int, str] = {}
    for key, tensor in tensors.items():
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        if ptr in seen and ptr != -1:
            tensors[key] = tensor.clone()
        seen[ptr] = key
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(sidecar_path(path), {**dict(sidecar), "versions": versions()})
    return path


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a .safetensors file and its sidecar; clear errors when either is missing or broken."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MedlsdmError(f"{path}: weights file not found")
    meta = sidecar_path(path)
    if not meta.is_file():
        raise MedlsdmError(f"{meta}: sidecar JSON for {path.name} not found")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MedlsdmError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        sidecar = json.loads(meta.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MedlsdmError(f"{meta}: not valid JSON ({exc.msg})") from None
    return state, sidecar
