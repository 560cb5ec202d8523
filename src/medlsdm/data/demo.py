"""The built-in demo cohort: synthetic T1-weighted brain MRIs with 4-class tissue label maps,
made offline from the MNI ICBM152 2009 template that ships inside the nilearn wheel.

Each subject is the template under a random smooth deformation (affine + elastic, applied
identically to image and label map) followed by MR-like intensity variation on the image only
(bias field, gamma, scanner gain, Rician noise). Subject ``i`` is drawn from its own random
stream ``default_rng([seed, i])``, so it is the same whatever the cohort size.

Arrays are in the NIfTI voxel axes ``(X, Y, Z)`` = (left→right, posterior→anterior,
inferior→superior) with a diagonal RAS affine whose world coordinates are MNI millimetres.
"""

from __future__ import annotations

import functools
import json
import math
from importlib.resources import files
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from medlsdm import __version__
from medlsdm.data.geometry import resample_to_grid
from medlsdm.data.labels import LabelTable
from medlsdm.errors import ConfigError, MedlsdmError
from medlsdm.files import atomic_directory, write_json

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
LABEL_TABLE = LabelTable({0: "background", 1: "csf_other_brain", 2: "grey_matter", 3: "white_matter"})
GENERATOR = "medlsdm demo-data"

# Random variation between subjects. Geometric magnitudes are fractions of the mean field of
# view (192 mm by default), so a subject has the same anatomy at any output resolution. They are
# kept small because the brain spans 181 of the default 192 mm front to back: larger ones
# would push the frontal/occipital poles out of the field of view.
VARIATION = {
    "rotation_deg": 5.0,  # uniform in ±5° about each axis
    "scaling": 0.04,  # per-axis scale factor uniform in [0.96, 1.04]
    "translation": 0.01,  # uniform in ±1 % of the FOV (about ±2 mm)
    "elastic_std": 0.01,  # std of the displacement at the control points (about 2 mm)
    "elastic_grid": 6,  # control points per axis: sets how smooth the elastic part is
    "bias_std": 0.12,  # std of the log of the multiplicative bias field
    "bias_grid": 4,  # bias fields vary slowly: few control points
    "gamma_std": 0.1,  # std of the log of the gamma exponent
    "gain_range": (0.8, 1.25),  # scanner gain (log-uniform), times 1000 arbitrary units
    "noise_range": (0.01, 0.035),  # Rician noise sigma, relative to the template maximum
}

_TISSUE_THRESHOLD = 0.5  # grey + white matter probability above which a voxel is brain tissue
_BRAIN_MARGIN_MM = 5  # the brain mask stays within this distance of grey/white matter


# ----------------------------------------------------------------------------- template (1 mm)


def template_dir() -> Path:
    """Folder of nilearn's bundled MNI ICBM152 files (found through the installed package)."""
    try:
        folder = files("nilearn") / "datasets" / "data"
    except ModuleNotFoundError:
        raise MedlsdmError("the demo cohort needs nilearn (pip install nilearn), which ships the MNI template") from None
    return Path(str(folder))


def _read_template(key: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    path = template_dir() / TEMPLATE_FILES[key]
    if not path.is_file():
        raise MedlsdmError(f"{path}: MNI ICBM152 template file missing from the nilearn installation (reinstall nilearn)")
    image = nib.load(str(path))
    linear = image.affine[:3, :3]
    if not (np.allclose(linear, np.diag(np.diag(linear))) and np.all(np.diag(linear) > 0)):
        # The resampling below maps axes one to one; the files nilearn ships are RAS-aligned.
        raise MedlsdmError(f"{path}: expected an axis-aligned RAS template, got affine {image.affine.tolist()}")
    # The files are uint8 (0..255); probabilities and intensities become 0..1.
    return np.asarray(image.dataobj, dtype=np.float32) / 255.0, image.affine


def tissue_label_map(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """4-class label map from the 1 mm template: 0 background, 1 CSF and other brain,
    2 grey matter, 3 white matter.

    Grey/white matter is the argmax of (other, GM, WM) probabilities, where "other" is what
    the two maps leave. The brain mask is the (skull-stripped) T1 support, closed and
    hole-filled so that the ventricles are inside, and kept within a few millimetres of
    grey/white matter so that nothing outside the intracranial region is labelled.
    """
    tissue = (gm + wm) >= _TISSUE_THRESHOLD
    ball = ndimage.generate_binary_structure(3, 1)
    pad = 3  # closing must not erode where the brain touches the volume's edge (brainstem)
    support = np.pad(t1 > 0, pad, mode="edge")
    support = ndimage.binary_closing(support, ball, iterations=2)[pad:-pad, pad:-pad, pad:-pad]
    near_tissue = ndimage.binary_dilation(tissue, ball, iterations=_BRAIN_MARGIN_MM)
    brain = ndimage.binary_fill_holes((support & near_tissue) | tissue)
    other = np.clip(1.0 - gm - wm, 0.0, None)
    classes = np.argmax(np.stack([other, gm, wm]), axis=0).astype(np.uint8) + 1
    return np.where(brain, classes, 0).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _template_1mm() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T1 in [0, 1], label map, affine) at the template's own 1 mm resolution."""
    t1, affine = _read_template("t1")
    gm, _ = _read_template("gm")
    wm, _ = _read_template("wm")
    return t1, tissue_label_map(t1, gm, wm), affine


# -------------------------------------------------------------------- template on the output grid


def as_shape(shape: int | Sequence[int]) -> tuple[int, int, int]:
    values = (shape,) * 3 if np.isscalar(shape) else tuple(shape)
    if len(values) != 3 or any(int(v) != v or not 8 <= v <= 512 for v in values):
        raise ConfigError(f"demo data: shape (--shape) must be one or three integers between 8 and 512, got {shape!r}")
    return tuple(int(v) for v in values)


def as_spacing(spacing: float | Sequence[float]) -> tuple[float, float, float]:
    values = (spacing,) * 3 if np.isscalar(spacing) else tuple(spacing)
    if len(values) != 3 or any(not (math.isfinite(v) and 0.25 <= v <= 32) for v in values):
        raise ConfigError(f"demo data: spacing (--spacing) must be one or three values between 0.25 and 32 mm, got {spacing!r}")
    return tuple(float(v) for v in values)


def output_affine(shape: Sequence[int], spacing: Sequence[float], labels_1mm, affine_1mm) -> np.ndarray:
    """RAS affine of the output grid: centred on the brain, in MNI millimetres, with the MNI
    origin on a voxel centre (so world coordinates of voxels are round multiples of spacing)."""
    inside = np.argwhere(labels_1mm > 0)
    centre_vox = (inside.min(0) + inside.max(0)) / 2.0
    centre_mm = affine_1mm[:3, :3] @ centre_vox + affine_1mm[:3, 3]
    spacing = np.asarray(spacing)
    corner = centre_mm - spacing * (np.asarray(shape) - 1) / 2.0
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = np.round(corner / spacing) * spacing
    return affine


@functools.lru_cache(maxsize=4)
def _build_template(shape: tuple[int, int, int], spacing: tuple[float, float, float]):
    t1, labels, affine_1mm = _template_1mm()
    affine = output_affine(shape, spacing, labels, affine_1mm)
    image = resample_to_grid(t1, affine_1mm, affine, shape, order=1, antialias=True).astype(np.float32)
    # Labels via partial volumes: resample each class indicator, then take the argmax, which
    # keeps thin grey matter that nearest-neighbour subsampling would alias.
    fractions = [
        resample_to_grid((labels == k).astype(np.float32), affine_1mm, affine, shape, order=1,
                         cval=float(k == 0), antialias=True)
        for k in LABEL_TABLE.values
    ]
    out_labels = np.argmax(np.stack(fractions), axis=0).astype(np.uint8)
    for array in (image, out_labels, affine):
        array.flags.writeable = False  # shared through the cache
    return image, out_labels, affine


def build_template(
    shape: int | Sequence[int] = (64, 64, 64), spacing: float | Sequence[float] = 3.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The template on the output grid: (T1 float32 in [0, 1], label map uint8, 4x4 RAS affine).

    Cached within the process; the arrays are read-only (copy them to modify).
    """
    return _build_template(as_shape(shape), as_spacing(spacing))


# ------------------------------------------------------------------------------------ subjects


def _smooth_field(rng: np.random.Generator, grid: int, shape: Sequence[int], std: float) -> np.ndarray:
    """Random field with `std` at `grid`^3 control points, cubic-spline interpolated to `shape`
    (free-form deformation style: smoothness set by the grid, cost independent of it)."""
    coarse = rng.normal(0.0, std, size=(grid,) * 3)
    return ndimage.zoom(coarse, np.divide(shape, grid), order=3, mode="nearest")


def _subject_coordinates(shape, spacing, rng, variation) -> np.ndarray:
    """Template voxel coordinates (3, X, Y, Z) sampled by each subject voxel: the affine and
    elastic parts composed into one mapping, so the template is interpolated only once."""
    shape = np.asarray(shape)
    spacing = np.asarray(spacing, dtype=float)
    centre = (shape - 1) / 2.0
    fov = float(np.mean(shape * spacing))
    rotation = Rotation.from_euler(
        "xyz", rng.uniform(-variation["rotation_deg"], variation["rotation_deg"], 3), degrees=True
    ).as_matrix()
    scale = rng.uniform(1 - variation["scaling"], 1 + variation["scaling"], 3)
    translation = rng.uniform(-variation["translation"], variation["translation"], 3) * fov
    displacement = [
        _smooth_field(rng, variation["elastic_grid"], shape, variation["elastic_std"] * fov) for _ in range(3)
    ]
    # Physical (mm) coordinates about the grid centre, so rotations stay rigid with anisotropic voxels.
    grid = np.indices(shape, dtype=np.float64).reshape(3, -1)
    mm = (grid - centre[:, None]) * spacing[:, None]
    moved = (rotation * scale) @ mm + translation[:, None]
    moved += np.stack([d.ravel() for d in displacement])
    return (moved / spacing[:, None] + centre[:, None]).reshape(3, *shape)


def _warp_labels(labels: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Warp a label map: linear interpolation of each class indicator, then argmax. Smoother
    boundaries than nearest neighbour, and never invents a value between two labels."""
    values = np.arange(int(labels.max()) + 1)
    warped = [
        ndimage.map_coordinates((labels == k).astype(np.float32), coords, order=1, mode="constant", cval=float(k == 0))
        for k in values
    ]
    return values[np.argmax(np.stack(warped), axis=0)].astype(np.uint8)


def _vary_intensity(image: np.ndarray, rng: np.random.Generator, variation, noise: str = "random") -> np.ndarray:
    """MR-like intensity variation: smooth multiplicative bias, gamma, gain, Rician noise.

    ``noise="expected"``: from the same draws, the scan's expected value over its noise (the
    Rician mean ``sigma sqrt(pi/2) L_1/2(-s^2 / 2 sigma^2)``): the least-squares best any
    reconstruction that does not reproduce the noise can give (benchmarks use it as a ceiling)."""
    bias = np.exp(_smooth_field(rng, variation["bias_grid"], image.shape, variation["bias_std"]))
    gamma = math.exp(rng.normal(0.0, variation["gamma_std"]))
    low, high = variation["gain_range"]
    gain = 1000.0 * math.exp(rng.uniform(math.log(low), math.log(high)))
    signal = np.clip(image, 0.0, None) ** gamma * bias
    # Magnitude images carry Rician noise: |signal + complex Gaussian noise|.
    sigma = rng.uniform(*variation["noise_range"])
    if noise == "expected":
        from scipy.special import i0e, i1e

        t = signal**2 / (4 * sigma**2)   # L_1/2(-2t) = exp(-t) ((1 + 2t) I0(t) + 2t I1(t)), scaled Bessels
        return (gain * sigma * math.sqrt(math.pi / 2) * ((1 + 2 * t) * i0e(t) + 2 * t * i1e(t))).astype(np.float32)
    if noise != "random":
        raise ValueError(f"noise must be 'random' or 'expected', not {noise!r}")
    real = signal + rng.normal(0.0, sigma, image.shape)
    imaginary = rng.normal(0.0, sigma, image.shape)
    return (gain * np.sqrt(real**2 + imaginary**2)).astype(np.float32)


def make_subject(
    template_image: np.ndarray,
    template_labels: np.ndarray,
    rng: np.random.Generator,
    spacing: float | Sequence[float] = 1.0,
    variation: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic subject from the template on its grid: (image float32, label map uint8).

    `spacing` (mm) makes rotations rigid when voxels are anisotropic; `variation` overrides
    entries of ``VARIATION``.
    """
    unknown = set(variation or {}) - set(VARIATION)
    if unknown:
        raise ConfigError(f"demo data: unknown variation setting(s) {sorted(unknown)}; known: {sorted(VARIATION)}")
    settings = {**VARIATION, **(variation or {})}
    coords = _subject_coordinates(template_image.shape, as_spacing(spacing), rng, settings)
    image = ndimage.map_coordinates(template_image, coords, order=1, mode="constant", cval=0.0)
    labels = _warp_labels(template_labels, coords)
    return _vary_intensity(image, rng, settings), labels


def subject_rng(seed: int, index: int) -> np.random.Generator:
    """Independent random stream per subject: subject `index` is the same whatever the cohort size."""
    return np.random.default_rng([int(seed), int(index)])


# -------------------------------------------------------------------------------------- cohort


def _check_cohort_args(n_subjects: int, n_test: int, seed: int) -> None:
    if int(n_subjects) != n_subjects or n_subjects < 1:
        raise ConfigError(f"demo data: n_subjects (--n-subjects) must be a positive integer, got {n_subjects!r}")
    if int(n_test) != n_test or not 0 <= n_test < n_subjects:
        raise ConfigError(
            f"demo data: n_test (--n-test) must be between 0 and n_subjects - 1 = {n_subjects - 1} (at least one "
            f"training subject), got {n_test!r}"
        )
    if int(seed) != seed or seed < 0:
        raise ConfigError(f"demo data: seed (--seed) must be a non-negative integer, got {seed!r}")


def _check_destination(out: Path) -> None:
    """Refuse to replace a folder that is not an earlier demo cohort: writing is atomic, so the
    old folder would be deleted as a whole."""
    if out.is_file():
        raise MedlsdmError(f"{out}: exists and is a file; choose a folder for the demo cohort")
    if out.is_dir() and any(out.iterdir()):
        try:
            previous = json.loads((out / "dataset.json").read_text(encoding="utf-8")).get("generator")
        except (OSError, ValueError, AttributeError):
            previous = None
        if previous != GENERATOR:
            raise MedlsdmError(f"{out}: folder exists and is not an earlier demo cohort; choose a new or empty folder")


def _dataset_description(n_subjects, n_test, shape, spacing, seed, affine) -> dict:
    return {
        "name": "medlsdm demo cohort",
        "description": "Synthetic skull-stripped T1-weighted brain MRIs with tissue label maps, made by "
        "randomly deforming the MNI ICBM152 template and varying its intensities.",
        "generator": GENERATOR,
        "medlsdm_version": __version__,
        "source": {
            "template": "MNI ICBM152 2009a nonlinear symmetric (T1, GM and WM probability maps), as shipped "
            "(skull-stripped, rescaled to uint8) in nilearn's datasets/data folder",
            "files": list(TEMPLATE_FILES.values()),
            "references": [
                "Fonov et al., Unbiased average age-appropriate atlases for pediatric studies, NeuroImage 54(1), 2011",
                "Fonov et al., Unbiased nonlinear average age-appropriate brain templates from birth to "
                "adulthood, NeuroImage 47 (Suppl 1), S102, 2009",
            ],
            "license": "derived from the MNI ICBM152 2009 template; use is subject to the template's terms "
            "(Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological "
            "Institute, McGill University; free use, copying and distribution with this notice, no warranty)",
        },
        # nnU-Net-style fields, so tools that read a dataset.json see the right table.
        "channel_names": {"0": "T1"},
        "labels": {name: value for value, name in LABEL_TABLE.names.items()},
        "numTraining": n_subjects - n_test,
        "numTest": n_test,
        "file_ending": ".nii.gz",
        "parameters": {
            "n_subjects": n_subjects,
            "n_test": n_test,
            "shape": list(shape),
            "spacing_mm": list(spacing),
            "seed": seed,
            "subject_seed": "numpy.random.default_rng([seed, subject_index])",
            "affine": np.asarray(affine).round(4).tolist(),
            "variation": VARIATION,
        },
    }


_README = """medlsdm demo cohort
===================

{n_train} training subjects (images/, labels/) and {n_test} test subjects (imagesTs/, labelsTs/):
synthetic skull-stripped T1-weighted brain MRIs (float32, arbitrary units) with label maps
(uint8; see labels.json): 0 background, 1 CSF and other brain, 2 grey matter, 3 white matter.
Grid: {shape} voxels of {spacing} mm, RAS affine in MNI millimetres.

Made offline by `medlsdm demo-data` (seed {seed}) from the MNI ICBM152 2009a nonlinear
symmetric template shipped with nilearn: the tissue label map comes from its grey/white matter
probability maps and brain support; each subject is a random affine + elastic deformation of
the template (image and labels alike) with a random bias field, gamma, gain and Rician noise.
All parameters are in dataset.json. The data are synthetic and contain no real subject.

Source and license: derived from the MNI ICBM152 2009 template (Fonov et al., NeuroImage 2009
and 2011), Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal
Neurological Institute, McGill University. Use is subject to the template's terms: free use,
copying and distribution provided the copyright notice is kept; no warranty.
"""


def write_demo_cohort(
    out: str | Path,
    n_subjects: int = 24,
    n_test: int = 4,
    shape: int | Sequence[int] = (64, 64, 64),
    spacing: float | Sequence[float] = 3.0,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write the demo cohort to `out` in the generic layout `medlsdm prepare` reads, atomically.

    The last `n_test` subjects go to imagesTs/labelsTs. Returns `out`.
    """
    from tqdm.auto import tqdm

    from medlsdm.data.io import write_nifti

    out = Path(out)
    _check_cohort_args(n_subjects, n_test, seed)
    shape, spacing = as_shape(shape), as_spacing(spacing)
    _check_destination(out)
    image0, labels0, affine = build_template(shape, spacing)
    width = max(3, len(str(n_subjects - 1)))
    with atomic_directory(out) as tmp:
        for i in tqdm(range(n_subjects), desc="demo subjects", unit="subject", disable=not progress):
            image, labels = make_subject(image0, labels0, subject_rng(seed, i), spacing=spacing)
            suffix = "Ts" if i >= n_subjects - n_test else ""
            name = f"subject_{i:0{width}d}.nii.gz"
            write_nifti(tmp / f"images{suffix}" / name, image, affine)
            write_nifti(tmp / f"labels{suffix}" / name, labels, affine)
        write_json(tmp / "labels.json", LABEL_TABLE.to_json())
        write_json(tmp / "dataset.json", _dataset_description(n_subjects, n_test, shape, spacing, seed, affine))
        (tmp / "README.txt").write_text(
            _README.format(n_train=n_subjects - n_test, n_test=n_test, shape="x".join(map(str, shape)),
                           spacing="x".join(f"{s:g}" for s in spacing), seed=seed)
        , encoding="utf-8")
    return out
