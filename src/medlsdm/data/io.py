"""Reading and writing volumes with their geometry.

A `Volume` keeps the array in the file's voxel axes (i, j, k), channels first, and the 4×4
voxel → world affine in RAS millimetres (the NIfTI convention). NIfTI is read with nibabel;
NRRD, MHA/MHD and DICOM series with SimpleITK, whose LPS physical space is converted to RAS.
"""

from __future__ import annotations

import contextlib
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


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    array = np.asarray(img.dataobj)  # forces the read: corruption surfaces here
    return array, np.asarray(img.affine, dtype=np.float64)


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
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing[None, :]
    affine[:3, 3] = image.GetOrigin()
    return array, LPS_TO_RAS @ affine


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    return _itk_to_volume(sitk.ReadImage(str(path)), path)


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    with _itk_warnings_off():
        series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise DataError(f"{folder}: folder holds no DICOM series")
    if len(series) > 1:
        raise DataError(f"{folder}: folder holds {len(series)} DICOM series; give one series per folder")
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    return _itk_to_volume(reader.Execute(), folder)


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
    except DataError:
        raise
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
    """A 3D integer label map whose values are in `table` (when given), as uint8/int16."""
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


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write NIfTI atomically with qform and sform both set to `affine` (code 1, scanner
    anatomical, so readers preferring either get the same grid); (C, X, Y, Z) arrays are
    written as 4D (X, Y, Z, C)."""
    import nibabel as nib

    array = np.asarray(array)
    if array.ndim == 4:
        array = np.moveaxis(array, 0, -1)
    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(_nifti_dtype(array, Path(path)), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_output(path) as tmp:
        nib.save(image, str(tmp))
