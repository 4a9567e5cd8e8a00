"""Inference wrapper that runs the predictive and the auxiliary network the way they are trained together.

At training time the auxiliary network receives the predictive network's binary uncertainty map
(``max_c softmax < threshold``) in its MultiCURE block; a deployed model has to reproduce that coupling. This
wrapper is one ``nn.Module`` with a single-tensor ``forward(x)``, so it drops into MONAI inferers
(``SlidingWindowInferer``), bundle ``ckpt_export`` and MONAI Label without custom code. There is no MONAI
equivalent (MONAI ensembles combine independent predictions, not a predictor feeding another network).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from multicure_monai.networks.vnet import SCRIPT_UNSUPPORTED
from multicure_monai.uncertainty import uncertainty_map

__all__ = ["DualNetworkEnsemble", "MEMBER_NAMES", "split_members"]

MEMBER_NAMES = ("ensemble", "predictive", "auxiliary")


class DualNetworkEnsemble(nn.Module):
    """Predictive + auxiliary network ensemble returning log averaged probabilities.

    ``forward(x)`` computes ``p = softmax(predictive(x))``, the uncertainty map ``U = [max_c p < threshold]``,
    ``a = softmax(auxiliary(x, U))`` and returns ``log(clamp(w0 * p + w1 * a, min=eps))``. Because the weights
    are normalised to sum to 1, the mixture sums to 1 over classes, so ``softmax(output)`` (what MONAI post
    transforms / ``Activations(softmax=True)`` apply) gives back the averaged probabilities, and ``argmax`` of
    the output is the ensemble label map.

    Probabilities, the uncertainty map and the mixture are float32 whatever precision the nets run in (autocast).

    ``weights=(0, 1)`` deploys the auxiliary network alone, still fed with the predictive network's uncertainty map
    (as in training); ``weights=(1, 0)`` deploys the predictive network alone (the auxiliary one is not run).

    Args:
        predictive: network mapping ``(B, C_in, *S)`` to logits ``(B, N, *S)``.
        auxiliary: network called as ``auxiliary(x, uncertainty)`` returning logits ``(B, N, *S)``.
        uncertainty_threshold: confidence threshold of the uncertainty map.
        weights: non-negative mixture weights ``(w_predictive, w_auxiliary)``, normalised to sum to 1.
        eps: lower clamp of the mixture before the log.
        return_members: also return each net's log-probabilities (see above).
        predictive_uses_uncertainty: the predictive net holds a MultiCURE block (the authors' placement) and, as
            in training (``SemiSupervisedTrainer(predictive_uses_uncertainty=True)``), gets the uncertainty map of
            a first pass of itself.

    With ``return_members=True`` (validation that scores each net next to the ensemble in one sliding-window
    pass) the output is ``(B, 3N, H, W, D)``: the ensemble's, the predictive net's and the auxiliary net's
    log-probabilities, in that order; both nets always run. :func:`split_members` takes it apart.

    State dict keys are ``predictive.*`` and ``auxiliary.*``, so the two trained networks' state dicts load with
    a prefix.
    """

    def __init__(
        self,
        predictive: nn.Module,
        auxiliary: nn.Module,
        uncertainty_threshold: float = 0.7,
        weights: Sequence[float] = (0.5, 0.5),
        eps: float = 1e-8,
        return_members: bool = False,
        predictive_uses_uncertainty: bool = False,
    ) -> None:
        super().__init__()
        if len(weights) != 2:
            raise ValueError(f"weights must have 2 entries, got {weights}.")
        w = [float(v) for v in weights]
        if any(v < 0 for v in w) or sum(w) <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {weights}.")
        total = sum(w)
        self.predictive = predictive
        self.auxiliary = auxiliary
        self.uncertainty_threshold = float(uncertainty_threshold)
        self.weights = (w[0] / total, w[1] / total)
        self.eps = float(eps)
        self.return_members = bool(return_members)
        self.predictive_uses_uncertainty = bool(predictive_uses_uncertainty)

    def __prepare_scriptable__(self) -> DualNetworkEnsemble:
        """``torch.jit.script`` stops here with what to do (export by tracing, see ``SCRIPT_UNSUPPORTED``)."""
        raise RuntimeError(SCRIPT_UNSUPPORTED)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Ensemble prediction.

        Args:
            x: image ``(B, C_in, H, W, D)``.

        Returns:
            Log-probabilities ``(B, N, H, W, D)`` of the weighted probability average.
        """
        w_pred, w_aux = self.weights
        if self.predictive_uses_uncertainty:  # as the trainer: a first pass gives the predictive net its own map
            first = torch.softmax(self.predictive(x).float(), dim=1)
            p = torch.softmax(self.predictive(x, uncertainty_map(first, self.uncertainty_threshold)).float(), dim=1)
        else:
            p = torch.softmax(self.predictive(x).float(), dim=1)
        if self.return_members:
            a = torch.softmax(self.auxiliary(x, uncertainty_map(p, self.uncertainty_threshold)).float(), dim=1)
            mixed = [w_pred * p + w_aux * a, p, a]
            return torch.log(torch.cat(mixed, dim=1).clamp_min(self.eps))
        if w_aux == 0.0:
            mix = p
        else:
            unc = uncertainty_map(p, self.uncertainty_threshold)
            a = torch.softmax(self.auxiliary(x, unc).float(), dim=1)
            mix = a if w_pred == 0.0 else w_pred * p + w_aux * a
        return torch.log(mix.clamp_min(self.eps))


def split_members(output: torch.Tensor, dim: int = 0) -> dict[str, torch.Tensor]:
    """Split a ``return_members=True`` output into ``{"ensemble", "predictive", "auxiliary"}`` parts.

    Args:
        output: ``(3N, *S)`` (one decollated case, ``dim=0``) or ``(B, 3N, *S)`` (``dim=1``).
        dim: the channel dimension.

    Raises:
        ValueError: if the channel count is not a multiple of 3.
    """
    if output.shape[dim] % 3:
        raise ValueError(f"expected 3N channels along dim {dim}, got shape {tuple(output.shape)}.")
    return dict(zip(MEMBER_NAMES, torch.chunk(output, 3, dim=dim)))
