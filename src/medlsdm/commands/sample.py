"""`medlsdm sample`: generate volumes from label maps with a trained diffusion model."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "sample", help="generate volumes from label maps with a trained model",
        description=("Generate synthetic volumes. Label maps are read in their original files on any grid, "
                     "mapped onto the model's classes, resampled to the voxel size the model was trained at, and "
                     "generated on a window that covers the whole labelled foreground; every output is written "
                     "back on the label map's own grid and affine, as <case ID>_sample<k>.nii.gz plus a PNG "
                     "preview, and sampling_report.json says what was done to each map."))
    p.add_argument("--model", required=True, help="diffusion run directory (or its diffusion.safetensors)")
    p.add_argument("--labels", help="a label map file, a folder of them, or a dataset root in any layout `prepare` "
                                    "reads (not for unconditional models)")
    p.add_argument("--layout", default="auto",
                   help="layout of a dataset root given as --labels (auto, generic, nnunet, brats, autopet, ...)")
    p.add_argument("--label-map", metavar="OLD=NEW,...|FILE",
                   help="map another label scheme's values onto the model's classes (e.g. 4=3,5=1, or a "
                        "JSON/YAML file {old: new}); values not listed keep their value")
    p.add_argument("--crop", action="store_true",
                   help="keep the training window even where the labelled foreground is larger (it is cut, "
                        "with a warning); default: a larger window that covers it")
    p.add_argument("--tile", action="store_true",
                   help="generate windows larger than the training window in overlapping tiles of it, "
                        "blended at every step (default: the whole window at once)")
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
    p.add_argument("--appearance", default="auto", metavar="auto|none|sample|noise=N,contrast=C,bias=B",
                   help="noise level, tissue contrast and bias field of each sample: auto (default) = a training "
                        "scan's, drawn with the seed, when the model has an appearance profile; none = the "
                        "decoder's output as it is; or given values (statistics as in medlsdm.data.appearance)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed and batch size: same output)")
    p.add_argument("--batch-size", type=int, default=1, help="samples generated together")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    p.add_argument("--save-trajectory", action="store_true", help="also write the progressive denoising as a GIF")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing folder that `sample` did not create (inputs are never replaced)")
    p.set_defaults(func=_run)


def parse_appearance(text: str) -> str | dict:
    """'auto' | 'none' | 'sample' as given; 'noise=0.02,contrast=0.3,bias=0.05' as a dict."""
    from medlsdm.errors import MedlsdmError

    if "=" not in text:
        return text
    values = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        try:
            values[key.strip()] = float(value)
        except ValueError:
            raise MedlsdmError(f"--appearance {text!r}: {part!r} is not NAME=NUMBER") from None
    return values


def _run(args) -> int:
    from medlsdm.inference import sample_to_files

    written = sample_to_files(args.model, args.labels, args.out, n=args.n, sampler=args.sampler, steps=args.steps,
                              guidance=args.guidance, eta=args.eta, seed=args.seed, batch_size=args.batch_size,
                              device=args.device, save_trajectory=args.save_trajectory, clip_x0=args.clip_x0,
                              layout=args.layout, label_map=args.label_map, crop=args.crop, tile=args.tile,
                              overwrite=args.overwrite, appearance=parse_appearance(args.appearance))
    print(f"{len(written)} volumes written to {args.out}")
    return 0
