"""Sampling label maps at another resolution than the model's (benchmarks/resolution.md).

The demo cohort is rebuilt with the same subjects (same seed, same 192 mm field of view) at 3 mm
(64^3, the shipped model's training grid), 1.5 mm (128^3) and 1 mm (192^3). The shipped demo model
generates one volume from each held-out label map at each resolution, with this checkout and —
with ``--before SRC`` (the ``src`` folder of an older checkout) — with that one, side by side.
A U-Net trained once on the real 3 mm training images (fixed epochs, seeded) then segments the
real and the synthetic test images, all resampled onto the 3 mm test grid, against the 3 mm test
label maps: tissue Dice per case, real vs synthetic, and their ratio.

    python benchmarks/bench_resolution.py --out "$OUT" --before "$BEFORE"/src [--redo after]

Sampling runs in a subprocess per (code, resolution), which reports wall and own-CPU time for the
label-map preparation and for the whole `sample_to_files` call.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESOLUTIONS = {"3mm": (64, 3.0), "1.5mm": (128, 1.5), "1mm": (192, 1.0)}

# Run inside the subprocess: time the label-map preparation alone, then the whole sampling call.
CHILD = r"""
import json, sys, time
from pathlib import Path
labels, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
try:
    from medlsdm.inference import sample_to_files, load_model
    from medlsdm.inference.labelmaps import label_jobs
    new = True
except ImportError:
    from medlsdm.generate import sample_to_files, load_model, _label_jobs
    new = False
from medlsdm.demo import shipped_model_dir
import torch
torch.set_flush_denormal(True)
model_dir = shipped_model_dir()
model = load_model(model_dir, "cpu")
w, c = time.perf_counter(), time.process_time()
jobs = label_jobs(model, labels) if new else _label_jobs(model, labels)
prep = {"wall": time.perf_counter() - w, "cpu": time.process_time() - c}
grids = [list(j.grid_shape) for j in jobs] if new else [list(j[2]["shape"]) for j in jobs]
w, c = time.perf_counter(), time.process_time()
sample_to_files(model_dir, labels, out, n=1, steps=steps, seed=0, device="cpu", progress=False)
total = {"wall": time.perf_counter() - w, "cpu": time.process_time() - c}
print(json.dumps({"prepare": prep, "total": total, "grids": grids, "n": len(grids)}))
"""


def build_cohorts(root: Path, n_subjects: int, n_test: int) -> dict[str, Path]:
    from medlsdm.data.demo import write_demo_cohort

    out = {}
    for name, (shape, spacing) in RESOLUTIONS.items():
        folder = root / f"cohort_{name}"
        if not (folder / "dataset.json").is_file():
            write_demo_cohort(folder, n_subjects=n_subjects, n_test=n_test, shape=shape, spacing=spacing, seed=0,
                              progress=False)
        out[name] = folder
    return out


def run_sampling(src: Path, labels: Path, out: Path, steps: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    result = subprocess.run([sys.executable, "-c", CHILD, str(labels), str(out), str(steps)], env=env,
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _on_grid(path: Path, affine: np.ndarray, shape, order: int) -> np.ndarray:
    import nibabel as nib

    from medlsdm.data.geometry import resample_to_grid

    image = nib.load(str(path))
    array = np.asarray(image.dataobj, dtype=np.float32)
    return resample_to_grid(array, image.affine, affine, shape, order=order, antialias=order > 0)


def segmentation(cohorts: dict, samples: dict, steps: int, seed: int) -> dict:
    """Per case tissue Dice (mean over the 3 classes) of real and synthetic test images on the 3 mm grid."""
    import nibabel as nib
    import torch

    from medlsdm.evaluation.metrics import confusion_matrix, mean_over_classes, overlap_from_confusion
    from medlsdm.evaluation.segmentation import SegCase, normalise_percentiles, predict, train_segmenter

    base = cohorts["3mm"]
    torch.manual_seed(seed)
    train = []
    for path in sorted((base / "images").glob("*.nii.gz")):
        image = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)[None]
        label = np.asarray(nib.load(str(base / "labels" / path.name)).dataobj).astype(np.int64)
        train.append(SegCase(path.name, normalise_percentiles(image), label, str(path)))
    patch = (64, 64, 64)
    cache = base.parent / f"segmenter_{steps}steps_seed{seed}.pt"   # trained once, reused by re-runs
    if cache.is_file():
        from medlsdm.evaluation.segmentation import build_network

        net = build_network(1, 4)
        net.load_state_dict(torch.load(cache, weights_only=True))
        net.eval()
        info = {"steps": steps, "cached": cache.name}
    else:
        net, info = train_segmenter(train, 4, patch, steps=steps, seed=seed, progress=False)
        torch.save(net.state_dict(), cache)

    def dice(image: np.ndarray, label: np.ndarray) -> float:
        pred = predict(net, normalise_percentiles(image[None]), patch)
        conf = confusion_matrix(pred, label, 4)
        return mean_over_classes({c: s["dice"] for c, s in overlap_from_confusion(conf).items()})

    rows = {}
    for test in sorted((base / "labelsTs").glob("*.nii.gz")):
        ref = nib.load(str(test))
        label = np.asarray(ref.dataobj).astype(np.int64)
        case = test.name[: -len(".nii.gz")]
        row = {}
        for name, folder in cohorts.items():
            real = _on_grid(folder / "imagesTs" / test.name, ref.affine, ref.shape, 1)
            row[f"real {name}"] = dice(real, label)
            for code, out in samples.items():
                path = out / name / f"{case}_sample0.nii.gz"
                if path.is_file():
                    row[f"{code} {name}"] = dice(_on_grid(path, ref.affine, ref.shape, 1), label)
        rows[case] = row
    return {"segmenter": info, "per_case": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--before", type=Path, help="src folder of the code to compare with")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seg-steps", type=int, default=600, help="segmenter training steps (batch 2, 64^3 patches)")
    parser.add_argument("--redo", nargs="*", default=[], help="codes whose samples are made again (e.g. after)")
    parser.add_argument("--n-subjects", type=int, default=24)
    parser.add_argument("--n-test", type=int, default=4)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cohorts = build_cohorts(args.out, args.n_subjects, args.n_test)
    codes = {"after": Path(__file__).resolve().parents[1] / "src"}
    if args.before:
        codes["before"] = args.before.resolve()
    timing, samples = {}, {}
    for code, src in codes.items():
        samples[code] = args.out / f"samples_{code}"
        for name, folder in cohorts.items():
            target = samples[code] / name
            if code in args.redo and target.is_dir():
                shutil.rmtree(target)
            if not (target / "sampling_done.json").is_file():
                result = run_sampling(src, folder / "labelsTs", target, args.steps, args.threads)
                target.mkdir(parents=True, exist_ok=True)
                (target / "sampling_done.json").write_text(json.dumps(result), encoding="utf-8")
            timing[f"{code} {name}"] = json.loads((target / "sampling_done.json").read_text(encoding="utf-8"))
            print(code, name, timing[f"{code} {name}"], flush=True)
    seg = segmentation(cohorts, samples, args.seg_steps, seed=0)
    result = {"timing": timing, **seg, "steps": args.steps, "threads": args.threads}
    (args.out / "result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    cols = sorted({k for row in seg["per_case"].values() for k in row})
    print("| case | " + " | ".join(cols) + " |")
    for case, row in seg["per_case"].items():
        print(f"| {case} | " + " | ".join(f"{row.get(c, float('nan')):.3f}" for c in cols) + " |")
    means = {c: float(np.mean([row[c] for row in seg["per_case"].values() if c in row])) for c in cols}
    print("| mean | " + " | ".join(f"{means[c]:.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
