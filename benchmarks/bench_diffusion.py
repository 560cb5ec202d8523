"""Stage-2 cost: train-step time and peak memory of the denoisers at their preset sizes, and the
time of one sampling step with and without classifier-free guidance.

Configurations (batch 1, random weights, random data):
- ``latent``: the Med-LSDM semantic denoiser of the `lsdm` preset (pseudo-3D U-Net, base 64,
  multipliers 1/2/4/8, attention at levels 2 and 3, label encoder 32 channels, SPADE 128) on an
  8 x 16^3 latent of a 64^3 image (autoencoder downsampling [4, 4, 4]), conditioned on a 64^3
  4-class label map.
- ``pixel``: the Med-DDPM concat U-Net of the `med-ddpm` preset (full 3D, base 64, multipliers
  1/1/2/3/4, attention at levels 3 and 4, gradient checkpointing) on a 64^3 image.
- ``sample``: one sampling step of the latent model: one denoiser pass (guidance w = 1), and
  guided (w = 2.5: the conditional and null passes as one forward on a doubled batch).

A train step is what `DiffusionModule.training_step` does plus the optimiser: the objective
(`diffusion_loss`: random t, noise, condition dropout 0.1, L1 on epsilon), backward, gradient
clipping at 1, AdamW step; outside Lightning (its per-step overhead is negligible here).
Each configuration runs in its own process, so peak memory belongs to it alone: the resident
set size on CPU (``ru_maxrss``, includes ~0.5 GB of Python/torch), ``max_memory_allocated`` on
CUDA. Medians over the timed steps after warm-up steps.

    .venv/bin/python benchmarks/bench_diffusion.py                       # all three, CPU
    .venv/bin/python benchmarks/bench_diffusion.py --only latent sample --steps 5
    .venv/bin/python benchmarks/bench_diffusion.py --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

IMAGE = (64, 64, 64)
NUM_CLASSES = 4


def _preset_model(name: str, in_channels: int, downsample) -> "object":
    import copy

    from medlsdm.config import load_preset, merge
    from medlsdm.training.diffusion import DiffusionModule, _defaults

    cfg = merge(_defaults(), copy.deepcopy(load_preset(name)["diffusion"]))
    table = {str(k): f"class{k}" for k in range(NUM_CLASSES)}
    scaler = {"mode": "std", "mean": [0.0] * in_channels, "std": [1.0] * in_channels, "bound": 5.0}
    return DiffusionModule(cfg, in_channels=in_channels, label_table=table, latent_downsample=downsample,
                           scaler_state=scaler if cfg["space"] == "latent" else None)


def _label(device):
    """A blocky label map: 4 classes in 16^3 blocks (the label encoder sees real structure)."""
    import torch

    from medlsdm.data.labels import one_hot

    blocks = torch.randint(0, NUM_CLASSES, (1, 1, 4, 4, 4), generator=torch.Generator().manual_seed(0))
    label = blocks.repeat_interleave(16, 2).repeat_interleave(16, 3).repeat_interleave(16, 4)
    return one_hot(label, NUM_CLASSES).to(device)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _one(which: str, steps: int, warmup: int, threads: int, device: str, precision: str) -> dict:
    """Runs in the worker process."""
    import resource

    import torch

    from medlsdm.diffusion.guidance import guided_model
    from medlsdm.diffusion.objective import diffusion_loss

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    device = torch.device(device)
    latent = which in ("latent", "sample")
    module = _preset_model("lsdm" if latent else "med-ddpm", 8 if latent else 1, (4, 4, 4) if latent else (1, 1, 1))
    denoiser = module.denoiser.to(device)
    x_shape = (1, 8, 16, 16, 16) if latent else (1, 1, *IMAGE)
    x0 = torch.randn(x_shape, device=device)
    cond = _label(device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    if which == "sample":
        denoiser.eval()
        times = {}
        for w in (1.0, 2.5):
            fn = guided_model(denoiser, w, batched=True)
            t = torch.full((1,), 250, device=device, dtype=torch.long)
            measured = []
            with torch.no_grad(), autocast():
                for i in range(warmup + steps):
                    _sync(device)
                    start = time.perf_counter()
                    fn(x0, t, cond)
                    _sync(device)
                    if i >= warmup:
                        measured.append(time.perf_counter() - start)
            times[w] = measured
        step_times = None
    else:
        opt = torch.optim.AdamW(denoiser.parameters(), lr=1e-5)
        measured = []
        for i in range(warmup + steps):
            _sync(device)
            start = time.perf_counter()
            with autocast():
                loss = diffusion_loss(denoiser, x0, cond, module.schedule, cond_drop_prob=0.1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if i >= warmup:
                measured.append(time.perf_counter() - start)
        step_times = measured
    peak = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)   # KiB on Linux
    out = {"which": which, "device": str(device), "precision": precision, "peak_memory_gb": round(peak, 2),
           "params_m": round(sum(p.numel() for p in denoiser.parameters()) / 1e6, 2),
           "input": "x".join(map(str, x_shape[1:]))}
    if step_times is not None:
        out.update(median_s=statistics.median(step_times), min_s=min(step_times), max_s=max(step_times),
                   steps=len(step_times))
    else:
        out.update({"median_s_w1": statistics.median(times[1.0]), "median_s_w2.5": statistics.median(times[2.5]),
                    "steps": len(times[1.0])})
    return out


def _run_worker(which, args) -> dict:
    argv = [sys.executable, __file__, "--worker", which, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--threads", str(args.threads), "--device", args.device, "--precision", args.precision]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"which": which, "error": f"over {args.timeout} s"}
    if proc.returncode != 0:
        return {"which": which, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows) -> str:
    lines = ["| configuration | input | params (M) | median (s) | min–max (s) | steps | peak memory (GB) |",
             "|---|---|---|---|---|---|---|"]
    names = {"latent": "Med-LSDM latent denoiser, train step", "pixel": "Med-DDPM pixel 64³, train step"}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['which']} | | | {r['error']} | | | |")
        elif r["which"] == "sample":
            lines.append(f"| one sampling step, w = 1 (1 pass) | {r['input']} | {r['params_m']} | "
                         f"{r['median_s_w1']:.3f} | | {r['steps']} | {r['peak_memory_gb']} |")
            lines.append(f"| one sampling step, w = 2.5 (batched 2 passes) | {r['input']} | {r['params_m']} | "
                         f"{r['median_s_w2.5']:.3f} | | {r['steps']} | |")
        else:
            lines.append(f"| {names[r['which']]} | {r['input']} | {r['params_m']} | {r['median_s']:.3f} | "
                         f"{r['min_s']:.3f}–{r['max_s']:.3f} | {r['steps']} | {r['peak_memory_gb']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=["latent", "pixel", "sample"], default=["latent", "pixel", "sample"])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--timeout", type=int, default=400, help="seconds per configuration")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_one(args.worker, args.steps, args.warmup, args.threads, args.device, args.precision)))
        return 0
    rows = []
    for which in args.only:
        rows.append(_run_worker(which, args))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
