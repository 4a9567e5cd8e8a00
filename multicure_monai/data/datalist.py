"""Datalist JSON files: reading, writing, k-fold splitting and early validation.

Every data source of the project (built-in phantoms, the UA-MT/MCF left-atrium h5 files, user NIfTI/NRRD
folders) is described by one datalist format, a MONAI/Decathlon-style JSON file::

    {
        "training":   [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}, ...],  # labelled
        "unlabeled":  [{"image": "imagesTr/b.nii.gz"}, ...],                                # no label
        "validation": [{"image": ..., "label": ...}, ...],
        "test":       [{"image": ..., "label": ...}, ...]                                   # optional
    }

Paths are relative to the folder of the JSON file, so a dataset folder can be moved as a whole. The
file is read with :func:`monai.data.load_decathlon_datalist`; :func:`load_datalist` only adds a clear
error for a missing file or key.

:func:`validate_datalist` is written by hand because MONAI has no "check a whole dataset before training"
utility: MONAI's loaders fail lazily inside a worker process, one file at a time and deep inside a
training loop. Here every file is loaded once with :class:`monai.transforms.LoadImage` (``.h5`` files in
the UA-MT layout with :func:`multicure_monai.data.la_h5.read_la_h5`) and *all* problems are reported
together in one exception, one line per problem, each naming the file.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DATALIST_KEYS",
    "IMAGE_SUFFIXES",
    "load_datalist",
    "list_images",
    "write_datalist",
    "kfold_split",
    "kfold_datalist",
    "validate_datalist",
    "studies_unlabeled",
]

#: Keys of the project's datalist format, in the order they are written.
DATALIST_KEYS: tuple[str, ...] = ("training", "unlabeled", "validation", "test")

_H5_SUFFIXES = (".h5", ".hdf5")
#: File suffixes :func:`list_images` picks up (lower case).
IMAGE_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


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
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not valid JSON, or ``key`` is missing (the message lists the keys present).
    """
    from monai.data import load_decathlon_datalist

    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"datalist file not found: {path}")
    try:
        with open(path) as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a valid JSON datalist ({e})") from e
    if isinstance(content, dict) and key not in content and missing_ok:
        return []
    if not isinstance(content, dict) or key not in content:
        present = sorted(content) if isinstance(content, dict) else []
        raise ValueError(f"{path}: datalist has no key {key!r}; keys present: {present}")
    if base_dir is None:
        base_dir = os.path.dirname(path)
    items = load_decathlon_datalist(path, is_segmentation=True, data_list_key=key, base_dir=base_dir)
    return [dict(item) for item in items]


def list_images(folder: str | os.PathLike, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[dict]:
    """Datalist entries ``{"image": path}`` for every image file under ``folder`` (recursive, sorted).

    Args:
        folder: folder to search.
        suffixes: file suffixes to accept (case-insensitive).

    Returns:
        Entries with absolute paths, sorted by path.

    Raises:
        FileNotFoundError: ``folder`` is not a directory.
        ValueError: no image file found.
    """
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    suffixes = tuple(s.lower() for s in suffixes)
    found = sorted(
        os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.lower().endswith(suffixes)
    )
    if not found:
        raise ValueError(f"{folder}: no image files ({', '.join(suffixes)}) found")
    return [{"image": p} for p in found]


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


def _fold_bounds(n: int, num_folds: int, fold: int) -> tuple[int, int]:
    """Start/stop of contiguous fold ``fold`` of ``n`` items; the first ``n % num_folds`` folds are one longer."""
    base, extra = divmod(n, num_folds)
    start = fold * base + min(fold, extra)
    return start, start + base + (1 if fold < extra else 0)


def kfold_split(items: Sequence[Any], num_folds: int, fold: int) -> tuple[list[Any], list[Any]]:
    """Deterministic contiguous k-fold split (no shuffling), as MCF/UA-MT style cross-validation.

    Fold ``k`` holds out the ``k``-th contiguous block of ``items``; the folds partition ``items`` and
    their sizes differ by at most one (``80`` items, ``5`` folds: blocks ``[0:16], [16:32], ...``).

    Args:
        items: the cases, in their fixed order (e.g. the order of ``train.list``).
        num_folds: number of folds, ``2 <= num_folds <= len(items)``.
        fold: which fold to hold out, ``0 <= fold < num_folds``.

    Returns:
        ``(train, val)``: the items outside the fold (original order) and the items of the fold.
    """
    n = len(items)
    if num_folds < 2:
        raise ValueError(f"num_folds must be >= 2, got {num_folds}")
    if n < num_folds:
        raise ValueError(f"cannot split {n} items into {num_folds} folds")
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in [0, {num_folds - 1}], got {fold}")
    start, stop = _fold_bounds(n, num_folds, fold)
    items = list(items)
    return items[:start] + items[stop:], items[start:stop]


def kfold_datalist(
    items: Sequence[Mapping[str, Any]],
    num_folds: int,
    fold: int,
    num_labelled: int,
    num_unlabelled: int | None = None,
    label_key: str = "label",
) -> dict[str, list[dict]]:
    """Semi-supervised datalist of one cross-validation fold.

    The held-out block (:func:`kfold_split`) becomes ``validation``; of the remaining cases, in order,
    the first ``num_labelled`` are ``training`` (labelled) and the next ``num_unlabelled`` (default: all
    the rest) are ``unlabeled``, with ``label_key`` removed.

    Args:
        items: labelled cases (dicts with ``image`` and ``label_key``), in their fixed order.
        num_folds: number of folds (5 for LA, 4 for Pancreas in the paper).
        fold: fold index.
        num_labelled: labelled cases per fold.
        num_unlabelled: unlabelled cases per fold; ``None``: all remaining.
        label_key: key of the label path.

    Returns:
        ``{"training": [...], "unlabeled": [...], "validation": [...]}``.
    """
    train, val = kfold_split(items, num_folds, fold)
    if num_labelled < 0 or num_labelled > len(train):
        raise ValueError(f"num_labelled={num_labelled} but fold {fold} has only {len(train)} training cases")
    rest = train[num_labelled:]
    if num_unlabelled is not None:
        if num_unlabelled < 0 or num_unlabelled > len(rest):
            raise ValueError(f"num_unlabelled={num_unlabelled} but only {len(rest)} cases remain in fold {fold}")
        rest = rest[:num_unlabelled]
    return {
        "training": [dict(i) for i in train[:num_labelled]],
        "unlabeled": [{k: v for k, v in i.items() if k != label_key} for i in rest],
        "validation": [dict(i) for i in val],
    }


# ----------------------------------------------------------------------------------------------- validation


def _load_array(path: str, key: str) -> np.ndarray:
    """Load ``path`` as a channel-first array ``(C, *spatial)``; h5 files read dataset ``key``."""
    if path.lower().endswith(_H5_SUFFIXES):
        from multicure_monai.data.la_h5 import read_la_h5

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
        items: datalist entries with absolute paths, e.g. from :func:`load_datalist`.
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
    try:
        return _load_array(path, key), None
    except Exception as e:  # noqa: BLE001 - any reader failure is reported as "cannot be read"
        return None, f"{path}: cannot be read, corrupt or truncated? ({type(e).__name__}: {str(e).strip()[:300]})"


def _check_image(path: str, key: str, in_channels: int) -> tuple[np.ndarray | None, list[str]]:
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
    flat = arr.reshape(-1)
    idx = np.flatnonzero(flat != np.round(flat))
    v = float(flat[idx[0]]) if idx.size else math.nan
    return round(v, 4)


def studies_unlabeled(
    labelled: Sequence[Mapping[str, str]],
    label_subdir: str = os.path.join("labels", "final"),
    suffixes: Sequence[str] = IMAGE_SUFFIXES,
) -> list[dict] | None:
    """Unlabelled images of a MONAI Label local studies folder, or ``None`` outside that layout.

    MONAI Label's ``BundleTrainTask`` replaces ``train#dataset#data`` with the studies folder's labelled
    pairs, ``{"image": <studies>/<id><ext>, "label": <studies>/labels/final/<id><ext>}``, and passes no
    unlabelled list. When every entry of ``labelled`` has that layout and one studies folder, this returns
    ``[{"image": path}]`` for each image directly in that folder (not recursive) that is not in
    ``labelled``, sorted; it may be empty. It returns ``None`` when ``labelled`` is empty or not in that
    layout (a datalist JSON's ``training`` list), so the caller falls back to its own unlabelled list.
    """
    if not labelled:
        return None
    folders = set()
    for item in labelled:
        image, label = item.get("image"), item.get("label")
        if not isinstance(image, str) or not isinstance(label, str):
            return None
        folder = os.path.dirname(os.path.realpath(image))
        if os.path.dirname(os.path.realpath(label)) != os.path.join(folder, label_subdir):
            return None
        folders.add(folder)
    if len(folders) != 1:
        return None
    folder = folders.pop()
    taken = {os.path.realpath(item["image"]) for item in labelled}
    suffixes = tuple(s.lower() for s in suffixes)
    found = sorted(
        os.path.join(folder, f)
        for f in os.listdir(folder)
        if f.lower().endswith(suffixes) and os.path.isfile(os.path.join(folder, f))
    )
    return [{"image": p} for p in found if os.path.realpath(p) not in taken]
