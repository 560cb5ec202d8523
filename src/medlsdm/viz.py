"""Pictures of volumes: three orthogonal planes, label overlays, side-by-side montages, GIFs.

Arrays are in model layout (D, H, W) = (inferior→superior, posterior→anterior, left→right), so
the axial plane is array[d], the coronal plane array[:, h] and the sagittal plane array[:, :, w];
planes are flipped so that superior/anterior are up, as radiologists look at them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from medlsdm.files import atomic_output

# Fixed palette: background transparent, then distinct colours (tab10 order).
PALETTE = np.array([
    [0, 0, 0], [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
    [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207],
], dtype=np.uint8)


def _window(array: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    if lo is None or hi is None:
        finite = array[np.isfinite(array)]
        lo, hi = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0))
    scaled = (array - lo) / max(float(hi - lo), 1e-8)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def colour_labels(label: np.ndarray) -> np.ndarray:
    """Integer label plane -> RGB using the fixed palette (values beyond it wrap around)."""
    idx = np.asarray(label, dtype=np.int64)
    colours = PALETTE[np.where(idx == 0, 0, (idx - 1) % (len(PALETTE) - 1) + 1)]
    return colours


def _planes(volume: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    d, h, w = centre
    axial = volume[d][::-1]            # (H, W), anterior up
    coronal = volume[:, h][::-1]       # (D, W), superior up
    sagittal = volume[:, :, w][::-1]   # (D, H), superior up
    return [axial, coronal, sagittal]


def _centre(shape: Sequence[int], label: np.ndarray | None) -> tuple[int, int, int]:
    if label is not None and np.any(label > 0):
        return tuple(int(round(c)) for c in np.argwhere(label > 0).mean(axis=0))
    return tuple(s // 2 for s in shape)


def _pad_to(plane: np.ndarray, height: int) -> np.ndarray:
    pad = height - plane.shape[0]
    return np.pad(plane, ((pad // 2, pad - pad // 2), (0, 0)) + ((0, 0),) * (plane.ndim - 2))


def three_plane(array: np.ndarray, label: np.ndarray | None = None, window: tuple[float, float] | None = None,
                alpha: float = 0.45, centre: Sequence[int] | None = None) -> np.ndarray:
    """RGB uint8 picture of axial | coronal | sagittal planes through the centre (or the label
    centroid). `array` is (D, H, W) or (C, D, H, W) (first channel shown); with `label` (D, H, W),
    the label map is overlaid in colour (fixed palette, so a class has the same colour in every
    figure). Output height is max(H, D), width W + W + H. For label-only pictures: `label_picture`."""
    array = np.asarray(array)
    if array.ndim == 4:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"three_plane expects a (D, H, W) or (C, D, H, W) volume, got shape {array.shape}")
    if label is not None:
        label = np.asarray(label)
        label = label[0] if label.ndim == 4 and label.shape[0] == 1 else label
        if label.shape != array.shape:
            raise ValueError(f"three_plane: label map {label.shape} and image {array.shape} differ in shape")
    centre = tuple(centre) if centre is not None else _centre(array.shape, label)
    grey = _window(array, *(window or (None, None)))
    planes = [np.repeat(p[..., None], 3, axis=-1).astype(np.float32) for p in _planes(grey, centre)]
    if label is not None:
        for i, lp in enumerate(_planes(np.asarray(label), centre)):
            colour = colour_labels(lp).astype(np.float32)
            mask = (lp > 0)[..., None]
            planes[i] = np.where(mask, (1 - alpha) * planes[i] + alpha * colour, planes[i])
    height = max(p.shape[0] for p in planes)
    return np.concatenate([_pad_to(p, height) for p in planes], axis=1).astype(np.uint8)


def label_picture(label: np.ndarray, centre: Sequence[int] | None = None) -> np.ndarray:
    """RGB uint8 picture of a label map alone (colours on black)."""
    label = np.asarray(label)
    label = label[0] if label.ndim == 4 and label.shape[0] == 1 else label
    if label.ndim != 3:
        raise ValueError(f"label_picture expects a (D, H, W) label map, got shape {label.shape}")
    centre = tuple(centre) if centre is not None else _centre(label.shape, label)
    planes = [colour_labels(p) for p in _planes(label, centre)]
    height = max(p.shape[0] for p in planes)
    return np.concatenate([_pad_to(p, height) for p in planes], axis=1).astype(np.uint8)


def montage(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str] | None = None,
            row_titles: Sequence[str] | None = None, scale: float = 2.0,
            panel_titles: Sequence[Sequence[str]] | None = None) -> np.ndarray:
    """Pictures in a grid (rows of panels) as one RGB uint8 image: column `titles` over the first
    row, `row_titles` (e.g. case IDs) at the left, or a title over every panel (`panel_titles`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    ph = max(p.shape[0] for r in rows for p in r)
    pw = max(p.shape[1] for r in rows for p in r)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(scale * n_cols * pw / ph * 0.9, scale * n_rows + 0.4),
                             squeeze=False, dpi=100)
    for i in range(n_rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(rows[i]):
                ax.imshow(rows[i][j], interpolation="nearest")
            if panel_titles is not None and j < len(panel_titles[i]):
                ax.set_title(panel_titles[i][j], fontsize=8)
            elif i == 0 and titles is not None and j < len(titles):
                ax.set_title(titles[j], fontsize=9)
            if j == 0 and row_titles is not None and i < len(row_titles):
                ax.text(-0.02, 0.5, row_titles[i], transform=ax.transAxes, ha="right", va="center", fontsize=8)
    fig.tight_layout(pad=0.3)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return path


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write an RGB (or grey) uint8 image as PNG, atomically."""
    from PIL import Image

    path = Path(path)
    with atomic_output(path) as tmp:
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(tmp, format="PNG")
    return path


def save_gif(path: str | Path, frames: Sequence[np.ndarray], duration: float = 0.08) -> Path:
    """Frames (RGB uint8, same size) as an animated GIF, atomically (the denoising trajectory)."""
    from PIL import Image

    path = Path(path)
    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    with atomic_output(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=int(duration * 1000), loop=0)
    return path
