"""Training memory per preset before starting a run: parameters (with gradients and Adam's two
moments for trained weights) and the activations a training step holds for its backward pass,
at the preset's volume shape, batch 1, fp32 (bf16 autocast roughly halves the activations).

Nothing is computed: the networks run on PyTorch's "meta" device (shapes only), and every
tensor autograd saves for the backward pass is counted once per storage (parameters excluded).
Not counted: the allocator's slack, temporaries of a single operation, the framework itself
(~0.5 GB of CPU memory, ~0.5-1 GB of CUDA context) and the data loader. benchmarks/speed.md
compares the estimate with measured peaks.

    python benchmarks/memory_estimate.py                      # the table in benchmarks/speed.md
    python benchmarks/memory_estimate.py --shape 32 256 256 --classes 3
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

GB = 2**30
# preset -> (image shape D, H, W, image channels, label classes)
PRESETS = {
    "demo": ((64, 64, 64), 1, 4),
    "brats": ((144, 192, 192), 4, 5),
    "autopet": ((256, 96, 144), 1, 37),
    "synthrad2023": ((128, 160, 128), 1, 31),
    "duke": ((32, 256, 256), 1, 3),
    "med-ddpm-head": ((128, 128, 128), 1, 3),
}
STAGE1 = {
    "plain": {"decoder": "plain"},
    "spade": {"decoder": "spade"},
    "spade, reference kernels": {"decoder": "spade", "spade_kernel": [1, 3, 3], "spade_instance_norm": False},
    "spade, reference kernels + checkpointing + slabs 8":
        {"decoder": "spade", "spade_kernel": [1, 3, 3], "spade_instance_norm": False, "checkpointing": True,
         "spade_slab": 8},
}


def saved_activation_bytes(run, params) -> int:
    """Bytes of the distinct storages autograd saves while ``run()`` executes (parameters excluded)."""
    skip = {p.untyped_storage()._cdata for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def _state_bytes(trained, frozen=()) -> int:
    """fp32 weights + gradients + Adam's two moments for trained ones; weights only for frozen."""
    return 16 * sum(p.numel() for p in trained) + 4 * sum(p.numel() for p in frozen)


def stage1(shape, channels: int, classes: int, model: dict) -> dict:
    from medlsdm.config import merge
    from medlsdm.models.autoencoder import VQGAN
    from medlsdm.models.discriminators import build_discriminators
    from medlsdm.models.perceptual import Backbone
    from medlsdm.training.autoencoder import AUTOENCODER_DEFAULTS

    cfg = merge(AUTOENCODER_DEFAULTS, {"model": model})
    with torch.device("meta"):
        ae = VQGAN(in_channels=channels, num_classes=classes, **cfg["model"])
        d2, d3 = build_discriminators(channels)
        backbone = Backbone("vgg").requires_grad_(False)   # LPIPS-VGG: frozen, but differentiated through
        x = torch.empty(1, channels, *shape)
        label = torch.empty(1, classes, *shape) if cfg["model"]["decoder"] == "spade" else None
    ae.train()
    params = [*ae.parameters(), *d2.parameters(), *d3.parameters(), *backbone.parameters()]

    def generator_step():
        # The codebook is skipped (meta tensors cannot run its autocast guard); it saves only
        # the latent-sized distances.
        rec = ae.decode(ae.encoder(ae._pad(x)), label, out_shape=shape)
        d3(rec)
        d2(rec[:, :, 0])
        backbone(rec[:, :1, 0].expand(-1, 3, -1, -1))

    acts = saved_activation_bytes(generator_step, params)
    state = _state_bytes([*ae.parameters(), *d2.parameters(), *d3.parameters()], backbone.parameters())
    return {"params_m": sum(p.numel() for p in ae.parameters()) / 1e6, "state_gb": state / GB,
            "activations_gb": acts / GB, "total_gb": (state + acts) / GB}


def stage2(shape, classes: int, preset: str = "lsdm", factors=(4, 4, 4)) -> dict:
    from medlsdm.config import load_preset, merge
    from medlsdm.models.denoisers import build_denoiser
    from medlsdm.training.diffusion import _defaults, denoiser_config

    cfg = merge(_defaults(), copy.deepcopy(load_preset(preset)["diffusion"]))
    with torch.device("meta"):
        net = build_denoiser(denoiser_config(cfg, 8, classes, factors))
        latent = torch.empty(1, 8, *(-(-s // f) for s, f in zip(shape, factors)))
        label = torch.empty(1, classes, *shape)
        t = torch.zeros(1, dtype=torch.long)
    net.train()
    acts = saved_activation_bytes(lambda: net(latent, t, label), list(net.parameters()))
    state = _state_bytes(list(net.parameters()))
    return {"params_m": sum(p.numel() for p in net.parameters()) / 1e6, "state_gb": state / GB,
            "activations_gb": acts / GB, "total_gb": (state + acts) / GB}


def table(rows) -> str:
    lines = ["| preset | shape (D×H×W) | network | parameters (M) | weights + grads + Adam (GB) "
             "| activations (GB) | total (GB) |", "|---|---|---|---|---|---|---|"]
    for preset, shape, name, r in rows:
        lines.append(f"| {preset} | {'×'.join(map(str, shape))} | {name} | {r['params_m']:.2f} | "
                     f"{r['state_gb']:.2f} | {r['activations_gb']:.2f} | {r['total_gb']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--shape", nargs=3, type=int, help="instead of the presets' shapes")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=4)
    args = p.parse_args(argv)
    cases = ([("custom", (tuple(args.shape), args.channels, args.classes))] if args.shape
             else [(n, PRESETS[n]) for n in args.presets])
    rows = []
    for preset, (shape, channels, classes) in cases:
        for name, model in STAGE1.items():
            rows.append((preset, shape, f"stage 1, {name} (G + 2D/3D D + LPIPS)",
                         stage1(shape, channels, classes, model)))
        rows.append((preset, shape, "stage 2, lsdm denoiser", stage2(shape, classes)))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
