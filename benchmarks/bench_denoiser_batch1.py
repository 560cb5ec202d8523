"""Batch-1 forward time of a denoiser with and without the in-plane slice path of
`medlsdm.models.layers.InPlaneConv3d` (conv2d over slices at batch 1 on the CPU), side by side in
one run, and the same at batch 2 (where the path is off) for scale. Medians of --repeats.

    .venv/bin/python benchmarks/bench_denoiser_batch1.py --model src/medlsdm/weights/demo [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from medlsdm.inference import load_model
from medlsdm.inference.synthesis import model_shape as _model_shape
from medlsdm.models.layers import InPlaneConv3d

PATHS = {"slice path": True, "nn.Conv3d": False}


def _use_slice_path(model, on: bool) -> None:
    for module in model.denoiser.modules():
        if isinstance(module, InPlaneConv3d):
            module.in_plane = on and module.kernel_size[0] == 1 and module.stride[0] == 1


def forward_ms(model, image_shape, batch: int, repeats: int) -> dict[str, float]:
    """Median forward time per convolution path; the paths alternate call by call (and which goes
    first, round by round), so that a change in machine load hits both alike."""
    x = torch.randn(batch, *_model_shape(model, image_shape))
    t = torch.full((batch,), 100, dtype=torch.long)
    cond = torch.zeros(batch, model.table.num_classes, *image_shape)
    cond[:, 1] = 1
    times: dict[str, list[float]] = {name: [] for name in PATHS}
    with torch.no_grad():
        for r in range(repeats + 1):
            order = list(PATHS.items())
            for name, on in (order if r % 2 else order[::-1]):   # alternate who goes first
                _use_slice_path(model, on)
                start = time.perf_counter()
                model.denoiser(x, t, cond)
                if r:                                  # the first round warms up
                    times[name].append((time.perf_counter() - start) * 1e3)
    _use_slice_path(model, True)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64], help="image grid (D H W)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    model = load_model(args.model, "cpu")
    rows = []
    for batch in (1, 2):
        for path, ms in forward_ms(model, args.shape, batch, args.repeats).items():
            rows.append({"batch": batch, "conv": path, "ms": ms})
    print(f"machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print("| batch | convolution | forward (ms, median) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['conv']} | {r['ms']:.1f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
