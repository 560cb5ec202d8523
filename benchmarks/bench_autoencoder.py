"""Stage-1 train-step time and peak memory of the VQ-GAN (published configuration), plain and
SPADE decoder, at several volume sizes, side by side.

One step = what `AutoencoderModule.training_step` does: generator forward (encoder, EMA
codebook, decoder, L1, commitment, LPIPS if its weights are found, 2D + 3D discriminators on the
fake with feature matching), backward, clip, Adam step; then the discriminators' forward on real
and fake, backward, clip, Adam step. It calls the module's own loss methods, outside Lightning
(whose per-step overhead is negligible at these sizes). Batch 1, fp32, random weights, random
input in [-1, 1] and a blocky 4-class label map.

Each (size, decoder) runs in its own process, so that the peak resident memory
(``resource.getrusage(...).ru_maxrss``) belongs to that configuration alone; a configuration
that runs out of memory or time is reported as such instead of stopping the others.

    .venv/bin/python benchmarks/bench_autoencoder.py                    # 64^3 and 32x256x256
    .venv/bin/python benchmarks/bench_autoencoder.py --sizes 64x64x64 --steps 5
    .venv/bin/python benchmarks/bench_autoencoder.py --lpips-random     # with LPIPS-VGG compute
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def _parse_size(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"size must be DxHxW, got {text!r}")
    return parts


def _random_lpips(folder) -> dict:
    """LPIPS-VGG with random weights in the published file formats: the same compute as the real
    network, for timing only (no weights can be downloaded here)."""
    import torch

    from medlsdm.models.perceptual import Backbone, Heads

    backbone = Backbone("vgg")
    torch.save(dict(backbone.state_dict()), f"{folder}/vgg16.pth")
    torch.save({k: v.abs() for k, v in Heads(backbone.channels).state_dict().items()}, f"{folder}/vgg_heads.pth")
    return {"lpips_backbone": f"{folder}/vgg16.pth", "lpips_heads": f"{folder}/vgg_heads.pth"}


def _one(size: tuple[int, int, int], decoder: str, steps: int, threads: int, max_memory_gb: float,
         lpips: bool) -> dict:
    """Runs in the worker process: `steps` timed steps after one warm-up step."""
    import resource
    import warnings

    # A cap on the address space turns "out of memory" into a clean allocation error in this
    # process, instead of the kernel's OOM killer picking a process on a shared machine.
    limit = int(max_memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    from medlsdm.config import merge
    from medlsdm.training.autoencoder import AUTOENCODER_DEFAULTS, AutoencoderModule

    import tempfile

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    loss = {"disc_start": 0, **(_random_lpips(tmp.name) if lpips else {})}
    cfg = merge(AUTOENCODER_DEFAULTS, {"model": {"decoder": decoder}, "loss": loss})
    table = {"0": "background", "1": "csf", "2": "grey_matter", "3": "white_matter"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = AutoencoderModule(cfg, in_channels=1, label_table=table)
    lpips_on = module._lpips[0] is not None
    gen_params = list(module.autoencoder.parameters())
    disc_params = list(module.disc2d.parameters()) + list(module.disc3d.parameters())
    # Two optimizers stepped in turn, as the training step did when these numbers were taken
    # (benchmarks/bench_speed.py times the current training step).
    opt_g = torch.optim.Adam(gen_params, lr=cfg["optim"]["lr"], betas=tuple(cfg["optim"]["betas"]))
    opt_d = torch.optim.Adam(disc_params, lr=cfg["optim"]["lr"], betas=tuple(cfg["optim"]["betas"]))
    clip = cfg["trainer"]["gradient_clip"]

    x = torch.rand(1, 1, *size) * 2 - 1
    # blocky label map: 4 classes in 8-voxel blocks
    coarse = torch.randint(0, 4, (1, 1, *(max(1, s // 8) for s in size)))
    label = torch.nn.functional.interpolate(coarse.float(), size=size, mode="nearest").long()

    def step() -> float:
        start = time.perf_counter()
        for p in disc_params:  # as toggle_optimizer: no discriminator gradients in the generator step
            p.requires_grad_(False)
        opt_g.zero_grad(set_to_none=True)
        g_loss, x_rec, real2d, fake2d, _ = module.generator_loss(x, label, use_disc=True)
        g_loss.backward()
        torch.nn.utils.clip_grad_norm_(gen_params, clip)
        opt_g.step()
        for p in disc_params:
            p.requires_grad_(True)
        for p in gen_params:
            p.requires_grad_(False)
        opt_d.zero_grad(set_to_none=True)
        d_loss = module.discriminator_loss(x, x_rec, real2d, fake2d)
        d_loss.backward()
        torch.nn.utils.clip_grad_norm_(disc_params, clip)
        opt_d.step()
        for p in gen_params:
            p.requires_grad_(True)
        if not (torch.isfinite(g_loss) and torch.isfinite(d_loss)):
            raise RuntimeError("non-finite loss in benchmark")
        return time.perf_counter() - start

    module.train()
    warmup = step()  # includes the codebook's data-dependent initialisation
    times = [step() for _ in range(steps)]
    count = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    return {
        "size": "x".join(map(str, size)), "decoder": decoder, "lpips": lpips_on,
        "warmup_s": warmup, "times_s": times, "median_s": statistics.median(times),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
        "params_generator_m": count(gen_params) / 1e6,
        "params_disc2d_m": count(module.disc2d.parameters()) / 1e6,
        "params_disc3d_m": count(module.disc3d.parameters()) / 1e6,
        "lpips_warning": next((str(w.message)[:80] for w in caught if "LPIPS" in str(w.message)), None),
        "threads": threads,
    }


def _run_worker(size, decoder, steps, threads, timeout, max_memory_gb, lpips) -> dict:
    argv = [sys.executable, __file__, "--worker", "x".join(map(str, size)), decoder, str(steps), str(threads),
            str(max_memory_gb), "1" if lpips else "0"]
    name = {"size": "x".join(map(str, size)), "decoder": decoder}
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**name, "error": f"over the {timeout} s limit"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if proc.returncode in (-9, 137) or "can't allocate memory" in last or "MemoryError" in last:
            return {**name, "error": f"out of memory (address space capped at {max_memory_gb:g} GB)"}
        return {**name, "error": last[:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(results: list[dict]) -> str:
    lines = ["| size (D×H×W) | decoder | median step (s) | steps timed | warm-up (s) | peak RSS (GB) | LPIPS "
             "| params G / D2 / D3 (M) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['decoder']} | {r['error']} | | | | | |")
        else:
            lines.append(f"| {r['size']} | {r['decoder']} | {r['median_s']:.2f} | {len(r['times_s'])} | "
                         f"{r['warmup_s']:.2f} | {r['peak_rss_gb']:.2f} | {'on' if r['lpips'] else 'off'} | "
                         f"{r['params_generator_m']:.2f} / {r['params_disc2d_m']:.2f} / {r['params_disc3d_m']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        size, decoder, steps, threads, memory, lpips = sys.argv[2:8]
        print(json.dumps(_one(_parse_size(size), decoder, int(steps), int(threads), float(memory), lpips == "1")))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", type=_parse_size, default=[(64, 64, 64), (32, 256, 256)])
    p.add_argument("--decoders", nargs="+", default=["plain", "spade"], choices=["plain", "spade"])
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (after 1 warm-up)")
    p.add_argument("--large-steps", type=int, default=1,
                   help="timed steps for sizes over 1M voxels (a step takes minutes on 2 CPU cores)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    p.add_argument("--max-memory-gb", type=float, default=16.0,
                   help="address-space cap per configuration (the machine is shared)")
    p.add_argument("--lpips-random", action="store_true",
                   help="include LPIPS-VGG with random weights (same compute as the real one); default: LPIPS "
                        "only if its weights are found on this machine")
    p.add_argument("--json", help="also write the raw results here")
    args = p.parse_args(argv)
    results = []
    for size in args.sizes:
        steps = args.large_steps if size[0] * size[1] * size[2] > 2**20 else args.steps
        for decoder in args.decoders:
            result = _run_worker(size, decoder, steps, args.threads, args.timeout, args.max_memory_gb,
                                 args.lpips_random)
            print(json.dumps(result), flush=True)
            results.append(result)
    print(_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
