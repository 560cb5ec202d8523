"""The evaluation of the shipped demo model on the demo cohort, with the real pretrained networks:
LPIPS (VGG, AlexNet), 2D FID (Inception), 3D FID on the offline random 3D CNN; the augmentation
study; the privacy audit with planted copies. Results go to benchmarks/evaluation.md by hand.

    PYTHONPATH=src python benchmarks/bench_evaluation.py --out "$OUT"

Real weights come from $MEDLSDM_SHARED_WEIGHTS (default ../shared/weights beside the repository),
imported with `medlsdm weights import` into a private torch hub cache under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def clock():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), usage.ru_utime + usage.ru_stime


def timed(label, fn, log):
    wall0, cpu0 = clock()
    result = fn()
    wall1, cpu1 = clock()
    log[label] = {"wall_s": round(wall1 - wall0, 1), "own_cpu_s": round(cpu1 - cpu0, 1)}
    print(f"[{label}] wall {wall1 - wall0:.1f} s, own CPU {cpu1 - cpu0:.1f} s", flush=True)
    return result


def autoencoder_copy(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """The image through the shipped model's autoencoder (encode, quantise, decode with its own
    label map): what a diffusion model that memorised the image's latent would produce."""
    import torch

    from medlsdm.data.labels import one_hot
    from medlsdm.demo import shipped_model_dir
    from medlsdm.inference.model import load_autoencoder

    ae, _ = load_autoencoder(shipped_model_dir())
    lo, hi = np.percentile(image, [0.5, 99.5])
    x = torch.tensor(np.clip((image - lo) / (hi - lo) * 2 - 1, -1, 1), dtype=torch.float32)[None, None]
    with torch.no_grad():
        z, _, _ = ae.quantize(ae.encode(x))
        cond = one_hot(torch.as_tensor(label, dtype=torch.long)[None, None], ae.num_classes).float()
        rec = ae.decode(z, label=cond, out_shape=image.shape)[0, 0].numpy()
    return ((rec + 1) / 2 * (hi - lo) + lo).astype(np.float32)


def plant_copies(train_images: Path, train_labels: Path, out: Path, victims, seed=0):
    """Copies of training images named as samples of the victim's own label map."""
    import nibabel as nib
    from scipy.ndimage import gaussian_filter, map_coordinates

    rng = np.random.default_rng(seed)
    written = []
    for victim in victims:
        img = nib.load(str(train_images / f"{victim}.nii.gz"))
        a = np.asarray(img.dataobj, dtype=np.float32)
        disp = [gaussian_filter(rng.normal(size=a.shape), 4) for _ in range(3)]
        grid = np.meshgrid(*[np.arange(n) for n in a.shape], indexing="ij")
        deformed = map_coordinates(a, [g + d / np.abs(d).max() * 0.8 for g, d in zip(grid, disp)], order=1,
                                   mode="nearest")
        kinds = {"exact": a, "noisy": a + 0.03 * a.std() * rng.normal(size=a.shape),
                 "shifted": np.roll(a, (1, -1, 0), (0, 1, 2)), "flipped": a[::-1],
                 "scaled": 1.3 * a + 0.1 * a.std(), "deformed": deformed,
                 "autoencoder": autoencoder_copy(a, np.asarray(nib.load(str(train_labels / f"{victim}.nii.gz")).dataobj))}
        for k, (kind, arr) in enumerate(kinds.items()):
            path = out / f"{victim}_sample{90 + k}.nii.gz"
            nib.save(nib.Nifti1Image(np.ascontiguousarray(arr, dtype=np.float32), img.affine), str(path))
            written.append((path.name, kind, victim))
    return written


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--seg-steps", type=int, default=100)
    parser.add_argument("--seg-patch", type=int, default=32)
    parser.add_argument("--sizes", default="2,4,all", help="augmentation study sizes")
    parser.add_argument("--fid-slices", type=int, default=8)
    parser.add_argument("--train-maps", type=int, default=8, help="training label maps to sample from")
    parser.add_argument("--privacy-only", action="store_true",
                        help="rerun only the privacy audits (reusing --out's samples and summary.json)")
    parser.add_argument("--train-sampling-steps", type=int, default=10,
                        help="DDIM steps for the training-map samples (the test-map samples use the model's own)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["TORCH_HOME"] = str(out / "torch_home")
    shared = Path(os.environ.get("MEDLSDM_SHARED_WEIGHTS", ROOT.parent / "shared" / "weights"))

    import torch

    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    from medlsdm import pretrained
    from medlsdm.data.demo import write_demo_cohort
    from medlsdm.demo import _generic_view, shipped_model_dir
    from medlsdm.evaluation.features import inception_from_torchscript
    from medlsdm.evaluation.quality import evaluate_quality
    from medlsdm.evaluation.report import build_report
    from medlsdm.evaluation.segmentation import evaluate_segmentation
    from medlsdm.inference import sample_to_files

    log = {}
    for name, file in (("lpips-vgg-backbone", "vgg16-features.pth"), ("lpips-alex-backbone", "alexnet-features.pth"),
                       ("lpips-vgg-heads", "lpips-v0.1-vgg-heads.pth"), ("lpips-alex-heads", "lpips-v0.1-alex-heads.pth"),
                       ("inception-fid", "inception-2015-12-05-torchscript.pt")):
        pretrained.import_weights(name, shared / file, inception_from_torchscript)
    cohort = out / "cohort"
    if not (cohort / "dataset.json").is_file():
        timed("cohort", lambda: write_demo_cohort(cohort, progress=False), log)
    model = shipped_model_dir()
    syn_test, syn_train = out / "synthetic_test", out / "synthetic_train"
    if len(list(syn_test.glob("*.nii.gz"))) < 4:
        timed("sample 4 test maps", lambda: sample_to_files(model, cohort / "labelsTs", syn_test, seed=0,
                                                            progress=False), log)
    maps = out / "train_maps"
    if not maps.is_dir():
        maps.mkdir()
        for label in sorted((cohort / "labels").glob("*.nii.gz"))[:args.train_maps]:
            os.symlink(label.resolve(), maps / label.name)
    if len(list(syn_train.glob("*.nii.gz"))) < args.train_maps:
        timed(f"sample {args.train_maps} training maps", lambda: sample_to_files(
            model, maps, syn_train, steps=args.train_sampling_steps, seed=1, progress=False), log)
    test_real = _generic_view(out / "test_real", cohort / "imagesTs", cohort / "labelsTs")
    train_real = _generic_view(out / "train_real", cohort / "images", cohort / "labels")

    ev = out / "evaluation"
    if args.privacy_only:
        summary = json.loads((out / "summary.json").read_text())
        log = summary["timings"]
        privacy_stage(args, out, cohort, syn_train, syn_test, train_real, test_real, ev, log, summary)
        return
    paired = timed("quality, paired (4 test cases)", lambda: evaluate_quality(
        cohort / "imagesTs", syn_test, ev / "paired", labels=cohort / "labelsTs",
        metrics="ssim,psnr,lpips", progress=False, ssim_window=11), log)
    summary = {"timings": log, "paired": paired["paired"]["summary"]}
    save(out, summary)
    dist = timed("quality, distributions (20 training images vs the training-map samples)", lambda: evaluate_quality(
        cohort / "images", syn_train, ev / "distribution", metrics="fid2d,fid3d_random,mmd", fid_slices=args.fid_slices,
        fid_axes=("D",), progress=False), log)
    summary["distribution"] = {k: v.get("value", v.get("mean")) for k, v in dist["distribution"].items()
                               if isinstance(v, dict)}
    save(out, summary)
    seg = timed("segmentation: real + augmentation study", lambda: evaluate_segmentation(
        train_real, test_real, syn_test, ev / "segmentation", synthetic_train=syn_train, protocols=["real", "augmentation"],
        steps=args.seg_steps, patch=(args.seg_patch,) * 3, seed=0, progress=False,
        config={"augmentation_sizes": tuple(x if x == "all" else int(x) for x in args.sizes.split(","))}), log)
    summary["segmentation_domain_gap"] = seg["domain_gap"]
    summary["augmentation"] = [{"n_real": r["n_real"], "synthetic": r["synthetic"], "case_mean": r["case_mean"],
                                "pooled": r["pooled_dice"]} for r in seg["augmentation"]["rows"]]
    save(out, summary)
    summary["segmentation_real"] = {t: seg["protocols"]["real"]["tests"][t]["case_mean"] for t in ("real", "synthetic")}
    for d in ("paired", "distribution", "segmentation"):
        build_report(ev / d)
    privacy_stage(args, out, cohort, syn_train, syn_test, train_real, test_real, ev, log, summary)


def privacy_stage(args, out, cohort, syn_train, syn_test, train_real, test_real, ev, log, summary):
    from medlsdm.evaluation.audit import audit_folders
    from medlsdm.evaluation.report import build_report

    audited = out / "synthetic_audited"
    if audited.exists():
        shutil.rmtree(audited)
    shutil.copytree(syn_train, audited, ignore=shutil.ignore_patterns("*.png"))
    for sample in syn_test.glob("*.nii.gz"):  # samples of held-out maps: calibrate the copy audit too
        shutil.copy(sample, audited / sample.name)
    planted = plant_copies(cohort / "images", cohort / "labels", audited, ["subject_003", "subject_011"])
    privacy = timed("privacy, copy audit", lambda: audit_folders(
        train_real, audited, ev / "privacy", held_out=test_real, progress=False), log)
    nearest = timed("privacy, nearest-neighbour audit (for contrast)", lambda: audit_folders(
        train_real, audited, ev / "privacy_nearest", held_out=test_real, mode="nearest", progress=False), log)
    build_report(ev / "privacy")
    heldout_ids = {p.name.removesuffix(".nii.gz") for p in syn_test.glob("*.nii.gz")}
    pairs = {p["synthetic_id"]: p for p in privacy["pairs"] if p["synthetic_id"] not in heldout_ids}
    near = {p["synthetic_id"]: p for p in nearest["pairs"] if p["synthetic_id"] not in heldout_ids}
    summary.update({
        "privacy": {"threshold": privacy["threshold"], "baseline_rate": privacy["baseline_rate"],
                    "bands": privacy["bands"], "settings": privacy["settings"],
                    "held_out_to_train": privacy["held_out_to_train"],
                    "held_out_samples_to_own_image": privacy["held_out_samples_to_own_image"],
                    "planted": [{"file": f, "kind": k, "victim": v,
                                 "similarity": pairs[f.removesuffix(".nii.gz")]["similarity"],
                                 "flagged": pairs[f.removesuffix(".nii.gz")]["flagged"],
                                 "bands": {b: pairs[f.removesuffix(".nii.gz")][b] for b in ("detail", "field")},
                                 "nearest": pairs[f.removesuffix(".nii.gz")]["train_id"],
                                 "nearest_mode_flagged": near[f.removesuffix(".nii.gz")]["flagged"]}
                                for f, k, v in planted],
                    "honest": {"n": sum(1 for s in pairs if int(s.rsplit("sample", 1)[1]) < 90),
                               "flagged": sum(p["flagged"] for s, p in pairs.items()
                                              if int(s.rsplit("sample", 1)[1]) < 90),
                               "max_similarity": max(p["similarity"] for s, p in pairs.items()
                                                     if int(s.rsplit("sample", 1)[1]) < 90),
                               "nearest_mode_flagged": sum(p["flagged"] for s, p in near.items()
                                                           if int(s.rsplit("sample", 1)[1]) < 90)},
                    "honest_pairs": [[s, p["train_id"], p["similarity"], p["flagged"], p["detail"], p["field"]]
                                     for s, p in sorted(pairs.items()) if int(s.rsplit("sample", 1)[1]) < 90],
                    "nearest_mode_threshold": nearest["threshold"]},
    })
    save(out, summary)
    print(json.dumps(summary, indent=2, default=float))


def save(out: Path, summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))


if __name__ == "__main__":
    main()
