"""Pictures for the evaluation report: three-plane panels of volumes (``medlsdm.viz``) arranged in
rows, and the privacy similarity histogram (matplotlib, Agg backend: no display needed).

Evaluation arrays are in file voxel axes (C, X, Y, Z); panels show them in the model layout
(D, H, W) = (Z, Y, X), so for RAS-like files D is axial, as in the rest of the package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["volume_panel", "save_panel_rows", "similarity_histogram"]


def volume_panel(image: np.ndarray, label: np.ndarray | None = None,
                 window: tuple[float, float] | None = None, label_only: bool = False) -> np.ndarray:
    """Three-plane RGB picture (uint8) of the first channel of ``image`` (C, X, Y, Z) or
    (X, Y, Z), with ``label`` (X, Y, Z) overlaid (or alone, ``label_only``). ``window`` = (low,
    high) intensities mapped to black and white: give the real volume's window to real and
    synthetic panels so their brightness compares."""
    from medlsdm.viz import three_plane

    arr = np.asarray(image, dtype=np.float32)
    arr = arr[0] if arr.ndim == 4 else arr
    if window is not None:
        lo, hi = window
        # Fixed window, then pinned corners so the viewer's own scaling cannot stretch it again.
        arr = np.clip((arr - lo) / max(hi - lo, 1e-12), 0, 1)
        arr.flat[0], arr.flat[-1] = 0.0, 1.0
    vol = np.ascontiguousarray(np.transpose(arr, (2, 1, 0)))
    lab = None if label is None else np.ascontiguousarray(np.transpose(np.asarray(label), (2, 1, 0)))
    if label_only and lab is not None:
        vol = np.zeros_like(vol)
    return three_plane(vol, label=lab)


def save_panel_rows(path: str | os.PathLike, rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str],
                    row_titles: Sequence[str] | None = None,
                    panel_titles: Sequence[Sequence[str]] | None = None) -> Path:
    """Rows of RGB panels into one PNG at ``path``: column ``titles`` over the first row, short
    ``row_titles`` (case IDs) at the left, or a title over every panel (``panel_titles``)."""
    from medlsdm.viz import montage, save_png

    return save_png(path, montage(rows, titles=titles, row_titles=row_titles, panel_titles=panel_titles))


def similarity_histogram(path: str | os.PathLike, real_values: Sequence[float | None],
                         synthetic_values: Sequence[float | None], threshold: float,
                         similarity: str, real_label: str = "real to nearest other real") -> Path:
    """Histogram of real-to-real vs synthetic-to-train nearest similarities with the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medlsdm.viz import save_figure

    real = np.array([v for v in real_values if v is not None and np.isfinite(v)], dtype=float)
    syn = np.array([v for v in synthetic_values if v is not None and np.isfinite(v)], dtype=float)
    both = np.concatenate([real, syn, [threshold]])
    bins = np.linspace(both.min(), both.max() + 1e-9, 31)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.hist(real, bins=bins, alpha=0.6, label=f"{real_label} (n={len(real)})", color="tab:blue")
    ax.hist(syn, bins=bins, alpha=0.6, label=f"synthetic to nearest training (n={len(syn)})", color="tab:orange")
    ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set_xlabel(f"nearest-neighbour similarity ({similarity})")
    ax.set_ylabel("volumes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
