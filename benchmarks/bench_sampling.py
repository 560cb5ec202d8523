"""Sampler speed and quality on a trained model: DDPM over all steps against DDIM, DPM-Solver++
and respaced ancestral DDPM at 10/25/50 steps, DDIM-25 with eta 0.5 and 1, and guidance scales,
on held-out cases of a prepared dataset.

Quality is measured on the prepared grid against the paired real image (the case whose label
map conditioned the sample): PSNR and 3D SSIM with data range 2 ([-1, 1]). Medians over cases.

    .venv/bin/python benchmarks/bench_sampling.py --model RUN_DIR --data PREPARED [--cases 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch

from medlsdm.data.dataset import PreparedDataset
from medlsdm.evaluation.metrics import psnr, ssim3d
from medlsdm.inference import load_model, synthesize, x0_clip


def run(model, cases, sampler, steps, guidance, seed=0, eta=0.0, clip=None):
    times, psnrs, ssims = [], [], []
    for i, case in enumerate(cases):
        label = case["label"][0].numpy()
        start = time.perf_counter()
        x = synthesize(model, label, n=1, sampler=sampler, steps=steps, guidance=guidance, seed=seed + i, eta=eta,
                       progress=False, clip_x0=clip)[0].numpy()
        times.append(time.perf_counter() - start)
        real = case["image"].numpy()
        psnrs.append(psnr(x, real, data_range=2.0))
        ssims.append(ssim3d(x, real, data_range=2.0))
    return {"sampler": sampler if sampler != "ddim" or not eta else f"ddim eta={eta:g}",
            "steps": steps or model.schedule.T, "guidance": guidance, "clip_x0": x0_clip(model, clip),
            "seconds_per_volume": statistics.median(times), "psnr": statistics.median(psnrs),
            "ssim": statistics.median(ssims)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--cases", type=int, default=2)
    ap.add_argument("--skip-ddpm", action="store_true")
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (no more than free cores)")
    ap.add_argument("--only", help="comma list of SAMPLER[:STEPS] to run instead of the default grid")
    ap.add_argument("--clip-x0", type=lambda t: [float(v) for v in t.split(",")],
                    help="with --only: comma list of x0 bounds to sweep (default: the model's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as the medlsdm command does
    model = load_model(args.model)
    data = PreparedDataset(args.data, split=args.split)
    cases = [data[i] for i in range(min(args.cases, len(data)))]
    default_w = model.sidecar["sampling"].get("guidance", 1.0)
    rows = []

    def add(*row, **kwargs):
        rows.append(run(model, cases, *row, **kwargs))
        print(json.dumps(rows[-1]), flush=True)

    if args.only:          # e.g. --only ddpm:500,ddim:25 --clip-x0 10,3,2: a grid of samplers x bounds
        for clip in args.clip_x0 or [None]:
            for item in args.only.split(","):
                sampler, _, steps = item.partition(":")
                add(sampler, int(steps) if steps else None, default_w, clip=clip)
    else:
        if not args.skip_ddpm:
            add("ddpm", None, default_w)
        for sampler in ("ddim", "dpm++", "ddpm"):     # ddpm with steps: ancestral on the respaced schedule
            for steps in (10, 25, 50):
                add(sampler, steps, default_w)
        for eta in (0.5, 1.0):
            add("ddim", 25, default_w, eta=eta)
        for w in (0.0, 1.0, 1.5, 3.0):
            add("ddim", 25, w)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; commit {commit}; cases: {len(cases)} ({args.split})")
    print("| sampler | steps | guidance w | clip x0 | s / volume | PSNR (dB) | SSIM |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sampler']} | {r['steps']} | {r['guidance']} | {r['clip_x0']:.3g} | "
              f"{r['seconds_per_volume']:.1f} | {r['psnr']:.2f} | {r['ssim']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
