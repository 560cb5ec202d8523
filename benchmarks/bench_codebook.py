"""Does the codebook settle? Stage-1 steps at the published codebook size (16,384 codes, 8-dim)
on real data, for two source trees side by side: per step, how many codes were restarted, the
fraction of the codebook used by the last 50 steps' batches, and the batch's code perplexity; at the end, held-out
reconstruction L1 / PSNR through the codebook.

The step is the generator's L1 + commitment update (no LPIPS or discriminators: the codebook's
behaviour does not depend on them), batch 1, random 32^3 patches of the prepared training cases
(8^3 = 512 latent vectors per step, so N / K = 0.03), the same seed and patch order for both
trees; one process per tree.

    medlsdm demo-data --out COHORT && medlsdm prepare COHORT --out PREPARED --config demo
    mkdir -p "$BEFORE" && git archive 5f4b235 src | tar -x -C "$BEFORE"
    python benchmarks/bench_codebook.py --data PREPARED --before "$BEFORE"/src --steps 1000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

AFTER = str(Path(__file__).resolve().parents[1] / "src")


def worker(data: Path, steps: int, patch: int, seed: int) -> dict:
    import numpy as np
    import torch

    from medlsdm.models.autoencoder import VQGAN

    torch.manual_seed(seed)
    manifest = json.loads((data / "manifest.json").read_text())
    cases = {split: [np.load(data / c["image"]).astype(np.float32) for c in manifest["cases"] if c["split"] == split]
             for split in ("train", "val")}
    import inspect

    # The same decoder in both trees (transposed convolutions, the older tree's only kind), so
    # that only the codebook differs.
    same_decoder = {"upsample": "transposed"} if "upsample" in inspect.signature(VQGAN).parameters else {}
    model = VQGAN(in_channels=1, channels=(16, 32, 64), num_res_blocks=(1, 2), downsample=(4, 4, 4),
                  latent_channels=8, num_codes=16384, **same_decoder)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4, betas=(0.5, 0.9))
    q = model.quantizer
    rng = np.random.default_rng(seed)
    log, recent = [], []
    for step in range(steps):
        image = cases["train"][rng.integers(len(cases["train"]))]
        if image.ndim == 3:
            image = image[None]
        start = [int(rng.integers(0, s - patch + 1)) for s in image.shape[1:]]
        x = torch.from_numpy(image[:, start[0]:start[0] + patch, start[1]:start[1] + patch,
                                   start[2]:start[2] + patch].copy())[None]
        model.train()
        rec, vq_loss, info = model(x)
        loss = 4.0 * (rec - x).abs().mean() + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        # The older quantiser reports no restarts; it resets a restarted code's count to exactly 1.
        restarts = int(info["restarts"]) if "restarts" in info else int((q.cluster_size == 1.0).sum())
        recent.append(info["indices"].flatten())
        del recent[:-50]
        log.append({"step": step + 1, "restarts": restarts,
                    "used_last_50": int(torch.unique(torch.cat(recent)).numel()),
                    "perplexity": float(info["perplexity"]), "l1": float((rec - x).abs().mean())})
    model.eval()
    l1s, psnrs = [], []
    with torch.no_grad():
        for image in cases["val"]:
            x = torch.from_numpy(image if image.ndim == 4 else image[None])[None]
            rec = model(x)[0]
            l1s.append(float((rec - x).abs().mean()))
            psnrs.append(float(10 * torch.log10(4.0 / ((rec - x) ** 2).mean())))
    return {"log": log, "val_l1": float(np.mean(l1s)), "val_psnr": float(np.mean(psnrs))}


def summary(result: dict, window: int = 50) -> dict:
    log = result["log"]
    tail = log[-window:]
    mean = lambda key, rows: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    return {"restarts/step (first 10 after init)": mean("restarts", log[1:11]),
            "restarts/step, most in one step after the first 10": max(r["restarts"] for r in log[10:]),
            "steps with restarts after the first 10": sum(1 for r in log[10:] if r["restarts"]),
            f"restarts/step (last {window})": mean("restarts", tail),
            "codes used by the last 50 batches": log[-1]["used_last_50"],
            f"perplexity (last {window})": mean("perplexity", tail),
            f"train L1 (last {window})": mean("l1", tail),
            "held-out L1": result["val_l1"], "held-out PSNR (dB)": result["val_psnr"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a prepared demo cohort")
    parser.add_argument("--before", help="src folder of the older tree")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the per-step logs here (JSON)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch
        torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.data, args.steps, args.patch, args.seed)))
        return
    trees = ([("before", args.before)] if args.before else []) + [("after", AFTER)]
    results = {}
    for name, src in trees:
        env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, __file__, "--worker", "--data", str(args.data), "--steps", str(args.steps),
               "--patch", str(args.patch), "--seed", str(args.seed), "--threads", str(args.threads)]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, encoding="utf-8")
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    rows = {name: summary(r) for name, r in results.items()}
    keys = list(next(iter(rows.values())))
    print("| | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    for key in keys:
        print(f"| {key} | " + " | ".join(f"{rows[n][key]:.4g}" for n in rows) + " |")
    if args.out:
        args.out.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
