"""Downstream segmentation test: does a segmentation network see the synthetic images as it sees
real ones, and do synthetic images help train one?

Protocol (Med-LSDM's test, done right):

* ``real``: a 3D U-Net (``monai.networks.nets.UNet``, small by default, DiceCE loss, Adam, seeded)
  is trained on real training cases and tested (a) on the real test images and (b) on the
  synthetic images generated from the same test label maps, the test label map being the
  reference for both. Dice(synthetic) / Dice(real) is the domain gap (1 = none).
* ``real+synthetic`` and ``synthetic``: trained on real + synthetic or synthetic images only,
  tested on the real test images. Synthetic *training* images must come from label maps that are
  not test label maps — training on images drawn from the test label maps would show the network
  the test labels — so their label maps are looked up in ``synthetic_labels`` and then among the
  training label maps, and synthetic volumes of test cases are never trained on.

The reference loaded "real" and "fake" test images from one folder, so its two Dice values
measured the same images; here identical folders are refused (``pairing.refuse_same_folder``)
and a case ID present in both training and test sets is an error.

* ``augmentation`` (the question users ask: do synthetic volumes help when real labelled data
  are scarce?): train on N real cases (N = 2, 4, 8, all by default; nested seeded subsets), each
  with and without all synthetic training volumes, and on synthetic volumes only; Dice on the real
  test cases, as a table and a plot.

Intensities: each volume, per channel, is mapped linearly from its [0.5, 99.5] percentile range
to [-1, 1] and clipped, so real and synthetic images are judged on shape and contrast, not on a
global intensity offset. Labels are used as given (integers 0..K-1, 0 = background). Scores are
per foreground class (background excluded): the headline is the **per-case mean Dice** (each test
case's mean over its classes, averaged over cases) with a percentile-bootstrap confidence interval
over cases, also per class; the Dice of the confusion matrix pooled over all test voxels (where a
large volume outweighs the rest) is kept beside it.

Reproducible by default: every protocol trains for the same fixed number of ``steps`` (batches of
random patches, half centred on a foreground voxel) with the same network settings, seeded, on a
fixed number of CPU threads (``threads``), so the same command gives the same numbers on a quiet
and on a busy machine. A wall-clock budget (``budget_minutes``) is used only when asked for.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from medlsdm.errors import ConfigError, DataError, MedlsdmError
from medlsdm.evaluation.metrics import (bootstrap_mean_ci, confusion_matrix, mean_over_classes,
                                        overlap_from_confusion)
from medlsdm.evaluation.pairing import (VolumeFiles, check_same_grid, load_image, load_label,
                                        pair_by_case, refuse_same_folder, scan_folder,
                                        split_sample_name)

__all__ = ["SEGMENTATION_DEFAULTS", "PROTOCOLS", "SegCase", "normalise_percentiles",
           "build_network", "patch_divisor", "train_segmenter", "predict", "score",
           "augmentation_study", "evaluate_segmentation"]

SEGMENTATION_DEFAULTS = {
    "channels": (16, 32, 64, 128),  # U-Net feature maps per level: small, trains in minutes on a GPU
    "strides": (2, 2, 2),
    "num_res_units": 1,
    "patch_max": 96,              # default patch: the largest training volume, capped per axis
    "batch_size": 2,
    "lr": 1e-3,
    "steps": 400,                 # training steps per protocol, when neither epochs nor a budget is given
    "threads": 2,                 # torch CPU threads while training and predicting (results depend on it)
    "bootstrap": 2000,            # bootstrap resamples for confidence intervals over test cases
    "ci_level": 0.95,
    "augmentation_sizes": (2, 4, 8, "all"),
    "percentiles": (0.5, 99.5),
    "foreground_crop_fraction": 0.5,
    "sw_overlap": 0.25,
}
PROTOCOLS = ("real", "real+synthetic", "synthetic", "augmentation")
DEFAULT_PROTOCOLS = PROTOCOLS[:3]   # the augmentation study trains 2 x len(sizes) + 1 networks: on request


@dataclass
class SegCase:
    """A volume ready for the network: ``image`` float32 (C, X, Y, Z) in [-1, 1], ``label`` int64
    (X, Y, Z)."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    source: str


# ----------------------------------------------------------------------------- data

def normalise_percentiles(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Each channel of (C, X, Y, Z) mapped from its [low, high] percentiles to [-1, 1], clipped;
    a constant channel becomes -1."""
    out = np.empty(image.shape, dtype=np.float32)
    for c, chan in enumerate(image):
        lo, hi = np.percentile(chan, [low, high])
        out[c] = -1.0 if hi <= lo else np.clip(2 * (chan - lo) / (hi - lo) - 1, -1, 1)
    return out


def _load_case(files: VolumeFiles, label_path: Path | None, percentiles) -> SegCase:
    if label_path is None:
        raise DataError(f"{files.display}: no label map found for case '{files.name}'")
    image, affine = load_image(files)
    label, label_affine = load_label(label_path)
    check_same_grid(image.shape, affine, files.display, label.shape, label_affine, label_path)
    return SegCase(files.name, normalise_percentiles(image, *percentiles), label, files.display)


def load_real_cases(files: Mapping[str, VolumeFiles], percentiles=SEGMENTATION_DEFAULTS["percentiles"]) -> list[SegCase]:
    """Real cases (images with their label maps, from `scan_folder`) ready for the network."""
    return [_load_case(f, f.label, percentiles) for f in files.values()]


def load_synthetic_test_cases(synthetic: str | os.PathLike, test_real: str | os.PathLike,
                              test_labels: str | os.PathLike | None = None,
                              percentiles=SEGMENTATION_DEFAULTS["percentiles"]) -> list[SegCase]:
    """Synthetic volumes paired by case ID with the real test cases (``test_labels``: their label
    maps when ``test_real`` is a flat folder), each with its test case's label map (the map it was
    generated from) as the reference."""
    test_files = scan_folder(test_real, "real test cases", test_labels)
    syn = scan_folder(synthetic, "synthetic volumes")
    pairs = pair_by_case(test_files, syn, "the real test set", synthetic).pairs
    return [_load_case(p.synthetic, p.real.label, percentiles) for p in pairs]


def _num_classes(groups: Sequence[Sequence[SegCase]]) -> int:
    top = max(int(c.label.max()) for cases in groups for c in cases)
    if top > 255:
        raise DataError(f"label value {top} found: remap label maps to 0..K-1 first (medlsdm prepare does)")
    return max(top + 1, 2)


def _check_channels(groups: Mapping[str, Sequence[SegCase]]) -> int:
    counts = {(name, c.image.shape[0]) for name, cases in groups.items() for c in cases}
    if len({n for _, n in counts}) > 1:
        raise DataError(f"volumes differ in number of channels: {sorted(counts)}")
    return counts.pop()[1]


# ----------------------------------------------------------------------------- network

def patch_divisor(strides: Sequence[int]) -> int:
    return int(np.prod(strides))


def build_network(in_channels: int, num_classes: int, channels: Sequence[int] = SEGMENTATION_DEFAULTS["channels"],
                  strides: Sequence[int] = SEGMENTATION_DEFAULTS["strides"],
                  num_res_units: int = SEGMENTATION_DEFAULTS["num_res_units"]) -> torch.nn.Module:
    """MONAI's residual 3D U-Net (instance norm, PReLU)."""
    from monai.networks.nets import UNet

    if len(channels) != len(strides) + 1:
        raise MedlsdmError(f"U-Net needs one more channel count than strides: {channels} vs {strides}")
    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=num_classes, channels=tuple(channels),
                strides=tuple(strides), num_res_units=num_res_units)


def _config(config: Mapping | None) -> dict:
    unknown = sorted(set(config or {}) - set(SEGMENTATION_DEFAULTS))
    if unknown:
        raise ConfigError(f"segmentation settings: unknown {', '.join(unknown)}; known: "
                          f"{', '.join(SEGMENTATION_DEFAULTS)}")
    return {**SEGMENTATION_DEFAULTS, **(config or {})}


def _default_patch(cases: Sequence[SegCase], divisor: int, cap: int) -> tuple[int, int, int]:
    largest = np.max([c.label.shape for c in cases], axis=0)
    return tuple(int(min(cap // divisor * divisor, math.ceil(n / divisor) * divisor)) for n in largest)


def _check_patch(patch: Sequence[int], divisor: int) -> tuple[int, int, int]:
    patch = tuple(int(p) for p in patch)
    if len(patch) != 3 or any(p < divisor or p % divisor for p in patch):
        raise MedlsdmError(f"--patch {' '.join(map(str, patch))}: need 3 sizes, each a multiple of "
                           f"{divisor} (the U-Net's total downsampling)")
    return patch


def _random_patch(case: SegCase, patch, rng: np.random.Generator, fg_fraction: float):
    """(image (C, *patch), label (*patch)) cropped at random, padded (image -1, label 0) where the
    volume is smaller than the patch."""
    shape = np.array(case.label.shape)
    need = np.maximum(np.array(patch) - shape, 0)
    pad = [(int(n // 2), int(n - n // 2)) for n in need]
    image = np.pad(case.image, [(0, 0)] + pad, constant_values=-1.0)
    label = np.pad(case.label, pad, constant_values=0)
    span = np.array(label.shape) - np.array(patch)
    foreground = np.argwhere(label > 0) if rng.random() < fg_fraction else np.empty((0, 3))
    if len(foreground):
        centre = foreground[rng.integers(len(foreground))]
        start = np.clip(centre - np.array(patch) // 2, 0, span)
    else:
        start = np.array([rng.integers(s + 1) for s in span])
    sl = tuple(slice(int(a), int(a) + p) for a, p in zip(start, patch))
    return image[(slice(None), *sl)], label[sl]


def train_segmenter(cases: Sequence[SegCase], num_classes: int, patch: Sequence[int], *,
                    steps: int | None = None, epochs: int | None = None, budget_seconds: float | None = None,
                    seed: int = 0, device: str = "cpu", config: Mapping | None = None, progress: bool = True,
                    desc: str = "train") -> tuple[torch.nn.Module, dict]:
    """Train a U-Net on ``cases`` for ``steps`` (or ``epochs`` of ceil(n / batch) steps), or until
    ``budget_seconds`` pass (whichever comes first when both are given). Returns the network
    (eval mode) and {steps, epochs, seconds, final_loss}."""
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    if not cases:
        raise DataError(f"{desc}: no training volumes")
    if steps is None and epochs is None and budget_seconds is None:
        raise MedlsdmError("give a number of steps, epochs or a time budget for the segmentation training")
    cfg = _config(config)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = build_network(cases[0].image.shape[0], num_classes, cfg["channels"], cfg["strides"],
                        cfg["num_res_units"]).to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimiser = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    batch = int(cfg["batch_size"])
    steps_per_epoch = math.ceil(len(cases) / batch)
    max_steps = int(steps) if steps is not None else None if epochs is None else int(epochs) * steps_per_epoch
    start, step, last_loss = time.perf_counter(), 0, math.nan
    net.train()
    with tqdm(total=max_steps, desc=desc, disable=not progress, leave=False) as bar:
        while (max_steps is None or step < max_steps) and \
                (budget_seconds is None or time.perf_counter() - start < budget_seconds):
            crops = [_random_patch(cases[i], patch, rng, cfg["foreground_crop_fraction"])
                     for i in rng.integers(len(cases), size=batch)]
            x = torch.from_numpy(np.stack([c[0] for c in crops])).to(device)
            y = torch.from_numpy(np.stack([c[1] for c in crops])[:, None]).to(device)
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            optimiser.step()
            step, last_loss = step + 1, float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.3f}")
    net.eval()
    return net, {"steps": step, "epochs": step / steps_per_epoch, "seconds": time.perf_counter() - start,
                 "final_loss": last_loss}


@torch.no_grad()
def predict(net: torch.nn.Module, image: np.ndarray, patch: Sequence[int], device: str = "cpu",
            overlap: float = SEGMENTATION_DEFAULTS["sw_overlap"]) -> np.ndarray:
    """Label map (X, Y, Z) for a normalised image (C, X, Y, Z). Sliding-window inference
    (Gaussian-weighted overlapping patches) covers volumes larger than the patch; smaller ones
    are padded with -1 (the normalised minimum) and cropped back by MONAI."""
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.ascontiguousarray(image))[None].to(device)
    logits = sliding_window_inference(x, roi_size=tuple(patch), sw_batch_size=2, predictor=net,
                                      overlap=overlap, mode="gaussian", cval=-1.0)
    return logits.argmax(1)[0].cpu().numpy()


def score(net: torch.nn.Module, cases: Sequence[SegCase], num_classes: int, patch: Sequence[int],
          device: str = "cpu", predictions: dict | None = None, bootstrap: int = 2000,
          level: float = 0.95, seed: int = 0) -> dict:
    """Scores of ``net`` on ``cases`` (foreground classes only):

    * ``case_mean``: per-case mean Dice (each case's mean over the classes present in its
      reference or prediction, then the mean over cases) with a bootstrap CI over cases;
    * ``per_class_case_mean``: per class, the mean of the cases' Dice with its CI;
    * ``mean`` / ``per_class``: Dice, IoU, precision, recall of the confusion matrix pooled over
      all test voxels (one large volume outweighs the rest; kept for comparison);
    * ``per_case``: each case's Dice per class and its mean.

    ``predictions`` (a dict) receives the predicted maps."""
    pooled = np.zeros((num_classes, num_classes), dtype=np.int64)
    per_case = {}
    for case in cases:
        pred = predict(net, case.image, patch, device)
        conf = confusion_matrix(pred, case.label, num_classes)
        pooled += conf
        dice = {c: s["dice"] for c, s in overlap_from_confusion(conf).items()}
        per_case[case.case_id] = {"dice_per_class": dice, "dice": mean_over_classes(dice)}
        if predictions is not None:
            predictions[case.case_id] = pred
    per_class = overlap_from_confusion(pooled)
    mean = {k: mean_over_classes({c: s[k] for c, s in per_class.items()})
            for k in ("dice", "iou", "precision", "recall")}
    ci = dict(level=level, n_resamples=bootstrap, seed=seed)
    return {"n_volumes": len(cases),
            "case_mean": bootstrap_mean_ci([v["dice"] for v in per_case.values()], **ci),
            "per_class_case_mean": {c: bootstrap_mean_ci([v["dice_per_class"][c] for v in per_case.values()], **ci)
                                    for c in per_class},
            "mean": mean, "per_class": per_class, "per_case": per_case}


@contextlib.contextmanager
def _fixed_threads(threads: int):
    """torch's intra-op thread count set for the duration (summation order, hence the last bits of
    every result, depends on it), then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- the whole test

def _synthetic_sets(synthetic_dir, synthetic_train_dir, synthetic_labels_dir, train_files, test_files):
    """(synthetic test volumes paired with test cases as (files, label map, case ID), synthetic
    training volumes as (files, label map), pairing summary)."""
    syn = scan_folder(synthetic_dir, "synthetic volumes")
    test_pairing = pair_by_case(test_files, syn, "the real test set", synthetic_dir)
    test_syn = [(p.synthetic, p.real.label, p.case_id) for p in test_pairing.pairs]
    pool = syn if synthetic_train_dir is None else scan_folder(synthetic_train_dir, "synthetic training volumes")
    label_sources: dict[str, Path] = {k: v.label for k, v in train_files.items() if v.label}
    if synthetic_labels_dir is not None:
        extra = scan_folder(synthetic_labels_dir, "synthetic label maps")
        label_sources.update({k: v.images[0] for k, v in extra.items()})
    train_syn = []
    for name, files in sorted(pool.items()):
        hit = split_sample_name(name, set(label_sources) - set(test_files))
        if hit is not None:  # volumes of test cases never reach training: they carry test labels
            train_syn.append((files, label_sources[hit[0]]))
    return test_syn, train_syn, test_pairing.summary()


def _protocol_list(protocols: Sequence[str] | None) -> tuple[list[str], bool]:
    if protocols is None:
        return list(DEFAULT_PROTOCOLS), False
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise MedlsdmError(f"--protocols: unknown {unknown or protocols}; choose from {', '.join(PROTOCOLS)}")
    return list(dict.fromkeys(protocols)), True


def _sizes(sizes: Sequence, n_available: int) -> list[int]:
    """Numbers of real training cases for the augmentation study: ints (those above the number
    available are dropped) and "all"."""
    out = []
    for size in sizes:
        if str(size) == "all":
            out.append(n_available)
        elif int(size) < 1:
            raise MedlsdmError(f"augmentation sizes must be positive or 'all', got {size!r}")
        elif int(size) <= n_available:
            out.append(int(size))
    return sorted(set(out))


def augmentation_study(train_real: Sequence[SegCase], test_real: Sequence[SegCase],
                       train_synthetic: Sequence[SegCase], num_classes: int, patch: Sequence[int], *,
                       sizes: Sequence = SEGMENTATION_DEFAULTS["augmentation_sizes"], train_kw: Mapping,
                       score_kw: Mapping, seed: int = 0) -> dict:
    """Dice on the real test cases of networks trained on N real cases (a seeded permutation's
    first N, so subsets are nested) without and with the synthetic training volumes, and on the
    synthetic volumes only. Every network gets the same settings and number of steps."""
    order = np.random.default_rng(seed).permutation(len(train_real))
    rows = []

    def run(n_real: int, with_synthetic: bool, cases: list[SegCase]) -> None:
        label = f"{n_real} real" + (" + synthetic" if with_synthetic else "") if n_real else "synthetic only"
        net, info = train_segmenter(cases, num_classes, patch, seed=seed, desc=f"augmentation [{label}]", **train_kw)
        res = score(net, test_real, num_classes, patch, **score_kw)
        rows.append({"n_real": n_real, "synthetic": with_synthetic, "n_train_volumes": len(cases),
                     "steps": info["steps"], "case_mean": res["case_mean"],
                     "per_class_case_mean": res["per_class_case_mean"], "pooled_dice": res["mean"]["dice"]})

    chosen = _sizes(sizes, len(train_real))
    for n in chosen:
        subset = [train_real[i] for i in order[:n]]
        run(n, False, subset)
        if train_synthetic:
            run(n, True, subset + list(train_synthetic))
    if train_synthetic:
        run(0, True, list(train_synthetic))
    return {"sizes": chosen, "n_synthetic_train": len(train_synthetic), "rows": rows,
            "subset_order": [train_real[i].case_id for i in order]}


def evaluate_segmentation(train_real: str | os.PathLike, test_real: str | os.PathLike,
                          synthetic: str | os.PathLike, out_dir: str | os.PathLike, *,
                          synthetic_labels: str | os.PathLike | None = None,
                          synthetic_train: str | os.PathLike | None = None,
                          protocols: Sequence[str] | None = None, steps: int | None = None,
                          epochs: int | None = None, budget_minutes: float | None = None, seed: int = 0,
                          patch: Sequence[int] | None = None, device: str = "cpu",
                          config: Mapping | None = None, progress: bool = True,
                          figures: bool = True) -> dict:
    """Run the downstream test, write OUT/segmentation.json (+ figures) and return the results.

    Training length: ``steps`` per network (default ``config["steps"]``), or ``epochs``, or a
    wall-clock ``budget_minutes`` split among the networks (only when asked for: not reproducible).
    ``protocols`` None = real, real+synthetic and synthetic, skipping (with the reason) those
    without synthetic training volumes; naming a protocol that cannot run is an error.
    """
    from medlsdm.evaluation.metrics import json_safe
    from medlsdm.files import ensure_writable_dir, relative_path, write_json

    refuse_same_folder(train_real=train_real, test_real=test_real, synthetic=synthetic,
                       synthetic_train=synthetic_train)
    cfg = _config(config)
    wanted, explicit = _protocol_list(protocols)
    if sum(x is not None for x in (steps, epochs, budget_minutes)) > 1:
        raise MedlsdmError("give one of --steps, --epochs, --budget-minutes")
    if steps is None and epochs is None and budget_minutes is None:
        steps = int(cfg["steps"])
    out_dir = ensure_writable_dir(out_dir)
    pct = cfg["percentiles"]

    train_files = scan_folder(train_real, "real training cases")
    test_files = scan_folder(test_real, "real test cases")
    both = sorted(set(train_files) & set(test_files))
    if both:
        raise DataError(f"case IDs in both --train-real and --test-real: {', '.join(both[:5])}")
    test_syn, train_syn, pairing = _synthetic_sets(synthetic, synthetic_train, synthetic_labels,
                                                   train_files, test_files)
    sets = {
        "train_real": load_real_cases(train_files, pct),
        "test_real": load_real_cases(test_files, pct),
        "test_synthetic": [_load_case(f, lbl, pct) for f, lbl, _ in test_syn],
        "train_synthetic": [_load_case(f, lbl, pct) for f, lbl in train_syn],
    }
    in_channels = _check_channels(sets)
    num_classes = _num_classes([v for v in sets.values() if v])
    divisor = patch_divisor(cfg["strides"])
    patch = _check_patch(patch, divisor) if patch is not None else \
        _default_patch(sets["train_real"] + sets["train_synthetic"], divisor, cfg["patch_max"])

    training_sets = {"real": sets["train_real"], "synthetic": sets["train_synthetic"],
                     "real+synthetic": sets["train_real"] + sets["train_synthetic"]}
    skipped = {}
    runnable = []
    for name in wanted:
        if name in ("real+synthetic", "synthetic") and not sets["train_synthetic"]:
            reason = ("no synthetic training volume: name them after training cases (or give "
                      "--synthetic-labels); synthetic volumes of test cases are not trained on")
            if explicit:
                raise DataError(f"protocol {name}: {reason}")
            skipped[name] = reason
        else:
            runnable.append(name)
    n_networks = sum(1 for n in runnable if n != "augmentation")
    if "augmentation" in runnable:
        n_sizes = len(_sizes(cfg["augmentation_sizes"], len(sets["train_real"])))
        n_networks += n_sizes * (2 if sets["train_synthetic"] else 1) + (1 if sets["train_synthetic"] else 0)
    budget = None if budget_minutes is None else 60.0 * float(budget_minutes) / max(n_networks, 1)
    train_kw = dict(steps=steps, epochs=epochs, budget_seconds=budget, device=device, config=cfg, progress=progress)
    score_kw = dict(device=device, bootstrap=int(cfg["bootstrap"]), level=float(cfg["ci_level"]), seed=seed)

    results, study = {}, None
    predictions: dict[str, dict] = {"real": {}, "synthetic": {}}
    with _fixed_threads(cfg["threads"]):
        for name in runnable:
            if name == "augmentation":
                study = augmentation_study(sets["train_real"], sets["test_real"], sets["train_synthetic"],
                                           num_classes, patch, sizes=cfg["augmentation_sizes"],
                                           train_kw=train_kw, score_kw=score_kw, seed=seed)
                continue
            net, info = train_segmenter(training_sets[name], num_classes, patch, seed=seed,
                                        desc=f"segmentation [{name}]", **train_kw)
            tests = {"real": score(net, sets["test_real"], num_classes, patch,
                                   predictions=predictions["real"] if name == "real" else None, **score_kw)}
            if name == "real":
                tests["synthetic"] = score(net, sets["test_synthetic"], num_classes, patch,
                                           predictions=predictions["synthetic"], **score_kw)
            results[name] = {"n_train_volumes": len(training_sets[name]), **info, "tests": tests}

    data = {
        "kind": "medlsdm-segmentation",
        # input folders relative to this folder (no absolute locations in results, as metrics.json)
        "train_real": relative_path(train_real, out_dir), "test_real": relative_path(test_real, out_dir),
        "synthetic": relative_path(synthetic, out_dir),
        "synthetic_train": relative_path(synthetic_train or synthetic, out_dir),
        "synthetic_labels": None if synthetic_labels is None else relative_path(synthetic_labels, out_dir),
        "pairing": pairing, "n_synthetic_train": len(sets["train_synthetic"]),
        "num_classes": num_classes, "in_channels": in_channels,
        "class_names": _class_names(train_real),
        "settings": {"patch": list(patch), "steps": steps, "epochs": epochs, "budget_minutes": budget_minutes,
                     "seed": seed, "device": str(device), "threads": int(cfg["threads"]),
                     "network": {k: list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k]
                                 for k in ("channels", "strides", "num_res_units", "batch_size", "lr")},
                     "confidence_interval": f"{cfg['ci_level']:.0%} percentile bootstrap over test cases, "
                                            f"{cfg['bootstrap']} resamples, seed {seed}",
                     "normalisation": f"per volume and channel, percentiles {list(pct)} -> [-1, 1], clipped"},
        "protocols": results, "skipped_protocols": skipped,
        "domain_gap": _domain_gap(results.get("real")),
        "augmentation": study,
        "figures": [],
    }
    if figures and "real" in results:
        data["figures"] = _prediction_figure(out_dir, sets, predictions, [c for _, _, c in test_syn])
    if figures and study and study["rows"]:
        data["figures"].append(_augmentation_figure(out_dir, study))
    write_json(out_dir / "segmentation.json", json_safe(data))
    return data


def _domain_gap(real_result: dict | None) -> dict:
    if not real_result:
        return {}
    d_real = real_result["tests"]["real"]["case_mean"]["mean"]
    d_syn = real_result["tests"]["synthetic"]["case_mean"]["mean"]
    ratio = d_syn / d_real if d_real and math.isfinite(d_real) and d_real > 0 else math.nan
    return {"dice_real": d_real, "dice_synthetic": d_syn, "ratio": ratio}


def _class_names(train_real) -> dict:
    """Label names from the training folder's label table, when its layout has one."""
    try:
        from medlsdm.data.layouts import discover

        table = discover(Path(train_real), "generic").label_table
    except Exception:  # flat folder, no table: the report then shows class numbers only
        return {}
    names = getattr(table, "names", None) or {}
    return {str(k): str(v) for k, v in names.items()}


def _prediction_figure(out_dir: Path, sets: dict, predictions: dict, syn_case_ids: list[str]) -> list[dict]:
    """Two test cases: real image, reference, prediction; synthetic image (first sample of that
    label map) and the prediction on it."""
    from medlsdm.evaluation.figures import save_panel_rows, volume_panel

    first_sample = {}
    for case, case_id in zip(sets["test_synthetic"], syn_case_ids):
        first_sample.setdefault(case_id, case)
    shown = [c for c in sets["test_real"] if c.case_id in first_sample][:2]
    if not shown:
        return []
    rows = []
    for case in shown:
        syn = first_sample[case.case_id]
        rows.append([volume_panel(case.image), volume_panel(case.image, case.label),
                     volume_panel(case.image, predictions["real"][case.case_id]),
                     volume_panel(syn.image), volume_panel(syn.image, predictions["synthetic"][syn.case_id])])
    rel = "figures/segmentation_examples.png"
    save_panel_rows(out_dir / rel, rows, ["real", "reference", "prediction (real)", "synthetic",
                                          "prediction (synthetic)"], row_titles=[c.case_id for c in shown])
    return [{"path": rel, "caption": "Test cases: real image, reference label map, prediction on the real image; "
                                     "synthetic image from the same label map and the prediction on it "
                                     "(network trained on real images)."}]


def _augmentation_figure(out_dir: Path, study: dict) -> dict:
    """Per-case mean Dice (with its CI) against the number of real training cases, without and
    with synthetic volumes; synthetic only as a horizontal band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medlsdm.files import atomic_output

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    for with_syn, colour, label in ((False, "tab:blue", "real only"), (True, "tab:orange", "real + synthetic")):
        rows = [r for r in study["rows"] if r["synthetic"] == with_syn and r["n_real"] > 0]
        if rows:
            x = [r["n_real"] for r in rows]
            m = np.array([r["case_mean"]["mean"] for r in rows], dtype=float)
            lo = np.array([r["case_mean"]["ci_low"] for r in rows], dtype=float)
            hi = np.array([r["case_mean"]["ci_high"] for r in rows], dtype=float)
            err = np.nan_to_num(np.stack([m - lo, hi - m]), nan=0.0)
            ax.errorbar(x, m, yerr=err, marker="o", capsize=3, color=colour, label=label)
    only = [r for r in study["rows"] if r["n_real"] == 0]
    if only:
        c = only[0]["case_mean"]
        ax.axhline(c["mean"], color="tab:green", ls="--", label="synthetic only")
        if np.isfinite(c["ci_low"]):
            ax.axhspan(c["ci_low"], c["ci_high"], color="tab:green", alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(study["sizes"], [str(n) for n in study["sizes"]])
    ax.set_xlabel("real training cases")
    ax.set_ylabel("per-case mean Dice (real test cases)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    rel = "figures/segmentation_augmentation.png"
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    with atomic_output(out_dir / rel) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return {"path": rel, "caption": "Augmentation study: per-case mean Dice on the real test cases "
                                    "(bars: bootstrap confidence interval over cases) against the number of "
                                    "real training cases, without and with the synthetic training volumes."}
