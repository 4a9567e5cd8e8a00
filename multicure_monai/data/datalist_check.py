"""Up-front validation of the files a datalist names: every problem reported at once, before training.

:func:`validate_datalist` (one list) and :func:`validate_datalists` (all lists of a run) are written by hand
because MONAI has no "check a whole dataset before training" utility: MONAI's loaders fail lazily inside a
worker process, one file at a time and deep inside a training loop. Here every file is loaded once with
:class:`monai.transforms.LoadImage` (``.h5`` files in the UA-MT layout with
:func:`multicure_monai.data.la_h5.read_la_h5`) and *all* problems are reported together in one
:class:`~multicure_monai.errors.BundleInputError`, one line per problem, each naming the file. Notices that do
not stop a run (empty labels, images smaller than the patch, strongly anisotropic voxels) come out as one
:class:`UserWarning` per kind, with the count and the first files.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from multicure_monai.data.la_h5 import read_la_h5
from multicure_monai.errors import BundleInputError, MissingFileError

__all__ = ["validate_datalist", "validate_datalists"]

_H5_SUFFIXES = (".h5", ".hdf5")
_SHOWN = 5  # files named in a notice


def _load_array(path: str, key: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Load ``path`` as a channel-first array ``(C, *spatial)`` and its 4x4 affine (``None`` for h5 files)."""
    if path.lower().endswith(_H5_SUFFIXES):
        image, label = read_la_h5(path, require_label=key == "label")
        arr = label if key == "label" else image
        assert arr is not None
        return (arr[None] if arr.ndim == 3 else arr), None
    loaded = _image_loader()(path)
    affine = getattr(loaded, "affine", None)
    return np.asarray(loaded), None if affine is None else np.asarray(affine, dtype=np.float64)


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


@dataclass
class _Findings:
    """What the checks found: problems (one line each) and notices by kind (``empty``, ``small``, ``anisotropic``)."""

    problems: list[str] = field(default_factory=list)
    missing_only: bool = True
    labels: int = 0
    notices: dict[str, list[str]] = field(default_factory=lambda: {"empty": [], "small": [], "anisotropic": []})

    def add(self, problems: Sequence[str], prefix: str = "", missing: bool = False) -> None:
        self.problems += [prefix + p for p in problems]
        self.missing_only = self.missing_only and (missing or not problems)


def validate_datalist(
    items: Sequence[Mapping[str, Any]],
    image_key: str = "image",
    label_key: str | None = "label",
    num_classes: int = 2,
    in_channels: int = 1,
    check_content: bool = True,
    allow_empty_labels: bool = True,
    roi_size: Sequence[int] | None = None,
    grid_tolerance: float = 1e-3,
    max_anisotropy: float = 5.0,
) -> None:
    """Check every case of a datalist before training and report all problems at once.

    Checks, per entry: the image (and label, if ``label_key`` is given) exists; with ``check_content``
    also that it can be read (corrupt/truncated NIfTI, NRRD, h5 are caught), that the image is 3D,
    ``(H, W, D)`` or ``(C, H, W, D)`` with ``C == in_channels``, and free of NaN/Inf; that the label is
    ``(H, W, D)`` or ``(1, H, W, D)``, integer valued in ``{0, ..., num_classes - 1}`` and has the
    image's spatial shape and grid: spacing (relative), origin (in voxels) and direction cosines agree within
    ``grid_tolerance`` (a mask on another grid is a data error; h5 files carry no grid). Notices, one
    :class:`UserWarning` per kind naming the count and the first files: all-background labels (an error when
    ``allow_empty_labels`` is False); with ``roi_size``, images smaller than the training patch along some
    axis (training zero-pads them, ``SpatialPadd`` before the random crop, as the paper's crops do); images
    whose largest voxel spacing exceeds ``max_anisotropy`` times the smallest.

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
        grid_tolerance: tolerance of the image/label grid comparison.
        max_anisotropy: spacing ratio (largest / smallest) above which an image gets the anisotropy notice.

    Raises:
        MissingFileError: when every problem found is a missing file (also a ``FileNotFoundError``).
        BundleInputError: otherwise, if any problem was found. The message has one line per problem:
            ``<path>: <what is wrong>``.
    """
    found = _Findings()
    _check_items(found, items, "", image_key, label_key, num_classes, in_channels, check_content,
                 allow_empty_labels, roi_size, grid_tolerance, max_anisotropy)  # fmt: skip
    _report(found, roi_size, max_anisotropy, "datalist check")


def validate_datalists(
    lists: Mapping[str, Sequence[Mapping[str, Any]]],
    unlabelled_lists: Sequence[str] = (),
    patch_lists: Sequence[str] = (),
    image_key: str = "image",
    label_key: str = "label",
    num_classes: int = 2,
    in_channels: int = 1,
    check_content: bool = True,
    allow_empty_labels: bool = True,
    roi_size: Sequence[int] | None = None,
    grid_tolerance: float = 1e-3,
    max_anisotropy: float = 5.0,
) -> bool:
    """Check all lists of a run together (training, unlabelled, validation, ...): one error lists every problem.

    The checks are :func:`validate_datalist`'s; each problem line starts with its list's name.

    Args:
        lists: list name -> entries, e.g. ``{"training": [...], "unlabeled": [...], "validation": [...]}``.
        unlabelled_lists: names of the lists without labels (their ``label_key`` is not read).
        patch_lists: names of the lists cropped to ``roi_size`` in training (the patch-size notice); the
            sliding-window inferer of validation and inference pads small images itself.
        image_key, label_key, num_classes, in_channels, check_content, allow_empty_labels, roi_size,
        grid_tolerance, max_anisotropy: as for :func:`validate_datalist`.

    Returns:
        ``True`` when no problem was found (notices only warn).

    Raises:
        MissingFileError: when every problem found is a missing file.
        BundleInputError: otherwise, if any problem was found.
    """
    found = _Findings()
    for name, items in lists.items():
        _check_items(found, items or [], f"{name}: ", image_key, None if name in unlabelled_lists else label_key,
                     num_classes, in_channels, check_content, allow_empty_labels,
                     roi_size if name in patch_lists else None, grid_tolerance, max_anisotropy)  # fmt: skip
    _report(found, roi_size, max_anisotropy, f"datalist check ({', '.join(lists)})")
    return True


def _check_items(
    found: _Findings,
    items: Sequence[Mapping[str, Any]],
    prefix: str,
    image_key: str,
    label_key: str | None,
    num_classes: int,
    in_channels: int,
    check_content: bool,
    allow_empty: bool,
    roi_size: Sequence[int] | None,
    grid_tolerance: float,
    max_anisotropy: float,
) -> None:
    """Add the problems and notices of one list's entries to ``found``."""
    for idx, item in enumerate(items):
        if not isinstance(item, Mapping) or image_key not in item:
            found.add([f"entry {idx}: has no {image_key!r} key ({item!r})"], prefix)
            continue
        img_path, prob = _check_file(item[image_key], "image")
        found.add([prob] if prob else [], prefix, missing=True)
        lab_path = None
        if label_key is not None:
            if label_key not in item:
                found.add([f"{item[image_key]}: entry {idx} has no {label_key!r} key"], prefix)
            else:
                lab_path, lprob = _check_file(item[label_key], "label")
                found.add([lprob] if lprob else [], prefix, missing=True)
        if not check_content:
            continue
        image = label = img_affine = lab_affine = None
        if img_path is not None:
            image, img_affine, img_probs = _check_image(img_path, image_key, in_channels)
            found.add(img_probs, prefix)
            if image is not None:
                _image_notices(found, img_path, tuple(image.shape[1:]), img_affine, roi_size, max_anisotropy)
        if lab_path is not None:
            found.labels += 1
            label, lab_affine, lab_probs = _check_label(lab_path, label_key or "label", num_classes)
            found.add(lab_probs, prefix)
            if label is not None and not lab_probs and not label.any():
                if allow_empty:
                    found.notices["empty"].append(lab_path)
                else:
                    found.add([f"{lab_path}: label is empty (all background)"], prefix)
        if image is None or label is None:
            continue
        if image.shape[1:] != label.shape[1:]:
            found.add([f"{lab_path}: label spatial shape {tuple(label.shape[1:])} differs from image "
                       f"{img_path} spatial shape {tuple(image.shape[1:])}"], prefix)  # fmt: skip
        elif img_affine is not None and lab_affine is not None:
            diff = _grid_difference(img_affine, lab_affine, grid_tolerance)
            if diff:
                found.add([f"{lab_path}: label grid differs from image {img_path} ({diff}); resample the label "
                           "onto the image grid (e.g. monai.transforms.ResampleToMatch) or correct its header"],
                          prefix)  # fmt: skip


def _spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing of a 4x4 affine: the lengths of its first three columns."""
    return np.linalg.norm(affine[:3, :3], axis=0)


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values.tolist()) + ")"


def _grid_difference(image: np.ndarray, label: np.ndarray, tol: float) -> str:
    """Describe how the label's grid differs from the image's (spacing, origin, direction); ``""`` if it agrees."""
    sp_i, sp_l = _spacing(image), _spacing(label)
    parts = []
    if not np.allclose(sp_l, sp_i, rtol=tol, atol=0.0):
        parts.append(f"spacing {_fmt(sp_l)} vs image {_fmt(sp_i)}")
    if np.any(np.abs(label[:3, 3] - image[:3, 3]) > tol * sp_i.max()):
        parts.append(f"origin {_fmt(label[:3, 3])} vs image {_fmt(image[:3, 3])}")
    dir_i, dir_l = image[:3, :3] / np.maximum(sp_i, 1e-12), label[:3, :3] / np.maximum(sp_l, 1e-12)
    if np.any(np.abs(dir_l - dir_i) > tol):
        parts.append(f"direction {_fmt(dir_l.reshape(-1))} vs image {_fmt(dir_i.reshape(-1))}")
    return "; ".join(parts)


def _image_notices(
    found: _Findings,
    path: str,
    shape: tuple[int, ...],
    affine: np.ndarray | None,
    roi_size: Sequence[int] | None,
    max_anisotropy: float,
) -> None:
    """Note an image smaller than the patch and one with strongly anisotropic voxels."""
    if roi_size is not None:
        roi = tuple(int(r) for r in roi_size)
        if len(roi) == len(shape) and any(s < r for s, r in zip(shape, roi)):
            padded = tuple(max(s, r) for s, r in zip(shape, roi))
            found.notices["small"].append(f"{path} {shape} -> {padded}")
    if affine is not None:
        spacing = _spacing(affine)
        if spacing.min() > 0 and spacing.max() / spacing.min() > max_anisotropy:
            found.notices["anisotropic"].append(f"{path} {_fmt(spacing)}")


def _listed(entries: list[str]) -> str:
    more = f", ... ({len(entries) - _SHOWN} more)" if len(entries) > _SHOWN else ""
    return ", ".join(entries[:_SHOWN]) + more


def _report(found: _Findings, roi_size: Sequence[int] | None, max_anisotropy: float, what: str) -> None:
    """Warn once per kind of notice, then raise one error listing every problem."""
    empty, small, aniso = (found.notices[k] for k in ("empty", "small", "anisotropic"))
    if empty:
        warnings.warn(
            f"label is empty (all background) in {len(empty)} of {found.labels} labels: {_listed(empty)}; "
            "check that these are the intended masks",
            UserWarning,
            stacklevel=3,
        )
    if small:
        roi = tuple(int(r) for r in roi_size or ())
        warnings.warn(
            f"{len(small)} image{'s are' if len(small) > 1 else ' is'} smaller than the patch roi_size={roi}; "
            f"zero-padded before cropping (as the paper's random crops do): {_listed(small)}",
            UserWarning,
            stacklevel=3,
        )
    if aniso:
        warnings.warn(
            f"{len(aniso)} image{'s have' if len(aniso) > 1 else ' has'} strongly anisotropic voxels (largest "
            f"spacing > {max_anisotropy:g} x smallest): {_listed(aniso)}; a cubic patch then spans very different "
            "physical extents per axis: consider resampling (monai.transforms.Spacingd) or a roi_size that "
            "follows the spacing",
            UserWarning,
            stacklevel=3,
        )
    if found.problems:
        problems = list(dict.fromkeys(found.problems))  # an h5 case is image and label in one file: report it once
        n = len(problems)
        msg = f"{what} failed with {n} problem{'s' if n > 1 else ''}:\n  " + "\n  ".join(problems)
        raise MissingFileError(msg) if found.missing_only else BundleInputError(msg)


def _read(path: str, key: str) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """Return ``(array, affine, None)``, or ``(None, None, problem)`` when any reader fails on ``path``."""
    try:
        return (*_load_array(path, key), None)
    except Exception as e:  # noqa: BLE001 - any reader failure is reported as "cannot be read"
        return None, None, f"{path}: cannot be read, corrupt or truncated? ({type(e).__name__}: {str(e).strip()[:300]})"


def _check_image(path: str, key: str, in_channels: int) -> tuple[np.ndarray | None, np.ndarray | None, list[str]]:
    """Load an image; return it (``None`` if unusable), its affine and its problems: not 3D, channels, NaN/Inf."""
    arr, affine, prob = _read(path, key)
    if arr is None:
        return None, None, [prob or f"{path}: cannot be read"]
    if arr.ndim != 4:
        return None, None, [f"{path}: image is not 3D: loaded spatial shape {tuple(arr.shape[1:])}"]
    probs = []
    if arr.shape[0] != in_channels:
        probs.append(f"{path}: image has {arr.shape[0]} channels, expected in_channels={in_channels}")
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
        probs.append(f"{path}: image has non-numeric dtype {arr.dtype}")
    elif np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
        probs.append(f"{path}: image contains NaN/Inf values ({n_nan} NaN, {n_inf} Inf)")
    return arr, affine, probs


def _check_label(path: str, key: str, num_classes: int) -> tuple[np.ndarray | None, np.ndarray | None, list[str]]:
    """Load a label; return it (``None`` if unusable), its affine and its problems: shape, non-integer, range."""
    arr, affine, prob = _read(path, key)
    if arr is None:
        return None, None, [prob or f"{path}: cannot be read"]
    if arr.ndim != 4:
        return None, None, [f"{path}: label is not 3D: loaded spatial shape {tuple(arr.shape[1:])}"]
    probs = []
    if arr.shape[0] != 1:
        probs.append(f"{path}: label has {arr.shape[0]} channels, expected 1 (class indices)")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            probs.append(f"{path}: label contains NaN/Inf values")
            return arr, affine, probs
        if not np.array_equal(arr, np.round(arr)):
            probs.append(f"{path}: label has non-integer values (e.g. {_first_nonint(arr)}); expected class indices")
            return arr, affine, probs
    values = np.unique(arr)
    bad = values[(values < 0) | (values > num_classes - 1)]
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in bad[:8].tolist())
        probs.append(
            f"{path}: label values outside {{0..{num_classes - 1}}} for num_classes={num_classes}: {shown}"
        )
    return arr, affine, probs


def _first_nonint(arr: np.ndarray) -> float:
    """The first non-integer value of ``arr`` (for the error message), rounded to 4 decimals."""
    flat = arr.reshape(-1)
    idx = np.flatnonzero(flat != np.round(flat))
    v = float(flat[idx[0]]) if idx.size else math.nan
    return round(v, 4)
