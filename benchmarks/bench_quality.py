"""Image quality and diversity of Med-LSDM models side by side on the demo cohort's held-out
subjects (benchmarks/quality.md): each variant (a model, a DDIM eta, requantisation of the
sampled latents on or off) generates N samples of every held-out label map; reported per variant:

* paired SSIM / PSNR / LPIPS-VGG against the real image of the map, 2D FID (Inception, slices
  along D, H, W), the checkerboard ratio (2-voxel-period energy, synthetic / real),
  mean pairwise MS-SSIM among the samples of one map (`evaluate quality`);
* appearance spread: the standard deviation over the samples of one map of the white-matter noise
  level, white/grey contrast and bias-field strength (`evaluation.diversity`), mean over maps,
  next to the same spread over the real subjects (all 24 of the cohort);
* the same MS-SSIM on volumes normalised alike (the 0.5 / 99.5 percentiles inside the label map
  to [-1, 1]: MR gain is arbitrary and `prepare` removes it), next to the same figure for real
  re-scans of one anatomy: each held-out subject's deformed template given N intensity draws
  (bias field, gamma, gain, noise) of the cohort's own generator, the first being the cohort's
  scan itself (what samples of one map should vary like: the map fixes the anatomy);
* the Dice ratio of one seeded segmenter (trained on the real training subjects for a fixed
  number of epochs) on the synthetic vs the real test images;
* stage 1: held-out reconstruction SSIM / PSNR of each variant's autoencoder (through the
  codebook, and without quantising the encoder's output), against the scan and against its
  expected value over the noise (the Rician mean of its noise-free signal); and the ceiling of a
  reconstruction that does not reproduce the noise: that expected scan's PSNR against the scan
  (the least-squares best; its SSIM beside it, for reference, not a bound). The cohort's
  generator, replayed from its dataset.json, gives both.

And a figure: the first held-out map's N samples for each variant next to N real subjects.

    medlsdm demo-data --out COHORT
    python benchmarks/bench_quality.py --cohort COHORT --out OUT --weights ../shared/weights \\
        --variant shipped=src/medlsdm/weights/demo --variant shipped-eta1=src/medlsdm/weights/demo,eta=1 \\
        --variant new=RUN_DIR --variant new-requantize=RUN_DIR,requantize=1,appearance=none
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from medlsdm.data.io import read_image, read_label_map
from medlsdm.evaluation.diversity import APPEARANCE_STATISTICS, appearance_spread, appearance_statistics
from medlsdm.evaluation.metrics import psnr, ssim3d
from medlsdm.evaluation.pairing import scan_folder
from medlsdm.evaluation.quality import evaluate_quality
from medlsdm.evaluation.segmentation import load_real_cases, load_synthetic_test_cases, score, train_segmenter
from medlsdm.inference import load_autoencoder, sample_to_files

WHITE, GREY = 3, 2   # the demo cohort's label table


def parse_variant(text: str) -> tuple[str, Path, dict]:
    name, _, rest = text.partition("=")
    path, *options = rest.split(",")
    opts = {"eta": 0.0, "requantize": None, "appearance": "auto"}
    for option in options:
        key, _, value = option.partition("=")
        if key == "eta":
            opts["eta"] = float(value)
        elif key == "requantize":
            opts["requantize"] = value in ("1", "true", "on")
        elif key == "appearance":
            opts["appearance"] = value
        else:
            raise SystemExit(f"--variant {text!r}: unknown option {key!r} (eta=, requantize=, appearance=)")
    return name, Path(path), opts


def model_copy(model_dir: Path, dest: Path, requantize: bool | None) -> Path:
    """The model folder itself, or a copy whose sidecar switches requantisation."""
    if requantize is None:
        return model_dir
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("diffusion.safetensors", "autoencoder.safetensors", "autoencoder.json"):
        shutil.copy2(model_dir / name, dest / name)
    sidecar = json.loads((model_dir / "diffusion.json").read_text())
    sidecar.setdefault("latent", {})["requantize"] = bool(requantize)
    (dest / "diffusion.json").write_text(json.dumps(sidecar))
    return dest


def _image(path) -> np.ndarray:
    array = read_image([path]).array
    return array[0] if array.ndim == 4 else array


def appearance(folder: Path, labels: Path | None = None) -> dict[str, list[dict]]:
    """Appearance statistics of every volume, grouped by case ID."""
    groups: dict[str, list[dict]] = {}
    for case_id, files in scan_folder(folder, "volumes", labels).items():
        image = _image(files.images[0])
        label = read_label_map(files.label).array
        groups.setdefault(case_id.split("_sample")[0], []).append(appearance_statistics(image, label, WHITE, GREY))
    return groups


def sample_groups(samples: Path, label_dir: Path) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for path in sorted(samples.glob("*_sample*.nii.gz")):
        case = path.name.split("_sample")[0]
        image = _image(path)
        label = read_label_map(label_dir / f"{case}.nii.gz").array
        groups.setdefault(case, []).append(appearance_statistics(image, label, WHITE, GREY))
    return groups


def normalised(volume: np.ndarray, label: np.ndarray) -> np.ndarray:
    """``volume`` with the 0.5 / 99.5 percentiles inside the label map mapped to [-1, 1] and
    clipped (the same voxels for every volume of a case, whatever its background looks like)."""
    lo, hi = np.percentile(volume[label > 0], [0.5, 99.5])
    return np.clip(2.0 * (volume - lo) / (hi - lo or 1.0) - 1.0, -1.0, 1.0)


def normalised_diversity(volumes_by_case: dict[str, list[np.ndarray]], label_dir: Path) -> float:
    """Mean over cases of the mean pairwise MS-SSIM of a case's volumes after `normalised`."""
    from medlsdm.evaluation.diversity import mean_pairwise_ms_ssim

    values = []
    for case, volumes in volumes_by_case.items():
        label = read_label_map(label_dir / f"{case}.nii.gz").array
        values.append(mean_pairwise_ms_ssim([normalised(v, label) for v in volumes], 2.0))
    return float(np.mean(values))


def regenerate(cohort: Path, k: int) -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
    """Per held-out subject, from the generator settings in the cohort's dataset.json: the
    cohort's scan's expected value over its noise (the same bias field, gamma and gain), and `k` scans of its
    anatomy — the deformed template with the cohort's intensity variation drawn `k` times, the
    first draw being the cohort's scan itself (checked against its file)."""
    from scipy import ndimage

    from medlsdm.data import demo

    params = json.loads((cohort / "dataset.json").read_text())["parameters"]
    template, _, _ = demo.build_template(params["shape"], params["spacing_mm"])
    variation = {**demo.VARIATION, **params["variation"]}
    out = {}
    for path in sorted((cohort / "imagesTs").glob("*.nii.gz")):
        case = path.name.replace(".nii.gz", "")
        index = int(case.rsplit("_", 1)[1])

        def anatomy_and_rng():
            rng = demo.subject_rng(params["seed"], index)
            coords = demo._subject_coordinates(template.shape, demo.as_spacing(params["spacing_mm"]), rng, variation)
            return ndimage.map_coordinates(template, coords, order=1, mode="constant", cval=0.0), rng

        anatomy, rng = anatomy_and_rng()
        scans = [demo._vary_intensity(anatomy, rng, variation)]
        stored = _image(path)
        if stored.shape != scans[0].shape or not np.allclose(scans[0], stored, rtol=0,
                                                              atol=1e-3 * float(scans[0].max())):
            raise SystemExit(f"{path.name} is not what the cohort's generator gives: not a demo-data cohort")
        anatomy, rng = anatomy_and_rng()
        expected = demo._vary_intensity(anatomy, rng, variation, noise="expected")
        scans += [demo._vary_intensity(anatomy, np.random.default_rng([params["seed"], index, 1000 + j]), variation)
                  for j in range(k - 1)]
        out[case] = (expected, scans)
    return out


def prepared_like(volume: np.ndarray, real: np.ndarray) -> np.ndarray:
    """``volume`` on the intensity mapping `prepare` gives the real scan ``real`` (its 0.5 / 99.5
    percentiles of the head to [-1, 1])."""
    body = real[real > real.min()]
    lo, hi = np.percentile(body, [0.5, 99.5])
    return np.clip(2.0 * (np.clip(volume, lo, hi) - lo) / (hi - lo) - 1.0, -1.0, 1.0)


def noise_ceiling(generated: dict) -> dict:
    """Held-out SSIM / PSNR of each scan's expected value over its noise against the scan (both
    prepared as `prepare` does): the PSNR is the most a reconstruction that does not reproduce
    the noise can reach (the least-squares best); the SSIM is given beside it, not a bound."""
    out = {"ssim": [], "psnr": []}
    for case, (expected, scans) in generated.items():
        real = prepared_like(scans[0], scans[0])
        clean = prepared_like(expected, scans[0])
        out["ssim"].append(ssim3d(real, clean, 2.0))
        out["psnr"].append(psnr(real, clean, 2.0))
    return {**{k: float(np.mean(v)) for k, v in out.items()}, "per_case": out}


def reconstruction(model_dir: Path, cohort: Path, generated: dict) -> dict:
    """Held-out stage-1 reconstruction, through the codebook and without it, on [-1, 1] images
    normalised as at preparation (the demo cohort's 0.5 / 99.5 percentiles); and through the
    codebook against the scan's expected value over its noise (``_expected``: how far from the
    noise-free image the reconstruction is)."""
    from medlsdm.data.labels import one_hot

    ae, _ = load_autoencoder(model_dir / "autoencoder.safetensors")
    out = {"ssim": [], "psnr": [], "ssim_unquantised": [], "psnr_unquantised": [],
           "ssim_expected": [], "psnr_expected": []}
    files = scan_folder(cohort / "imagesTs", "real test cases", cohort / "labelsTs")
    for case in load_real_cases(files):
        expected, scans = generated[case.case_id]
        clean = prepared_like(expected, scans[0])
        x = torch.as_tensor(case.image)[None].float()
        label = one_hot(torch.as_tensor(case.label)[None, None].long(), ae.num_classes or 4) \
            if ae.num_classes else None
        with torch.no_grad():
            z = ae.encode(x)
            for suffix, latent in (("", ae.quantize(z)[0]), ("_unquantised", z)):
                rec = ae.decode(latent, label, out_shape=x.shape[2:])[0, 0].numpy()
                real = x[0, 0].numpy()
                out["ssim" + suffix].append(ssim3d(real, rec, 2.0))
                out["psnr" + suffix].append(psnr(real, rec, 2.0))
                if not suffix:
                    out["ssim_expected"].append(ssim3d(clean, rec, 2.0))
                    out["psnr_expected"].append(psnr(clean, rec, 2.0))
    return {k: float(np.mean(v)) for k, v in out.items()}


def figure(path: Path, cohort: Path, rows: dict[str, Path], n: int) -> None:
    from medlsdm.viz import montage, save_png

    first = sorted((cohort / "labelsTs").glob("*.nii.gz"))[0].name.replace(".nii.gz", "")
    real = sorted((cohort / "images").glob("*.nii.gz"))[:n]

    def axial(p: Path) -> np.ndarray:
        v = _image(p)
        plane = np.rot90(v[:, :, v.shape[2] // 2])
        lo, hi = np.percentile(plane, [0.5, 99.5])
        return np.repeat(np.clip((plane - lo) / (hi - lo or 1.0), 0, 1)[..., None], 3, axis=-1)   # grey RGB

    grid = [[axial(p) for p in real]]
    titles = ["real subjects"]
    for name, folder in rows.items():
        grid.append([axial(p) for p in sorted(folder.glob(f"{first}_sample*.nii.gz"))[:n]])
        titles.append(f"{name}: {first}")
    save_png(path, montage(grid, row_titles=titles))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=DIR[,eta=E][,requantize=0|1]")
    parser.add_argument("--weights", type=Path, help="folder with the LPIPS and Inception files (../shared/weights)")
    parser.add_argument("--n", type=int, default=4, help="samples per held-out label map")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seg-epochs", type=int, default=60)
    parser.add_argument("--fid-slices", type=int, default=4, help="slices per axis and volume for 2D FID")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cohort, out = args.cohort, args.out
    out.mkdir(parents=True, exist_ok=True)
    w = args.weights
    quality_kw = {"metrics": ["ssim", "psnr", "lpips", "fid2d", "checkerboard", "diversity"]} if w else \
        {"metrics": ["ssim", "psnr", "checkerboard", "diversity"]}
    quality_kw["fid_slices"] = args.fid_slices
    if w:
        quality_kw.update(lpips_backbone=w / "vgg16-features.pth", lpips_heads=w / "lpips-v0.1-vgg-heads.pth",
                          lpips_net="vgg", inception=w / "inception-2015-12-05-torchscript.pt")

    real_groups = {**appearance(cohort / "images", cohort / "labels"), **appearance(cohort / "imagesTs", cohort / "labelsTs")}
    real_spread = appearance_spread([[s[0] for s in real_groups.values()]])
    train = load_real_cases(scan_folder(cohort / "images", "real training cases", cohort / "labels"))
    test_files = scan_folder(cohort / "imagesTs", "real test cases", cohort / "labelsTs")
    test = load_real_cases(test_files)
    patch = tuple(int(s) for s in train[0].image.shape[1:])
    log(f"real appearance spread {real_spread}")
    generated = regenerate(cohort, max(args.n, 2))
    rescan_ms_ssim = normalised_diversity({case: scans for case, (_, scans) in generated.items()}, cohort / "labelsTs")
    log(f"real re-scans of one anatomy: normalised MS-SSIM {rescan_ms_ssim:.3f}")
    ceiling = noise_ceiling(generated)
    log(f"stage-1 ceiling (the expected scan against the scan): SSIM {ceiling['ssim']:.3f}, PSNR {ceiling['psnr']:.2f}")
    net, seg_info = train_segmenter(train, 4, patch, epochs=args.seg_epochs, seed=args.seed, progress=False)
    real_dice = score(net, test, 4, patch)["case_mean"]["mean"]
    log(f"segmenter: {seg_info}, Dice on the real test images {real_dice:.3f}")

    results, folders = {}, {}
    for text in args.variant:
        name, model_dir, opts = parse_variant(text)
        model = model_copy(model_dir, out / name / "model", opts["requantize"])
        samples = out / name / "samples"
        start = time.process_time()
        sample_to_files(model, cohort / "labelsTs", samples, n=args.n, eta=opts["eta"], seed=args.seed,
                        progress=False, overwrite=True, appearance=opts["appearance"])
        cpu = (time.process_time() - start) / (args.n * len(test_files))
        log(f"{name}: sampled, {cpu:.1f} s own CPU per volume")
        quality = evaluate_quality(cohort / "imagesTs", samples, out / name / "quality", labels=cohort / "labelsTs",
                                   progress=False, figures=False, **quality_kw)
        groups = sample_groups(samples, cohort / "labelsTs")
        spread = appearance_spread(list(groups.values()))
        syn_dice = score(net, load_synthetic_test_cases(samples, cohort / "imagesTs", cohort / "labelsTs"),
                         4, patch)["case_mean"]["mean"]
        paired, dist = quality["paired"]["summary"], quality["distribution"]
        results[name] = {
            "model": str(model_dir), **opts, "cpu_seconds_per_volume": cpu,
            "ssim": paired["ssim"]["mean"], "psnr": paired["psnr"]["mean"],
            "lpips_vgg": paired.get("lpips_vgg", {}).get("mean"),
            "fid2d": dist.get("fid2d", {}).get("mean"), "checkerboard": dist["checkerboard"]["value"],
            "checkerboard_per_axis": dist["checkerboard"]["per_axis"],
            "ms_ssim_within_map": quality["diversity"]["synthetic_mean"], "ms_ssim_real": quality["diversity"]["real"],
            "ms_ssim_within_map_normalised": normalised_diversity(
                {case: [_image(p) for p in sorted(samples.glob(f"{case}_sample*.nii.gz"))] for case in groups},
                cohort / "labelsTs"),
            "ms_ssim_rescans_normalised": rescan_ms_ssim,
            "appearance_spread": spread,
            "appearance_spread_ratio": {k: spread[k] / real_spread[k] for k in APPEARANCE_STATISTICS},
            "dice_synthetic": syn_dice, "dice_real": real_dice, "dice_ratio": syn_dice / real_dice,
            "stage1": reconstruction(model, cohort, generated),
            "stage1_ceiling": {"ssim": ceiling["ssim"], "psnr": ceiling["psnr"]},
        }
        folders[name] = samples
        print(name, json.dumps(results[name], default=float), flush=True)
        # after every variant, so what is measured is on disk even if a later one fails
        write_outputs(out, cohort, args.n, results, folders, real_spread, seg_info, real_dice)


def write_outputs(out: Path, cohort: Path, n: int, results: dict, folders: dict, real_spread: dict,
                  seg_info: dict, real_dice: float) -> None:
    """quality.json, quality.md (the table) and samples_vs_real.png of the variants in `results`."""
    figure(out / "samples_vs_real.png", cohort, folders, n)
    summary = {"real_appearance_spread": real_spread, "segmenter": seg_info, "variants": results}
    (out / "quality.json").write_text(json.dumps(summary, indent=1, default=float))

    keys = [("stage-1 held-out SSIM", lambda r: r["stage1"]["ssim"]),
            ("stage-1 held-out PSNR (dB)", lambda r: r["stage1"]["psnr"]),
            ("stage-1 SSIM / PSNR without quantising", lambda r: f"{r['stage1']['ssim_unquantised']:.3f} / "
                                                                 f"{r['stage1']['psnr_unquantised']:.2f}"),
            ("stage-1 ceiling: the expected scan's SSIM / PSNR", lambda r: f"{r['stage1_ceiling']['ssim']:.3f} / "
                                                                         f"{r['stage1_ceiling']['psnr']:.2f}"),
            ("stage-1 SSIM / PSNR against the expected scan", lambda r: f"{r['stage1']['ssim_expected']:.3f} / "
                                                                        f"{r['stage1']['psnr_expected']:.2f}"),
            ("checkerboard ratio (goal <= 1.1)", lambda r: r["checkerboard"]),
            ("paired SSIM", lambda r: r["ssim"]), ("paired PSNR (dB)", lambda r: r["psnr"]),
            ("LPIPS-VGG", lambda r: r["lpips_vgg"]), ("2D FID", lambda r: r["fid2d"]),
            ("MS-SSIM among samples of a map (goal <= 0.95)", lambda r: r["ms_ssim_within_map"]),
            ("the same, normalised inside the label map", lambda r: r.get("ms_ssim_within_map_normalised")),
            *[(f"{k} spread / real (goal >= 0.5)", (lambda k: lambda r: r["appearance_spread_ratio"][k])(k))
              for k in APPEARANCE_STATISTICS],
            ("Dice ratio synthetic / real (goal >= 0.95)", lambda r: r["dice_ratio"]),
            ("own-CPU s per volume", lambda r: r["cpu_seconds_per_volume"])]
    lines = ["| | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for label, get in keys:
        cells = []
        for r in results.values():
            v = get(r)
            cells.append("–" if v is None else v if isinstance(v, str) else f"{v:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    first = next(iter(results.values()))
    lines.append(f"\nReal: MS-SSIM among subjects {first['ms_ssim_real']:.3f}; normalised MS-SSIM among "
                 f"{max(n, 2)} re-scans of one anatomy {first.get('ms_ssim_rescans_normalised', float('nan')):.3f}; "
                 f"appearance spread over the "
                 f"24 subjects " + ", ".join(f"{k} {v:.4f}" for k, v in real_spread.items()) +
                 f"; segmenter Dice on the real test images {real_dice:.3f} ({seg_info.get('steps')} steps)")
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
