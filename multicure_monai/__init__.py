"""multicure-monai: uncertainty-aware contrastive semi-supervised 3D segmentation on MONAI."""

from __future__ import annotations

__version__ = "0.15.2"

__all__ = ["__version__"]
