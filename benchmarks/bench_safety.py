"""Cost of the safety checks, before and after side by side in one run.

1. Reading a DICOM series: `medlsdm.data.io.read_volume` with and without the slice-position
   check (on the per-slice tags ITK keeps while reading) and the size check (first file's header).
2. Writing a Lightning checkpoint: Lightning's `TorchCheckpointIO` (through a temporary file
   under TMPDIR, no fsync) against `medlsdm.training.runner.AtomicCheckpointIO` (temporary file
   beside the target, fsync, rename, previous checkpoint kept).
3. Refusing a header bomb: `read_volume` of a .nii.gz whose header claims 4096^3 float32.

Each timing is the median of --repeats runs; wall time and this process's CPU time are both
given (the machine may be shared). Usage:

    PYTHONPATH=src python benchmarks/bench_safety.py [--slices 200] [--size 256] [--mb 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np


def timed(fn, repeats: int) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


SERIES_TAGS = {"0008|0060": "MR", "0020|000d": "1.2.3", "0020|000e": "1.2.3.4", "0020|0037": "1\\0\\0\\0\\1\\0",
               "0028|0030": "1\\1"}


def dicom_series(folder: Path, slices: int, size: int) -> Path:
    """`slices` axial int16 slices of `size`^2 voxels, 1.5 mm apart, one file each."""
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    volume = (np.random.default_rng(0).random((slices, size, size)) * 1000).astype(np.int16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, pixels in enumerate(volume):
        image = sitk.GetImageFromArray(pixels)
        tags = {**SERIES_TAGS, "0020|0032": f"0\\0\\{1.5 * k}", "0020|0013": str(k + 1)}
        for tag in tags:
            image.SetMetaData(tag, tags[tag])
        writer.SetFileName(str(folder / f"{k:04d}.dcm"))
        writer.Execute(image)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--mb", type=int, default=200, help="checkpoint size in MB")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import nibabel as nib
    import torch
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    from medlsdm.data import io
    from medlsdm.errors import DataError
    from medlsdm.training.runner import AtomicCheckpointIO

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        series = dicom_series(tmp / "series", args.slices, args.size)
        io.read_volume(series)  # warm the page cache
        with mock.patch.object(io, "_check_slice_positions", lambda reader, files, folder: None):
            before = timed(lambda: io.read_volume(series), args.repeats)
        after = timed(lambda: io.read_volume(series), args.repeats)
        rows.append((f"read DICOM series {args.size}x{args.size}x{args.slices} int16", before, after))

        state = {"state_dict": {"w": torch.randn(args.mb * 2**20 // 4)}, "global_step": 1}
        target = tmp / "checkpoints" / "last.ckpt"
        target.parent.mkdir()
        before = timed(lambda: TorchCheckpointIO().save_checkpoint(state, target), args.repeats)
        after = timed(lambda: AtomicCheckpointIO().save_checkpoint(state, target), args.repeats)
        rows.append((f"write a {args.mb} MB checkpoint", before, after))

        header = nib.Nifti1Header()
        header.set_data_shape((4096, 4096, 4096))
        header.set_data_dtype(np.float32)
        bomb = tmp / "bomb.nii.gz"
        bomb.write_bytes(gzip.compress(header.binaryblock + b"\0" * 68))

        def refuse():
            try:
                io.read_volume(bomb)
            except DataError:
                pass

        refused = timed(refuse, args.repeats)
        rows.append(("refuse a header bomb (4096^3 float32 claimed)", (float("nan"), float("nan")), refused))

    print("| what | before: wall s (CPU s) | after: wall s (CPU s) |")
    print("|---|---|---|")
    for what, (bw, bc), (aw, ac) in rows:
        b = "not checked before reading" if np.isnan(bw) else f"{bw:.3f} ({bc:.3f})"
        print(f"| {what} | {b} | {aw:.3f} ({ac:.3f}) |")


if __name__ == "__main__":
    main()
