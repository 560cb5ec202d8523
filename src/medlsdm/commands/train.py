"""`medlsdm train autoencoder|diffusion`: train (or resume) one stage into a run directory;
`medlsdm train attach-decoder`: give a trained diffusion run a decoder trained on its frozen encoder."""

from __future__ import annotations

import argparse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="prepared dataset directory (from `medlsdm prepare`)")
    p.add_argument("--out", required=True, help="run directory; re-running the same command resumes from its last checkpoint")
    p.add_argument("--config", help="preset name (e.g. demo, brats) or YAML file; its stage section is used")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set trainer.max_steps=5000 (repeatable)")
    p.add_argument("--overwrite", action="store_true",
                   help="train into an existing folder that training did not create (inputs are never replaced)")


def register(sub) -> None:
    train = sub.add_parser("train", help="train a stage (autoencoder, diffusion)",
                           description="Train one stage of the pipeline into a run directory.")
    stages = train.add_subparsers(dest="stage", metavar="STAGE")
    stages.required = True

    ae = stages.add_parser(
        "autoencoder", help="stage 1: 3D VQ-GAN (optionally SPADE decoder)",
        description="Train the 3D VQ-GAN of stage 1 on a prepared dataset. The run directory gets "
                    "config.yaml, checkpoints/ (last.ckpt, best.ckpt), logs/ (TensorBoard), previews/ and "
                    "autoencoder.safetensors + autoencoder.json. Re-running the same command resumes; "
                    "trainer.max_steps, trainer.max_minutes, trainer.precision and the hardware may change.")
    _common(ae)
    ae.set_defaults(func=_run_autoencoder)

    dm = stages.add_parser(
        "diffusion", help="stage 2: latent semantic diffusion (or the Med-DDPM / unconditional baselines)",
        description="Train the diffusion model of stage 2. Latent models (configs lsdm, ldm-uncond) need "
                    "--autoencoder, a stage-1 run directory; the pixel-space Med-DDPM baseline (config "
                    "med-ddpm) takes none. The run directory gets diffusion.safetensors + diffusion.json "
                    "(EMA weights) and a copy of the autoencoder, so `medlsdm sample --model RUN_DIR` needs "
                    "nothing else. Re-running the same command resumes.")
    _common(dm)
    dm.add_argument("--autoencoder", help="stage-1 run directory (latent models only)")
    dm.set_defaults(func=_run_diffusion)

    attach = stages.add_parser(
        "attach-decoder", help="swap a decoder trained on the frozen encoder into a diffusion run",
        description="Copy an autoencoder whose encoder and codebook are those of a latent diffusion run "
                    "(trained with --set init.from=AE_RUN --set init.freeze_encoder=true, e.g. a SPADE "
                    "decoder) into that run: the latents, and so the trained denoiser, stay valid. "
                    "Refused when the encoder or codebook differ.")
    attach.add_argument("--model", required=True, help="latent diffusion run directory")
    attach.add_argument("--autoencoder", required=True, help="the stage-1 run with the new decoder")
    attach.set_defaults(func=_run_attach)


def _quiet_lightning_duplicates() -> None:
    # Lightning prints through its own handler; propagating to the root handler set up by the
    # CLI would print each of its messages twice.
    import logging

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).propagate = False


def _run_autoencoder(args) -> int:
    from medlsdm.training.autoencoder import train_autoencoder

    _quiet_lightning_duplicates()

    weights = train_autoencoder(args.data, args.out, args.config, args.overrides, overwrite=args.overwrite)
    print(f"autoencoder weights: {weights}")
    return 0


def _run_diffusion(args) -> int:
    from medlsdm.training.diffusion import train_diffusion

    _quiet_lightning_duplicates()
    weights = train_diffusion(args.data, args.out, args.autoencoder, args.config, args.overrides,
                              overwrite=args.overwrite)
    print(f"diffusion weights: {weights}")
    return 0


def _run_attach(args) -> int:
    from medlsdm.training.export import attach_decoder

    print(f"autoencoder of {args.model}: {attach_decoder(args.model, args.autoencoder)}")
    return 0
