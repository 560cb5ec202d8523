"""Two demo samples (DDIM-25, guidance 1.5, seed 3, a smooth 4-class 64^3 label map, 1 thread)
from the shipped demo weights with the medlsdm found on PYTHONPATH, saved to OUT.npy; with a
second .npy, the max abs difference to it. Run once per source tree (benchmarks/speed.md):

    PYTHONPATH="$BEFORE"/src python benchmarks/sample_identity.py before.npy
    PYTHONPATH=src python benchmarks/sample_identity.py after.npy before.npy
"""

import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

torch.set_num_threads(1)
from medlsdm.inference import load_model, synthesize  # noqa: E402

model = load_model(Path(__file__).resolve().parents[1] / "src" / "medlsdm" / "weights" / "demo")
field = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal((64, 64, 64)), 4)
label = np.digitize(field, np.quantile(field, [0.3, 0.5, 0.75])).astype(np.uint8)
x = synthesize(model, label, n=2, steps=25, guidance=1.5, seed=3, progress=False).numpy()
np.save(sys.argv[1], x)
if len(sys.argv) > 2:
    other = np.load(sys.argv[2])
    print(f"identical: {np.array_equal(x, other)}, max abs difference {np.abs(x - other).max():.3g}")
