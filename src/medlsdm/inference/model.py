"""Loading a trained run for inference: the denoiser, the autoencoder next to it (latent models)
and the sidecar, read as a typed `ModelCard`. Nothing here imports Lightning or training code."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from medlsdm.data.labels import LabelTable
from medlsdm.errors import MedlsdmError


@dataclass(frozen=True)
class LabelScheme:
    """How training label maps were made from the dataset's files: the dataset's own table, the
    mapping raw value -> model class, and the "brain" label added from the images (Med-DDPM's
    BraTS conditioning: non-zero image voxels outside the labelled foreground), as a raw value."""

    source_table: LabelTable | None = None
    mapping: dict[int, int] | None = None
    brain_label: int | None = None

    @classmethod
    def from_sidecar(cls, sidecar: Mapping) -> "LabelScheme":
        scheme = sidecar.get("label_scheme")
        spec_mapping = (sidecar.get("prepare_spec") or {}).get("label_mapping")
        if scheme is None:
            return cls._from_older_sidecar(sidecar, spec_mapping)
        table = LabelTable.from_mapping(scheme["source_table"]) if scheme.get("source_table") else None
        mapping = scheme.get("mapping", spec_mapping)
        mapping = {int(k): int(v) for k, v in mapping.items()} if mapping else None
        brain = None if scheme.get("brain_label") is None else int(scheme["brain_label"])
        if mapping is None and brain is not None and table is not None:
            mapping = {v: v for v in table.values}   # a brain label added to a table kept as it was
        return cls(source_table=table, mapping=mapping, brain_label=brain)

    @classmethod
    def _from_older_sidecar(cls, sidecar: Mapping, spec_mapping: Mapping | None) -> "LabelScheme":
        """Runs from before the label scheme was recorded: the spec's mapping, and as the brain
        label the one raw value mapped to a class named "brain" (prepare's add_brain_label)."""
        mapping = {int(k): int(v) for k, v in spec_mapping.items()} if spec_mapping else None
        names = LabelTable.from_mapping(sidecar["label_table"]).names
        brain_classes = [v for v, name in names.items() if name == "brain"]
        raw = [k for k, v in (mapping or {}).items() if brain_classes and v == brain_classes[0]]
        return cls(mapping=mapping, brain_label=raw[0] if len(raw) == 1 else None)


@dataclass(frozen=True)
class ModelCard:
    """The typed view of a run's sidecar that inference needs (older sidecars fill what they can).

    - ``spacing`` (D, H, W) mm, ``shape`` (D, H, W) voxels and ``directions`` (3x3 direction
      cosines in model layout, None when the training cases did not share them) of the prepared
      training grids; ``spacing`` None: the run does not record it (made before it was recorded,
      with a preparation that kept each case's own voxel size).
    - ``class_statistics``: see `medlsdm.data.statistics.class_statistics` (None for older runs).
    """

    kind: str
    space: str
    table: LabelTable
    channels: list[str]
    prepare_spec: dict
    intensity: dict | None
    spacing: tuple[float, float, float] | None
    shape: tuple[int, int, int] | None
    directions: tuple[tuple[float, ...], ...] | None
    scheme: LabelScheme
    class_statistics: dict | None = None
    sampling: dict = field(default_factory=dict)

    @classmethod
    def from_sidecar(cls, sidecar: Mapping) -> "ModelCard":
        spec = dict(sidecar.get("prepare_spec") or {})
        geometry = sidecar.get("training_geometry") or {}
        spacing = spec.get("spacing") or geometry.get("spacing") or sidecar.get("image_spacing")
        if spacing is not None:
            spacing = [float(spacing)] * 3 if np.isscalar(spacing) else [float(s) for s in spacing]
        shape = geometry.get("shape") or sidecar.get("image_shape") or spec.get("shape")
        if shape is not None:
            shape = [int(shape)] * 3 if np.isscalar(shape) else [int(s) for s in shape]
        directions = geometry.get("directions")
        return cls(kind=str(sidecar.get("kind")), space=str(sidecar.get("space", "latent")),
                   table=LabelTable.from_mapping(sidecar["label_table"]), channels=list(sidecar.get("channels", [])),
                   prepare_spec=spec, intensity=sidecar.get("intensity"),
                   spacing=tuple(spacing) if spacing else None, shape=tuple(shape) if shape else None,
                   directions=tuple(tuple(float(v) for v in row) for row in directions) if directions else None,
                   scheme=LabelScheme.from_sidecar(sidecar), class_statistics=sidecar.get("class_statistics"),
                   sampling=dict(sidecar.get("sampling") or {}))


@dataclass
class SynthesisModel:
    """A trained stage-2 model with everything needed to sample and map back to files."""

    denoiser: torch.nn.Module
    schedule: object
    sidecar: dict
    table: LabelTable
    autoencoder: torch.nn.Module | None = None
    scaler: object | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def conditional(self) -> bool:
        return self.denoiser.conditioning != "none"

    @property
    def prepare_spec(self) -> dict:
        return self.sidecar.get("prepare_spec", {})

    @property
    def card(self) -> ModelCard:
        return ModelCard.from_sidecar(self.sidecar)

    @property
    def downsample(self) -> tuple[int, int, int]:
        """Image voxels per model-space voxel along (D, H, W) (1 for pixel-space models)."""
        return tuple(int(f) for f in self.autoencoder.factors) if self.autoencoder is not None else (1, 1, 1)

    @property
    def grid_multiple(self) -> tuple[int, int, int]:
        """Image sizes the model handles without padding: the autoencoder's factors times the
        denoiser's own (its U-Net halves H and W per level)."""
        inner = getattr(self.denoiser, "multiple", (1, 1, 1))
        return tuple(int(a) * int(b) for a, b in zip(self.downsample, inner))


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu"):
    """An exported autoencoder (run directory or .safetensors file) in eval mode, with its sidecar."""
    from medlsdm.models.autoencoder import VQGAN
    from medlsdm.weights import load_weights

    path = Path(path)
    if path.is_dir():
        path = path / "autoencoder.safetensors"
    state, sidecar = load_weights(path)
    if sidecar.get("kind") != "autoencoder":
        raise MedlsdmError(f"{path}: not autoencoder weights (kind {sidecar.get('kind')!r})")
    table = LabelTable.from_mapping(sidecar["label_table"])
    # A sidecar written before model.upsample existed describes a transposed-convolution decoder.
    model_cfg = {"upsample": None, **sidecar["model"]}
    model = VQGAN(in_channels=sidecar["in_channels"], num_classes=table.num_classes, **model_cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise MedlsdmError(f"{path}: weights do not match the configuration in its sidecar "
                           f"({str(exc).splitlines()[0]})") from None
    return model.to(device).eval().requires_grad_(False), sidecar


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> SynthesisModel:
    """Load `diffusion.safetensors` (+ the autoencoder copied next to it for latent models)."""
    from medlsdm.diffusion.scaling import LatentScaler
    from medlsdm.diffusion.schedules import NoiseSchedule
    from medlsdm.models.denoisers import build_denoiser
    from medlsdm.weights import load_weights

    run_dir = Path(run_dir)
    path = run_dir / "diffusion.safetensors" if run_dir.is_dir() else run_dir
    state, sidecar = load_weights(path)
    if sidecar.get("kind") != "diffusion":
        raise MedlsdmError(f"{path}: not a diffusion model (kind {sidecar.get('kind')!r})")
    device = torch.device(device)
    denoiser = build_denoiser(sidecar["denoiser"])
    try:
        denoiser.load_state_dict(state)
    except RuntimeError as exc:
        raise MedlsdmError(f"{path}: weights do not match the denoiser in its sidecar "
                           f"({str(exc).splitlines()[0]})") from None
    denoiser.to(device).eval().requires_grad_(False)
    dcfg = sidecar["diffusion"]
    model = SynthesisModel(denoiser=denoiser, schedule=NoiseSchedule(dcfg["timesteps"], kind=dcfg["schedule"]),
                           sidecar=sidecar, table=LabelTable.from_mapping(sidecar["label_table"]), device=device)
    if sidecar["space"] == "latent":
        ae_path = path.parent / "autoencoder.safetensors"
        if not ae_path.is_file():
            raise MedlsdmError(f"{ae_path}: a latent model needs the autoencoder next to {path.name}")
        model.autoencoder, _ = load_autoencoder(ae_path, device=device)
        model.scaler = LatentScaler.from_dict(sidecar["scaler"])
    return model


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MedlsdmError(f"--device {device!r}: not a device name (cpu, cuda, cuda:1 ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MedlsdmError(f"--device {device}: CUDA is not available on this machine")
    return dev
