"""A tqdm progress bar as a MONAI-attachable handler.

MONAI's workflows attach every handler with ``handler.attach(engine)``; ignite's
:class:`~ignite.handlers.ProgressBar` takes its ``output_transform`` and ``metric_names`` in ``attach`` instead,
so it cannot be configured from a bundle's YAML alone. This subclass takes them in the constructor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.engine import Engine
from ignite.handlers import ProgressBar as _IgniteProgressBar

__all__ = ["ProgressBar", "scalar_terms"]


def scalar_terms(output: Any, prefix: str | tuple[str, ...] = "loss") -> dict[str, float]:
    """The scalar entries of an engine output dict whose names start with ``prefix``, as floats.

    Args:
        output: ``engine.state.output``; a dict (or a decollated list of dicts, of which the first is used).
        prefix: keep the keys that start with this string (or with one of these strings).
    """
    if isinstance(output, list):
        output = output[0] if output else {}
    if not isinstance(output, dict):
        return {}
    terms = {}
    for key, value in output.items():
        if isinstance(key, str) and key.startswith(prefix):
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                terms[key] = float(value.item())
            elif isinstance(value, (int, float)):
                terms[key] = float(value)
    return terms


class ProgressBar(_IgniteProgressBar):
    """ignite's progress bar, configured in the constructor so a bundle config can list it as a handler.

    Args:
        output_transform: maps ``engine.state.output`` to a dict of scalars shown in the bar; defaults to
            :func:`scalar_terms` (every ``loss*`` entry).
        metric_names: engine metrics to show as well (``"all"`` for every metric).
        persist: keep the bar after completion.
        kwargs: passed to tqdm.
    """

    def __init__(
        self,
        output_transform: Callable | None = scalar_terms,
        metric_names: str | Sequence[str] | None = None,
        persist: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(persist=persist, **kwargs)
        self._output_transform = output_transform
        self._metric_names = list(metric_names) if isinstance(metric_names, (list, tuple)) else metric_names

    def attach(self, engine: Engine, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Attach to ``engine`` with the constructor's ``output_transform`` and ``metric_names``."""
        kwargs.setdefault("output_transform", self._output_transform)
        kwargs.setdefault("metric_names", self._metric_names)
        super().attach(engine, *args, **kwargs)
