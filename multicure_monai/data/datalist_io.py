"""Reading and writing datalist JSON files, the one dataset description format of the project.

Every data source (built-in phantoms, the UA-MT/MCF left-atrium h5 files, user NIfTI/NRRD folders) is
described by a MONAI/Decathlon-style JSON file::

    {
        "training":   [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}, ...],  # labelled
        "unlabeled":  [{"image": "imagesTr/b.nii.gz"}, ...],                                # no label
        "validation": [{"image": ..., "label": ...}, ...],
        "test":       [{"image": ..., "label": ...}, ...]                                   # optional
    }

Paths are relative to the folder of the JSON file, so a dataset folder can be moved as a whole. The
file is read with :func:`monai.data.load_decathlon_datalist`; :func:`load_datalist` only adds a clear
error for a missing file or key. :func:`write_datalist` is the inverse (relative paths, atomic write).
This module does file I/O only; checking the files a datalist names is
:mod:`multicure_monai.data.datalist_check`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from multicure_monai.errors import BundleInputError, MissingFileError

__all__ = ["DATALIST_KEYS", "load_datalist", "write_datalist"]


#: Keys of the project's datalist format, in the order they are written.
DATALIST_KEYS: tuple[str, ...] = ("training", "unlabeled", "validation", "test")


def load_datalist(
    path: str | os.PathLike, key: str = "training", base_dir: str | None = None, missing_ok: bool = False
) -> list[dict]:
    """Load one list of a datalist JSON file with absolute paths.

    Args:
        path: the datalist JSON file.
        key: which list to read, e.g. ``"training"``, ``"unlabeled"``, ``"validation"``, ``"test"``.
        base_dir: folder the relative paths are resolved against; default: the JSON file's folder.
        missing_ok: return ``[]`` instead of raising when ``key`` is absent (e.g. no ``unlabeled`` list).

    Returns:
        The entries of ``key``; every string value that names a file (``image``, ``label``, ...) is an
        absolute path.

    Raises:
        MissingFileError: ``path`` does not exist (a ``FileNotFoundError``).
        BundleInputError: the file is not valid JSON, or ``key`` is missing (the message lists the keys present).
    """
    from monai.data import load_decathlon_datalist

    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise MissingFileError(f"datalist file not found: {path} (check --datalist)")
    try:
        with open(path) as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise BundleInputError(f"{path}: not a valid JSON datalist ({e})") from e
    if isinstance(content, dict) and key not in content and missing_ok:
        return []
    if not isinstance(content, dict) or key not in content:
        present = sorted(content) if isinstance(content, dict) else []
        raise BundleInputError(f"{path}: datalist has no key {key!r}; keys present: {present}")
    if base_dir is None:
        base_dir = os.path.dirname(path)
    items = load_decathlon_datalist(path, is_segmentation=True, data_list_key=key, base_dir=base_dir)
    return [dict(item) for item in items]


def write_datalist(path: str | os.PathLike, datalist: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Write a datalist JSON file with paths relative to its folder.

    Absolute paths are made relative to the JSON file's folder; relative paths are written unchanged.
    The file is written to a temporary name first and then renamed, so a reader never sees half a file.

    Args:
        path: the JSON file to write (its folder is created).
        datalist: mapping ``key -> list of dicts``, e.g. ``{"training": [{"image": ..., "label": ...}]}``.

    Returns:
        The absolute path of the written file.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)

    def rel(v: Any) -> Any:
        if isinstance(v, (str, os.PathLike)) and os.path.isabs(os.fspath(v)):
            return os.path.relpath(os.fspath(v), folder)
        return v

    content = {k: [{ik: rel(iv) for ik, iv in item.items()} for item in items] for k, items in datalist.items()}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(content, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path
