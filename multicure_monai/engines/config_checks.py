"""Range checks of the training config's scalar values, run in the bundle's ``initialize`` before any data loads.

MONAI's config parser checks syntax and references, not values; a threshold of ``7`` or ``-300`` iterations
would otherwise surface (if at all) deep inside a training run, or be silently clamped
(``max_epochs: max(1, max_iterations // val_interval)``). :func:`check_training_config` reports every value
out of range in one :class:`~multicure_monai.errors.BundleInputError`, one line per value, naming the config id
to override. :func:`check_writable_folders` (also part of it) finds an output folder that cannot be created or
written before the run does any work, rather than when the first file is saved.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

from multicure_monai.errors import BundleInputError
from multicure_monai.networks.multicure import MULTICURE_FORMS

__all__ = ["check_training_config", "check_writable_folders", "folder_problems"]


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def check_training_config(
    max_iterations: Any = 1,
    val_interval: Any = 1,
    checkpoint_interval: Any | None = None,
    uncertainty_threshold: Any = 0.5,
    pseudo_label_threshold: Any = 0.5,
    learning_rate: Any = 0.01,
    momentum: Any = 0.0,
    weight_decay: Any = 0.0,
    lambda_u: Any = 1.0,
    lambda_reg: Any = 1.0,
    lambda_c: Any = 0.1,
    num_classes: Any = 2,
    in_channels: Any = 1,
    labeled_batch_size: Any = 1,
    unlabeled_batch_size: Any = 1,
    roi_size: Sequence[Any] | None = None,
    sw_stride: Sequence[Any] | None = None,
    switches: dict[str, Any] | None = None,
    multicure_form: Any = None,
    folders: Mapping[str, Any] | None = None,
) -> bool:
    """Raise one :class:`BundleInputError` listing every config value out of range; ``True`` when all are fine.

    Rules: ``max_iterations``, ``val_interval``, batch sizes, ``in_channels`` are positive integers,
    ``num_classes >= 2``; ``checkpoint_interval`` is a positive multiple of ``val_interval`` (resume
    checkpoints are written at the end of an engine epoch, see ``multicure_monai.handlers.determinism``);
    the two thresholds are in the open interval (0, 1); ``learning_rate > 0``; ``momentum`` in [0, 1);
    ``weight_decay`` and the lambdas ``>= 0``; ``roi_size``/``sw_stride`` are three positive integers, the
    stride not larger than the patch; every entry of ``switches`` (on/off options such as ``use_contrastive``)
    is a real boolean: ``monai.bundle``'s command line (fire) reads ``--use_contrastive false`` as the string
    ``'false'``, which Python treats as true, so a lower-case value would silently switch the option ON.
    ``multicure_form`` is a key of :data:`~multicure_monai.networks.MULTICURE_FORMS`. Every entry of
    ``folders`` (config id -> path, e.g. ``model_dir``, ``ckpt_dir``, ``output_dir``) can be created and
    written (:func:`folder_problems`).
    """
    problems: list[str] = []

    def bad(name: str, value: Any, rule: str) -> None:
        problems.append(f"{name}={value!r}: {rule} (override with --{name})")

    for name, value in (
        ("max_iterations", max_iterations),
        ("val_interval", val_interval),
        ("labeled_batch_size", labeled_batch_size),
        ("unlabeled_batch_size", unlabeled_batch_size),
        ("in_channels", in_channels),
    ):
        if not _is_int(value) or value < 1:
            bad(name, value, "must be a positive integer")
    if not _is_int(num_classes) or num_classes < 2:
        bad("num_classes", num_classes, "must be an integer >= 2 (background + foreground classes)")
    if checkpoint_interval is not None and _is_int(val_interval) and val_interval >= 1:
        if not _is_int(checkpoint_interval) or checkpoint_interval < 1 or checkpoint_interval % val_interval:
            bad(
                "checkpoint_interval",
                checkpoint_interval,
                f"must be a positive multiple of val_interval={val_interval} (checkpoints are written at the end "
                "of an engine epoch, so that a resumed run is identical to an uninterrupted one)",
            )
    if _is_int(max_iterations) and _is_int(val_interval) and 1 <= max_iterations < val_interval:
        bad("max_iterations", max_iterations, f"must be >= val_interval={val_interval} (one engine epoch)")
    thresholds = (("uncertainty_threshold", uncertainty_threshold), ("pseudo_label_threshold", pseudo_label_threshold))
    for name, value in thresholds:
        if not _is_num(value) or not 0.0 < value < 1.0:
            bad(name, value, "must be a number in the open interval (0, 1)")
    if not _is_num(learning_rate) or learning_rate <= 0:
        bad("learning_rate", learning_rate, "must be a positive number")
    if not _is_num(momentum) or not 0.0 <= momentum < 1.0:
        bad("momentum", momentum, "must be in [0, 1)")
    weights = (
        ("weight_decay", weight_decay), ("lambda_u", lambda_u), ("lambda_reg", lambda_reg), ("lambda_c", lambda_c)
    )
    for name, value in weights:
        if not _is_num(value) or value < 0:
            bad(name, value, "must be a non-negative number")
    for name, value in (("roi_size", roi_size), ("sw_stride", sw_stride)):
        if value is None:
            continue
        vals = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
        if vals is None or len(vals) != 3 or not all(_is_int(v) and v >= 1 for v in vals):
            bad(name, value, "must be three positive integers (H, W, D)")
    geometry_ok = not any(p.startswith(("roi_size", "sw_stride")) for p in problems)
    if roi_size is not None and sw_stride is not None and geometry_ok:
        if any(s > r for s, r in zip(sw_stride, roi_size)):
            bad("sw_stride", list(sw_stride), f"must not exceed roi_size={list(roi_size)} (windows would leave gaps)")
    for name, value in (switches or {}).items():
        if not isinstance(value, bool):
            bad(name, value, f"must be True or False (capitalised on the command line: --{name} False)")
    if multicure_form is not None and multicure_form not in MULTICURE_FORMS:
        bad("multicure_form", multicure_form, f"must be one of {sorted(MULTICURE_FORMS)}")
    problems += folder_problems(folders or {})
    if problems:
        n = len(problems)
        head = f"config check failed with {n} value{'s' if n > 1 else ''} out of range:"
        raise BundleInputError(head + "\n  " + "\n  ".join(problems))
    return True


def folder_problems(folders: Mapping[str, Any]) -> list[str]:
    """One line per folder that cannot be created or written, naming its config id; ``[]`` when all can.

    A folder is fine when it is a writable directory, or when it does not exist yet and its nearest existing
    parent is a writable directory (the run creates it). Nothing is created here.

    Args:
        folders: config id -> folder path, e.g. ``{"model_dir": ..., "output_dir": ...}``.
    """
    problems = []
    for name, value in folders.items():
        if value is None:
            continue
        path = os.path.abspath(os.fspath(value))
        existing = path
        while not os.path.exists(existing) and os.path.dirname(existing) != existing:
            existing = os.path.dirname(existing)
        fix = f"(choose another folder with --{name})"
        if not os.path.isdir(existing):
            where = "is" if existing == path else f"is under {existing}, which is"
            problems.append(f"{name}={path}: {where} a regular file, not a folder {fix}")
        elif not os.access(existing, os.W_OK | os.X_OK):
            where = "" if existing == path else f" (its nearest existing parent {existing})"
            problems.append(f"{name}={path}: folder{where} is not writable {fix}")
    return problems


def check_writable_folders(folders: Mapping[str, Any]) -> bool:
    """Raise one :class:`BundleInputError` naming every folder of ``folders`` that cannot be written; else True.

    Args:
        folders: config id -> folder path (see :func:`folder_problems`).
    """
    problems = folder_problems(folders)
    if problems:
        n = len(problems)
        head = f"{n} output folder{'s' if n > 1 else ''} cannot be written:"
        raise BundleInputError(head + "\n  " + "\n  ".join(problems))
    return True
