"""Synthetic 3D "organ" phantoms: the bundle's built-in default dataset.

A fresh checkout must train and evaluate with no data downloaded, so the bundle generates a small
dataset of phantoms on first use (:func:`ensure_phantom_dataset`). MONAI's
:func:`monai.data.synthetic.create_test_image_3d` does not fit: its spheres have hard edges, constant
intensities and no confounders, so a global threshold segments them perfectly and nothing about a
semi-supervised method can be learned from them. A phantom here has

- an organ-like target: a smooth union of 2-3 random ellipsoids (random position, size, orientation),
  deformed by a low-frequency random displacement field, covering 5-25 % of the volume (the level set
  of an approximate signed distance is shifted so the foreground fraction hits a random target);
- partial-volume edges: the label is the voxel-centre inside test, the image occupancy ramps linearly
  over about 1.5 voxels across the boundary;
- a textured background with darker regions and distractors of similar but not identical intensity:
  tubular "vessels" that leave the organ surface and separate blobs (together 30-50 % of the organ's
  volume, so every phantom is about equally hard);
- a multiplicative smooth bias field, Rician noise, and finally z-score normalisation.

Because distractors overlap the organ's intensity range once the bias field is applied, the best
global threshold reaches a Dice clearly below 0.9, while shape and context (size, tubularity) separate
organ from distractors for a CNN.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from multicure_monai.data.datalist import load_datalist, write_datalist

__all__ = [
    "make_phantom",
    "generate_phantom_dataset",
    "ensure_phantom_dataset",
    "best_threshold_dice",
    "STAMP_NAME",
]

#: Name of the file recording the parameters a phantom dataset was generated with.
STAMP_NAME = "phantom_stamp.json"
#: Bumped whenever :func:`make_phantom` changes its output, so stale datasets are regenerated.
_GENERATOR_VERSION = 2


def _bspline_matrix(n_out: int, n_ctrl: int) -> np.ndarray:
    """``(n_out, n_ctrl)`` cubic B-spline weights of ``n_out`` evenly spaced samples over ``n_ctrl`` controls."""
    x = np.linspace(1.0, n_ctrl - 2.0, n_out)[:, None] - np.arange(n_ctrl)[None, :]
    t = np.abs(x)
    w = np.where(t < 1.0, 2.0 / 3.0 - t**2 + 0.5 * t**3, np.where(t < 2.0, (2.0 - t) ** 3 / 6.0, 0.0))
    return w.astype(np.float32)


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], cells: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field: a cubic B-spline over a coarse grid of Gaussian coefficients.

    The tensor-product spline is evaluated separably (three small matrix products), which keeps a dataset
    of phantoms fast to generate.

    Args:
        rng: random generator.
        shape: output shape ``(H, W, D)``.
        cells: about how many independent values along the longest axis (low = smoother).

    Returns:
        float32 array of ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    longest = max(shape)
    coarse = [max(2, int(round(cells * s / longest))) + 3 for s in shape]
    coeff = rng.standard_normal(coarse).astype(np.float32)
    b0, b1, b2 = (_bspline_matrix(n, c) for n, c in zip(shape, coarse))
    # small contractions first, then the full volume as a sum of c0 slabs; einsum and the explicit sum
    # stay single-threaded (multi-threaded BLAS contends for the cores with the training that asked for them)
    t = np.einsum("bj,ijc->ibc", b1, np.einsum("ijk,ck->ijc", coeff, b2))  # (c0, S1, S2)
    field = np.zeros(shape, dtype=np.float32)
    for i in range(coarse[0]):
        field += b0[:, i, None, None] * t[i][None]
    field -= field.mean()
    return field / (field.std() + 1e-8)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _ellipsoid_sdf(pts: np.ndarray, center: np.ndarray, radii: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """First-order signed distance (mm, positive inside) to an ellipsoid, for points ``(3, N)``."""
    u = rot.T @ (pts - center[:, None])
    f = ((u / radii[:, None]) ** 2).sum(0) - 1.0
    grad = 2.0 * np.sqrt(((u / radii[:, None] ** 2) ** 2).sum(0))
    return np.minimum(-f / (grad + 1e-6), radii.max())


def _segment_distance(pts: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """Distance from points ``(3, N)`` to a polyline ``(K, 3)``."""
    best = np.full(pts.shape[1], np.inf, dtype=np.float32)
    for a, b in zip(curve[:-1], curve[1:]):
        ab = b - a
        t = np.clip(((pts - a[:, None]) * ab[:, None]).sum(0) / max(float(ab @ ab), 1e-8), 0.0, 1.0)
        d = np.sqrt(((pts - (a[:, None] + t * ab[:, None])) ** 2).sum(0))
        np.minimum(best, d, out=best)
    return best


def _smooth_max(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth maximum (a filleted union of two signed distances)."""
    h = np.clip(0.5 + 0.5 * (a - b) / k, 0.0, 1.0)
    return b + (a - b) * h + k * h * (1.0 - h)


def make_phantom(
    shape: Sequence[int] = (64, 64, 48),
    seed: int = 0,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic organ phantom (see the module docstring for what it contains).

    Geometry is built in millimetres, so anisotropic ``spacing`` gives physically round structures.

    Args:
        shape: volume shape ``(H, W, D)``; every side should be at least about 24 voxels.
        seed: random seed; the same seed gives the same arrays.
        spacing: voxel size in mm.

    Returns:
        ``(image, label)``: image ``(H, W, D)`` float32, z-score normalised (mean 0, std 1); label
        ``(H, W, D)`` uint8 in ``{0, 1}`` with 5-25 % foreground.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be 3D with sides >= 8, got {shape}")
    sp = np.asarray(spacing, dtype=np.float32)
    if sp.shape != (3,) or (sp <= 0).any():
        raise ValueError(f"spacing must be 3 positive numbers, got {spacing}")
    rng = np.random.default_rng(seed)
    extent = np.asarray(shape, dtype=np.float32) * sp
    vox_mm = float(sp.mean())
    grid = (np.indices(shape, dtype=np.float32) + 0.5) * sp[:, None, None, None]  # voxel centres, mm

    def box(lo: np.ndarray, hi: np.ndarray) -> tuple[slice, ...]:
        """Voxel slices covering the mm box [lo, hi] (clipped to the volume)."""
        i0 = np.clip(np.floor(lo / sp).astype(int), 0, shape)
        i1 = np.clip(np.ceil(hi / sp).astype(int) + 1, 0, shape)
        return tuple(slice(int(x), int(y)) for x, y in zip(i0, i1))

    def local(sl: tuple[slice, ...]) -> np.ndarray:
        return grid[(slice(None), *sl)].reshape(3, -1)

    def paint(img: np.ndarray, sl: tuple[slice, ...], sdf_local: np.ndarray, value: Any, ramp: float) -> None:
        """Alpha-composite a structure: signed distance ``sdf_local`` (mm), intensity ``value`` (scalar or
        array of ``img[sl]``'s shape), linear edge ramp over ``ramp`` voxels."""
        o = np.clip(0.5 + sdf_local / (ramp * vox_mm), 0.0, 1.0).reshape(img[sl].shape)
        img[sl] = img[sl] * (1.0 - o) + value * o

    # --- organ: smooth union of ellipsoids, warped by a low-frequency displacement field -----------------
    target = float(rng.uniform(0.07, 0.18))
    r_mean = (0.7 * target * float(np.prod(extent)) / (4.0 / 3.0 * np.pi)) ** (1.0 / 3.0)
    aspect = rng.uniform(0.75, 1.35, 3)
    radii0 = (r_mean * aspect / np.prod(aspect) ** (1.0 / 3.0)).astype(np.float32)
    center0 = (extent * rng.uniform(0.4, 0.6, 3)).astype(np.float32)
    disp = np.stack([_smooth_field(rng, shape, 4) for _ in range(3)])
    warped = (grid + 0.12 * r_mean * disp).reshape(3, -1)
    sdf = _ellipsoid_sdf(warped, center0, radii0, _random_rotation(rng))
    for _ in range(int(rng.integers(1, 3))):
        direction = rng.standard_normal(3)
        c = center0 + direction / np.linalg.norm(direction) * r_mean * rng.uniform(0.5, 0.8)
        radii = (radii0 * rng.uniform(0.45, 0.7, 3)).astype(np.float32)
        sdf = _smooth_max(sdf, _ellipsoid_sdf(warped, c.astype(np.float32), radii, _random_rotation(rng)), 0.3 * r_mean)
    sdf = (sdf - np.quantile(sdf, 1.0 - target)).reshape(shape)  # exact foreground fraction; mm
    label = sdf > 0

    # --- background: texture and darker regions ---------------------------------------------------------
    image = 0.3 + 0.06 * _smooth_field(rng, shape, 8) + 0.03 * _smooth_field(rng, shape, 20)
    for _ in range(int(rng.integers(1, 3))):
        c = (extent * rng.uniform(0.0, 1.0, 3)).astype(np.float32)
        r = (r_mean * rng.uniform(0.8, 1.5, 3)).astype(np.float32)
        sl = box(c - r.max() - 3 * vox_mm, c + r.max() + 3 * vox_mm)
        paint(image, sl, _ellipsoid_sdf(local(sl), c, r, _random_rotation(rng)), rng.uniform(0.08, 0.15), 3.0)

    # --- distractors: vessels leaving the organ surface, and separate blobs ------------------------------
    surface = np.argwhere(np.abs(sdf) < vox_mm)
    centroid = grid[:, label].mean(1)
    for _ in range(int(rng.integers(3, 6))):
        start = (surface[rng.integers(len(surface))] + 0.5) * sp
        out = (start - centroid) / (np.linalg.norm(start - centroid) + 1e-6)
        bend = rng.standard_normal(3) * 0.6
        length = r_mean * rng.uniform(1.2, 2.2)
        p1 = start + out * length * 0.5 + bend * length * 0.3
        p2 = start + (out + 0.5 * bend) * length
        t = np.linspace(0.0, 1.0, 20)[:, None]
        curve = ((1 - t) ** 2 * (start - 2 * vox_mm * out) + 2 * (1 - t) * t * p1 + t**2 * p2).astype(np.float32)
        radius = rng.uniform(2.0, 3.5) * vox_mm
        sl = box(curve.min(0) - radius - 2 * vox_mm, curve.max(0) + radius + 2 * vox_mm)
        paint(image, sl, radius - _segment_distance(local(sl), curve), rng.uniform(0.9, 1.05), 1.5)
    blob_budget = int(label.sum()) * rng.uniform(0.3, 0.5)  # blob voxels, relative to the organ's
    for _ in range(300):
        if blob_budget <= 0:
            break
        r = (r_mean * rng.uniform(0.3, 0.55) * rng.uniform(0.8, 1.25, 3)).astype(np.float32)
        c = (extent * rng.uniform(0.1, 0.9, 3)).astype(np.float32)
        ci = tuple(np.clip((c / sp).astype(int), 0, np.asarray(shape) - 1))
        if sdf[ci] > -(float(r.max()) + 3.0 * vox_mm):
            continue  # centre too close to the organ (cheap test before the exact one)
        sl = box(c - r.max() - 2 * vox_mm, c + r.max() + 2 * vox_mm)
        blob = _ellipsoid_sdf(local(sl), c, r, _random_rotation(rng))
        if (sdf[sl].reshape(-1)[blob > -2.0 * vox_mm] > -3.0 * vox_mm).any():
            continue  # would touch the organ
        paint(image, sl, blob, rng.uniform(0.9, 1.15), 1.5)
        blob_budget -= int((blob > 0).sum())

    # --- organ on top, with a mild texture of its own ----------------------------------------------------
    everything = tuple(slice(None) for _ in shape)
    paint(image, everything, sdf, 1.0 + 0.06 * _smooth_field(rng, shape, 10), 1.5)

    # --- acquisition: bias field, Rician noise, z-score ---------------------------------------------------
    image *= np.exp(0.3 * _smooth_field(rng, shape, 3))
    sigma = rng.uniform(0.05, 0.09)
    image = np.sqrt((image + sigma * rng.standard_normal(shape)) ** 2 + (sigma * rng.standard_normal(shape)) ** 2)
    image = (image - image.mean()) / (image.std() + 1e-8)
    return image.astype(np.float32), label.astype(np.uint8)


def best_threshold_dice(image: np.ndarray, label: np.ndarray, num_thresholds: int = 256) -> tuple[float, float]:
    """Best Dice of a global threshold ``image > t`` against a binary label (a difficulty measure).

    Args:
        image: ``(H, W, D)`` intensities.
        label: ``(H, W, D)`` binary mask.
        num_thresholds: thresholds tried, evenly spaced over the image's intensity quantiles.

    Returns:
        ``(dice, threshold)`` of the best threshold.
    """
    x = np.asarray(image, dtype=np.float64).reshape(-1)
    y = np.asarray(label).reshape(-1) > 0
    ts = np.unique(np.quantile(x, np.linspace(0.0, 1.0, num_thresholds + 2)[1:-1]))
    order = np.argsort(x)
    xs, ys = x[order], y[order]
    fg_above = np.cumsum(ys[::-1])[::-1]  # foreground voxels at index >= i
    pos = np.searchsorted(xs, ts, side="right")
    n = len(xs)
    pred = n - pos
    tp = np.where(pos < n, fg_above[np.minimum(pos, n - 1)], 0)
    dice = 2.0 * tp / np.maximum(pred + y.sum(), 1)
    i = int(np.argmax(dice))
    return float(dice[i]), float(ts[i])


def _case_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def _save_nifti(arr: np.ndarray, path: str, spacing: Sequence[float]) -> None:
    import nibabel as nib

    nii = nib.Nifti1Image(arr, np.diag([*map(float, spacing), 1.0]))
    nii.header.set_xyzt_units("mm")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path[: -len(".nii.gz")] + f".tmp{os.getpid()}.nii.gz"
    nib.save(nii, tmp)
    os.replace(tmp, path)


def _stamp(params: dict[str, Any]) -> dict[str, Any]:
    clean = {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in params.items()}
    clean["shape"] = [int(s) for s in clean["shape"]]
    clean["spacing"] = [float(s) for s in clean["spacing"]]
    return {"generator": f"{__name__}.make_phantom", "version": _GENERATOR_VERSION, **clean}


def _is_complete(root: str, stamp: dict[str, Any]) -> bool:
    dl = os.path.join(root, "datalist.json")
    try:
        with open(os.path.join(root, STAMP_NAME)) as f:
            if json.load(f) != stamp:
                return False
        for key in ("training", "unlabeled", "validation"):
            for item in load_datalist(dl, key):
                if not all(os.path.isfile(v) for k, v in item.items() if k in ("image", "label")):
                    return False
    except (OSError, ValueError):
        return False
    return True


def generate_phantom_dataset(
    root: str | os.PathLike,
    num_labelled: int = 4,
    num_unlabelled: int = 16,
    num_validation: int = 4,
    shape: Sequence[int] = (64, 64, 48),
    seed: int = 0,
    overwrite: bool = False,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> str:
    """Write a phantom dataset as NIfTI files and a datalist JSON.

    Layout: ``root/imagesTr/phantom_XXX.nii.gz`` (all images, float32) and ``root/labelsTr/phantom_XXX.nii.gz``
    (uint8) for the labelled and validation cases only; unlabelled cases get **no** label file.
    ``root/datalist.json`` has ``training`` (labelled), ``unlabeled`` and ``validation``;
    ``root/phantom_stamp.json`` records the parameters. Case ``i`` is ``make_phantom(shape, s_i, spacing)``
    with ``s_i`` derived from ``(seed, i)``, so the output is deterministic given the parameters.

    Args:
        root: output folder.
        num_labelled: labelled training cases.
        num_unlabelled: unlabelled training cases.
        num_validation: labelled validation cases.
        shape: volume shape ``(H, W, D)``.
        seed: dataset seed.
        overwrite: regenerate even if ``root`` already holds a datalist.
        spacing: voxel size in mm, written to the NIfTI affine ``diag(*spacing, 1)``.

    Returns:
        Absolute path of ``root/datalist.json``.

    Raises:
        FileExistsError: ``root`` holds a datalist generated with other parameters (or incomplete) and
            ``overwrite`` is False.
    """
    root = os.path.abspath(os.fspath(root))
    if min(num_labelled, num_unlabelled, num_validation) < 0:
        raise ValueError("case counts must be >= 0")
    params = dict(
        num_labelled=int(num_labelled), num_unlabelled=int(num_unlabelled), num_validation=int(num_validation),
        shape=tuple(shape), seed=int(seed), spacing=tuple(spacing),
    )  # fmt: skip
    stamp = _stamp(params)
    dl_path = os.path.join(root, "datalist.json")
    if os.path.exists(dl_path) and not overwrite:
        if _is_complete(root, stamp):
            return dl_path
        raise FileExistsError(
            f"{dl_path} exists but was generated with other parameters or is incomplete; "
            "pass overwrite=True or use ensure_phantom_dataset"
        )
    roles = ["training"] * num_labelled + ["unlabeled"] * num_unlabelled + ["validation"] * num_validation
    datalist: dict[str, list[dict[str, str]]] = {"training": [], "unlabeled": [], "validation": []}
    for i, role in enumerate(roles):
        image, label = make_phantom(shape, _case_seed(seed, i), spacing)
        name = f"phantom_{i:03d}.nii.gz"
        entry = {"image": os.path.join(root, "imagesTr", name)}
        _save_nifti(image, entry["image"], spacing)
        lab_path = os.path.join(root, "labelsTr", name)
        if role == "unlabeled":
            with contextlib.suppress(FileNotFoundError):
                os.remove(lab_path)  # left over from a previous generation with other roles
        else:
            entry["label"] = lab_path
            _save_nifti(label, lab_path, spacing)
        datalist[role].append(entry)
    path = write_datalist(dl_path, datalist)
    tmp = os.path.join(root, f"{STAMP_NAME}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(stamp, f, indent=2)
    os.replace(tmp, os.path.join(root, STAMP_NAME))  # written last: its presence marks a complete dataset
    return path


def ensure_phantom_dataset(root: str | os.PathLike, **kwargs: Any) -> str:
    """Return ``root/datalist.json``, generating the phantom dataset only when needed.

    Nothing is written when the datalist, every file it names and a stamp with the same parameters
    exist, so this is cheap and safe in a bundle config expression, e.g.
    ``"$multicure_monai.data.synthetic.ensure_phantom_dataset(@dataset_dir)"``.

    Args:
        root: dataset folder.
        kwargs: parameters of :func:`generate_phantom_dataset` (except ``root`` and ``overwrite``).

    Returns:
        Absolute path of the datalist JSON.
    """
    kwargs.pop("overwrite", None)
    bound = inspect.signature(generate_phantom_dataset).bind(root, **kwargs)
    bound.apply_defaults()
    params = {k: v for k, v in bound.arguments.items() if k not in ("root", "overwrite")}
    params["shape"], params["spacing"] = tuple(params["shape"]), tuple(params["spacing"])
    params = {k: (int(v) if isinstance(v, (int, np.integer)) else v) for k, v in params.items()}
    root = os.path.abspath(os.fspath(root))
    if _is_complete(root, _stamp(params)):
        return os.path.join(root, "datalist.json")
    return generate_phantom_dataset(root, overwrite=True, **params)
