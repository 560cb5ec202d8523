"""`medlsdm sample`: generate volumes from label maps with a trained diffusion model."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "sample", help="generate volumes from label maps with a trained model",
        description=("Generate synthetic volumes. Label maps are read in their original files on any grid, "
                     "prepared with the model's stored preprocessing, and every output is written back on the "
                     "label map's own grid and affine, as <label stem>_sample<k>.nii.gz plus a PNG preview."))
    p.add_argument("--model", required=True, help="diffusion run directory (or its diffusion.safetensors)")
    p.add_argument("--labels", help="a label map file or a folder of them (not for unconditional models)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=1, help="samples per label map (unconditional: samples in all)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++"], help="default: the model's (ddim)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's; ddpm: all T steps)")
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance scale w (1 = conditional only, 0 = unconditional; "
                        "the Med-LSDM reference's 1.5 equals w = 2.5)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0 = deterministic)")
    p.add_argument("--clip-x0", type=float,
                   help="bound for the x0 estimates while sampling, in the model's units (std-scaled latents: "
                        "standard deviations; default: the model's sampling.clip_x0, else the training range)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed and batch size: same output)")
    p.add_argument("--batch-size", type=int, default=1, help="samples generated together")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    p.add_argument("--save-trajectory", action="store_true", help="also write the progressive denoising as a GIF")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from medlsdm.generate import sample_to_files

    written = sample_to_files(args.model, args.labels, args.out, n=args.n, sampler=args.sampler, steps=args.steps,
                              guidance=args.guidance, eta=args.eta, seed=args.seed, batch_size=args.batch_size,
                              device=args.device, save_trajectory=args.save_trajectory, clip_x0=args.clip_x0)
    print(f"{len(written)} volumes written to {args.out}")
    return 0
