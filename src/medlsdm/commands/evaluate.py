"""`medlsdm evaluate quality|segmentation|privacy|report`: how good and how safe synthetic data is.

Each sub-command writes its JSON and figures into --out and then rebuilds OUT/report.md and
OUT/report.html from every result found there, so the three can share one folder. --out must be
new, empty or written by an earlier `medlsdm evaluate` (``medlsdm.files.owned_output``), and must not
contain or lie inside an input folder; --overwrite allows a foreign folder (inputs are never deleted).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medlsdm.commands.dataset_options import add_dataset_options, dataset_source


def register(sub) -> None:
    ev = sub.add_parser("evaluate", help="evaluate synthetic volumes (quality, segmentation, privacy, report)",
                        description="Evaluate synthetic volumes against real ones; results go to "
                                    "--out as JSON plus report.md / report.html with pictures.")
    kinds = ev.add_subparsers(dest="evaluation", metavar="EVALUATION")
    kinds.required = True
    _quality_parser(kinds)
    _segmentation_parser(kinds)
    _privacy_parser(kinds)
    rep = kinds.add_parser("report", help="rebuild report.md / report.html from the results in a folder",
                           description="Assemble metrics.json, segmentation.json and privacy.json found "
                                       "in --dir into report.md and report.html.")
    rep.add_argument("--dir", required=True, help="folder written by the evaluate commands")
    rep.set_defaults(func=_run_report)


# Kept literal (not imported from evaluation.quality, which imports torch) so --help stays fast;
# evaluation.quality.resolve_metrics checks the names.
QUALITY_METRICS = ("ssim", "ms_ssim", "psnr", "rmse", "mae", "lpips", "fid2d", "fid3d", "fid3d_random", "mmd",
                   "diversity")


def _quality_parser(kinds) -> None:
    p = kinds.add_parser("quality", help="paired, distributional and diversity metrics",
                         description="Compare synthetic volumes with the real cases whose label maps "
                                     "generated them (synthetic files named CASE.nii.gz or "
                                     "CASE_sample<k>.nii.gz), and the two sets as distributions.")
    p.add_argument("--real", required=True, help="real volumes: a flat folder, a dataset root in any layout "
                                                 "`medlsdm prepare` reads, or a prepared dataset")
    p.add_argument("--synthetic", required=True, help="synthetic volumes (flat folder or images/)")
    p.add_argument("--labels", help="label maps named by case ID (for --mask foreground with a flat --real)")
    p.add_argument("--out", required=True, help="output folder (metrics.json, figures/, report)")
    _overwrite_option(p)
    p.add_argument("--metrics", help=f"comma-separated subset of {','.join(QUALITY_METRICS)}; default all, "
                                     f"skipping those whose weights are missing (named ones are required)")
    p.add_argument("--data-range", type=float, help="intensity range for SSIM/PSNR (default: each real "
                                                    "volume's max - min)")
    p.add_argument("--mask", choices=["foreground"], help="SSIM/PSNR/RMSE/MAE inside label > 0 only")
    p.add_argument("--ssim-window", type=int, default=7,
                   help="Gaussian SSIM window (default 7; 11 to compare with most published numbers)")
    p.add_argument("--inception", help="FID Inception weights (pt_inception-2015-12-05-6726825d.pth); "
                                       "default: the torch hub cache")
    p.add_argument("--medicalnet", help="MedicalNet ResNet checkpoint for 3D FID / MMD features")
    p.add_argument("--lpips-backbone", help="torchvision VGG16/AlexNet weights for LPIPS")
    p.add_argument("--lpips-heads", help="LPIPS v0.1 linear heads (vgg.pth / alex.pth)")
    p.add_argument("--lpips-net", choices=["vgg", "alex"], help="LPIPS backbone (default: both when found)")
    p.add_argument("--unpaired", action="store_true",
                   help="synthetic volumes of an unconditional model (no case IDs): distributions and "
                        "diversity only")
    p.add_argument("--fid-slices", type=int, default=32, help="slices per axis and volume for 2D FID (default 32)")
    p.add_argument("--device", default="cpu", help="torch device for feature networks (cpu, cuda, cuda:1)")
    add_dataset_options(p, "--real")
    p.set_defaults(func=_run_quality)


def _segmentation_parser(kinds) -> None:
    p = kinds.add_parser("segmentation", help="downstream segmentation test (domain gap, augmentation)",
                         description="Train a 3D U-Net on real training cases; test it on real test "
                                     "images and on synthetic images of the same test label maps; "
                                     "optionally train on real+synthetic and synthetic only.")
    p.add_argument("--train-real", required=True, help="real training cases (images/ + labels/, any layout "
                                                       "`medlsdm prepare` reads, or a prepared dataset)")
    p.add_argument("--test-real", required=True, help="real test cases (as --train-real; the same dataset "
                                                      "as --train-real: its test split, the rest for training)")
    p.add_argument("--synthetic", required=True, help="synthetic volumes named after their label map's case ID")
    p.add_argument("--synthetic-train", help="synthetic volumes for training (default: --synthetic); only "
                                             "those of non-test label maps are trained on")
    p.add_argument("--synthetic-labels", help="label maps of synthetic training volumes (default: the "
                                              "training label maps with the same case ID)")
    p.add_argument("--out", required=True, help="output folder (segmentation.json, figures/, report)")
    _overwrite_option(p)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="training steps per network (default 400; the same for every "
                                                  "network, so results are reproducible and comparable)")
    length.add_argument("--epochs", type=int, help="epochs per network instead (ceil(n_train / batch) steps each)")
    length.add_argument("--budget-minutes", type=float, help="total wall-clock training time instead, split among "
                                                             "networks (NOT reproducible: depends on the machine's load)")
    p.add_argument("--protocols", help="comma-separated subset of real,real+synthetic,synthetic,augmentation "
                                       "(default: the first three, those that can run)")
    p.add_argument("--augmentation-sizes", default="2,4,8,all",
                   help="numbers of real training cases for the augmentation study (default 2,4,8,all)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for the segmenter (fixed: results depend on it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patch", type=int, nargs=3, metavar=("D", "H", "W"),
                   help="training patch and sliding-window size (multiples of 8; default: volume size, at most 96)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    add_dataset_options(p, "--train-real and --test-real")
    p.set_defaults(func=_run_segmentation)


def _privacy_parser(kinds) -> None:
    p = kinds.add_parser("privacy", help="memorisation audit: are synthetic volumes copies of training ones?",
                         description="Flag synthetic volumes closer to a training volume than held-out real "
                                     "patients are. Label-conditioned samples (named CASE_sample<k> after the "
                                     "case of their label map) are compared by label-conditional residuals "
                                     "(what the map does not explain), so shared anatomy is not taken for "
                                     "copying; unconditional samples by nearest-neighbour image similarity.")
    p.add_argument("--train", required=True, help="training volumes (the generator's training set): a flat "
                                                  "folder, or a dataset (its training split)")
    p.add_argument("--held-out", help="real cases never trained on (images + label maps): calibrate the threshold")
    p.add_argument("--synthetic", required=True, help="synthetic volumes")
    p.add_argument("--mode", choices=["auto", "conditional", "nearest"], default="auto",
                   help="conditional: residual audit (needs --held-out and samples named after label-map cases); "
                        "nearest: image similarity; auto (default): conditional when possible")
    p.add_argument("--out", required=True, help="output folder (privacy.json, figures/, report)")
    _overwrite_option(p)
    p.add_argument("--similarity", choices=["ncc", "ssim"], default="ncc", help="nearest mode only")
    p.add_argument("--quantile", type=float, help="threshold = this quantile of the held-out (else real-to-real) "
                                                  "similarities (default: their maximum)")
    p.add_argument("--mask", choices=["foreground"], help="compare inside the training label maps' foreground")
    add_dataset_options(p, "--train")
    p.set_defaults(func=_run_privacy)


def _overwrite_option(p) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out not made by `medlsdm evaluate` (nothing is deleted)")


def _owned(args, *inputs):
    """--out claimed for `medlsdm evaluate` (checked, marked, locked) while the block runs."""
    from medlsdm.files import owned_output

    return owned_output(args.out, "evaluate", inputs=inputs, overwrite=args.overwrite)


def _finish(out) -> None:
    from medlsdm.evaluation.report import build_report

    md, html = build_report(out)
    print(f"report: {md} and {html}")


def _run_quality(args: argparse.Namespace) -> int:
    from medlsdm.evaluation.quality import evaluate_quality
    from medlsdm.evaluation.report import fmt

    with _owned(args, args.real, args.synthetic, args.labels):
        data = evaluate_quality(dataset_source(args.real, args), args.synthetic, args.out, labels=args.labels,
                                metrics=args.metrics, data_range=args.data_range, mask=args.mask,
                                inception=args.inception, medicalnet=args.medicalnet,
                                lpips_backbone=args.lpips_backbone, lpips_heads=args.lpips_heads,
                                lpips_net=args.lpips_net, device=args.device, fid_slices=args.fid_slices,
                                unpaired=args.unpaired, ssim_window=args.ssim_window)
    for name, s in data["paired"]["summary"].items():
        print(f"{name:10s} {fmt(s['mean'])} ± {fmt(s['std'])} (n={s['n']})")
    for name, reason in data["skipped"].items():
        print(f"skipped {name}: {reason}")
    _finish(args.out)
    return 0


def _run_segmentation(args: argparse.Namespace) -> int:
    from medlsdm.evaluation.report import fmt
    from medlsdm.evaluation.segmentation import evaluate_segmentation

    protocols = [p.strip() for p in args.protocols.split(",")] if args.protocols else None
    # One dataset for both: its test split is the test set, the other cases train.
    same = Path(args.train_real).resolve() == Path(args.test_real).resolve()
    train_real = dataset_source(args.train_real, args, ("train", "val") if same else None)
    test_real = dataset_source(args.test_real, args, ("test",) if same else None)
    sizes = [s.strip() for s in args.augmentation_sizes.split(",") if s.strip()]
    config = {"threads": args.threads, "augmentation_sizes": [s if s == "all" else _int(s, "--augmentation-sizes")
                                                              for s in sizes]}
    with _owned(args, args.train_real, args.test_real, args.synthetic, args.synthetic_train, args.synthetic_labels):
        data = evaluate_segmentation(train_real, test_real, args.synthetic, args.out,
                                     synthetic_labels=args.synthetic_labels, synthetic_train=args.synthetic_train,
                                     protocols=protocols, steps=args.steps, epochs=args.epochs,
                                     budget_minutes=args.budget_minutes, seed=args.seed, patch=args.patch,
                                     device=args.device, config=config)
    gap = data["domain_gap"]
    if gap:
        print(f"per-case mean Dice real {fmt(gap['dice_real'])}, synthetic {fmt(gap['dice_synthetic'])}, "
              f"ratio {fmt(gap['ratio'])}")
    for name, res in data["protocols"].items():
        print(f"trained on {name}: per-case mean Dice on real test images {_with_ci(res['tests']['real']['case_mean'])}"
              f" (pooled {fmt(res['tests']['real']['mean']['dice'])})")
    for row in (data.get("augmentation") or {}).get("rows", []):
        what = f"{row['n_real']} real" + (" + synthetic" if row["synthetic"] else "") if row["n_real"] else "synthetic only"
        print(f"augmentation, {what}: {_with_ci(row['case_mean'])}")
    _finish(args.out)
    return 0


def _int(text: str, option: str) -> int:
    from medlsdm.errors import MedlsdmError

    try:
        return int(text)
    except ValueError:
        raise MedlsdmError(f"{option}: {text!r} is not a whole number or 'all'") from None


def _with_ci(summary: dict) -> str:
    from medlsdm.evaluation.report import fmt

    return f"{fmt(summary['mean'])} [{fmt(summary['ci_low'], 3)}, {fmt(summary['ci_high'], 3)}] (n={summary['n']})"


def _run_privacy(args: argparse.Namespace) -> int:
    from medlsdm.evaluation.audit import audit_folders
    from medlsdm.evaluation.report import fmt

    with _owned(args, args.train, args.synthetic, args.held_out):
        result = audit_folders(dataset_source(args.train, args, ("train",)), args.synthetic, args.out,
                               held_out=args.held_out, mode=args.mode, similarity=args.similarity,
                               quantile=args.quantile, mask=args.mask)
    print(f"{result['mode']} audit: {result['n_flagged']} of {result['n_synthetic']} synthetic volumes flagged "
          f"(threshold {fmt(result['threshold'])}, {result['threshold_rule']}; held-out baseline rate "
          f"{fmt(result.get('baseline_rate'))})")
    _finish(args.out)
    return 0


def _run_report(args: argparse.Namespace) -> int:
    _finish(args.dir)
    return 0
