"""Label maps: integer volumes whose values are listed in a label table (value -> name).

Models see one-hot encodings. Values are checked, never guessed: a non-integer, a negative value
or a value missing from the table is an error naming the file and the values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from medlsdm.errors import DataError
from medlsdm.files import read_json


@dataclass(frozen=True)
class LabelTable:
    """Label values and names. Value 0 is background. Values are contiguous 0..K-1 after
    preparation (``remap`` gets them there); raw tables may use any non-negative values."""

    names: dict[int, str]

    def __post_init__(self):
        if not self.names:
            raise DataError("a label table needs at least one label")
        for value, name in self.names.items():
            if not isinstance(value, (int, np.integer)) or value < 0:
                raise DataError(f"label table: value {value!r} ({name}) is not a non-negative integer")

    @classmethod
    def from_mapping(cls, mapping: Mapping) -> "LabelTable":
        """From ``{value: name}``; keys may be strings of integers (as in JSON)."""
        try:
            return cls({int(k): str(v) for k, v in mapping.items()})
        except (TypeError, ValueError):
            raise DataError(f"label table: keys must be integers, got {list(mapping)!r}") from None

    @classmethod
    def from_nnunet(cls, labels: Mapping[str, object]) -> "LabelTable":
        """From an nnU-Net dataset.json ``labels`` entry ``{name: value}`` (region lists refused)."""
        out = {}
        for name, value in labels.items():
            if not isinstance(value, (int, np.integer)):
                raise DataError(f"dataset.json label '{name}': region-based labels ({value!r}) are not supported")
            out[int(value)] = str(name)
        return cls(out)

    def to_json(self) -> dict[str, str]:
        return {str(k): v for k, v in sorted(self.names.items())}

    @property
    def values(self) -> list[int]:
        return sorted(self.names)

    @property
    def num_classes(self) -> int:
        """Number of classes including background, for contiguous tables."""
        return len(self.names)

    def is_contiguous(self) -> bool:
        return self.values == list(range(len(self.names)))


def label_dtype(values: np.ndarray, source: str = "label map") -> type:
    """The smallest unsigned integer type holding every value exactly (uint8, uint16, uint32);
    values beyond 32 bits are an error naming them (no narrowing cast ever wraps a value)."""
    values = np.asarray(values)
    top = int(values.max()) if values.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return dtype
    big = sorted({int(v) for v in np.unique(values) if int(v) > np.iinfo(np.uint32).max})[:5]
    raise DataError(f"{source}: label values {big} do not fit in 32 bits")


def validate_label_map(array: np.ndarray, table: LabelTable | None = None, source: str = "label map") -> np.ndarray:
    """Check that `array` holds non-negative integers found in `table`; return it in the smallest
    unsigned type that keeps every value (`label_dtype`).

    `source` names the file in error messages.
    """
    array = np.asarray(array)
    if array.size == 0:
        raise DataError(f"{source}: label map is empty")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)):
            raise DataError(f"{source}: label map contains NaN or Inf")
        if not np.all(array == np.round(array)):
            bad = array[array != np.round(array)].ravel()[:3]
            raise DataError(f"{source}: label map has non-integer values (e.g. {', '.join(f'{v:g}' for v in bad)})")
    if array.min() < 0:
        raise DataError(f"{source}: label map has negative values (min {array.min():g})")
    values = np.unique(array).astype(np.int64)
    if table is not None:
        unknown = sorted(set(values.tolist()) - set(table.values))
        if unknown:
            raise DataError(
                f"{source}: label values {unknown} are not in the label table {table.values}"
            )
    return array.astype(label_dtype(values, source))


def remap(array: np.ndarray, mapping: Mapping[int, int], source: str = "label map") -> np.ndarray:
    """Map label values through `mapping` (every value present must be a key)."""
    array = np.asarray(array)
    present = np.unique(array).tolist()
    missing = sorted(set(present) - set(int(k) for k in mapping))
    if missing:
        raise DataError(f"{source}: label values {missing} have no entry in the label mapping")
    lut = np.zeros(int(max(max(present), max(int(k) for k in mapping))) + 1, dtype=np.int64)
    for k, v in mapping.items():
        lut[int(k)] = int(v)
    out = lut[array.astype(np.int64)]
    return out.astype(label_dtype(out, source))


def one_hot(labels, num_classes: int, drop_background: bool = False):
    """(B, 1, D, H, W) or (B, D, H, W) integer tensor -> (B, K, D, H, W) float one-hot.

    With ``drop_background`` the channel of value 0 is left out (Med-DDPM's conditioning).
    """
    import torch

    if labels.ndim == 5:
        labels = labels[:, 0]
    out = torch.nn.functional.one_hot(labels.long(), num_classes).permute(0, 4, 1, 2, 3).float()
    return out[:, 1:] if drop_background else out


def read_label_table(path: str | Path) -> LabelTable:
    """A label table from ``labels.json`` (``{"0": "background", ...}``) or an nnU-Net
    ``dataset.json`` (its ``labels`` entry ``{name: value}``)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a label table (expected a JSON object)")
    try:
        if isinstance(data.get("labels"), dict):
            return LabelTable.from_nnunet(data["labels"])
        return LabelTable.from_mapping(data)
    except DataError as exc:
        raise DataError(f"{path}: not a label table ({exc})") from None


def find_label_table(folders: Sequence[str | Path]) -> Path | None:
    """The first ``labels.json``, or ``dataset.json`` with a ``labels`` entry, in `folders`."""
    for folder in folders:
        folder = Path(folder)
        if (folder / "labels.json").is_file():
            return folder / "labels.json"
        candidate = folder / "dataset.json"
        if candidate.is_file():
            data = read_json(candidate)
            if isinstance(data, dict) and isinstance(data.get("labels"), dict):
                return candidate
    return None
