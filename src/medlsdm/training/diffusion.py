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
import hashlib
import logging
import shutil
from pathlib import Path
from typing import Mapping

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.utils.data import DataLoader, Dataset

from medlsdm.config import stage_config
from medlsdm.data.labels import LabelTable, one_hot
from medlsdm.errors import ConfigError, MedlsdmError
from medlsdm.training.runner import TRAINER_DEFAULTS, check_finite

log = logging.getLogger(__name__)

PREVIEW_STEPS = 10   # DDIM steps of a training preview: enough to see structure, cheap next to training


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
        "trainer": {**TRAINER_DEFAULTS, "gradient_clip": 1.0, "compile": None},   # compile: torch.compile the denoiser
    }


# -- data -------------------------------------------------------------------------------------

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
    """Encode a split once and keep it in `cache` (safetensors; reused on resume).

    The autoencoder runs in eval mode under no_grad: its codebook (EMA-updated in train mode)
    is never touched. With `flip`, a left-right flipped copy of every case is encoded too: an
    encoder is not equivariant to flips, so flipping a cached latent would not be the latent
    of the flipped image.
    """
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
        device = next(autoencoder.parameters()).device
        for item in tqdm(dataset, desc=f"encoding {split} latents", unit="case"):
            x = item["image"][None].to(device)
            variants = {"": x, ":flip": torch.flip(x, dims=[-1])} if flip else {"": x}
            for suffix, v in variants.items():
                stored[item["case_id"] + suffix] = autoencoder.encode(v)[0].float().cpu().contiguous()
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

class DiffusionEMA(EMAWeightAveraging):
    """Lightning's EMAWeightAveraging, with two changes for this stage.

    - Lightning's averaged model starts as a copy of the initial weights and is only updated
      from `update_starting_at_step`; a run shorter than that would export (and, at train end,
      swap in) its initialisation. Here the average follows the raw weights until averaging
      starts.
    - Lightning copies the average into the model at the end of training, before the final
      checkpoint is written (checkpoint callbacks run last), so a resumed run would continue
      from the EMA weights instead of the raw ones. Here the model keeps its raw weights; the
      averaged weights are exported with :meth:`averaged_module`.

    The checkpoint holds both (Lightning: `state_dict` = average, `current_model_state` = raw,
    `averaging_state` = the number of averaged steps), and resuming restores both.
    """

    def __init__(self, decay: float, every_n_steps: int, start_step: int):
        if not 0.0 <= float(decay) < 1.0:
            raise ConfigError(f"ema.decay must be in [0, 1) (or null for no EMA), not {decay}")
        super().__init__(decay=float(decay), update_every_n_steps=max(1, int(every_n_steps)),
                         update_starting_at_step=int(start_step))

    @property
    def started(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def _follow_if_not_started(self, pl_module) -> None:
        if self._average_model is not None and not self.started:
            self._average_model.module.load_state_dict(pl_module.state_dict())

    def averaged_module(self, pl_module):
        """The module holding the weights to export (the average, or the raw weights if
        averaging has not started)."""
        self._follow_if_not_started(pl_module)
        return self._average_model.module

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self._follow_if_not_started(pl_module)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_validation_epoch_start(self, trainer, pl_module):
        self._follow_if_not_started(pl_module)
        super().on_validation_epoch_start(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._follow_if_not_started(pl_module)   # no copy into the model: it keeps its raw weights


# -- previews ---------------------------------------------------------------------------------

class DiffusionPreview(pl.Callback):
    """Every `every_n_steps` steps and at the end of training: a quick DDIM sample (10 steps,
    fixed seed) of one held-out label map, decoded, as previews/stepNNNNNNN.png
    (label map | sample | real image). Uses the EMA weights once averaging has started."""

    def __init__(self, folder: Path, case: Mapping, every_n_steps: int, sidecar: Mapping,
                 autoencoder=None, ema: DiffusionEMA | None = None):
        self.folder, self.case, self.every = Path(folder), case, int(every_n_steps)
        self.sidecar, self.autoencoder, self.ema = dict(sidecar), autoencoder, ema
        self._last = -1

    @torch.no_grad()
    def make(self, module: DiffusionModule) -> np.ndarray:
        """(C, D, H, W) sample in [-1, 1] for the preview label map."""
        from medlsdm.inference.model import SynthesisModel
        from medlsdm.inference.synthesis import synthesize

        source = self.ema.averaged_module(module) if self.ema is not None and self.ema.started else module
        denoiser = source.denoiser
        was_training = denoiser.training
        if self.autoencoder is not None:
            self.autoencoder.to(module.device).eval()   # eval: the codebook is never updated
        model = SynthesisModel(denoiser=denoiser.eval(), schedule=module.schedule, sidecar=self.sidecar,
                               table=module.table, autoencoder=self.autoencoder, scaler=module.scaler,
                               device=module.device)
        label = self.case["label"][0].numpy()
        try:
            x = synthesize(model, label if module.conditional else None, n=1, sampler="ddim", steps=PREVIEW_STEPS,
                           guidance=self.sidecar["sampling"]["guidance"], seed=0, image_shape=label.shape,
                           progress=False)
        finally:
            denoiser.train(was_training)
        return x[0].float().cpu().numpy()

    def _save(self, trainer, module) -> None:
        from medlsdm.viz import label_picture, montage, save_png, three_plane

        if not trainer.is_global_zero or trainer.global_step == self._last:
            return
        sample = self.make(module)
        label = self.case["label"][0].numpy()
        real = self.case["image"].numpy()
        panels = [three_plane(sample, window=(-1, 1)), three_plane(real, window=(-1, 1))]
        titles = ["sample", "real image"]
        if module.conditional:
            panels, titles = [label_picture(label), *panels], ["label map", *titles]
        save_png(self.folder / f"step{trainer.global_step:07d}.png", montage([panels], titles=titles))
        self._last = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every > 0 and trainer.global_step % self.every == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step > 0:
            self._save(trainer, pl_module)


# -- the stage as a function ------------------------------------------------------------------

def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _copy_autoencoder(autoencoder: str | Path, run_dir: Path) -> Path:
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

    ae_path = _copy_autoencoder(autoencoder, run_dir)
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


def export_sidecar(cfg: Mapping, manifest: Mapping, in_channels: int, downsample, scaler_state,
                   image_shape, steps: int = 0, data: str | Path | None = None) -> dict:
    """What `medlsdm sample` needs besides the weights (see `medlsdm.inference.model`): with the
    prepared dataset `data`, also the training geometry and per-class statistics
    (`medlsdm.data.statistics.training_summary`)."""
    from medlsdm.data.statistics import training_summary

    table = LabelTable.from_mapping(manifest["label_table"])
    summary = training_summary(data, manifest) if data is not None else {}
    return {
        "kind": "diffusion",
        "space": cfg["space"],
        "denoiser": denoiser_config(cfg, in_channels, table.num_classes, downsample),
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


def train_diffusion(data: str | Path, out: str | Path, autoencoder: str | Path | None = None,
                    config: str | Mapping | None = None, overrides=()) -> Path:
    """Train (or resume) stage 2; returns the exported `diffusion.safetensors` path.

    The run directory is self-contained: it also holds a copy of the autoencoder weights, so
    `medlsdm sample --model RUN_DIR` needs nothing else.
    """
    from medlsdm.data.dataset import PreparedDataset, load_manifest
    from medlsdm.training.runner import build_trainer, fit, prepare_run_dir
    from medlsdm.weights import save_weights

    cfg = stage_config(_defaults(), config, overrides, section="diffusion")
    _check_config(cfg, autoencoder)
    manifest = load_manifest(data)
    tcfg = cfg["trainer"]
    preview = preview_case(data)
    run_dir, resume = prepare_run_dir(out, {**cfg, "data_dir": str(Path(data).resolve()),
                                            "autoencoder_dir": str(Path(autoencoder).resolve()) if autoencoder else None})
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
    sidecar = export_sidecar(cfg, manifest, in_channels, downsample, scaler_state, image_shape, data=data)
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
