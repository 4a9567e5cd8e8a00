"""Range checks of the training config's values, run in the bundle's ``initialize`` before any data loads.

MONAI's config parser checks syntax and references, not values; a threshold of ``7`` or ``-300`` iterations
would otherwise surface (if at all) deep inside a training run, or be silently clamped
(``max_epochs: max(1, max_iterations // val_interval)``). :func:`check_training_config` reports every value
out of range in one :class:`~multicure_monai.errors.BundleInputError`, one line per value, naming the config id
to override (``optim#learning_rate`` for a value of a group). :func:`check_writable_folders` (also part of it)
finds an output folder that cannot be created or written before the run does any work, rather than when the
first file is saved.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from multicure_monai.config_ids import flatten_ids
from multicure_monai.errors import BundleInputError
from multicure_monai.networks.multicure import MULTICURE_FORMS

__all__ = ["RULES", "check_training_config", "check_writable_folders", "folder_problems"]


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _triple(v: Any) -> bool:
    vals = list(v) if isinstance(v, Sequence) and not isinstance(v, str) else None
    return vals is not None and len(vals) == 3 and all(_is_int(x) and x >= 1 for x in vals)


_POSITIVE_INT = (lambda v: _is_int(v) and v >= 1, "must be a positive integer")
_UNIT_INTERVAL = (lambda v: _is_num(v) and 0.0 < v < 1.0, "must be a number in the open interval (0, 1)")
_NON_NEGATIVE = (lambda v: _is_num(v) and v >= 0, "must be a non-negative number")
_TRIPLE = (_triple, "must be three positive integers (H, W, D)")
_SWITCH = (lambda v: isinstance(v, bool), "must be True or False")

#: config id -> (test, what a value must be). A switch (on/off option) must be a real boolean: ``monai.bundle``'s
#: command line (fire) reads ``--contrastive#use false`` as the string ``'false'``, which Python treats as true.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_iterations": _POSITIVE_INT,
    "val_interval": _POSITIVE_INT,
    "labeled_batch_size": _POSITIVE_INT,
    "unlabeled_batch_size": _POSITIVE_INT,
    "in_channels": _POSITIVE_INT,
    "num_classes": (lambda v: _is_int(v) and v >= 2, "must be an integer >= 2 (background + foreground classes)"),
    "uncertainty_threshold": _UNIT_INTERVAL,
    "unlabelled#pseudo_label_threshold": _UNIT_INTERVAL,
    "optim#learning_rate": (lambda v: _is_num(v) and v > 0, "must be a positive number"),
    "optim#momentum": (lambda v: _is_num(v) and 0.0 <= v < 1.0, "must be in [0, 1)"),
    "optim#weight_decay": _NON_NEGATIVE,
    "unlabelled#lambda_u": _NON_NEGATIVE,
    "unlabelled#lambda_reg": _NON_NEGATIVE,
    "contrastive#lambda_c": _NON_NEGATIVE,
    "roi_size": _TRIPLE,
    "sw_stride": _TRIPLE,
    "multicure#form": (lambda v: str(v) in MULTICURE_FORMS, f"must be one of {sorted(MULTICURE_FORMS)}"),
    **{name: _SWITCH for name in (
        "multicure#use", "multicure#in_predictive", "supervised#only", "unlabelled#detach_predictive_in_reg",
        "unlabelled#ema_warmup", "contrastive#use", "precision#amp", "precision#channels_last",
        "keep_largest_component",
    )},
}  # fmt: skip


def check_training_config(values: Mapping[str, Any], folders: Mapping[str, Any] | None = None) -> bool:
    """Raise one :class:`BundleInputError` listing every config value out of range; ``True`` when all are fine.

    Each value with a rule in :data:`RULES` is checked (values without one, and rules without a value, are
    skipped). Besides: ``checkpoint_interval`` is a positive multiple of ``val_interval`` (resume checkpoints are
    written at the end of an engine epoch, see ``multicure_monai.handlers.determinism``), ``max_iterations`` is at
    least ``val_interval`` and the ``sw_stride`` not larger than the ``roi_size``. Every entry of ``folders``
    (config id -> path, e.g. ``model_dir``, ``ckpt_dir``, ``output_dir``) can be created and written
    (:func:`folder_problems`).

    Args:
        values: config id -> value, nested for groups (``{"optim": {"learning_rate": 0.01}, ...}``).
        folders: config id -> folder path.
    """
    flat = flatten_ids(values)
    problems: list[str] = []

    def bad(name: str, value: Any, rule: str) -> None:
        switch = RULES.get(name) is _SWITCH
        hint = f"capitalised on the command line: --{name} False" if switch else f"override with --{name}"
        problems.append(f"{name}={value!r}: {rule} ({hint})")

    for name, value in flat.items():
        if name in RULES and not RULES[name][0](value):
            bad(name, value, RULES[name][1])
    iterations, interval = flat.get("max_iterations"), flat.get("val_interval")
    checkpoints = flat.get("checkpoint_interval")
    if checkpoints is not None and _is_int(interval) and interval >= 1:
        if not _is_int(checkpoints) or checkpoints < 1 or checkpoints % interval:
            bad("checkpoint_interval", checkpoints, f"must be a positive multiple of val_interval={interval} "
                "(checkpoints are written at the end of an engine epoch, so that a resumed run is identical to an "
                "uninterrupted one)")  # fmt: skip
    if _is_int(iterations) and _is_int(interval) and 1 <= iterations < interval:
        bad("max_iterations", iterations, f"must be >= val_interval={interval} (one engine epoch)")
    roi, stride = flat.get("roi_size"), flat.get("sw_stride")
    if roi is not None and stride is not None and _triple(roi) and _triple(stride):
        if any(s > r for s, r in zip(stride, roi)):
            bad("sw_stride", list(stride), f"must not exceed roi_size={list(roi)} (windows would leave gaps)")
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
