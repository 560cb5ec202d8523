"""Reading and writing volumes with their geometry.

A `Volume` keeps the array in the file's voxel axes (i, j, k), channels first, and the 4×4
voxel → world affine in RAS millimetres (the NIfTI convention). NIfTI is read with nibabel;
NRRD, MHA/MHD and DICOM series with SimpleITK, whose LPS physical space is converted to RAS.

Readers check before they allocate or trust anything:
- size: the header's dimensions x data type must fit `max_volume_bytes()` (default 4 GiB; raise
  it with the environment variable ``MEDLSDM_MAX_VOLUME_GB`` or ``medlsdm --max-volume-gb``), so
  a header claiming a huge volume (or a gzip bomb) is refused before any voxel is inflated;
- geometry: voxel sizes must be positive; a NIfTI whose qform and sform (both set) disagree is
  read with the **sform** (as nibabel, FSL and ANTs do) and a warning names the difference; one
  with neither set has no known orientation (warning); a DICOM series must have regular slice
  positions along its normal (a missing slice is an error, not a stretched volume);
- label maps keep their values exactly (`data.labels.validate_label_map`: no narrowing casts).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from medlsdm.data.labels import LabelTable, validate_label_map
from medlsdm.errors import DataError
from medlsdm.files import atomic_output

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MAX_VOLUME_ENV = "MEDLSDM_MAX_VOLUME_GB"
DEFAULT_MAX_VOLUME_GB = 4.0
SLICE_GAP_TOLERANCE = 0.01  # relative deviation of a DICOM slice gap from the median gap

log = logging.getLogger(__name__)


def max_volume_bytes() -> int:
    """The largest volume (voxels x bytes per voxel, all channels) a reader will allocate."""
    raw = os.environ.get(MAX_VOLUME_ENV)
    try:
        gb = DEFAULT_MAX_VOLUME_GB if raw in (None, "") else float(raw)
    except ValueError:
        raise DataError(f"{MAX_VOLUME_ENV}={raw!r}: expected a number of gigabytes") from None
    return int(gb * 2**30)


def check_volume_size(path, shape, itemsize: int) -> None:
    """Refuse, from the header alone, a volume larger than `max_volume_bytes()`."""
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise DataError(f"{path}: header gives negative dimensions {tuple(dims)}")
    total = int(np.prod(np.array(dims, dtype=object))) * int(itemsize) if dims else 0
    if total > max_volume_bytes():
        raise DataError(f"{path}: header claims a volume of {tuple(dims)} voxels x {itemsize} bytes "
                        f"= {total / 2**30:.3g} GiB, over the limit of {max_volume_bytes() / 2**30:.3g} GiB "
                        f"(raise it with {MAX_VOLUME_ENV} or --max-volume-gb if the file is genuine)")


def _check_spacing(path, spacing) -> None:
    spacing = [float(v) for v in spacing]
    if not all(np.isfinite(v) and v > 0 for v in spacing):
        raise DataError(f"{path}: voxel size {tuple(spacing)} has zero, negative or non-finite values")


@dataclass
class Volume:
    """A volume in its file's voxel axes: `array` (X, Y, Z) or channels-first (C, X, Y, Z) and
    `affine` 4x4 voxel (i, j, k) -> world RAS mm."""

    array: np.ndarray
    affine: np.ndarray
    path: str | None = None
    channel_names: list[str] | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[-3:])

    @property
    def num_channels(self) -> int:
        return 1 if self.array.ndim == 3 else int(self.array.shape[0])


def volume_stem(path: str | Path) -> str:
    """File name without its volume suffix (``case.nii.gz`` -> ``case``)."""
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _nifti_affine(img, path: Path) -> np.ndarray:
    """The voxel -> world affine by the rule in the module docstring (sform, else qform)."""
    import nibabel as nib

    header = img.header
    # nibabel repairs some headers on loading (negative voxel sizes become positive): check the
    # voxel sizes as the file holds them.
    with nib.openers.ImageOpener(str(path)) as fh:
        raw = type(header).from_fileobj(fh, check=False)
    _check_spacing(path, raw["pixdim"][1:4])
    sform, scode = header.get_sform(coded=True)
    qform, qcode = header.get_qform(coded=True)
    if scode > 0 and qcode > 0:
        diff = float(np.abs(np.asarray(sform) - np.asarray(qform)).max())
        if diff > 1e-3:
            log.warning("%s: qform and sform disagree (up to %.3g mm); using the sform", path, diff)
    elif scode == 0 and qcode == 0:
        log.warning("%s: neither qform nor sform is set; the orientation is unknown (taken as "
                    "voxel axes = RAS, spacing from pixdim)", path)
    return np.asarray(img.affine, dtype=np.float64)


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))  # reads the header only
    check_volume_size(path, img.header.get_data_shape(), img.header.get_data_dtype().itemsize)
    affine = _nifti_affine(img, path)
    array = np.asarray(img.dataobj)  # forces the read: corruption surfaces here
    return array, affine


def _itk_error_text(exc: Exception) -> str:
    """SimpleITK's messages start with a C++ source location; keep ITK's own reason instead."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        match = re.search(r"ERROR: (?:\w+\(0x[0-9a-fA-F]+\): )?(.*)", line)
        if match:
            reason = next((text for text in lines if text.startswith("Reason:")), "")
            return " ".join(filter(None, [match.group(1).rstrip(":"), reason]))
    return lines[-1] if lines else type(exc).__name__


@contextlib.contextmanager
def _itk_warnings_off():
    """GDCM/ITK print warnings straight to stderr (e.g. 'No Series were found'); our own
    DataError says it in one line, so silence them while reading."""
    import SimpleITK as sitk

    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _itk_to_volume(image, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image (LPS physical space, array (k, j, i[, c])) -> (array, RAS affine)."""
    import SimpleITK as sitk

    if image.GetDimension() != 3:
        raise DataError(f"{path}: expected a 3D volume (or 3D with channels), got a {image.GetDimension()}D image "
                        f"of size {image.GetSize()}")
    array = sitk.GetArrayFromImage(image)  # (k, j, i[, c])
    if image.GetNumberOfComponentsPerPixel() > 1:
        array = np.moveaxis(array, -1, 0)  # (c, k, j, i)
        array = np.transpose(array, (0, 3, 2, 1))
    else:
        array = np.transpose(array, (2, 1, 0))
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    _check_spacing(path, spacing)
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing[None, :]
    affine[:3, 3] = image.GetOrigin()
    return array, LPS_TO_RAS @ affine


def _check_itk_header(file_name: str, path: Path, n_files: int = 1) -> None:
    """Read an ITK file's header only and refuse a volume over the size limit."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(file_name)
    reader.ReadImageInformation()
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    bits = next((b for b in (8, 16, 32, 64) if f"{b}-bit" in pixel), 64)
    itemsize = bits // 8 * (2 if "complex" in pixel else 1)
    size = list(reader.GetSize())
    if n_files > 1:  # one slice per file
        size = size[:2] + [n_files]
    check_volume_size(path, size, itemsize * reader.GetNumberOfComponents())


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    _check_itk_header(str(path), path)
    return _itk_to_volume(sitk.ReadImage(str(path)), path)


def _check_slice_positions(reader, files: Sequence[str], folder: Path) -> None:
    """Slices of a series must be evenly spaced along the slice normal: a missing or duplicated
    slice would otherwise be read as a regular volume with the wrong anatomy (ITK only warns).
    `reader` is the ImageSeriesReader after `Execute` with its per-slice metadata kept."""
    if len(files) < 3:
        return
    positions, normal = [], None
    for k, name in enumerate(files):
        if not (reader.HasMetaDataKey(k, "0020|0032") and reader.HasMetaDataKey(k, "0020|0037")):
            return  # no positions to check (ITK falls back to the slice spacing)
        try:
            position = np.array([float(v) for v in reader.GetMetaData(k, "0020|0032").split("\\")])
            if normal is None:
                cosines = np.array([float(v) for v in reader.GetMetaData(k, "0020|0037").split("\\")])
                normal = np.cross(cosines[:3], cosines[3:6])
        except ValueError:
            raise DataError(f"{name}: unreadable image position/orientation tags") from None
        positions.append(float(position @ normal))
    gaps = np.diff(np.sort(positions))
    median = float(np.median(gaps))
    bad = np.abs(gaps - median) > SLICE_GAP_TOLERANCE * median + 1e-4
    if median <= 0 or np.any(bad):
        odd = [f"{g:.4g}" for g in gaps[bad][:3]]
        raise DataError(f"{folder}: irregular slice spacing in the DICOM series (usual gap {median:.4g} mm, "
                        f"also {', '.join(odd) or 'zero'} mm): a slice is missing or duplicated")


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    with _itk_warnings_off():
        series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise DataError(f"{folder}: folder holds no DICOM series")
    if len(series) > 1:
        raise DataError(f"{folder}: folder holds {len(series)} DICOM series; give one series per folder")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    with _itk_warnings_off():
        _check_itk_header(files[0], folder, n_files=len(files))
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()  # per-slice tags, read along with the pixels
        image = reader.Execute()
    _check_slice_positions(reader, files, folder)
    return _itk_to_volume(image, folder)


def _nifti_channels_first(array: np.ndarray) -> np.ndarray:
    """NIfTI keeps channels after the three spatial axes: 4D (X, Y, Z, C), or 5D (X, Y, Z, 1, C)
    for vector images (intent 'vector', as ITK writes them). Both become (C, X, Y, Z)."""
    if array.ndim == 5 and array.shape[3] == 1:
        array = array[:, :, :, 0]
    return np.moveaxis(array, -1, 0) if array.ndim == 4 else array


def read_volume(path: str | Path) -> Volume:
    """Read NIfTI, NRRD, MHA/MHD or a DICOM series folder; errors name the file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        if path.is_dir():
            array, affine = _read_dicom_series(path)
        elif path.name.lower().endswith(NIFTI_SUFFIXES):
            array, affine = _read_nifti(path)
        elif path.name.lower().endswith(ITK_SUFFIXES):
            array, affine = _read_itk(path)
        else:
            raise DataError(f"{path}: unsupported file type (expected {', '.join(VOLUME_SUFFIXES)} or a DICOM folder)")
    except (DataError, MemoryError, PermissionError):
        raise  # the command line reports memory and permission problems as such
    except RuntimeError as exc:  # SimpleITK wraps every ITK failure in RuntimeError
        raise DataError(f"{path}: cannot read ({_itk_error_text(exc)})") from None
    except Exception as exc:  # nibabel raises many types for broken files (EOFError, OSError, ...)
        text = str(exc).splitlines()[0] if str(exc) else "corrupt file"
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {text})") from None
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        array = _nifti_channels_first(array)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim not in (3, 4):
        raise DataError(f"{path}: expected a 3D volume (or 3D with channels), got {array.ndim} dimensions {array.shape}")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{path}: invalid (singular or non-finite) voxel-to-world affine")
    return Volume(array=array, affine=affine, path=str(path))


def check_finite(volume: Volume) -> None:
    """NaN/Inf voxels would poison normalisation and training: refuse them, naming the file."""
    if np.issubdtype(volume.array.dtype, np.floating) and not np.all(np.isfinite(volume.array)):
        raise DataError(f"{volume.path}: volume contains NaN or Inf values")


def check_same_grid(a: Volume, b: Volume, atol: float = 1e-3, what: str = "") -> None:
    """Same spatial shape and affine (within `atol` mm), else a DataError naming both files."""
    label = f" ({what})" if what else ""
    if a.spatial_shape != b.spatial_shape:
        raise DataError(f"{a.path} and {b.path}{label}: different grids, shapes {a.spatial_shape} vs {b.spatial_shape}")
    if not np.allclose(a.affine, b.affine, atol=atol):
        diff = float(np.abs(a.affine - b.affine).max())
        raise DataError(f"{a.path} and {b.path}{label}: different voxel-to-world affines (max difference {diff:.4g})")


def read_image(paths: Sequence[str | Path], channel_names: list[str] | None = None) -> Volume:
    """One file per channel (or one file with channels), stacked to (C, X, Y, Z) on one grid."""
    if not paths:
        raise DataError("no image files given")
    volumes = [read_volume(p) for p in paths]
    for v in volumes:
        check_finite(v)
    for v in volumes[1:]:
        check_same_grid(volumes[0], v, what="image channels")
    arrays = [v.array if v.array.ndim == 4 else v.array[None] for v in volumes]
    array = np.concatenate(arrays, axis=0).astype(np.float32)
    if channel_names is not None and len(channel_names) != array.shape[0]:
        raise DataError(f"{paths[0]}: {array.shape[0]} image channels but {len(channel_names)} channel names")
    return Volume(array=array[0] if array.shape[0] == 1 else array, affine=volumes[0].affine,
                  path=str(paths[0]), channel_names=channel_names)


def read_label_map(path: str | Path, table: LabelTable | None = None) -> Volume:
    """A 3D integer label map whose values are in `table` (when given), in the smallest unsigned
    type that keeps every value exactly."""
    volume = read_volume(path)
    if volume.array.ndim != 3:
        raise DataError(f"{path}: a label map must be 3D, got shape {volume.array.shape}")
    volume.array = validate_label_map(volume.array, table, source=str(path))
    return volume


def _nifti_dtype(array: np.ndarray, path: Path) -> np.ndarray:
    """A dtype every NIfTI reader handles: nibabel refuses 64-bit integers without an explicit
    header (many tools cannot read them) and NIfTI-1 has no float16, so integers go to the
    smallest type that holds their range, floats to float32, booleans to uint8."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32) if array.dtype != np.float32 else array
    if array.dtype.itemsize == 8:
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        for dtype in (np.uint8, np.int16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return array.astype(dtype)
        raise DataError(f"{path}: integer values {lo}..{hi} do not fit in 32 bits for NIfTI")
    return array


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray, descrip: str | None = None) -> None:
    """Write NIfTI atomically with qform and sform both set to `affine` (code 1, scanner
    anatomical, so readers preferring either get the same grid); (C, X, Y, Z) arrays are
    written as 4D (X, Y, Z, C). The header is new: nothing of an input's header is copied
    (`descrip`, at most 80 characters, is the only text written into it)."""
    import nibabel as nib

    array = np.asarray(array)
    if array.ndim == 4:
        array = np.moveaxis(array, 0, -1)
    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(_nifti_dtype(array, Path(path)), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    if descrip is not None:
        image.header["descrip"] = descrip.encode("ascii", "replace")[:80]
    with atomic_output(path) as tmp:
        nib.save(image, str(tmp))


# ------------------------------------------------------------------ synthetic volumes' provenance

SYNTHETIC_DESCRIP = "medlsdm synthetic image, not a patient scan"


def provenance_path(path: str | Path) -> Path:
    """The JSON sidecar of a synthetic volume: ``CASE_sample0.nii.gz`` -> ``CASE_sample0.json``."""
    path = Path(path)
    return path.with_name(volume_stem(path) + ".json")


def synthetic_provenance(model_dir: str | Path, sampler: str, steps: int | None, guidance: float | None,
                         seed: int, label_path: str | Path | None, sample_index: int = 0) -> dict:
    """What made a synthetic volume, without identities or absolute paths: the model (its folder's
    name and the SHA-256 of its weights), the sampler, the seed, and the label map's case ID."""
    from medlsdm import __version__
    from medlsdm.files import file_sha256

    model_dir = Path(model_dir)
    weights = model_dir / "diffusion.safetensors" if model_dir.is_dir() else model_dir
    return {
        "synthetic": True,
        "generator": f"medlsdm {__version__}",
        "model": {"name": model_dir.name, "weights_sha256": file_sha256(weights) if weights.is_file() else None},
        "sampler": {"name": sampler, "steps": steps, "guidance": guidance},
        "seed": int(seed),
        "sample_index": int(sample_index),
        "label_map_case_id": None if label_path is None else volume_stem(label_path),
    }


def write_synthetic_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray, provenance: dict) -> Path:
    """Write a synthetic volume marked as such: header ``descrip`` `SYNTHETIC_DESCRIP`, and the
    JSON sidecar `provenance_path` holding `provenance` (see `synthetic_provenance`). Returns the
    sidecar's path."""
    from medlsdm.files import write_json

    if not provenance.get("synthetic"):
        raise ValueError("provenance of a synthetic volume must say synthetic: true")
    write_nifti(path, array, affine, descrip=SYNTHETIC_DESCRIP)
    sidecar = provenance_path(path)
    write_json(sidecar, provenance)
    return sidecar


def is_synthetic(path: str | Path) -> bool:
    """Whether a NIfTI file carries the synthetic mark in its header."""
    import nibabel as nib

    descrip = bytes(nib.load(str(path)).header["descrip"]).split(b"\0")[0].decode("ascii", "replace")
    return descrip == SYNTHETIC_DESCRIP
