"""Config values keyed by their config ids: a group's values as ``group#name``, as the command line spells them.

MONAI bundle configs nest switches in groups (``optim: {learning_rate: 0.01}``) and address them with ``#``
(``--optim#learning_rate 0.02``). Messages that name the id to override, and records that store switches by id
(the architecture of a checkpoint), read nested values through :func:`flatten_ids`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ID_SEP", "flatten_ids"]

ID_SEP = "#"  # MONAI's separator of nested config ids (monai.bundle.utils.ID_SEP_KEY)


def flatten_ids(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping of config values as ``{config id: value}``; lists and other values are leaves.

    Args:
        values: e.g. ``{"num_classes": 2, "multicure": {"use": True, "level": 2}}``.
        prefix: the id of ``values`` itself (``""`` for the top level).

    Returns:
        e.g. ``{"num_classes": 2, "multicure#use": True, "multicure#level": 2}``, in the order of ``values``.
    """
    flat: dict[str, Any] = {}
    for key, value in values.items():
        cid = f"{prefix}{ID_SEP}{key}" if prefix else str(key)
        flat.update(flatten_ids(value, cid) if isinstance(value, Mapping) else {cid: value})
    return flat
