"""A tiny prepared dataset (the format of `medlsdm prepare`, docs/architecture.md) for tests.

Images depend on the label map (one mean intensity per class, plus smooth noise), so that an
autoencoder has structure to learn and a SPADE decoder has a label map that means something.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage


def _label_map(rng: np.random.Generator, shape, num_classes: int) -> np.ndarray:
    """Smooth random blobs: class k where a smoothed noise field falls in its quantile band,
    so every class is present and regions are connected, like anatomy."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=max(shape) / 8)
    edges = np.quantile(field, np.linspace(0, 1, num_classes + 1)[1:-1])
    return np.digitize(field, edges).astype(np.uint8)


def _image(rng: np.random.Generator, labels: np.ndarray, num_classes: int, channels: int) -> np.ndarray:
    means = np.linspace(-0.8, 0.8, num_classes)
    out = []
    for c in range(channels):
        base = means[(labels.astype(int) + c) % num_classes]
        noise = ndimage.gaussian_filter(rng.standard_normal(labels.shape), sigma=1.5)
        out.append(base + 0.1 * noise / (noise.std() + 1e-8))
    return np.clip(np.stack(out), -1.0, 1.0).astype(np.float32)


def make_prepared_dataset(root, n_train: int = 3, n_val: int = 1, shape=(16, 16, 16), num_classes: int = 3,
                          channels: int = 1, seed: int = 0, n_test: int = 0) -> Path:
    """Write a prepared dataset to `root` and return its path.

    Cases are named case000, case001, ...; the first `n_train` are 'train', the next `n_val`
    'val', the last `n_test` 'test'. Images are float32 (C, D, H, W) in [-1, 1], labels uint8
    (D, H, W) with values 0..num_classes-1.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    cases = []
    for i, split in enumerate(splits):
        case_id = f"case{i:03d}"
        labels = _label_map(rng, tuple(shape), num_classes)
        image = _image(rng, labels, num_classes, channels)
        np.save(root / "images" / f"{case_id}.npy", image)
        np.save(root / "labels" / f"{case_id}.npy", labels)
        cases.append({
            "case_id": case_id, "subject_id": case_id, "split": split,
            "image": f"images/{case_id}.npy", "label": f"labels/{case_id}.npy",
            "record": {"original_shape": list(shape), "affine": np.eye(4).tolist(),
                       "normalisation": {"kind": "minmax", "low": 0.0, "high": 1.0}},
        })
    manifest = {
        "format": "medlsdm-prepared", "version": 1, "modality": "mr",
        "channels": [f"ch{c}" for c in range(channels)] if channels > 1 else ["t1"],
        "label_table": {str(k): ("background" if k == 0 else f"class{k}") for k in range(num_classes)},
        "spec": {"target_shape": list(shape), "normalisation": "minmax"},
        "cases": cases,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return root
