"""Start-up cost of `medlsdm sample` (benchmarks/startup.md): one subprocess per run, interleaved
between this checkout and an older one (``--before SRC``), each sampling one 3 mm demo label map
with 1 DDIM step on the shipped model. Reports wall and own-CPU seconds for the imports, for
loading the model, for the whole command, its peak resident memory, and whether Lightning (or
training/evaluation code) was imported.

    python benchmarks/bench_startup.py --labels demo_output/cohort/labelsTs/subject_020.nii.gz --before "$BEFORE"/src
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, sys, time
w0, c0 = time.perf_counter(), time.process_time()
from medlsdm import cli
try:
    from medlsdm.inference import load_model
except ImportError:
    from medlsdm.generate import load_model
from medlsdm.demo import shipped_model_dir
imports = {"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}
w, c = time.perf_counter(), time.process_time()
load_model(shipped_model_dir(), "cpu")
load = {"wall": time.perf_counter() - w, "cpu": time.process_time() - c}
rc = cli.main(["sample", "--model", str(shipped_model_dir()), "--labels", sys.argv[1], "--out", sys.argv[2],
               "--steps", "1", "--device", "cpu"])
total = {"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}
mods = sys.modules
print(json.dumps({"rc": rc, "imports": imports, "load_model": load, "total": total,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "lightning": any(m.split(".")[0] in ("lightning", "pytorch_lightning") for m in mods),
                  "training_or_evaluation": sorted(m for m in mods if m.startswith(("medlsdm.training", "medlsdm.evaluation")))}))
"""


def run(src: Path, labels: Path, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", CHILD, str(labels), str(Path(tmp) / "o")], env=env,
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    codes = {"before": args.before.resolve(), "after": Path(__file__).resolve().parents[1] / "src"}
    runs = {code: [] for code in codes}
    for _ in range(args.repeats):
        for code, src in codes.items():
            runs[code].append(run(src, args.labels, args.threads))
    print("| | imports wall / cpu s | load model wall / cpu s | whole command wall / cpu s | peak RSS MB | Lightning imported |")
    print("|---|---|---|---|---|---|")
    for code, items in runs.items():
        med = {k: {kind: float(np.median([r[k][kind] for r in items])) for kind in ("wall", "cpu")}
               for k in ("imports", "load_model", "total")}
        rss = float(np.median([r["peak_rss_mb"] for r in items]))
        print(f"| {code} | {med['imports']['wall']:.2f} / {med['imports']['cpu']:.2f} | "
              f"{med['load_model']['wall']:.2f} / {med['load_model']['cpu']:.2f} | "
              f"{med['total']['wall']:.2f} / {med['total']['cpu']:.2f} | {rss:.0f} | "
              f"{'yes' if any(r['lightning'] for r in items) else 'no'} |")
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
