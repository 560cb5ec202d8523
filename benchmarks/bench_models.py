"""Med-LSDM and the two baselines side by side on the demo cohort: generation time, paired
quality (SSIM, PSNR, MS-SSIM, LPIPS-VGG), distributions (2D FID, 3D FID on the random 3D CNN,
MMD), diversity, downstream segmentation Dice and the copy audit.

Every model generates from the held-out label maps of the cohort (unconditional models generate
as many volumes, unpaired); one segmentation network, trained once on the real training cases
(seeded, a fixed number of epochs), scores the real test images and each model's synthetic
images against the test label maps, so the Dice ratios share one yardstick. Paired metrics
compare each sample with the real image of its label map; distribution metrics compare all
samples with the cohort's real subjects (training and held-out). The copy audit
(evaluation/copying.py) calibrates on the held-out real cases; for an unconditional model it is
the nearest-neighbour test with a held-out baseline. Each model's full evaluation (metrics.json,
segmentation-free report with figures, privacy.json) lands in OUT/<name>/evaluation.

    .venv/bin/python benchmarks/bench_models.py --cohort COHORT --out OUT \\
        --model lsdm=RUN_DIR --model med-ddpm=RUN_DIR --model ldm-uncond=RUN_DIR \\
        [--sampling lsdm=ddim:25:1.5] [--n 2] [--seg-epochs 60] [--weights ../shared/weights]

--weights: a folder with the real LPIPS (VGG16 backbone, v0.1 heads) and FID Inception files
(vgg16-features.pth, lpips-v0.1-vgg-heads.pth, inception-2015-12-05-torchscript.pt; hash-checked
on loading); without it LPIPS and 2D FID are left out.
--appearance: the acquisition-appearance post-process of `medlsdm sample` (noise, contrast, bias
field of a training scan; models trained since appearance profiles exist have one). Default none:
the models themselves are compared (the shipped demo model has no profile; on the 400-step
Med-DDPM "auto" cost 6 dB PSNR).

(COHORT: `medlsdm demo-data --out COHORT`; the runs: see benchmarks/models.md.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from medlsdm.evaluation.audit import audit_folders
from medlsdm.evaluation.pairing import scan_folder
from medlsdm.evaluation.quality import evaluate_quality
from medlsdm.evaluation.report import build_report
from medlsdm.evaluation.segmentation import (load_real_cases, load_synthetic_test_cases,
                                             score, train_segmenter)
from medlsdm.inference import load_model, sample_to_files


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"{what} {item!r}: expected NAME=VALUE")
        name, value = item.split("=", 1)
        out[name] = value
    return out


def segmenter(cohort: Path, epochs: int, seed: int):
    train = load_real_cases(scan_folder(cohort / "images", "real training cases", cohort / "labels"))
    test = load_real_cases(scan_folder(cohort / "imagesTs", "real test cases", cohort / "labelsTs"))
    num_classes = max(int(c.label.max()) for c in train + test) + 1
    patch = tuple(int(s) for s in train[0].image.shape[1:])
    net, info = train_segmenter(train, num_classes, patch, epochs=epochs, seed=seed, progress=True,
                                desc="segmentation [real]")
    return net, info, num_classes, patch, score(net, test, num_classes, patch)


def weights_options(folder: Path | None, fid_slices: int) -> dict:
    """evaluate_quality's metrics and weight files: LPIPS-VGG and 2D FID only with real weights."""
    metrics = ["ssim", "ms_ssim", "psnr", "fid3d_random", "mmd", "diversity"]
    if folder is None:
        return {"metrics": metrics}
    return {"metrics": metrics + ["lpips", "fid2d"], "lpips_net": "vgg", "fid_slices": fid_slices,
            "lpips_backbone": folder / "vgg16-features.pth", "lpips_heads": folder / "lpips-v0.1-vgg-heads.pth",
            "inception": folder / "inception-2015-12-05-torchscript.pt"}


def real_views(cohort: Path, out: Path) -> dict[str, Path]:
    """Generic-layout views (images/, labels/ of symlinks) of the cohort's training, held-out and
    all real cases."""
    parts = {"train": [("images", "labels")], "held_out": [("imagesTs", "labelsTs")],
             "all": [("images", "labels"), ("imagesTs", "labelsTs")]}
    views = {}
    for key, pairs in parts.items():
        folder = out / "real" / key
        for images, labels in pairs:
            for src, dst in ((images, "images"), (labels, "labels")):
                (folder / dst).mkdir(parents=True, exist_ok=True)
                for f in sorted((cohort / src).glob("*.nii.gz")):
                    if not (folder / dst / f.name).exists():
                        os.symlink(f.resolve(), folder / dst / f.name)
        views[key] = folder
    return views


def evaluate_model(name: str, run_dir: str, sampling: str | None, cohort: Path, out: Path, n: int, seed: int,
                   seg, quality_options: dict, views: dict[str, Path], appearance: str = "none") -> dict:
    net, _, num_classes, patch, real_score = seg
    model = load_model(run_dir, "cpu")
    sampler, steps, guidance = None, None, None
    if sampling:                                   # SAMPLER[:STEPS[:GUIDANCE]]
        parts = sampling.split(":")
        sampler = parts[0]
        steps = int(parts[1]) if len(parts) > 1 and parts[1] else None
        guidance = float(parts[2]) if len(parts) > 2 else None
    synthetic = out / name / "synthetic"
    labels = cohort / "labelsTs"
    n_test = len(list(labels.glob("*.nii.gz")))
    start, cpu_start = time.perf_counter(), time.process_time()
    if model.conditional:
        written = sample_to_files(run_dir, labels, synthetic, n=n, sampler=sampler, steps=steps, guidance=guidance,
                                  seed=seed, appearance=appearance)
    else:
        written = sample_to_files(run_dir, None, synthetic, n=n * n_test, sampler=sampler, steps=steps, seed=seed)
    seconds = (time.perf_counter() - start) / len(written)
    cpu_seconds = (time.process_time() - cpu_start) / len(written)
    scfg = model.sidecar.get("sampling", {})
    evaluation = out / name / "evaluation"
    # paired metrics against each map's own real image; distributions against all 24 real subjects
    quality = evaluate_quality(views["all"], synthetic, evaluation, progress=False,
                               unpaired=not model.conditional, **quality_options)
    privacy = audit_folders(views["train"], synthetic, evaluation, held_out=views["held_out"], progress=False)
    build_report(evaluation)
    paired, dist = quality["paired"]["summary"], quality["distribution"]
    row = {
        "model": name, "run": run_dir, "kind": model.sidecar["denoiser"].get("kind"),
        "space": model.sidecar.get("space"),
        "sampler": sampler or scfg.get("sampler"), "steps": steps or (model.schedule.T if (sampler or scfg.get("sampler")) == "ddpm"
                           else scfg.get("steps") or model.schedule.T),
        "guidance": (guidance or scfg.get("guidance", 1.0)) if model.conditional else None,
        "training_steps": model.sidecar.get("steps"),
        "appearance": appearance if model.conditional else None,
        "seconds_per_volume": seconds, "cpu_seconds_per_volume": cpu_seconds, "n_volumes": len(written),
        "ssim": paired.get("ssim", {}).get("mean"), "psnr": paired.get("psnr", {}).get("mean"),
        "ms_ssim": paired.get("ms_ssim", {}).get("mean"), "lpips_vgg": paired.get("lpips_vgg", {}).get("mean"),
        "fid2d": dist.get("fid2d", {}).get("mean"),  # mean over the D, H, W slice axes
        "fid2d_per_axis": dist.get("fid2d", {}).get("per_axis"), "fid3d_random": dist.get("fid3d_random", {}).get("value"),
        "n_real_distribution": dist.get("n_real"),
        "mmd": dist.get("mmd"), "diversity": quality.get("diversity"),
        "privacy_mode": privacy.get("mode"), "privacy_flagged": privacy.get("fraction_flagged"),
        "privacy_n_flagged": sum(bool(p.get("flagged")) for p in privacy.get("pairs", [])),
        "dice_synthetic": None, "dice_ratio": None,
    }
    if model.conditional and net is not None:
        syn_score = score(net, load_synthetic_test_cases(synthetic, cohort / "imagesTs", labels), num_classes, patch)
        d_real, d_syn = real_score["mean"]["dice"], syn_score["mean"]["dice"]
        row.update(dice_synthetic=d_syn, dice_ratio=d_syn / d_real if d_real else None,
                   dice_synthetic_per_class={c: s["dice"] for c, s in syn_score["per_class"].items()})
    return row


def _fmt(value, digits=3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model", action="append", required=True, help="NAME=RUN_DIR (repeat)")
    parser.add_argument("--sampling", action="append", default=[], help="NAME=SAMPLER[:STEPS[:GUIDANCE]] (default: the model's)")
    parser.add_argument("--n", type=int, default=2, help="samples per test label map (2: diversity is measured)")
    parser.add_argument("--seg-epochs", type=int, default=60, help="0: no segmentation test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", type=Path, help="folder with the real LPIPS and Inception files (../shared/weights)")
    parser.add_argument("--appearance", default="none", choices=["none", "auto"],
                        help="sample's appearance post-process (default none: the models themselves)")
    parser.add_argument("--fid-slices", type=int, default=8, help="slices per axis (D, H, W) and volume for 2D FID")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    models, sampling = _pairs(args.model, "--model"), _pairs(args.sampling, "--sampling")

    start = time.perf_counter()
    # --seg-epochs 0: no downstream segmentation (e.g. a run of unconditional models only)
    seg = segmenter(args.cohort, args.seg_epochs, args.seed) if args.seg_epochs > 0 else (None,) * 5
    net_info, real_score = seg[1], seg[4]
    options, views = weights_options(args.weights, args.fid_slices), real_views(args.cohort, args.out)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"machine": f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}",
              "commit": commit, "segmenter": net_info,
              "dice_real": real_score["mean"]["dice"] if real_score else None,
              "dice_real_per_class": {c: s["dice"] for c, s in real_score["per_class"].items()} if real_score else None,
              "models": [], "minutes": None}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, run in models.items():  # results.json after each model: a late failure keeps the others
        result["models"].append(evaluate_model(name, run, sampling.get(name), args.cohort, args.out, args.n, args.seed,
                                               seg, options, views, args.appearance))
        result["minutes"] = (time.perf_counter() - start) / 60
        (args.out / "results.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    rows = result["models"]
    print(f"machine: {result['machine']}; commit {commit}; " + (
        f"segmenter: {net_info['steps']} steps, Dice on real test images {result['dice_real']:.3f}"
        if net_info else "no segmentation test"))
    print("| model | training steps | sampler | steps | w | s / volume (CPU) | SSIM | PSNR (dB) | MS-SSIM | LPIPS-VGG | "
          "2D FID | 3D FID (random 3D CNN) | MMD² | diversity | Dice synthetic | Dice ratio | flagged (copy audit) |")
    print("|---" * 17 + "|")
    for r in rows:
        mmd = r["mmd"].get("value") if isinstance(r["mmd"], dict) else r["mmd"]
        div = r["diversity"].get("synthetic_mean") if isinstance(r["diversity"], dict) else r["diversity"]
        print(f"| {r['model']} | {r['training_steps']} | {r['sampler']} | {r['steps']} | {_fmt(r['guidance'], 1)} | "
              f"{_fmt(r['cpu_seconds_per_volume'], 1)} | {_fmt(r['ssim'])} | {_fmt(r['psnr'], 2)} | {_fmt(r['ms_ssim'])} | "
              f"{_fmt(r['lpips_vgg'])} | {_fmt(r['fid2d'], 1)} | {_fmt(r['fid3d_random'], 4)} | {_fmt(mmd, 4)} | "
              f"{_fmt(div)} | {_fmt(r['dice_synthetic'])} | {_fmt(r['dice_ratio'])} | "
              f"{r['privacy_n_flagged']} / {r['n_volumes']} ({r['privacy_mode']}) |")


if __name__ == "__main__":
    main()
