"""Losses of the method: pseudo-label (eq. 2), XOR regularisation (eq. 2) and prototype contrastive (eqs. 4-5)."""

from __future__ import annotations

from .prototype_contrastive import PrototypeContrastiveLoss
from .pseudo_label import PseudoLabelLoss
from .xor_regularization import XORRegularizationLoss

__all__ = ["PrototypeContrastiveLoss", "PseudoLabelLoss", "XORRegularizationLoss"]
