"""Voxel-wise confidence, uncertainty and entropy maps from softmax probabilities.

Section 2.1 of Karimijafarbigloo et al. (MIDL 2024) builds a *binary uncertainty map* by thresholding the
softmax output of the predictive network: voxels whose confidence (maximum class probability) is below a
threshold are uncertain (value 1), the others certain (value 0). The same confidence drives the pseudo-label
mask of eq. 2 ("confidence exceeding 0.7") and the reliable / uncertain split of section 2.2.

MONAI has no function that returns the max-probability confidence or a thresholded uncertainty map, so these
small functions are written here, with the per-voxel class (:func:`predicted_labels`, which also takes logits)
that the package shares. All inputs are probabilities (already soft-maxed), shaped ``(B, C, *S)`` with ``S`` the
spatial dimensions (``H, W`` or ``H, W, D``) and ``C >= 2``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["confidence", "predicted_labels", "uncertainty_map", "entropy"]


def _check_probs(probs: Tensor) -> None:
    """Raise ``ValueError`` unless ``probs`` is ``(B, C, *S)`` with ``C >= 2``."""
    if probs.ndim < 2:
        raise ValueError(f"probs must be shaped (B, C, *S), got shape {tuple(probs.shape)}.")
    if probs.shape[1] < 2:
        raise ValueError(
            f"probs must have at least 2 channels (softmax over classes), got {probs.shape[1]}; "
            "for a single sigmoid channel stack [1 - p, p] first."
        )


def confidence(probs: Tensor) -> Tensor:
    """Maximum class probability per voxel.

    Args:
        probs: softmax probabilities ``(B, C, *S)``, ``C >= 2``.

    Returns:
        ``(B, 1, *S)`` tensor with ``max_c probs[:, c]``, same dtype and device as ``probs``.

    Raises:
        ValueError: if ``probs`` has fewer than 2 dims or fewer than 2 channels.
    """
    _check_probs(probs)
    return probs.amax(dim=1, keepdim=True)


def predicted_labels(scores: Tensor, keepdim: bool = True) -> Tensor:
    """The class of each voxel, ``argmax_c scores[:, c]`` (the first maximum on ties), for probabilities or logits.

    ``max(dim=1).indices`` rather than ``torch.argmax``: on CPU the latter runs tens of times slower over dim 1 of
    a contiguous ``(B, C, *S)`` tensor (``benchmarks/README.md``).

    Args:
        scores: ``(B, C, *S)`` probabilities or logits.
        keepdim: keep the class dimension, ``(B, 1, *S)``; else ``(B, *S)``.
    """
    return scores.max(dim=1, keepdim=keepdim).indices


def uncertainty_map(probs: Tensor, threshold: float = 0.7) -> Tensor:
    """Binary uncertainty map of section 2.1: 1 where the confidence is below ``threshold``, else 0.

    Args:
        probs: softmax probabilities ``(B, C, *S)``, ``C >= 2``.
        threshold: confidence threshold in the open interval ``(0, 1)``; the paper uses 0.7.

    Returns:
        ``(B, 1, *S)`` floating tensor with values in ``{0, 1}`` (dtype of ``probs`` when floating, else
        ``torch.get_default_dtype()``); 1 marks an uncertain voxel (``max prob < threshold``). No gradient.

    Raises:
        ValueError: if ``threshold`` is not in ``(0, 1)`` or ``probs`` is malformed.
    """
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"threshold must lie in the open interval (0, 1), got {threshold}.")
    conf = confidence(probs.detach())
    dtype = probs.dtype if probs.is_floating_point() else torch.get_default_dtype()
    return (conf < threshold).to(dtype)


def entropy(probs: Tensor, eps: float = 1e-8, normalize: bool = False) -> Tensor:
    """Shannon entropy of the class distribution per voxel, ``-sum_c p_c log p_c``.

    ``log`` is evaluated at ``max(p_c, eps)`` so zero probabilities contribute exactly 0 and the result is
    finite and non-negative for valid probabilities.

    Args:
        probs: softmax probabilities ``(B, C, *S)``, ``C >= 2``.
        eps: lower clamp inside the logarithm.
        normalize: divide by ``log(C)`` so the result lies in ``[0, 1]``.

    Returns:
        ``(B, 1, *S)`` entropy in nats (or normalised), differentiable w.r.t. ``probs``.

    Raises:
        ValueError: if ``probs`` is malformed or ``eps <= 0``.
    """
    _check_probs(probs)
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}.")
    ent = -(probs * probs.clamp_min(eps).log()).sum(dim=1, keepdim=True)
    if normalize:
        ent = ent / math.log(probs.shape[1])
    return ent
