"""Up-front validation of the files a datalist names: every problem reported at once, before training.

:func:`validate_datalist` is written by hand because MONAI has no "check a whole dataset before training"
utility: MONAI's loaders fail lazily inside a worker process, one file at a time and deep inside a
training loop. Here every file is loaded once with :class:`monai.transforms.LoadImage` (``.h5`` files in
the UA-MT layout with :func:`multicure_monai.data.la_h5.read_la_h5`) and *all* problems are reported
together in one exception, one line per problem, each naming the file.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from multicure_monai.data.la_h5 import read_la_h5

__all__ = ["validate_datalist"]

_H5_SUFFIXES = (".h5", ".hdf5")


def _load_array(path: str, key: str) -> np.ndarray:
    """Load ``path`` as a channel-first array ``(C, *spatial)``; h5 files read dataset ``key``."""
    if path.lower().endswith(_H5_SUFFIXES):
        image, label = read_la_h5(path, require_label=key == "label")
        arr = label if key == "label" else image
        assert arr is not None
        return arr[None] if arr.ndim == 3 else arr
    return np.asarray(_image_loader()(path))


@functools.lru_cache(maxsize=1)
def _image_loader() -> Any:
    """One shared ``LoadImage``: building it imports every optional reader (ITK is slow to import)."""
    from monai.transforms import LoadImage

    return LoadImage(image_only=True, ensure_channel_first=True)


def _check_file(value: Any, role: str) -> tuple[str | None, str | None]:
    """Return ``(path, problem)`` for an entry value: the path if it exists, else a problem string."""
    if not isinstance(value, (str, os.PathLike)):
        return None, f"{role} entry is not a path: {value!r}"
    path = os.fspath(value)
    if not os.path.exists(path):
        return None, f"{path}: {role} file not found"
    return path, None


def validate_datalist(
    items: Sequence[Mapping[str, Any]],
    image_key: str = "image",
    label_key: str | None = "label",
    num_classes: int = 2,
    in_channels: int = 1,
    check_content: bool = True,
    allow_empty_labels: bool = True,
    roi_size: Sequence[int] | None = None,
) -> None:
    """Check every case of a datalist before training and report all problems at once.

    Checks, per entry: the image (and label, if ``label_key`` is given) exists; with ``check_content``
    also that it can be read (corrupt/truncated NIfTI, NRRD, h5 are caught), that the image is 3D,
    ``(H, W, D)`` or ``(C, H, W, D)`` with ``C == in_channels``, and free of NaN/Inf; that the label is
    ``(H, W, D)`` or ``(1, H, W, D)``, integer valued in ``{0, ..., num_classes - 1}`` and has the
    image's spatial shape. An all-background label is a warning (:class:`UserWarning` naming the file),
    or an error when ``allow_empty_labels`` is False. With ``roi_size``, an image smaller than the training
    patch along some axis gets a :class:`UserWarning` naming the file: training zero-pads it to the patch
    (``SpatialPadd`` before the random crop, as the paper's crops do).

    Args:
        items: datalist entries with absolute paths, e.g. from
            :func:`multicure_monai.data.datalist_io.load_datalist`.
        image_key: key of the image path.
        label_key: key of the label path; ``None`` for unlabelled lists.
        num_classes: number of classes including background.
        in_channels: expected image channels.
        check_content: load the files (slow for big datasets); ``False`` only checks existence.
        allow_empty_labels: whether an all-zero label is only a warning.
        roi_size: the training patch size ``(H, W, D)``; ``None`` skips the patch-size notice.

    Raises:
        FileNotFoundError: when every problem found is a missing file.
        ValueError: otherwise, if any problem was found. The message has one line per problem:
            ``<path>: <what is wrong>``.
    """
    problems: list[str] = []
    missing_only = True
    for idx, item in enumerate(items):
        if not isinstance(item, Mapping) or image_key not in item:
            problems.append(f"entry {idx}: has no {image_key!r} key ({item!r})")
            missing_only = False
            continue
        img_path, prob = _check_file(item[image_key], "image")
        if prob:
            problems.append(prob)
        lab_path = None
        if label_key is not None:
            if label_key not in item:
                problems.append(f"{item[image_key]}: entry {idx} has no {label_key!r} key")
                missing_only = False
            else:
                lab_path, lprob = _check_file(item[label_key], "label")
                if lprob:
                    problems.append(lprob)
        if not check_content:
            continue

        image = label = None
        if img_path is not None:
            image, img_probs = _check_image(img_path, image_key, in_channels)
            problems += img_probs
            missing_only = missing_only and not img_probs
            if image is not None and roi_size is not None:
                _patch_notice(img_path, tuple(image.shape[1:]), roi_size)
        if lab_path is not None:
            label, lab_probs = _check_label(lab_path, label_key or "label", num_classes, allow_empty_labels)
            problems += lab_probs
            missing_only = missing_only and not lab_probs
        if image is not None and label is not None and image.shape[1:] != label.shape[1:]:
            problems.append(
                f"{lab_path}: label spatial shape {tuple(label.shape[1:])} differs from image "
                f"{img_path} spatial shape {tuple(image.shape[1:])}"
            )
            missing_only = False
    if problems:
        problems = list(dict.fromkeys(problems))  # an h5 case is image and label in one file: report it once
        n = len(problems)
        msg = f"datalist check failed with {n} problem{'s' if n > 1 else ''}:\n  " + "\n  ".join(problems)
        raise FileNotFoundError(msg) if missing_only else ValueError(msg)


def _patch_notice(path: str, shape: tuple[int, ...], roi_size: Sequence[int]) -> None:
    """Warn (naming the file) when an image is smaller than the training patch along some axis."""
    roi = tuple(int(r) for r in roi_size)
    if len(roi) != len(shape) or all(s >= r for s, r in zip(shape, roi)):
        return
    padded = tuple(max(s, r) for s, r in zip(shape, roi))
    warnings.warn(
        f"{path}: image spatial shape {shape} is smaller than the patch roi_size={roi}; it is zero-padded to "
        f"{padded} before cropping (as the paper's random crops do)",
        UserWarning,
        stacklevel=3,
    )


def _read(path: str, key: str) -> tuple[np.ndarray | None, str | None]:
    """Return ``(array, None)``, or ``(None, problem)`` when any reader fails on ``path``."""
    try:
        return _load_array(path, key), None
    except Exception as e:  # noqa: BLE001 - any reader failure is reported as "cannot be read"
        return None, f"{path}: cannot be read, corrupt or truncated? ({type(e).__name__}: {str(e).strip()[:300]})"


def _check_image(path: str, key: str, in_channels: int) -> tuple[np.ndarray | None, list[str]]:
    """Load an image; return it (``None`` if unusable) and its problems: not 3D, channels, dtype, NaN/Inf."""
    arr, prob = _read(path, key)
    if arr is None:
        return None, [prob or f"{path}: cannot be read"]
    if arr.ndim != 4:
        return None, [f"{path}: image is not 3D: loaded spatial shape {tuple(arr.shape[1:])}"]
    probs = []
    if arr.shape[0] != in_channels:
        probs.append(f"{path}: image has {arr.shape[0]} channels, expected in_channels={in_channels}")
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
        probs.append(f"{path}: image has non-numeric dtype {arr.dtype}")
    elif np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
        probs.append(f"{path}: image contains NaN/Inf values ({n_nan} NaN, {n_inf} Inf)")
    return arr, probs


def _check_label(
    path: str, key: str, num_classes: int, allow_empty: bool
) -> tuple[np.ndarray | None, list[str]]:
    """Load a label; return it (``None`` if unusable) and its problems: shape, non-integer, out-of-range, empty."""
    arr, prob = _read(path, key)
    if arr is None:
        return None, [prob or f"{path}: cannot be read"]
    if arr.ndim != 4:
        return None, [f"{path}: label is not 3D: loaded spatial shape {tuple(arr.shape[1:])}"]
    probs = []
    if arr.shape[0] != 1:
        probs.append(f"{path}: label has {arr.shape[0]} channels, expected 1 (class indices)")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            probs.append(f"{path}: label contains NaN/Inf values")
            return arr, probs
        if not np.array_equal(arr, np.round(arr)):
            probs.append(f"{path}: label has non-integer values (e.g. {_first_nonint(arr)}); expected class indices")
            return arr, probs
    values = np.unique(arr)
    bad = values[(values < 0) | (values > num_classes - 1)]
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in bad[:8].tolist())
        probs.append(
            f"{path}: label values outside {{0..{num_classes - 1}}} for num_classes={num_classes}: {shown}"
        )
    elif values.size == 1 and values[0] == 0:
        if allow_empty:
            warnings.warn(f"{path}: label is empty (all background)", UserWarning, stacklevel=3)
        else:
            probs.append(f"{path}: label is empty (all background)")
    return arr, probs


def _first_nonint(arr: np.ndarray) -> float:
    """The first non-integer value of ``arr`` (for the error message), rounded to 4 decimals."""
    flat = arr.reshape(-1)
    idx = np.flatnonzero(flat != np.round(flat))
    v = float(flat[idx[0]]) if idx.size else math.nan
    return round(v, 4)
