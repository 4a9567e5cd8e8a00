"""Left-atrium data in the UA-MT / MCF h5 layout: reading, conversion to NIfTI, cross-validation datalists.

UA-MT (Yu et al., 2019) and MCF (Wang et al., 2023) publish the preprocessed LA 2018 challenge data as::

    <root>/<case>/mri_norm2.h5     # datasets "image" (float32, z-scored) and "label" (uint8, 0/1)
    <root>/train.list              # one case id per line (80 cases)
    <root>/test.list               # optional, one case id per line (20 cases)

:func:`convert_la_h5` writes one NIfTI per image and label and a datalist JSON in the project's format
(:mod:`multicure_monai.data.datalist_io`), so the bundle reads LA exactly like any other dataset with
MONAI's ``LoadImaged``. MONAI has no h5 reader, hence :func:`read_la_h5`.

Axis convention: the arrays are kept **as stored** in the h5 files, axes ``(x, y, z)`` with ``z`` the
slice axis (about 88 slices in the full-resolution data, 44 in ``la_half``); nothing is transposed or
flipped. The NIfTI affine is ``diag(*spacing, 1)``: identity direction, origin 0, voxel size
``spacing`` (mm). The preprocessed h5 files carry no orientation, so the affine is not a true patient
orientation; it only makes ``LoadImage`` (Nibabel or ITK reader, both give ``(x, y, z)`` order) return
the same array the h5 file holds, and gives physical voxel sizes to metrics such as HD95.
The default spacing ``0.625`` mm is that of the full-resolution LA data (paper, section 3.1); for the
2x-downsampled ``la_half`` copy pass ``spacing=(1.25, 1.25, 1.25)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from multicure_monai.data.datalist_io import load_datalist, write_datalist
from multicure_monai.data.kfold import kfold_datalist

__all__ = ["H5_NAME", "read_la_h5", "read_case_list", "convert_la_h5", "kfold_datalists"]

#: File name of one case inside its folder in the UA-MT layout.
H5_NAME = "mri_norm2.h5"


def read_la_h5(
    path: str | os.PathLike, image_key: str = "image", label_key: str = "label", require_label: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read one UA-MT style h5 case.

    Args:
        path: the ``.h5`` file (e.g. ``<root>/<case>/mri_norm2.h5``).
        image_key: dataset name of the image.
        label_key: dataset name of the label.
        require_label: raise if the label dataset is missing instead of returning ``None``.

    Returns:
        ``(image, label)``: image ``(X, Y, Z)`` float32 as stored; label ``(X, Y, Z)`` uint8 or ``None``
        when the file has no ``label_key`` dataset (and ``require_label`` is False).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not an HDF5 file or truncated; missing dataset; array not 3D; image and label
            shapes differ. Messages name the file.
    """
    import h5py

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: h5 file not found")
    try:
        with h5py.File(path, "r") as f:
            keys = sorted(f.keys())
            if image_key not in f:
                raise ValueError(f"{path}: h5 file has no dataset {image_key!r} (datasets: {keys})")
            image = np.asarray(f[image_key][()], dtype=np.float32)
            label = None
            if label_key in f:
                label = np.asarray(f[label_key][()])
            elif require_label:
                raise ValueError(f"{path}: h5 file has no dataset {label_key!r} (datasets: {keys})")
    except ValueError:
        raise
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 file, corrupt or truncated? ({e})") from e
    if image.ndim != 3:
        raise ValueError(f"{path}: {image_key!r} is not 3D, shape {image.shape}")
    if label is not None:
        if label.ndim != 3:
            raise ValueError(f"{path}: {label_key!r} is not 3D, shape {label.shape}")
        if label.shape != image.shape:
            raise ValueError(f"{path}: {label_key!r} shape {label.shape} differs from {image_key!r} {image.shape}")
        if np.issubdtype(label.dtype, np.floating) and not np.array_equal(label, np.round(label)):
            raise ValueError(f"{path}: {label_key!r} has non-integer values")
        label = label.astype(np.uint8)
    return image, label


def read_case_list(path: str | os.PathLike) -> list[str]:
    """Case ids of a ``train.list``/``test.list`` file, in file order.

    Blank lines are skipped. Lines that are paths (``<case>/mri_norm2.h5`` or ``<case>.h5`` as some
    forks write them) are reduced to the case id.

    Args:
        path: the list file.

    Returns:
        Case ids.
    """
    cases = []
    with open(path) as f:
        for line in f:
            name = line.strip().replace("\\", "/")
            if not name:
                continue
            if name.endswith(H5_NAME):
                name = name[: -len(H5_NAME)].rstrip("/")
            name = name.split("/")[-1] if "/" in name else name
            if name.endswith(".h5"):
                name = name[:-3]
            cases.append(name)
    return cases


def _case_h5(data_root: str, case: str) -> str:
    p = os.path.join(data_root, case, H5_NAME)
    if os.path.isfile(p):
        return p
    alt = os.path.join(data_root, f"{case}.h5")
    return alt if os.path.isfile(alt) else p


def _spacing3(spacing: float | Sequence[float]) -> tuple[float, float, float]:
    """``1.25 -> (1.25, 1.25, 1.25)``; validates three positive values."""
    sp = (float(spacing),) * 3 if isinstance(spacing, (int, float)) else tuple(float(s) for s in spacing)
    if len(sp) != 3 or min(sp) <= 0:
        raise ValueError(f"spacing must be a positive number or 3 positive numbers, got {spacing!r}")
    return sp  # type: ignore[return-value]


def _is_converted(img_path: str, lab_path: str, spacing: Sequence[float]) -> bool:
    """Both files exist, their headers are readable and carry ``spacing`` (a cheap header-only check)."""
    import nibabel as nib

    try:
        return all(
            np.allclose(nib.load(p).header.get_zooms()[:3], spacing, rtol=1e-5) for p in (img_path, lab_path)
        )
    except Exception:  # noqa: BLE001 - missing or unreadable: convert again
        return False


def _write_case(
    data_root: str, case: str, output_dir: str, spacing: float | Sequence[float], overwrite: bool
) -> dict[str, str]:
    """Convert one case; returns absolute ``{"image", "label"}`` paths (files skipped if they exist)."""
    import nibabel as nib

    spacing = _spacing3(spacing)
    img_path = os.path.join(output_dir, "imagesTr", f"{case}.nii.gz")
    lab_path = os.path.join(output_dir, "labelsTr", f"{case}.nii.gz")
    if overwrite or not _is_converted(img_path, lab_path, spacing):
        image, label = read_la_h5(_case_h5(data_root, case), require_label=True)
        assert label is not None
        affine = np.diag([*map(float, spacing), 1.0])
        os.makedirs(os.path.dirname(img_path), exist_ok=True)
        os.makedirs(os.path.dirname(lab_path), exist_ok=True)
        for arr, out, dtype in ((image, img_path, np.float32), (label, lab_path, np.uint8)):
            nii = nib.Nifti1Image(arr.astype(dtype), affine)
            nii.header.set_xyzt_units("mm")
            nii.header.set_data_dtype(dtype)
            tmp = out[: -len(".nii.gz")] + f".tmp{os.getpid()}.nii.gz"
            nib.save(nii, tmp)
            os.replace(tmp, out)
    return {"image": img_path, "label": lab_path}


def convert_la_h5(
    data_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    train_list: str = "train.list",
    test_list: str | None = "test.list",
    num_labelled: int = 8,
    num_unlabelled: int | None = None,
    num_validation: int = 0,
    spacing: float | Sequence[float] = (0.625, 0.625, 0.625),
    overwrite: bool = False,
    datalist_name: str = "datalist.json",
) -> str:
    """Convert UA-MT/MCF LA h5 cases to NIfTI and write the semi-supervised datalist.

    Split (cases in ``train_list`` order, as MCF): ``training`` = the first ``num_labelled`` cases
    (MCF: 8 = 10 %, 16 = 20 % of 80), ``unlabeled`` = the next ``num_unlabelled`` (``None``: all cases
    between the labelled and the validation ones), ``validation`` = the last ``num_validation`` cases of
    the list, ``test`` = the cases of ``test_list`` if that file exists. Labels are written for every
    case (LA is fully annotated, :func:`kfold_datalists` needs them), but ``unlabeled`` entries name only
    the image. Files: ``<output_dir>/imagesTr/<case>.nii.gz`` (float32), ``labelsTr/<case>.nii.gz``
    (uint8), axes as stored in the h5 (see module docstring), affine ``diag(*spacing, 1)``.

    Args:
        data_root: folder with ``<case>/mri_norm2.h5`` and the list files.
        output_dir: where NIfTI files and the datalist go (keep it outside the repository).
        train_list: list file (relative to ``data_root``, or absolute) of the training cases.
        test_list: list file of test cases; skipped when ``None`` or absent.
        num_labelled: number of labelled cases.
        num_unlabelled: number of unlabelled cases; ``None``: all remaining.
        num_validation: number of validation cases taken from the end of ``train_list``.
        spacing: voxel size in mm written to the affine (one number: isotropic); ``la_half``: 1.25.
        overwrite: rewrite existing NIfTI files (otherwise files whose header already has ``spacing`` are
            reused).
        datalist_name: file name of the datalist inside ``output_dir``.

    Returns:
        Absolute path of the datalist JSON.

    Raises:
        ValueError: the counts do not fit in ``train_list``, or a case cannot be read.
        FileNotFoundError: ``data_root``, ``train_list`` or a case file is missing.
    """
    data_root, output_dir = os.path.abspath(os.fspath(data_root)), os.path.abspath(os.fspath(output_dir))
    spacing = _spacing3(spacing)
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"LA data root not found: {data_root}")
    train_path = os.path.join(data_root, train_list)
    if not os.path.isfile(train_path):
        raise FileNotFoundError(f"case list not found: {train_path}")
    cases = read_case_list(train_path)
    n = len(cases)
    if len(set(cases)) != n:
        raise ValueError(f"{train_path}: duplicate case ids")
    if min(num_labelled, num_validation) < 0 or num_labelled + num_validation > n:
        raise ValueError(
            f"num_labelled={num_labelled} + num_validation={num_validation} exceeds the {n} cases of {train_path}"
        )
    pool = cases[num_labelled : n - num_validation]
    if num_unlabelled is not None:
        if num_unlabelled < 0 or num_unlabelled > len(pool):
            raise ValueError(f"num_unlabelled={num_unlabelled} but only {len(pool)} cases remain in {train_path}")
        pool = pool[:num_unlabelled]
    test_cases: list[str] = []
    if test_list is not None and os.path.isfile(os.path.join(data_root, test_list)):
        test_cases = read_case_list(os.path.join(data_root, test_list))

    def conv(names: Sequence[str]) -> list[dict[str, str]]:
        return [_write_case(data_root, c, output_dir, spacing, overwrite) for c in names]

    datalist: dict[str, list[dict[str, str]]] = {
        "training": conv(cases[:num_labelled]),
        "unlabeled": [{"image": e["image"]} for e in conv(pool)],
        "validation": conv(cases[n - num_validation :] if num_validation else []),
    }
    if test_cases:
        datalist["test"] = conv(test_cases)
    return write_datalist(os.path.join(output_dir, datalist_name), datalist)


def _pool_from_datalist(path: str, keys: Sequence[str]) -> list[dict[str, Any]]:
    """All cases of ``keys`` in a datalist, in order; missing labels found by ``imagesTr -> labelsTr``."""
    import json

    with open(path) as f:
        present = json.load(f)
    items: list[dict[str, Any]] = []
    for key in keys:
        if key not in present:
            continue
        for item in load_datalist(path, key):
            if "label" not in item:
                guess = os.path.join(
                    os.path.dirname(os.path.dirname(item["image"])), "labelsTr", os.path.basename(item["image"])
                )
                if not os.path.isfile(guess):
                    raise ValueError(
                        f"{path}: {key!r} entry {item['image']} has no label and {guess} does not exist; "
                        "k-fold cross-validation needs a label for every case"
                    )
                item = {**item, "label": guess}
            items.append(item)
    return items


def kfold_datalists(
    source: str | os.PathLike | Sequence[Mapping[str, Any]],
    output_dir: str | os.PathLike | None = None,
    num_folds: int = 5,
    num_labelled: int = 8,
    num_unlabelled: int | None = None,
    pool_keys: Sequence[str] = ("training", "unlabeled", "validation"),
    train_list: str = "train.list",
    spacing: float | Sequence[float] = (0.625, 0.625, 0.625),
    overwrite: bool = False,
) -> list[str]:
    """Write ``datalist_fold{k}.json`` for k-fold cross-validation (paper: 5-fold LA, 4-fold Pancreas).

    Within fold ``k`` (see :func:`multicure_monai.data.kfold.kfold_datalist`) the ``k``-th contiguous
    block of the cases is ``validation``; of the other cases, in order, the first ``num_labelled`` are
    ``training`` and the next ``num_unlabelled`` (default all) are ``unlabeled``.

    Args:
        source: one of
            - a UA-MT h5 data root (folder with ``train_list``): its cases are converted to NIfTI under
              ``output_dir`` first (existing files reused unless ``overwrite``);
            - a datalist JSON: the cases of ``pool_keys`` in that order (labels of ``unlabeled``
              entries are looked up as ``labelsTr/<name>`` next to ``imagesTr/<name>``, as written by
              :func:`convert_la_h5`);
            - a sequence of ``{"image", "label"}`` dicts with absolute paths.
        output_dir: where the fold datalists go; default: the datalist's folder (required otherwise).
        num_folds: number of folds.
        num_labelled: labelled cases per fold.
        num_unlabelled: unlabelled cases per fold; ``None``: all remaining.
        pool_keys: datalist keys whose cases form the pool (datalist source only).
        train_list: case list (h5 root source only).
        spacing: voxel size in mm (h5 root source only).
        overwrite: rewrite existing NIfTI files (h5 root source only).

    Returns:
        Absolute paths of the ``num_folds`` fold datalists.
    """
    if isinstance(source, (str, os.PathLike)):
        src = os.path.abspath(os.fspath(source))
        if os.path.isdir(src):
            if output_dir is None:
                raise ValueError("output_dir is required when source is an h5 data root")
            out = os.path.abspath(os.fspath(output_dir))
            cases = read_case_list(os.path.join(src, train_list))
            pool: list[dict[str, Any]] = [_write_case(src, c, out, spacing, overwrite) for c in cases]
        elif os.path.isfile(src):
            pool = _pool_from_datalist(src, pool_keys)
            out = os.path.abspath(os.fspath(output_dir)) if output_dir is not None else os.path.dirname(src)
        else:
            raise FileNotFoundError(f"k-fold source not found: {src}")
    else:
        if output_dir is None:
            raise ValueError("output_dir is required when source is a list of cases")
        out = os.path.abspath(os.fspath(output_dir))
        pool = [dict(i) for i in source]
    missing = [i for i in pool if "label" not in i]
    if missing:
        raise ValueError(f"k-fold cross-validation needs a label for every case; {len(missing)} have none")
    paths = []
    for fold in range(num_folds):
        dl = kfold_datalist(pool, num_folds, fold, num_labelled, num_unlabelled)
        paths.append(write_datalist(os.path.join(out, f"datalist_fold{fold}.json"), dl))
    return paths
