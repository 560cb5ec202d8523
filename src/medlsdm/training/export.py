"""What a training run leaves for inference: the weights (safetensors) and their sidecars (the
autoencoder's latent statistics; the diffusion model's configuration, training geometry, class
statistics and label scheme), and swapping a decoder into a trained diffusion run."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from medlsdm.errors import ConfigError, MedlsdmError


@torch.no_grad()
def latent_statistics(autoencoder, loader, device) -> dict:
    """Per-channel mean/std and global min/max of the continuous latents of a dataset, plus the
    codebook range (the reference's min-max scaling uses the latter). Eval mode: the codebook
    is not touched."""
    autoencoder.eval()
    total, total_sq, count = 0.0, 0.0, 0
    lo, hi = float("inf"), float("-inf")
    for batch in loader:
        z = autoencoder.encode(batch["image"].to(device)).double()
        dims = [0, 2, 3, 4]
        total = total + z.sum(dims)
        total_sq = total_sq + (z**2).sum(dims)
        count += z.numel() // z.shape[1]
        lo, hi = min(lo, z.min().item()), max(hi, z.max().item())
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(1e-12).sqrt()
    cmin, cmax = autoencoder.quantizer.codebook_range()
    return {"mean": mean.tolist(), "std": std.tolist(), "min": lo, "max": hi,
            "codebook_min": float(cmin), "codebook_max": float(cmax), "volumes": len(loader.dataset)}


def export_autoencoder(run_dir: Path, module, data, manifest: Mapping, cfg: Mapping, step: int) -> Path:
    """autoencoder.safetensors + autoencoder.json from the trained model."""
    from torch.utils.data import DataLoader

    from medlsdm.data.dataset import PreparedDataset
    from medlsdm.weights import save_weights

    # Statistics over whole, un-augmented training volumes: what stage 2 will encode.
    loader = DataLoader(PreparedDataset(data, split="train"), batch_size=1)
    stats = latent_statistics(module.autoencoder, loader, module.device)
    return save_weights(run_dir / "autoencoder.safetensors", module.autoencoder.state_dict(), {
        "kind": "autoencoder",
        "model": cfg["model"],
        "in_channels": len(manifest["channels"]),
        "channels": manifest["channels"],
        "label_table": manifest["label_table"],
        "modality": manifest.get("modality"),
        "prepare_spec": manifest.get("spec", {}),
        "latent_statistics": stats,
        "steps": int(step),
        "config": cfg,
    })


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def copy_autoencoder(autoencoder: str | Path, run_dir: Path) -> Path:
    """Copy the autoencoder into the run dir (self-contained); on resume, refuse one that has
    changed since (the cached latents and the trained denoiser belong to the copy)."""
    src = Path(autoencoder)
    src = src / "autoencoder.safetensors" if src.is_dir() else src
    if not src.is_file() or not src.with_suffix(".json").is_file():
        raise MedlsdmError(f"{autoencoder}: no autoencoder.safetensors + autoencoder.json (a stage-1 run directory)")
    dst = run_dir / "autoencoder.safetensors"
    if dst.exists():
        if _file_digest(src) != _file_digest(dst):
            raise ConfigError(f"{src} differs from the copy this run was trained with ({dst}); "
                              "use another --out for a new autoencoder")
    else:
        shutil.copy2(src.with_suffix(".json"), run_dir / "autoencoder.json")
        shutil.copy2(src, dst)
    return dst


def attach_decoder(run_dir: str | Path, autoencoder: str | Path) -> Path:
    """Give a trained latent diffusion run a new decoder: copy in an autoencoder with the same
    encoder and codebook (e.g. a SPADE decoder trained with ``init.freeze_encoder``), so that the
    latents, and with them the trained denoiser, stay valid. Refused when they differ."""
    from medlsdm.files import atomic_output
    from medlsdm.inference.model import load_autoencoder

    run_dir = Path(run_dir)
    if not (run_dir / "autoencoder.safetensors").is_file():
        raise MedlsdmError(f"{run_dir}: not a latent diffusion run (no autoencoder.safetensors)")
    current, new = load_autoencoder(run_dir)[0].state_dict(), load_autoencoder(autoencoder)[0].state_dict()
    for key, value in current.items():
        if key.startswith(("encoder.", "quantizer.")) and not (key in new and torch.equal(new[key], value)):
            raise ConfigError(f"{autoencoder}: its encoder or codebook differs from the one {run_dir} was trained "
                              f"with ({key}); train the new decoder with init.from and init.freeze_encoder")
    src = Path(autoencoder)
    src = src / "autoencoder.safetensors" if src.is_dir() else src
    for source, name in ((src.with_suffix(".json"), "autoencoder.json"), (src, "autoencoder.safetensors")):
        with atomic_output(run_dir / name) as tmp:
            shutil.copyfile(source, tmp)
    return run_dir / "autoencoder.safetensors"


def export_sidecar(cfg: Mapping, manifest: Mapping, denoiser: Mapping, scaler_state, image_shape, steps: int = 0,
                   data: str | Path | None = None) -> dict:
    """What `medlsdm sample` needs besides the weights (see `medlsdm.inference.model`): with the
    prepared dataset `data`, also the training geometry and per-class statistics
    (`medlsdm.data.statistics.training_summary`)."""
    from medlsdm.data.statistics import training_summary

    summary = training_summary(data, manifest) if data is not None else {}
    if denoiser.get("kind") == "unconditional":
        summary.pop("appearance", None)   # found through a label map at sampling: none here
    return {
        "kind": "diffusion",
        "space": cfg["space"],
        "denoiser": dict(denoiser),
        "diffusion": cfg["diffusion"],
        "latent": cfg["latent"],
        "sampling": cfg["sampling"],
        "ema": cfg["ema"],
        "scaler": scaler_state,
        "label_table": manifest["label_table"],
        "channels": manifest["channels"],
        "modality": manifest.get("modality"),
        "prepare_spec": manifest.get("spec", {}),
        "intensity": manifest.get("intensity"),
        "image_shape": [int(s) for s in image_shape],
        "image_spacing": prepared_spacing(manifest),
        "label_scheme": manifest.get("label_scheme"),
        **summary,
        "steps": int(steps),
    }


def prepared_spacing(manifest: Mapping) -> list[float] | None:
    """Median voxel size (D, H, W) in mm of the prepared training cases (the grid unconditional
    samples are written on when the preparation kept each case's own spacing)."""
    from medlsdm.data.preprocess import prepared_affine

    sizes = [np.linalg.norm(prepared_affine(c["record"])[:3, :3], axis=0) for c in manifest.get("cases", [])
             if c.get("split") == "train" and "record" in c]
    return [float(v) for v in np.median(sizes, axis=0)] if sizes else None
