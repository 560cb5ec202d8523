"""Per-step time and peak memory of the three training steps — stage 1 with the plain and the
SPADE decoder, and the latent denoiser — for two source trees side by side ("before": an older
commit unpacked into a folder; "after": this checkout), interleaved, one process per
measurement.

A stage-1 step is what ``AutoencoderModule.training_step`` does outside Lightning: generator
forward (encoder, EMA codebook, decoder, L1, commitment, LPIPS-VGG with random weights on one
axial slice, 2D + 3D discriminators with feature matching when the setting has them on),
backward, clip, Adam; then the discriminators' step. A denoiser step is
``diffusion_loss`` (random t, noise, condition dropout) + backward + clip + AdamW, as
``DiffusionModule.training_step``. Batch 1, fp32, random weights and data, a blocky 4-class
label map. Reported per measurement: median wall and own-CPU seconds (``time.process_time``:
the robust figure on a shared machine) over the timed steps after one warm-up step, and the
process's peak resident memory (``ru_maxrss``, includes ~0.5 GB of Python/torch).

    # before = the code of an older commit, e.g. 5f4b235 (a worktree or an unpacked archive)
    git worktree add "$BEFORE" 5f4b235      # or: mkdir -p "$BEFORE" && git archive 5f4b235 src | tar -x -C "$BEFORE"
    python benchmarks/bench_speed.py --before "$BEFORE"/src --steps 5 --threads 1
    python benchmarks/bench_speed.py --before "$BEFORE"/src --profile      # top ops by self time
    python benchmarks/bench_speed.py --flops                                # FLOP/s vs conv3d peak
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

AFTER = str(Path(__file__).resolve().parents[1] / "src")
NUM_CLASSES = 4
TABLE = {"0": "background", "1": "csf", "2": "grey_matter", "3": "white_matter"}

# Stage-1 settings. "reference": the Med-LSDM reference's architecture (REFERENCE.md §1 and §5:
# channels 16/32/64, ResBlocks 1/2, 16,384 codes, 2D + 3D PatchGAN, LPIPS-VGG; SPADE with
# (1, 3, 3) kernels, 128 hidden channels, 8 groups, plain gamma/beta convolutions; transposed-
# convolution upsampling in the decoder, whose default is now interpolation + convolution).
# "default": this package's defaults (SPADE with 3x3x3 kernels and instance-normalised
# gamma/beta, as MONAI's block that the shipped decoder was trained with). "demo": the demo
# preset and its shipped SPADE decoder (hidden 32; discriminators off, as in the demo's
# training). "+ckpt": with activation checkpointing and SPADE slabs of 8 slices; "+shared": one
# label convolution for the whole decoder (reference: and 64 hidden channels; demo: its 32).
# Keys absent from an older tree are reported there as "option missing".
REFERENCE_MODEL = {"spade_kernel": [1, 3, 3], "spade_instance_norm": False, "upsample": "transposed"}
# What trees from before an option existed always did (its value there).
BEFORE_THE_OPTION = {"upsample": "transposed"}
AE_SETTINGS = {
    "reference": {"model": dict(REFERENCE_MODEL), "loss": {"disc_start": 0}},
    "reference+ckpt": {"model": {**REFERENCE_MODEL, "checkpointing": True, "spade_slab": 8},
                       "loss": {"disc_start": 0}},
    "reference+shared": {"model": {**REFERENCE_MODEL, "spade_shared": True, "spade_hidden": 64},
                         "loss": {"disc_start": 0}},
    "default": {"model": {}, "loss": {"disc_start": 0}},
    "demo": {"model": {"num_codes": 1024, "spade_hidden": 32}, "loss": {"disc_start": 100000}},
    "demo+shared": {"model": {"num_codes": 1024, "spade_hidden": 32, "spade_shared": True},
                    "loss": {"disc_start": 100000}},
}
# Denoiser settings: (preset, trainer overrides). lsdm = the reference's architecture (base 64,
# 1/2/4/8, SPADE 128), with the tree's trainer defaults (as `medlsdm train diffusion`: where the
# tree has trainer.keep_freed_memory, on by default, the worker applies it as training does);
# "+mmap": without keep_freed_memory (the code's gain alone); "+compile": trainer.compile
# (torch.compile of the denoiser; compilation falls in the untimed warm-up step).
DENOISER_SETTINGS = {"lsdm": ("lsdm", {}), "lsdm+mmap": ("lsdm", {"keep_freed_memory": False}),
                     "lsdm+compile": ("lsdm", {"compile": True}), "demo": ("demo", {})}


def _parse_size(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"size must be DxHxW, got {text!r}")
    return parts


def _label(size):
    import torch

    coarse = torch.randint(0, NUM_CLASSES, (1, 1, *(max(1, s // 8) for s in size)),
                           generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.interpolate(coarse.float(), size=size, mode="nearest").long()


def _random_lpips(folder) -> dict:
    """LPIPS-VGG with random weights in the published file formats: the real network's compute."""
    import torch

    from medlsdm.models.perceptual import Backbone, Heads

    backbone = Backbone("vgg")
    torch.save(dict(backbone.state_dict()), f"{folder}/vgg16.pth")
    torch.save({k: v.abs() for k, v in Heads(backbone.channels).state_dict().items()}, f"{folder}/vgg_heads.pth")
    return {"lpips_backbone": f"{folder}/vgg16.pth", "lpips_heads": f"{folder}/vgg_heads.pth"}


def _autoencoder_step(decoder: str, setting: str, size, tmp: str):
    """(step function, parameter count, dropped options) of a stage-1 training step."""
    import copy
    import warnings

    import torch

    from medlsdm.config import load_preset, merge
    from medlsdm.training.autoencoder import AUTOENCODER_DEFAULTS, AutoencoderModule

    over = copy.deepcopy(AE_SETTINGS[setting])
    if decoder == "plain":  # the SPADE options do not apply
        over["model"] = {k: v for k, v in over["model"].items() if not k.startswith("spade")}
        if setting.startswith("reference+") and not over["model"]:
            raise ValueError(f"setting {setting} is the plain reference")
    base = AUTOENCODER_DEFAULTS
    if setting.startswith("demo"):
        base = merge(AUTOENCODER_DEFAULTS, load_preset("demo")["autoencoder"])
    # A key an older tree lacks is missing there unless its value is what that tree always did.
    dropped = sorted(k for k in over["model"] if k not in base["model"]
                     and BEFORE_THE_OPTION.get(k, object()) != over["model"][k])
    model = {k: v for k, v in over["model"].items() if k in base["model"]}
    cfg = merge(base, {"model": {**model, "decoder": decoder},
                       "loss": {**over["loss"], **_random_lpips(tmp)}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = AutoencoderModule(cfg, in_channels=1, label_table=TABLE)
    module.train()
    optimizers = module.configure_optimizers()
    gen = list(module.autoencoder.parameters())
    disc = list(module.disc2d.parameters()) + list(module.disc3d.parameters())
    clip = cfg["trainer"]["gradient_clip"]
    use_disc = cfg["loss"]["disc_start"] == 0
    x = torch.rand(1, 1, *size) * 2 - 1
    label = _label(size)

    def two_optimizers():  # the training step up to commit d8b91bc
        opt_g, opt_d = optimizers
        for p in disc:  # as toggle_optimizer: no discriminator gradients in the generator step
            p.requires_grad_(False)
        opt_g.zero_grad(set_to_none=True)
        g_loss, x_rec, real2d, fake2d, _ = module.generator_loss(x, label, use_disc=use_disc)
        g_loss.backward()
        torch.nn.utils.clip_grad_norm_(gen, clip)
        opt_g.step()
        for p in disc:
            p.requires_grad_(True)
        if use_disc:
            for p in gen:
                p.requires_grad_(False)
            opt_d.zero_grad(set_to_none=True)
            d_loss = module.discriminator_loss(x, x_rec, real2d, fake2d)
            d_loss.backward()
            torch.nn.utils.clip_grad_norm_(disc, clip)
            opt_d.step()
            for p in gen:
                p.requires_grad_(True)
        return g_loss

    def one_optimizer():  # AutoencoderModule.training_step now: one optimizer, two groups
        opt = optimizers
        opt.zero_grad(set_to_none=True)
        for p in disc:
            p.requires_grad_(False)
        g_loss, x_rec, real2d, fake2d, _ = module.generator_loss(x, label, use_disc=use_disc)
        g_loss.backward()
        for p in disc:
            p.requires_grad_(True)
        if use_disc:
            module.discriminator_loss(x, x_rec, real2d, fake2d).backward()
        for group in opt.param_groups:
            torch.nn.utils.clip_grad_norm_([p for p in group["params"] if p.grad is not None], clip)
        opt.step()
        return g_loss

    def step():
        g_loss = two_optimizers() if isinstance(optimizers, (list, tuple)) else one_optimizer()
        if not torch.isfinite(g_loss):
            raise RuntimeError("non-finite loss")

    return step, sum(p.numel() for p in gen), dropped


def _denoiser_step(setting: str, size):
    import copy

    import torch

    from medlsdm.config import load_preset, merge
    from medlsdm.data.labels import one_hot
    from medlsdm.diffusion.objective import diffusion_loss
    from medlsdm.training.diffusion import DiffusionModule, _defaults

    preset, over = DENOISER_SETTINGS[setting]
    cfg = merge(_defaults(), copy.deepcopy(load_preset(preset)["diffusion"]))
    dropped = sorted(k for k in over if k not in cfg["trainer"])
    cfg["trainer"].update({k: v for k, v in over.items() if k in cfg["trainer"]})
    if cfg["trainer"].get("keep_freed_memory"):  # as train_diffusion does
        from medlsdm.training.allocator import keep_freed_memory

        keep_freed_memory()
    scaler = {"mode": "std", "mean": [0.0] * 8, "std": [1.0] * 8, "bound": 5.0}
    module = DiffusionModule(cfg, in_channels=8, label_table=TABLE, latent_downsample=[4, 4, 4],
                             scaler_state=scaler)
    module.train()
    net = module.denoiser
    opt = module.configure_optimizers()
    x0 = torch.randn(1, 8, *(s // 4 for s in size))
    cond = one_hot(_label(size), NUM_CLASSES).float()
    dcfg = cfg["diffusion"]
    gen = torch.Generator().manual_seed(0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = diffusion_loss(net, x0, cond, module.schedule, prediction=dcfg["prediction"], loss=dcfg["loss"],
                              cond_drop_prob=dcfg["cond_drop_prob"], generator=gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()

    return step, sum(p.numel() for p in net.parameters()), dropped


def _worker(job: dict) -> dict:
    import resource
    import tempfile

    limit = int(job["max_memory_gb"] * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    size = tuple(job["size"])
    if job["kind"] == "denoiser":
        step, params, dropped = _denoiser_step(job["setting"], size)
    else:
        step, params, dropped = _autoencoder_step(job["kind"], job["setting"], size, tmp.name)
    out = {"params_m": params / 1e6, "dropped": dropped}
    if dropped and job["tree"] == "before":
        return {**out, "error": "option missing in this tree: " + ", ".join(dropped)}

    def timed():
        w, c = time.perf_counter(), time.process_time()
        step()
        return time.perf_counter() - w, time.process_time() - c

    warm = timed()
    runs = [timed() for _ in range(job["steps"])]
    out.update({"warmup_wall_s": warm[0], "wall_s": [r[0] for r in runs], "cpu_s": [r[1] for r in runs],
                "median_wall_s": statistics.median(r[0] for r in runs),
                "median_cpu_s": statistics.median(r[1] for r in runs),
                "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})
    if job.get("profile"):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
        out["profile"] = [(e.key, e.self_cpu_time_total / 1e6, e.self_cpu_time_total / total, e.count) for e in top]
    if job.get("flops"):
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step()
        out["flops"] = counter.get_total_flops()
        out["conv3d_peak_gflops"] = _conv3d_peak()
    return out


def _conv3d_peak() -> float:
    """GFLOP per own-CPU second of a large 3x3x3 convolution, forward and backward (the best of 3)."""
    import torch

    x = torch.randn(1, 32, 32, 64, 64, requires_grad=True)
    conv = torch.nn.Conv3d(32, 32, 3, padding=1)
    flops = 3 * 2 * 32 * 32 * 27 * x[0, 0].numel()  # forward + input and weight gradients
    best = float("inf")
    for _ in range(3):
        c = time.process_time()
        conv(x).sum().backward()
        best = min(best, time.process_time() - c)
    return flops / best / 1e9


def _run(job: dict, timeout: int) -> dict:
    env = {**os.environ, "PYTHONPATH": job["src"], "OMP_NUM_THREADS": str(job["threads"])}
    name = {k: job[k] for k in ("tree", "kind", "setting", "size", "threads")}
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd="/")
    except subprocess.TimeoutExpired:
        return {**name, "error": f"over the {timeout} s limit"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if proc.returncode in (-9, 137) or "allocate" in last or "MemoryError" in last:
            return {**name, "error": f"out of memory (address space capped at {job['max_memory_gb']:g} GB)"}
        return {**name, "error": last[:200]}
    return {**name, **json.loads(proc.stdout.strip().splitlines()[-1])}


def _table(results: list[dict]) -> str:
    lines = ["| step | setting | size | threads | tree | params (M) | median own-CPU (s) | median wall (s) "
             "| peak RSS (GB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        head = f"| {r['kind']} | {r['setting']} | {'×'.join(map(str, r['size']))} | {r['threads']} | {r['tree']} |"
        if "error" in r:
            lines.append(f"{head} {r.get('params_m', 0):.2f} | {r['error']} | | |")
        else:
            lines.append(f"{head} {r['params_m']:.2f} | {r['median_cpu_s']:.2f} | {r['median_wall_s']:.2f} | "
                         f"{r['peak_rss_gb']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", help="src folder of the older tree (omit: this tree only)")
    p.add_argument("--kinds", nargs="+", default=["plain", "spade", "denoiser"])
    p.add_argument("--ae-settings", nargs="+", default=["reference", "default", "demo"], choices=list(AE_SETTINGS))
    p.add_argument("--denoiser-settings", nargs="+", default=["lsdm", "demo"], choices=list(DENOISER_SETTINGS))
    p.add_argument("--sizes", nargs="+", type=_parse_size, default=[(32, 64, 64), (64, 64, 64)])
    p.add_argument("--threads", nargs="+", type=int, default=[1])
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--max-memory-gb", type=float, default=16.0)
    p.add_argument("--profile", action="store_true", help="also the top ops by self time of one step")
    p.add_argument("--flops", action="store_true", help="also the step's FLOPs and the conv3d peak")
    p.add_argument("--json", help="append raw results (JSON lines) here")
    args = p.parse_args(argv)
    trees = [("before", args.before), ("after", AFTER)] if args.before else [("after", AFTER)]
    results = []
    n = 0
    for threads in args.threads:
        for size in args.sizes:
            for kind in args.kinds:
                settings = args.denoiser_settings if kind == "denoiser" else args.ae_settings
                if kind == "plain":  # "default" and "+shared" are "reference" without SPADE options
                    settings = [s for s in settings if s not in ("default", "reference+shared")
                                or "reference" not in settings]
                for setting in settings:
                    # Interleaved: the tree order alternates from one configuration to the next.
                    order = trees if n % 2 == 0 else trees[::-1]
                    n += 1
                    for tree, src in order:
                        job = {"tree": tree, "src": src, "kind": kind, "setting": setting, "size": list(size),
                               "threads": threads, "steps": args.steps, "max_memory_gb": args.max_memory_gb,
                               "profile": args.profile, "flops": args.flops}
                        result = _run(job, args.timeout)
                        print(json.dumps(result), flush=True)
                        results.append(result)
                        if args.json:
                            with open(args.json, "a") as f:
                                f.write(json.dumps(result) + "\n")
    print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
