"""Engines: the two-network semi-supervised trainer and what it is built from (its loss table, the teachers, the
students' views, its diagnostics), the checks of the training config, and the multi-process pieces of the
multi-GPU configs (:mod:`.distributed`). Its handlers are :mod:`multicure_monai.handlers`."""

from __future__ import annotations

from .diagnostics import check_finite_losses, loss_gradient_norms
from .distributed import (
    check_cases_per_process,
    ddp_module,
    ensure_process_group,
    rank_handlers,
    validation_sampler,
)
from .loss_terms import LossTerm, method_loss_terms
from .semi_supervised_trainer import SemiSupervisedTrainer

__all__ = [
    "LossTerm",
    "SemiSupervisedTrainer",
    "check_cases_per_process",
    "check_finite_losses",
    "ddp_module",
    "ensure_process_group",
    "loss_gradient_norms",
    "method_loss_terms",
    "rank_handlers",
    "validation_sampler",
]
