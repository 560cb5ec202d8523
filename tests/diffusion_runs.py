"""Tiny stage-2 settings and runs shared by test_train_diffusion.py and test_sample.py."""

import json

from medlsdm import cli
from prepared_data import make_prepared_dataset

# 16^3 volumes; autoencoder [4, 8, 8] with 32 codes (latent 8 x 4^3); denoiser base 8, T = 50.
AE_TINY = ["model.channels=[4,8,8]", "model.num_codes=32", "loss.perceptual=0", "loss.disc_layers=2",
           "loss.disc_start=100000", "data.val_cases=0", "trainer.max_steps=1", "trainer.progress_bar=false"]
TINY = ["denoiser.base_channels=8", "denoiser.channel_mult=[1,2]", "denoiser.attention_levels=[1]",
        "denoiser.attention_head_dim=8", "denoiser.label_channels=8", "denoiser.label_hidden=[8,8]",
        "denoiser.spade_hidden=8", "diffusion.timesteps=50", "optim.lr=1e-3", "trainer.progress_bar=false",
        "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=2", "trainer.preview_every_n_steps=2"]
# Averaging from the first step, so that a few steps give EMA weights that differ from the raw ones.
EMA_NOW = ["ema.decay=0.9", "ema.every_n_steps=1", "ema.start_step=0"]
PIXEL = ["space=pixel", "denoiser.kind=concat"]
UNCOND = ["denoiser.kind=unconditional", "diffusion.cond_drop_prob=0"]
INTENSITY = {"modality": "mr", "channels": [{"lo": 0.0, "hi": 1000.0, "min": 0.0}]}


def make_dataset(root):
    """The tiny prepared dataset with a preprocessing spec and an intensity summary as
    `medlsdm prepare` writes them (sampling needs both): 2 mm voxels, 16^3 window."""
    root = make_prepared_dataset(root, n_train=3, n_val=1)
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    manifest["spec"] = {"spacing": [2.0, 2.0, 2.0], "shape": [16, 16, 16], "shape_mode": "crop_pad"}
    manifest["intensity"] = INTENSITY
    (root / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return root


def sets(*items):
    return [a for item in items for a in ("--set", item)]


def train_ae(data, out):
    assert cli.main(["train", "autoencoder", "--data", str(data), "--out", str(out), *sets(*AE_TINY)]) == 0
    return out


def train_dm(data, out, *items, autoencoder=None):
    argv = ["train", "diffusion", "--data", str(data), "--out", str(out), *sets(*TINY, *items)]
    return cli.main(argv + (["--autoencoder", str(autoencoder)] if autoencoder else []))
