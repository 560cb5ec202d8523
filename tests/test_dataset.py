"""The prepared-dataset loader: items in the documented layout, memory-mapped arrays, and random
patches/flips that move the image and its label map together."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import medlsdm.data.dataset as dataset_module
from medlsdm.data.dataset import PreparedDataset, load_manifest
from medlsdm.errors import ConfigError, DataError

SHAPE = (6, 7, 8)  # (D, H, W), all different so a transposed axis would show


def _coordinates(shape):
    d, h, w = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    return d, h, w


def make_dataset(root, splits=("train", "train", "val", "test"), channels=2):
    """Image channel 0 encodes each voxel's (d, h, w) position, channel 1 its negative; the label
    map is a function of the position, so any patch/flip can be checked for image/label agreement."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    d, h, w = _coordinates(SHAPE)
    code = (d * 100 + h * 10 + w).astype(np.float32)
    cases = []
    for i, split in enumerate(splits):
        image = np.stack([code + 1000 * i, -code][:channels]).astype(np.float32)
        label = ((d + 2 * h + 3 * w + i) % 4).astype(np.uint8)
        np.save(root / "images" / f"c{i}.npy", image)
        np.save(root / "labels" / f"c{i}.npy", label)
        cases.append({"case_id": f"c{i}", "subject_id": f"s{i}", "split": split, "image": f"images/c{i}.npy",
                      "label": f"labels/c{i}.npy", "record": {}})
    manifest = {"format": "medlsdm-prepared", "version": 1, "modality": "mr", "channels": ["a", "b"][:channels],
                "label_table": {str(k): f"l{k}" for k in range(4)}, "spec": {}, "cases": cases}
    (root / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return root


def _positions(item, index):
    """(d, h, w) of every voxel of an item, decoded from image channel 0."""
    code = item["image"][0].numpy() - 1000 * index
    return (code // 100).astype(int), (code // 10 % 10).astype(int), (code % 10).astype(int)


def _check_aligned(item, index):
    d, h, w = _positions(item, index)
    assert np.array_equal(item["label"][0].numpy(), (d + 2 * h + 3 * w + index) % 4)
    assert torch.equal(item["image"][1], -(item["image"][0] - 1000 * index))  # channels moved together


def test_items_have_the_documented_layout(tmp_path):
    root = make_dataset(tmp_path / "p")
    train = PreparedDataset(root, "train")
    assert len(train) == 2 and [c["case_id"] for c in train.cases] == ["c0", "c1"]
    assert len(PreparedDataset(root, "val")) == 1 and len(PreparedDataset(root, None)) == 4
    item = train[1]
    assert item["case_id"] == "c1"
    assert item["image"].dtype == torch.float32 and item["image"].shape == (2, *SHAPE)
    assert item["label"].dtype == torch.int64 and item["label"].shape == (1, *SHAPE)
    _check_aligned(item, 1)
    d, h, w = _positions(item, 1)  # no patch, no flip: the array as stored
    assert np.array_equal(d, _coordinates(SHAPE)[0]) and np.array_equal(w, _coordinates(SHAPE)[2])
    image, label = train._load(train.cases[0])
    assert isinstance(image, np.memmap) and isinstance(label, np.memmap)  # read lazily from disk


def test_patches_and_flips_move_image_and_label_together(tmp_path):
    root = make_dataset(tmp_path / "p")
    data = PreparedDataset(root, None, patch_size=(4, 5, 3), flip=True, seed=3)
    starts, w_flipped = set(), set()
    for _ in range(12):
        for index in range(len(data)):
            item = data[index]
            assert item["image"].shape == (2, 4, 5, 3) and item["label"].shape == (1, 4, 5, 3)
            _check_aligned(item, index)
            d, h, w = _positions(item, index)
            assert np.all(np.diff(d, axis=0) == 1) and np.all(np.diff(h, axis=1) == 1)  # D, H never flipped
            step = np.unique(np.diff(w, axis=2))
            assert step.tolist() in ([1], [-1])
            w_flipped.add(int(step[0]))
            starts.add((int(d.min()), int(h.min()), int(w.min())))
    assert w_flipped == {1, -1}  # flipped left-right about half of the time
    assert len(starts) > 5  # patches come from many places
    assert all(s[0] <= 2 and s[1] <= 2 and s[2] <= 5 for s in starts)  # always inside the volume


def test_flip_axes_configurable(tmp_path):
    data = PreparedDataset(make_dataset(tmp_path / "p"), "train", flip=True, flip_axes=("H",), seed=0)
    flipped = set()
    for _ in range(10):
        item = data[0]
        _check_aligned(item, 0)
        d, h, w = _positions(item, 0)
        assert np.all(np.diff(w, axis=2) == 1) and np.all(np.diff(d, axis=0) == 1)
        flipped.add(int(np.diff(h, axis=1)[0, 0, 0]))
    assert flipped == {1, -1}
    with pytest.raises(ConfigError, match="flip axes"):
        PreparedDataset(tmp_path / "p", flip_axes=("X",))


def _draws(data, n=6):
    """Patch starts (d, h, w) of `n` successive items."""
    return [tuple(int(axis.min()) for axis in _positions(data[0], 0)) for _ in range(n)]


def test_seeded_and_distinct_per_worker(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "p")
    make = lambda seed: PreparedDataset(root, "train", patch_size=(2, 2, 2), seed=seed)  # noqa: E731
    assert _draws(make(1)) == _draws(make(1))
    assert _draws(make(1)) != _draws(make(2))
    # In DataLoader workers each worker draws from its own stream (torch gives every worker its own
    # seed); copies of one generator would hand every worker the same patches.
    per_worker = []
    for worker_seed in (1234, 1235):
        monkeypatch.setattr(dataset_module, "get_worker_info", lambda s=worker_seed: SimpleNamespace(seed=s))
        per_worker.append(_draws(make(1)))
    assert per_worker[0] != per_worker[1]
    monkeypatch.setattr(dataset_module, "get_worker_info", lambda: SimpleNamespace(seed=1234))
    assert _draws(make(1)) == per_worker[0]


def test_errors(tmp_path):
    with pytest.raises(DataError, match="not a prepared dataset"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}), encoding="utf-8")
    with pytest.raises(DataError, match="not a medlsdm prepared-dataset manifest"):
        load_manifest(tmp_path)
    root = make_dataset(tmp_path / "p", splits=("train",))
    with pytest.raises(DataError, match="no cases in split 'val'"):
        PreparedDataset(root, "val")
    with pytest.raises(ConfigError, match="unknown split"):
        PreparedDataset(root, "training")
    with pytest.raises(DataError, match=r"c0.npy: patch size \[8, 8, 8\] exceeds the volume shape \[6, 7, 8\]"):
        PreparedDataset(root, "train", patch_size=(8, 8, 8))[0]
    np.save(root / "labels" / "c0.npy", np.zeros((6, 7, 9), dtype=np.uint8))
    with pytest.raises(DataError, match="do not match"):
        PreparedDataset(root, "train")[0]
