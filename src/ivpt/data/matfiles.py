"""Reading the MATLAB ``.mat`` files that Flowers-102, Stanford Dogs and Stanford Cars ship, with errors that name
the file and the variable or field to fix."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .base import require_file
from .common import DatasetError

__all__ = ["mat_field", "mat_ints", "mat_strings", "read_mat"]


def read_mat(path: Path, names: tuple[str, ...], fmt: str, layout: str) -> dict[str, Any]:
    """The variables ``names`` of the .mat file ``path`` (MissingFileError with the layout if it is absent)."""
    from scipy.io import loadmat

    require_file(path, fmt, layout)
    try:
        content = loadmat(str(path))
    except (ValueError, TypeError, OSError, NotImplementedError) as exc:
        raise DatasetError(f"{path}: not a readable MATLAB file ({type(exc).__name__}: {exc})") from None
    missing = [n for n in names if n not in content]
    if missing:
        found = sorted(k for k in content if not k.startswith("__"))
        raise DatasetError(f"{path} has no variable {', '.join(missing)} (it holds {', '.join(found) or 'none'})")
    return {n: content[n] for n in names}


def mat_ints(value: Any, path: Path, name: str) -> np.ndarray:
    """A MATLAB numeric array (any shape, e.g. 1 x N) as a flat int64 array of whole numbers."""
    flat = np.asarray(value).reshape(-1)
    try:
        numbers = flat.astype(np.float64)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: {name} must hold numbers") from None
    if not np.all(np.isfinite(numbers)) or np.any(numbers != np.round(numbers)):
        raise DatasetError(f"{path}: {name} must hold whole numbers")
    return numbers.astype(np.int64)


def mat_strings(value: Any, path: Path, name: str) -> list[str]:
    """A MATLAB cell array of strings (N x 1 or 1 x N, each cell a 1-element char array) as Python strings."""
    out = []
    for cell in np.asarray(value, dtype=object).reshape(-1):
        item = np.asarray(cell).reshape(-1)
        if item.size != 1 or not isinstance(item[0], str):
            raise DatasetError(f"{path}: {name} must be a cell array of strings, entry {len(out) + 1} is {cell!r}")
        out.append(str(item[0]))
    return out


def mat_field(records: Any, field: str, path: Path, name: str) -> list[Any]:
    """Field ``field`` of every element of the MATLAB struct array ``records``, as Python scalars/strings."""
    array = np.asarray(records).reshape(-1)
    if array.dtype.names is None or field not in array.dtype.names:
        have = ", ".join(array.dtype.names or ())
        raise DatasetError(f"{path}: {name} has no field {field!r} (fields: {have or 'none'})")
    out = []
    for i, element in enumerate(array):
        value = np.asarray(element[field]).reshape(-1)
        if value.size != 1:
            raise DatasetError(f"{path}: {name}({i + 1}).{field} is empty or not a single value")
        out.append(value[0].item() if isinstance(value[0], np.generic) else value[0])
    return out
