"""Deterministic contiguous k-fold splits of a case list into semi-supervised datalists (in memory).

:func:`kfold_split` holds out the ``k``-th contiguous block of the cases, as the MCF/UA-MT
cross-validation does; :func:`kfold_datalist` turns one fold into a ``training``/``unlabeled``/
``validation`` datalist. Writing the datalist files of *all* folds from an h5 data root or a datalist
JSON is :func:`multicure_monai.data.la_h5.kfold_datalists` (plural), which calls :func:`kfold_datalist`
once per fold.

Why not :func:`monai.data.partition_dataset`: it does not give these folds. With ``num_partitions`` it
deals the cases out round-robin (fold 0 of ``[0..9]`` in 5 folds is ``[0, 5]``, not ``[0, 1]``); with
``ratios=[1] * k`` the blocks are contiguous but each size is rounded on its own, so the blocks need not
cover the list (7 cases in 3 folds: sizes ``2, 2, 2`` and the last case is in no fold; here ``3, 2, 2``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["kfold_split", "kfold_datalist"]


def kfold_split(items: Sequence[Any], num_folds: int, fold: int) -> tuple[list[Any], list[Any]]:
    """Deterministic contiguous k-fold split (no shuffling), as MCF/UA-MT style cross-validation.

    Fold ``k`` holds out the ``k``-th contiguous block of ``items``; the blocks are those of
    :func:`numpy.array_split`: they partition ``items`` and the first ``len(items) % num_folds`` are one longer
    than the rest (``80`` items, ``5`` folds: blocks ``[0:16], [16:32], ...``).

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
    held_out = np.array_split(np.arange(n), num_folds)[fold]
    start, stop = int(held_out[0]), int(held_out[-1]) + 1
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
