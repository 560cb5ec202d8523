"""Stage 2: training the diffusion model with Lightning.

Three configurations of the same machinery (REFERENCE.md §1-3):
- Med-LSDM (`space: latent`, denoiser `semantic`): latent diffusion conditioned on the label map
  through SPADE, with classifier-free guidance trained by condition dropout;
- medicaldiffusion (`space: latent`, denoiser `unconditional`);
- Med-DDPM (`space: pixel`, denoiser `concat`): the one-hot mask concatenated to x_t.

Latents are encoded once with the frozen autoencoder (eval mode, so the codebook is never
touched) and cached in the run directory; training then never runs the autoencoder (only the
previews decode with it). The exported `diffusion.safetensors` holds the EMA weights.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Mapping

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from medlsdm.config import stage_config
from medlsdm.data.labels import LabelTable, one_hot
from medlsdm.errors import ConfigError, MedlsdmError
from medlsdm.training.callbacks import DiffusionEMA, DiffusionPreview
from medlsdm.training.export import copy_autoencoder, export_sidecar
from medlsdm.training.latents import cache_latents
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
            # epsilon | x0 | v. v by default: on the demo model, epsilon-prediction's 25-step DDIM
            # samples were 12 dB worse than v's at the same training (benchmarks/sampling.md).
            "prediction": "v",
            "loss": "l1",                  # l1 | l2
            "cond_drop_prob": 0.1,         # classifier-free guidance: null label map with this probability
        },
        "latent": {"scaling": "std", "requantize": False},   # std | minmax (the reference's codebook range)
        # clip_x0: bound for the samplers' x0 estimates, in the model's data units (scaled latents:
        # standard deviations); null = the widest sensible one (1 in pixel space and for min-max
        # latents, the largest |scaled latent| of the training set for std scaling).
        "sampling": {"sampler": "ddim", "steps": 50, "guidance": 1.0, "eta": 0.0, "clip_x0": None},
        # decay null: no averaging, the raw weights are exported. Before start_step the average
        # follows the raw weights (a short run exports what it trained, not its initialisation).
        "ema": {"decay": 0.995, "every_n_steps": 10, "start_step": 2000},
        "optim": {"lr": 1e-5, "weight_decay": 0.0},
        "data": {"flip": True},
        # compile: torch.compile the denoiser; keep_freed_memory: malloc keeps freed blocks for the
        # next step instead of unmapping them (Linux/glibc; training/allocator.py)
        "trainer": {**TRAINER_DEFAULTS, "gradient_clip": 1.0, "compile": None, "keep_freed_memory": True},
    }


# -- data -------------------------------------------------------------------------------------


def preview_case(data: str | Path) -> dict:
    """The label map (and image) previews are made from: the first held-out case (val, else
    test), else the first training case."""
    from medlsdm.data.dataset import PreparedDataset, load_manifest

    splits = {c["split"] for c in load_manifest(data)["cases"]}
    split = next((s for s in ("val", "test") if s in splits), "train")
    return PreparedDataset(data, split=split)[0]


# -- model ------------------------------------------------------------------------------------

class DiffusionModule(pl.LightningModule):
    """A denoiser, its noise schedule and the training objective."""

    def __init__(self, cfg: Mapping, in_channels: int, label_table: Mapping[str, str],
                 latent_downsample=(1, 1, 1), scaler_state: Mapping | None = None):
        super().__init__()
        from medlsdm.diffusion.scaling import LatentScaler
        from medlsdm.diffusion.schedules import NoiseSchedule
        from medlsdm.models.denoisers import build_denoiser

        self.save_hyperparameters({"cfg": copy.deepcopy(dict(cfg)), "in_channels": int(in_channels),
                                   "label_table": dict(label_table),
                                   "latent_downsample": [int(f) for f in latent_downsample],
                                   "scaler_state": dict(scaler_state) if scaler_state else None})
        self.cfg = copy.deepcopy(dict(cfg))
        self.table = LabelTable.from_mapping(label_table)
        dcfg = self.cfg["diffusion"]
        self.denoiser = build_denoiser(denoiser_config(self.cfg, in_channels, self.table.num_classes,
                                                       latent_downsample))
        if self.cfg["trainer"]["compile"]:
            self.denoiser.compile()   # in place: the state dict keeps its keys
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
        # All ranks learn of a NaN on any rank, so they stop together (no hang in DDP).
        check_finite(loss, self.global_step, strategy=self.trainer.strategy)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=x0.shape[0])
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # Logged (not clipped) here: Lightning clips after this hook, with gradient_clip_val.
        if self.global_step % max(1, int(self.cfg["trainer"]["log_every_n_steps"])) == 0:
            norms = [p.grad.detach().norm() for p in self.denoiser.parameters() if p.grad is not None]
            if norms:
                self.log("train/grad_norm", torch.stack(norms).norm(), batch_size=1)

    def configure_optimizers(self):
        ocfg = self.cfg["optim"]
        try:  # YAML reads "1e-5" (no dot) as a string
            lr, decay = float(ocfg["lr"]), float(ocfg["weight_decay"])
        except (TypeError, ValueError):
            raise ConfigError(f"optim.lr and optim.weight_decay must be numbers, got {ocfg['lr']!r}, "
                              f"{ocfg['weight_decay']!r}") from None
        from medlsdm.training.optim import adam

        return adam(self.denoiser.parameters(), lr=lr, weight_decay=decay, decoupled=True)


def denoiser_config(cfg: Mapping, in_channels: int, num_classes: int, downsample) -> dict:
    """The denoiser section with what the data and the autoencoder fix."""
    return {**cfg["denoiser"], "in_channels": int(in_channels), "num_classes": int(num_classes),
            "label_downsample": [int(f) for f in downsample]}


# -- EMA --------------------------------------------------------------------------------------


# -- previews ---------------------------------------------------------------------------------


# -- the stage as a function ------------------------------------------------------------------


def _check_config(cfg: Mapping, autoencoder) -> None:
    space = cfg["space"]
    if space not in ("latent", "pixel"):
        raise ConfigError(f"space must be 'latent' or 'pixel', not {space!r}")
    if space == "latent" and autoencoder is None:
        raise ConfigError("a latent diffusion model needs --autoencoder (a stage-1 run directory)")
    if space == "pixel" and autoencoder is not None:
        raise ConfigError("a pixel-space model (e.g. Med-DDPM) takes no --autoencoder")
    kind = cfg["denoiser"]["kind"]
    if space == "pixel" and kind != "concat":
        raise ConfigError(f"space 'pixel' needs denoiser.kind 'concat' (Med-DDPM), not {kind!r}")
    if space == "latent" and kind == "concat":
        raise ConfigError("denoiser.kind 'concat' is the pixel-space Med-DDPM network: set space to 'pixel'")
    if not 0.0 <= float(cfg["diffusion"]["cond_drop_prob"]) <= 1.0:
        raise ConfigError(f"diffusion.cond_drop_prob must be in [0, 1], not {cfg['diffusion']['cond_drop_prob']}")


def _latent_setup(cfg: Mapping, data, manifest: Mapping, autoencoder, run_dir: Path):
    """(train set, in_channels, downsample, scaler state, autoencoder) for a latent model."""
    from medlsdm.diffusion.scaling import LatentScaler
    from medlsdm.inference.model import load_autoencoder

    ae_path = copy_autoencoder(autoencoder, run_dir)
    ae, ae_sidecar = load_autoencoder(ae_path)
    if ae_sidecar["label_table"] != manifest["label_table"]:
        raise MedlsdmError(f"{autoencoder}: autoencoder label table {ae_sidecar['label_table']} differs "
                           f"from the dataset's {manifest['label_table']}")
    if list(ae_sidecar["channels"]) != list(manifest["channels"]):
        raise MedlsdmError(f"{autoencoder}: autoencoder channels {ae_sidecar['channels']} differ from the "
                           f"dataset's {manifest['channels']}")
    if torch.cuda.is_available():
        ae.to("cuda")
    train_set = cache_latents(ae, data, "train", cfg["data"]["flip"], run_dir / "latents_train.safetensors")
    ae.to("cpu")
    scaler = LatentScaler(mode=cfg["latent"]["scaling"])
    if cfg["latent"]["scaling"] == "minmax":
        stats = ae_sidecar["latent_statistics"]
        scaler.fit_range(stats["codebook_min"], stats["codebook_max"])
    else:
        scaler.fit(torch.stack(train_set.latents))
    return (train_set, ae_sidecar["model"]["latent_channels"], ae_sidecar["model"]["downsample"],
            scaler.state_dict(), ae)


def train_diffusion(data: str | Path, out: str | Path, autoencoder: str | Path | None = None,
                    config: str | Mapping | None = None, overrides=(), overwrite: bool = False) -> Path:
    """Train (or resume) stage 2; returns the exported `diffusion.safetensors` path (`overwrite`:
    `out` may be a folder that training did not create; inputs are never replaced).

    The run directory is self-contained: it also holds a copy of the autoencoder weights, so
    `medlsdm sample --model RUN_DIR` needs nothing else.
    """
    from medlsdm.data.dataset import PreparedDataset, load_manifest
    from medlsdm.training.runner import build_trainer, fit, prepare_run_dir
    from medlsdm.weights import save_weights

    cfg = stage_config(_defaults(), config, overrides, section="diffusion")
    _check_config(cfg, autoencoder)
    if cfg["trainer"]["keep_freed_memory"]:
        from medlsdm.training.allocator import keep_freed_memory

        keep_freed_memory()
    manifest = load_manifest(data)
    tcfg = cfg["trainer"]
    preview = preview_case(data)
    run_dir, resume = prepare_run_dir(out, {**cfg, "data_dir": str(Path(data).resolve()),
                                            "autoencoder_dir": str(Path(autoencoder).resolve()) if autoencoder else None},
                                    overwrite=overwrite)
    pl.seed_everything(tcfg["seed"], workers=True, verbose=False)

    ae = None
    if cfg["space"] == "latent":
        train_set, in_channels, downsample, scaler_state, ae = _latent_setup(cfg, data, manifest, autoencoder, run_dir)
    else:
        train_set = PreparedDataset(data, split="train", flip=cfg["data"]["flip"], seed=tcfg["seed"])
        in_channels, downsample, scaler_state = len(manifest["channels"]), (1, 1, 1), None
    image_shape = tuple(preview["label"].shape[1:])
    module = DiffusionModule(cfg, in_channels=in_channels, label_table=manifest["label_table"],
                             latent_downsample=downsample, scaler_state=scaler_state)
    sidecar = export_sidecar(cfg, manifest, denoiser_config(cfg, in_channels, len(manifest["label_table"]), downsample),
                             scaler_state, image_shape, data=data)
    ecfg = cfg["ema"]
    ema = DiffusionEMA(ecfg["decay"], ecfg["every_n_steps"], ecfg["start_step"]) if ecfg["decay"] is not None else None
    previews = DiffusionPreview(run_dir / "previews", preview, tcfg["preview_every_n_steps"], sidecar, ae, ema)
    workers = int(tcfg["num_workers"])
    loader = DataLoader(train_set, batch_size=tcfg["batch_size"], shuffle=True,
                        drop_last=len(train_set) > tcfg["batch_size"], num_workers=workers,
                        persistent_workers=workers > 0)
    trainer = build_trainer(run_dir, tcfg, callbacks=[c for c in (ema, previews) if c is not None],
                            gradient_clip_val=tcfg["gradient_clip"],
                            accumulate_grad_batches=tcfg["accumulate_grad_batches"])
    fit(trainer, module, loader, resume=resume, ignore=[".*does not have many workers"])
    weights = run_dir / "diffusion.safetensors"
    if trainer.is_global_zero:
        source = ema.averaged_module(module) if ema is not None else module
        save_weights(weights, source.denoiser.state_dict(), {**sidecar, "steps": int(trainer.global_step)})
        log.info("diffusion model trained for %d steps: %s", trainer.global_step, weights)
    return weights
