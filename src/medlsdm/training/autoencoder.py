"""Stage 1: training the 3D VQ-GAN (optionally with a SPADE decoder) with Lightning.

Losses follow the Med-LSDM reference (REFERENCE.md §1): L1 + LPIPS on random 2D slices + hinge
GAN with a 2D slice discriminator and a 3D volume discriminator + discriminator feature
matching, discriminators switched on after `disc_start` steps. Manual optimisation: each step
updates the generator (encoder, decoder; the codebook follows by EMA) and then, once they are
on, the discriminators.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Mapping, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from medlsdm.config import stage_config
from medlsdm.data.labels import LabelTable, one_hot
from medlsdm.errors import ConfigError, MedlsdmError
from medlsdm.inference.model import load_autoencoder
from medlsdm.training.callbacks import ReconstructionPreview
from medlsdm.training.export import export_autoencoder
from medlsdm.training.runner import TRAINER_DEFAULTS, check_finite

log = logging.getLogger(__name__)

AUTOENCODER_DEFAULTS = {
    "model": {
        "channels": [16, 32, 64],
        "num_res_blocks": [1, 2],         # encoder, decoder ResBlocks per level
        "downsample": [4, 4, 4],          # per-axis (D, H, W) compression factors
        "latent_channels": 8,
        "num_codes": 16384,
        "codebook_decay": 0.99,
        "commitment": 0.25,
        "attention": False,
        "decoder": "plain",               # plain | spade
        "spade_hidden": 128,
        # Decoder upsampling: interpolate (nearest + conv: no 2-voxel checkerboard, benchmarks/quality.md)
        # | transposed (the reference's; runs and weights made before this option have it)
        "upsample": "interpolate",
        # Codebook: a code is restarted when its EMA usage falls below this fraction of the usage
        # every code would have if all were used equally (None: 0.03; models.quantizer)
        "dead_code_threshold": None,
        # Speed/memory options; None = as before they existed (runs made earlier still resume):
        "spade_kernel": None,             # 3 (3x3x3, None) | [1, 3, 3] (the reference's: about 1/3 of the SPADE cost)
        "spade_shared": None,             # true: one label convolution for all decoder levels instead of one per norm
        "spade_slab": None,               # SPADE modulation in depth slabs of this many voxels (None/0: whole volume)
        "spade_instance_norm": None,      # gamma/beta instance-normalised (None/true, as MONAI's SPADE); false: the reference's
        "checkpointing": None,            # true: recompute encoder/decoder ResBlocks in the backward pass (memory)
    },
    "loss": {
        "l1": 4.0,
        "perceptual": 4.0,                # LPIPS weight; 0 or missing weights switch it off
        "perceptual_net": "vgg",          # vgg | alex
        "perceptual_slices": 1,           # random slices per volume (LPIPS and the 2D discriminator)
        "perceptual_axes": ["D"],         # axes to slice along (D = axial)
        "lpips_backbone": None,           # torchvision-format backbone state dict (else the torch hub cache)
        "lpips_heads": None,              # lpips package head file (else searched, see models.perceptual)
        "gan": "hinge",                   # hinge | least_squares
        "gan_2d": 1.0,
        "gan_3d": 1.0,
        "feature_matching": 4.0,
        "disc_start": 2000,               # step at which the discriminators switch on
        "disc_warmup": 0,                 # steps over which the adversarial weight ramps up to 1
        "disc_channels": 64,
        "disc_layers": 3,
    },
    "optim": {"lr": 3e-5, "betas": [0.5, 0.9], "disc_lr": None},
    # Start from a trained autoencoder (run dir or .safetensors): every weight whose name and shape
    # match is copied (encoder, codebook, and the decoder's convolutions when only the decoder
    # kind changes). freeze_encoder keeps encoder and codebook fixed, so the latents do not change
    # and a diffusion model trained on them works with the new decoder (e.g. a SPADE decoder
    # fine-tuned after the fact; benchmarks/models.md).
    "init": {"from": None, "freeze_encoder": False},
    "data": {"patch_size": None, "flip": True, "val_cases": 4},
    # compile: torch.compile the encoder and decoder (Inductor fuses norms, activations and
    # element-wise ops); pays over long runs: ~15 % less CPU per SPADE generator pass here, after minutes
    # of compilation (benchmarks/speed.md). Weights and checkpoints keep their keys.
    "trainer": {**TRAINER_DEFAULTS, "compile": None},
}


class AutoencoderModule(pl.LightningModule):
    """The VQ-GAN, its discriminators and losses, for one training run."""

    def __init__(self, cfg: Mapping, in_channels: int, label_table: Mapping[str, str]):
        super().__init__()
        from medlsdm.models.autoencoder import VQGAN
        from medlsdm.models.discriminators import build_discriminators
        from medlsdm.models.perceptual import build_perceptual_loss

        self.save_hyperparameters({"cfg": copy.deepcopy(dict(cfg)), "in_channels": int(in_channels),
                                   "label_table": dict(label_table)})
        self.automatic_optimization = False
        self.cfg = copy.deepcopy(dict(cfg))
        self.table = LabelTable.from_mapping(label_table)
        self.num_classes = self.table.num_classes
        self.autoencoder = VQGAN(in_channels=in_channels, num_classes=self.num_classes, **self.cfg["model"])
        icfg = self.cfg["init"]
        if icfg["from"]:
            self.init_from(icfg["from"])
        elif icfg["freeze_encoder"]:
            raise ConfigError("init.freeze_encoder needs init.from (the autoencoder whose encoder to keep)")
        if icfg["freeze_encoder"]:
            for part in (self.autoencoder.encoder, self.autoencoder.quantizer):
                part.requires_grad_(False)
        lcfg = self.cfg["loss"]
        self.disc2d, self.disc3d = build_discriminators(
            in_channels, channels=lcfg["disc_channels"], layers=lcfg["disc_layers"])
        # Frozen and kept out of the submodules (a list hides it): never trained, never in a
        # checkpoint or in the exported weights.
        self._lpips = [build_perceptual_loss(lcfg) if lcfg["perceptual"] > 0 else None]
        if self.cfg["trainer"]["compile"]:
            self.autoencoder.encoder.compile()
            self.autoencoder.decoder.compile()
        self._val_counts: torch.Tensor | None = None

    # -- initialisation ---------------------------------------------------------------------
    def init_from(self, path: str | Path) -> list[str]:
        """Copy the weights of a trained autoencoder whose names and shapes match; the encoder
        and codebook must match entirely. Returns the names of the weights left as initialised."""
        source, _ = load_autoencoder(path)
        theirs, ours = source.state_dict(), self.autoencoder.state_dict()
        matched = {k: v for k, v in theirs.items() if k in ours and ours[k].shape == v.shape}
        needed = [k for k in ours if k.startswith(("encoder.", "quantizer."))]
        missing = [k for k in needed if k not in matched]
        if missing:
            raise ConfigError(f"init.from {path}: its encoder/codebook do not fit this model "
                              f"({len(missing)} weights differ, e.g. {missing[0]}); use the same model.channels, "
                              "downsample, latent_channels and num_codes")
        self.autoencoder.load_state_dict(matched, strict=False)
        fresh = [k for k in ours if k not in matched]
        log.info("init.from %s: %d weights copied, %d new (%s)", path, len(matched), len(fresh),
                 ", ".join(sorted({k.split(".")[0] + "." + k.split(".")[1] for k in fresh})[:6]) or "none")
        return fresh

    def _hold_frozen(self) -> None:
        """A frozen encoder and codebook stay in eval mode: the codebook's EMA update runs only in
        training mode. Lightning sets submodule modes itself (and restores them after
        validation), so this runs before every training step."""
        if self.cfg["init"]["freeze_encoder"]:
            self.autoencoder.encoder.eval()
            self.autoencoder.quantizer.eval()

    def on_train_batch_start(self, batch, batch_idx):
        self._hold_frozen()

    # -- helpers --------------------------------------------------------------------------
    def label_onehot(self, label: torch.Tensor) -> torch.Tensor | None:
        """One-hot label map for the SPADE decoder (None for the plain one)."""
        if self.cfg["model"]["decoder"] != "spade":
            return None
        return one_hot(label, self.num_classes).to(self.dtype)

    def _slices(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same random 2D slices of the input and its reconstruction (LPIPS, 2D discriminator).
        Drawn from the global torch RNG, so a resumed run continues the same sequence."""
        from medlsdm.models.slicing import extract_slices

        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        lcfg = self.cfg["loss"]
        axes = tuple(lcfg["perceptual_axes"])
        n = int(lcfg["perceptual_slices"])
        return tuple(extract_slices(v, n, axes=axes, generator=torch.Generator().manual_seed(seed))
                     for v in (real, fake))

    def _check_finite(self, loss: torch.Tensor, name: str) -> None:
        check_finite(loss, self.global_step, name, strategy=self.trainer.strategy)

    @torch.no_grad()
    def reconstruct(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Reconstruction in eval mode (the codebook is not touched), for previews."""
        was_training = self.training
        self.eval()
        try:
            return self.autoencoder(image, self.label_onehot(label))[0]
        finally:
            self.train(was_training)

    # -- training -------------------------------------------------------------------------
    def generator_loss(self, x: torch.Tensor, label: torch.Tensor, use_disc: bool):
        """(loss, reconstruction, real slices, fake slices, logs) of the generator's step."""
        from medlsdm.models.losses import feature_matching_loss, generator_loss

        lcfg = self.cfg["loss"]
        x_rec, vq_loss, info = self.autoencoder(x, self.label_onehot(label))
        l1 = F.l1_loss(x_rec, x)
        loss = lcfg["l1"] * l1 + vq_loss
        logs = {"train/l1": l1.detach(), "train/commitment": vq_loss.detach(),
                "train/perplexity": info["perplexity"].float(), "train/code_usage": info["usage"].float()}
        if "restarts" in info:  # the codebook learned in this step (not with a frozen encoder)
            logs["train/codebook_restarts"] = info["restarts"].float()
            logs["train/codebook_active"] = info["active"].float()
        real2d, fake2d = self._slices(x, x_rec)
        lpips = self._lpips[0]
        if lpips is not None:
            perceptual = lpips.to(self.device)(fake2d, real2d).mean()
            loss = loss + lcfg["perceptual"] * perceptual
            logs["train/lpips"] = perceptual.detach()
        if use_disc:
            weight = self._adversarial_weight()
            adv, fm = x.new_zeros(()), x.new_zeros(())
            for w, disc, real, fake in self._disc_pairs(x, x_rec, real2d, fake2d):
                fake_feats = disc(fake)
                with torch.no_grad():
                    real_feats = disc(real)
                adv = adv + w * generator_loss(fake_feats[-1], lcfg["gan"])
                fm = fm + w * feature_matching_loss(fake_feats[:-1], real_feats[:-1])
            loss = loss + weight * (adv + lcfg["feature_matching"] * fm)
            logs.update({"train/g_adv": adv.detach(), "train/feature_matching": fm.detach()})
        return loss, x_rec, real2d, fake2d, logs

    def discriminator_loss(self, x, x_rec, real2d, fake2d) -> torch.Tensor:
        from medlsdm.models.losses import discriminator_loss

        loss = x.new_zeros(())
        for w, disc, real, fake in self._disc_pairs(x, x_rec, real2d, fake2d):
            loss = loss + w * discriminator_loss(disc(real.detach())[-1], disc(fake.detach())[-1],
                                                 self.cfg["loss"]["gan"])
        return loss

    def _disc_pairs(self, x, x_rec, real2d, fake2d):
        """(weight, discriminator, real, fake) for each discriminator in use (weight > 0)."""
        lcfg = self.cfg["loss"]
        pairs = [(lcfg["gan_2d"], self.disc2d, real2d, fake2d), (lcfg["gan_3d"], self.disc3d, x, x_rec)]
        return [p for p in pairs if p[0] > 0]

    def _adversarial_weight(self) -> float:
        from medlsdm.models.losses import adversarial_weight

        lcfg = self.cfg["loss"]
        return adversarial_weight(self.global_step, int(lcfg["disc_start"]), 1.0, int(lcfg["disc_warmup"]))

    def training_step(self, batch, batch_idx):
        # One optimizer with two parameter groups (generator, discriminators), stepped once per
        # batch, so that Lightning counts one step per batch (it counts every optimizer step in
        # manual optimisation). Each loss reaches only its own group: the discriminators are
        # frozen while the generator's loss is differentiated, and the discriminators' loss sees
        # detached images. Adam is per parameter and clipping is per group
        # (on_before_optimizer_step), so this equals stepping two optimizers in turn: the
        # discriminators' loss never depended on the generator's update.
        opt = self.optimizers()
        x, label = batch["image"], batch["label"]
        lcfg = self.cfg["loss"]
        use_disc = self._adversarial_weight() > 0 and (lcfg["gan_2d"] > 0 or lcfg["gan_3d"] > 0)

        opt.zero_grad(set_to_none=True)
        discriminators = [p for d in (self.disc2d, self.disc3d) for p in d.parameters()]
        for p in discriminators:  # the adversarial terms need no discriminator gradients
            p.requires_grad_(False)
        try:
            g_loss, x_rec, real2d, fake2d, logs = self.generator_loss(x, label, use_disc)
            self._check_finite(g_loss, "generator loss")
            self.manual_backward(g_loss)
        finally:
            for p in discriminators:
                p.requires_grad_(True)
        if use_disc:
            d_loss = self.discriminator_loss(x, x_rec, real2d, fake2d)
            self._check_finite(d_loss, "discriminator loss")
            self.manual_backward(d_loss)
            logs["train/d_loss"] = d_loss.detach()
        opt.step()  # gradients are clipped in on_before_optimizer_step, after AMP unscaling

        logs["train/g_loss"] = g_loss.detach()
        batch_size = x.shape[0]
        self.log_dict(logs, batch_size=batch_size)
        self.log("loss", g_loss.detach(), prog_bar=True, logger=False, batch_size=batch_size)
        self.log("l1", logs["train/l1"], prog_bar=True, logger=False, batch_size=batch_size)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Gradient clipping by norm, per parameter group (generator, discriminators). Here
        rather than before `opt.step()` in training_step: Lightning calls this hook after
        unscaling fp16 gradients, so the norm is the true one."""
        clip = self.cfg["trainer"]["gradient_clip"]
        for name, group in zip(("generator", "discriminator"), optimizer.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if clip and params:
                norm = torch.nn.utils.clip_grad_norm_(params, float(clip))
                self.log(f"train/grad_norm_{name}", norm, batch_size=1)

    def configure_optimizers(self):
        from medlsdm.training.optim import adam

        ocfg = self.cfg["optim"]
        trainable = [p for p in self.autoencoder.parameters() if p.requires_grad]   # not a frozen encoder
        discriminators = list(self.disc2d.parameters()) + list(self.disc3d.parameters())
        return adam([{"params": trainable, "lr": ocfg["lr"]},
                     {"params": discriminators, "lr": ocfg["disc_lr"] or ocfg["lr"]}],
                    lr=ocfg["lr"], betas=tuple(ocfg["betas"]))

    def on_load_checkpoint(self, checkpoint) -> None:
        """Checkpoints written with two optimizers (generator, discriminators) resume into the one
        optimizer with two groups."""
        states = checkpoint.get("optimizer_states") or []
        if len(states) == 2:
            checkpoint["optimizer_states"] = [merge_optimizer_states(*states)]

    # -- validation -----------------------------------------------------------------------
    def on_validation_epoch_start(self):
        self._val_counts = torch.zeros(self.autoencoder.quantizer.num_codes, device=self.device)

    def validation_step(self, batch, batch_idx):
        from medlsdm.evaluation.metrics import psnr, ssim3d

        x, label = batch["image"], batch["label"]
        x_rec, _, info = self.autoencoder(x, self.label_onehot(label))  # eval + no_grad: codebook untouched
        x_rec = x_rec.float()
        win = min(7, *(s if s % 2 else s - 1 for s in x.shape[2:]))
        metrics = {"val/l1": F.l1_loss(x_rec, x).item(),
                   "val/psnr": psnr(x_rec, x, data_range=2.0),          # [-1, 1] intensities
                   "val/ssim": ssim3d(x_rec, x, data_range=2.0, win_size=win)}
        self.log_dict(metrics, batch_size=x.shape[0], sync_dist=True)
        self._val_counts += torch.bincount(info["indices"].flatten(), minlength=self._val_counts.numel()).float()

    def on_validation_epoch_end(self):
        """Code usage and perplexity over the whole validation set (summed over ranks)."""
        counts = self.trainer.strategy.reduce(self._val_counts, reduce_op="sum")
        if counts.sum() > 0:
            probs = counts / counts.sum()
            perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
            self.log_dict({"val/perplexity": perplexity, "val/code_usage": (counts > 0).float().mean()})


def merge_optimizer_states(first: Mapping, second: Mapping) -> dict:
    """One optimizer state dict holding the parameter groups of ``first`` then ``second`` (state
    dicts number parameters consecutively over groups: ``second``'s are shifted)."""
    shift = sum(len(group["params"]) for group in first["param_groups"])
    state = {**first["state"], **{int(k) + shift: v for k, v in second["state"].items()}}
    groups = [dict(g) for g in first["param_groups"]] + [
        {**g, "params": [int(i) + shift for i in g["params"]]} for g in second["param_groups"]]
    return {"state": state, "param_groups": groups}


# -- previews -------------------------------------------------------------------------------


# -- the stage as a function ----------------------------------------------------------------

def make_loaders(data: str | Path, cfg: Mapping):
    """(manifest, training loader, validation loader or None, preview sample) over a prepared
    dataset; validation uses the 'val' split, else 'test', at most `data.val_cases` cases."""
    from torch.utils.data import DataLoader, Subset

    from medlsdm.data.dataset import PreparedDataset, load_manifest

    manifest = load_manifest(data)
    dcfg, tcfg = cfg["data"], cfg["trainer"]
    train = PreparedDataset(data, split="train", patch_size=dcfg["patch_size"], flip=dcfg["flip"],
                            seed=tcfg["seed"])
    if len(train) == 0:
        raise MedlsdmError(f"{data}: the prepared dataset has no 'train' cases")
    splits = {c["split"] for c in manifest["cases"]}
    val_split = "val" if "val" in splits else ("test" if "test" in splits else None)
    val = preview = None
    workers = int(tcfg["num_workers"])
    if val_split:
        val_set = PreparedDataset(data, split=val_split)
        preview = val_set[0]
        if dcfg["val_cases"]:
            val = DataLoader(Subset(val_set, range(min(len(val_set), int(dcfg["val_cases"])))),
                             batch_size=1, num_workers=workers)
    if preview is None:
        preview = PreparedDataset(data, split="train")[0]
    loader = DataLoader(train, batch_size=tcfg["batch_size"], shuffle=True,
                        drop_last=len(train) > tcfg["batch_size"], num_workers=workers,
                        persistent_workers=workers > 0)
    return manifest, loader, val, preview


def check_input_size(shape: Sequence[int], lcfg: Mapping) -> None:
    """Refuse, before training starts, volumes too small for the discriminators (they would fail
    only when switched on, `disc_start` steps later) or for the LPIPS backbone."""
    from medlsdm.models.slicing import AXES

    need = 3 * 2 ** int(lcfg["disc_layers"])  # see PatchGAN.min_size
    spatial = [int(s) for s in shape[-3:]]
    sizes = []
    if lcfg["gan_3d"] > 0:
        sizes += spatial
    if lcfg["gan_2d"] > 0:
        for axis in lcfg["perceptual_axes"]:
            sizes += [s for i, s in enumerate(spatial) if i != AXES[axis] - 2]
    if sizes and min(sizes) < need:
        raise ConfigError(
            f"training volumes of shape {spatial} are too small for discriminators with loss.disc_layers="
            f"{lcfg['disc_layers']} (they need >= {need} voxels per axis); lower loss.disc_layers or use "
            f"larger data.patch_size")
    # AlexNet's stride-4 stem and two max-pools need 31-pixel slices; VGG16 works from 16.
    need_lpips = {"alex": 31, "vgg": 16}.get(lcfg["perceptual_net"], 0)
    slices = [s for axis in lcfg["perceptual_axes"] for i, s in enumerate(spatial) if i != AXES[axis] - 2]
    if lcfg["perceptual"] > 0 and slices and min(slices) < need_lpips:
        raise ConfigError(
            f"slices of training volumes of shape {spatial} are too small for LPIPS loss.perceptual_net="
            f"{lcfg['perceptual_net']} (it needs >= {need_lpips} pixels); use vgg, larger patches or loss.perceptual=0")


def train_autoencoder(data: str | Path, out: str | Path, config: str | Mapping | None = None,
                      overrides=(), overwrite: bool = False) -> Path:
    """Train (or resume) stage 1 on a prepared dataset; returns the exported weights path.
    `overwrite`: `out` may be a folder that training did not create (inputs are never replaced)."""
    from medlsdm.training.runner import build_trainer, fit, prepare_run_dir

    cfg = stage_config(AUTOENCODER_DEFAULTS, config, overrides, section="autoencoder")
    if cfg["model"]["decoder"] not in ("plain", "spade"):
        raise ConfigError(f"model.decoder must be 'plain' or 'spade', not {cfg['model']['decoder']!r}")
    manifest, train_loader, val_loader, preview = make_loaders(data, cfg)
    check_input_size(train_loader.dataset[0]["image"].shape, cfg["loss"])
    run_dir, resume = prepare_run_dir(out, {**cfg, "data_dir": str(Path(data).resolve())}, overwrite=overwrite)
    pl.seed_everything(cfg["trainer"]["seed"], workers=True, verbose=False)
    module = AutoencoderModule(cfg, in_channels=len(manifest["channels"]), label_table=manifest["label_table"])
    previews = ReconstructionPreview(run_dir / "previews", preview, cfg["trainer"]["preview_every_n_steps"])
    trainer = build_trainer(run_dir, cfg["trainer"], callbacks=[previews],
                            monitor="val/l1" if val_loader is not None else None, find_unused_parameters=True)
    # Lightning warns that a periodic checkpoint of a manually optimised module holds the state
    # after the step: that is the state to resume from.
    fit(trainer, module, train_loader, val_loader, resume, ignore=["Using ModelCheckpoint with manual optimization"])
    weights = run_dir / "autoencoder.safetensors"
    if trainer.is_global_zero:
        export_autoencoder(run_dir, module, data, manifest, cfg, trainer.global_step)
        log.info("autoencoder trained for %d steps: %s", trainer.global_step, weights)
    return weights
