"""Stage 2: training the diffusion model with Lightning.

Three configurations of the same machinery (REFERENCE.md §1-3):
- Med-LSDM (`space: latent`, denoiser `semantic`): latent diffusion conditioned on the label map
  through SPADE, with classifier-free guidance trained by condition dropout;
- medicaldiffusion (`space: latent`, denoiser `unconditional`);
- Med-DDPM (`space: pixel`, denoiser `concat`): the one-hot mask concatenated to x_t.

Latents are encoded once with the frozen autoencoder (eval mode) and cached in the run
directory; training then never runs the autoencoder.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Mapping

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from medlsdm.config import stage_config
from medlsdm.data.labels import LabelTable, one_hot
from medlsdm.errors import ConfigError, MedlsdmError
from medlsdm.training.runner import TRAINER_DEFAULTS, check_finite

log = logging.getLogger(__name__)


def _defaults() -> dict:
    from medlsdm.models.denoisers import DENOISER_DEFAULTS

    return {
        "space": "latent",                 # latent | pixel
        "denoiser": copy.deepcopy(DENOISER_DEFAULTS),
        "diffusion": {
            "timesteps": 500,
            "schedule": "cosine",          # cosine | linear
            "prediction": "epsilon",       # epsilon | x0 | v
            "loss": "l1",                  # l1 | l2
            "cond_drop_prob": 0.1,         # classifier-free guidance: null label map with this probability
        },
        "latent": {"scaling": "std", "requantize": False},   # std | minmax (the reference's codebook range)
        "sampling": {"sampler": "ddim", "steps": 50, "guidance": 1.0, "eta": 0.0},
        "ema": {"decay": 0.995, "every_n_steps": 10, "start_step": 2000},
        "optim": {"lr": 1e-5, "weight_decay": 0.0},
        "data": {"flip": True},
        "trainer": {**TRAINER_DEFAULTS, "gradient_clip": 1.0},
    }


class LatentDataset(Dataset):
    """Cached latents with their full-resolution label maps (the label encoder downsamples)."""

    def __init__(self, latents: list[torch.Tensor], labels: list[torch.Tensor], case_ids: list[str]):
        self.latents, self.labels, self.case_ids = latents, labels, case_ids

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return {"image": self.latents[i], "label": self.labels[i], "case_id": self.case_ids[i]}


@torch.no_grad()
def cache_latents(autoencoder, data: str | Path, split: str, flip: bool, cache: Path) -> LatentDataset:
    """Encode a split once (eval mode: the codebook is untouched) and keep it in `cache`."""
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    from medlsdm.data.dataset import PreparedDataset
    from medlsdm.files import atomic_output

    dataset = PreparedDataset(data, split=split)
    if cache.exists():
        stored = load_file(str(cache))
    else:
        stored = {}
        autoencoder.eval()
        for item in tqdm(dataset, desc=f"encoding {split} latents", unit="case"):
            x = item["image"][None]
            variants = {"": x, ":flip": torch.flip(x, dims=[-1])} if flip else {"": x}
            for suffix, v in variants.items():
                stored[item["case_id"] + suffix] = autoencoder.encode(v)[0].float().contiguous()
        with atomic_output(cache) as tmp:
            save_file(stored, str(tmp))
    latents, labels, ids = [], [], []
    for item in dataset:
        cid = item["case_id"]
        for suffix in ("", ":flip"):
            if cid + suffix in stored:
                latents.append(stored[cid + suffix])
                labels.append(torch.flip(item["label"], dims=[-1]) if suffix else item["label"])
                ids.append(cid + suffix)
    return LatentDataset(latents, labels, ids)


class DiffusionModule(pl.LightningModule):
    """A denoiser, its noise schedule and the training objective."""

    def __init__(self, cfg: Mapping, in_channels: int, label_table: Mapping[str, str],
                 latent_downsample=(1, 1, 1), scaler_state: Mapping | None = None):
        super().__init__()
        from medlsdm.diffusion.scaling import LatentScaler
        from medlsdm.diffusion.schedules import NoiseSchedule
        from medlsdm.models.denoisers import build_denoiser

        self.save_hyperparameters({"cfg": dict(cfg), "in_channels": in_channels, "label_table": dict(label_table),
                                   "latent_downsample": list(latent_downsample),
                                   "scaler_state": dict(scaler_state) if scaler_state else None})
        self.cfg = copy.deepcopy(dict(cfg))
        self.table = LabelTable.from_mapping(label_table)
        dcfg = self.cfg["diffusion"]
        self.denoiser = build_denoiser({**self.cfg["denoiser"], "in_channels": in_channels,
                                        "num_classes": self.table.num_classes,
                                        "label_downsample": list(latent_downsample)})
        self.schedule = NoiseSchedule(dcfg["timesteps"], kind=dcfg["schedule"])
        self.scaler = LatentScaler.from_dict(scaler_state) if scaler_state else None

    @property
    def conditional(self) -> bool:
        return self.denoiser.conditioning != "none"

    def condition(self, label: torch.Tensor) -> torch.Tensor | None:
        return one_hot(label, self.table.num_classes).to(self.dtype) if self.conditional else None

    def training_step(self, batch, batch_idx):
        from medlsdm.diffusion.objective import diffusion_loss

        dcfg = self.cfg["diffusion"]
        x0 = batch["image"]
        if self.scaler is not None:
            x0 = self.scaler.scale(x0)
        cond = self.condition(batch["label"])
        loss = diffusion_loss(self.denoiser, x0, cond, self.schedule, prediction=dcfg["prediction"],
                              loss=dcfg["loss"], cond_drop_prob=dcfg["cond_drop_prob"] if cond is not None else 0.0)
        check_finite(loss, self.global_step)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=x0.shape[0])
        return loss

    def configure_optimizers(self):
        ocfg = self.cfg["optim"]
        return torch.optim.AdamW(self.denoiser.parameters(), lr=ocfg["lr"], weight_decay=ocfg["weight_decay"])


def _ema_callback(ecfg: Mapping):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    return EMAWeightAveraging(decay=ecfg["decay"], update_every_n_steps=ecfg["every_n_steps"],
                              update_starting_at_step=ecfg["start_step"])


def train_diffusion(data: str | Path, out: str | Path, autoencoder: str | Path | None = None,
                    config: str | Mapping | None = None, overrides=()) -> Path:
    """Train (or resume) stage 2; returns the exported `diffusion.safetensors` path.

    The run directory is self-contained: it also holds a copy of the autoencoder weights, so
    `medlsdm sample --model RUN_DIR` needs nothing else.
    """
    from medlsdm.data.dataset import PreparedDataset, load_manifest
    from medlsdm.diffusion.scaling import LatentScaler
    from medlsdm.training.autoencoder import load_autoencoder
    from medlsdm.training.runner import build_trainer, prepare_run_dir
    from medlsdm.weights import save_weights

    cfg = stage_config(_defaults(), config, overrides, section="diffusion")
    space = cfg["space"]
    if space not in ("latent", "pixel"):
        raise ConfigError(f"space must be 'latent' or 'pixel', not {space!r}")
    if space == "latent" and autoencoder is None:
        raise ConfigError("a latent diffusion model needs --autoencoder (a stage-1 run directory)")
    if space == "pixel" and autoencoder is not None:
        raise ConfigError("a pixel-space model (e.g. Med-DDPM) takes no --autoencoder")
    manifest = load_manifest(data)
    tcfg = cfg["trainer"]
    run_dir, resume = prepare_run_dir(out, {**cfg, "data_dir": str(Path(data).resolve()),
                                            "autoencoder_dir": str(Path(autoencoder).resolve()) if autoencoder else None})
    pl.seed_everything(tcfg["seed"], workers=True, verbose=False)

    sidecar_extra: dict = {}
    if space == "latent":
        ae, ae_sidecar = load_autoencoder(autoencoder)
        if ae_sidecar["label_table"] != manifest["label_table"]:
            raise MedlsdmError(f"{autoencoder}: autoencoder label table {ae_sidecar['label_table']} differs "
                               f"from the dataset's {manifest['label_table']}")
        train_set = cache_latents(ae, data, "train", cfg["data"]["flip"], run_dir / "latents_train.safetensors")
        scaler = LatentScaler(mode=cfg["latent"]["scaling"])
        if cfg["latent"]["scaling"] == "minmax":
            stats = ae_sidecar["latent_statistics"]
            scaler.fit_range(stats["codebook_min"], stats["codebook_max"])
        else:
            scaler.fit(torch.stack(train_set.latents))
        in_channels = ae_sidecar["model"]["latent_channels"]
        downsample = ae_sidecar["model"]["downsample"]
        scaler_state = scaler.state_dict()
        ae_src = Path(autoencoder) / "autoencoder.safetensors" if Path(autoencoder).is_dir() else Path(autoencoder)
        if not (run_dir / "autoencoder.safetensors").exists():
            shutil.copy2(ae_src, run_dir / "autoencoder.safetensors")
            shutil.copy2(ae_src.with_suffix(".json"), run_dir / "autoencoder.json")
    else:
        train_set = PreparedDataset(data, split="train", flip=cfg["data"]["flip"], seed=tcfg["seed"])
        in_channels, downsample, scaler_state = len(manifest["channels"]), (1, 1, 1), None

    module = DiffusionModule(cfg, in_channels=in_channels, label_table=manifest["label_table"],
                             latent_downsample=downsample, scaler_state=scaler_state)
    loader = DataLoader(train_set, batch_size=tcfg["batch_size"], shuffle=True,
                        drop_last=len(train_set) > tcfg["batch_size"], num_workers=tcfg["num_workers"])
    trainer = build_trainer(run_dir, tcfg, callbacks=[_ema_callback(cfg["ema"])],
                            gradient_clip_val=tcfg["gradient_clip"],
                            accumulate_grad_batches=tcfg["accumulate_grad_batches"])
    trainer.fit(module, loader, ckpt_path=str(resume) if resume else None)
    weights = run_dir / "diffusion.safetensors"
    if trainer.is_global_zero:
        # EMAWeightAveraging has swapped the averaged weights in at the end of fit.
        save_weights(weights, module.denoiser.state_dict(), {
            "kind": "diffusion",
            "space": space,
            "denoiser": {**cfg["denoiser"], "in_channels": in_channels,
                         "num_classes": module.table.num_classes, "label_downsample": list(downsample)},
            "diffusion": cfg["diffusion"],
            "latent": cfg["latent"],
            "sampling": cfg["sampling"],
            "scaler": scaler_state,
            "label_table": manifest["label_table"],
            "channels": manifest["channels"],
            "modality": manifest.get("modality"),
            "prepare_spec": manifest.get("spec", {}),
            "intensity": manifest.get("intensity"),
            "steps": int(trainer.global_step),
        })
    return weights
