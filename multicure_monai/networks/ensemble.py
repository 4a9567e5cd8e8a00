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

from multicure_monai.networks.batchnorm_folding import FoldedCopy
from multicure_monai.networks.two_nets import forward_two_nets
from multicure_monai.networks.vnet import SCRIPT_UNSUPPORTED

__all__ = ["DualNetworkEnsemble", "EnsembleMembers", "MEMBER_NAMES", "split_members"]

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
        predictive: the predictive :class:`~multicure_monai.networks.protocol.SegmentationNetwork`.
        auxiliary: the auxiliary one, called with the predictive net's uncertainty map.
        uncertainty_threshold: confidence threshold of the uncertainty map.
        weights: non-negative mixture weights ``(w_predictive, w_auxiliary)``, normalised to sum to 1.
        eps: lower clamp of the mixture before the log.
        predictive_uses_uncertainty: the predictive net holds a MultiCURE block (the authors' placement) and, as
            in training, gets the uncertainty map of a first pass of itself
            (:func:`~multicure_monai.networks.two_nets.forward_two_nets`, shared with the trainer).
        fold_batch_norm: in eval mode without gradients (inference, validation), run copies of the nets with each
            BatchNorm folded into its convolution (:func:`~multicure_monai.networks.batchnorm_folding.fold_batch_norm`,
            rebuilt when the weights change): the same function up to float rounding, in less time.

    :meth:`forward_members` (validation that scores each net next to the ensemble in one sliding-window pass,
    through :class:`EnsembleMembers`) returns the ensemble's and each net's log-probabilities together.

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
        predictive_uses_uncertainty: bool = False,
        fold_batch_norm: bool = True,
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
        self.predictive_uses_uncertainty = bool(predictive_uses_uncertainty)
        self.fold_batch_norm = bool(fold_batch_norm)
        self._folded = (FoldedCopy(), FoldedCopy())

    def __prepare_scriptable__(self) -> DualNetworkEnsemble:
        """``torch.jit.script`` stops here with what to do (export by tracing, see ``SCRIPT_UNSUPPORTED``)."""
        raise RuntimeError(SCRIPT_UNSUPPORTED)

    def _nets(self) -> tuple[nn.Module, nn.Module]:
        """The (predictive, auxiliary) nets to run: their BatchNorm-folded copies where ``fold_batch_norm`` applies."""
        if not self.fold_batch_norm:
            return self.predictive, self.auxiliary
        return self._folded[0].get(self.predictive), self._folded[1].get(self.auxiliary)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Ensemble prediction.

        Args:
            x: image ``(B, C_in, H, W, D)``.

        Returns:
            Log-probabilities ``(B, N, H, W, D)`` of the weighted probability average.
        """
        w_pred, w_aux = self.weights
        out = forward_two_nets(*self._nets(), x, self.uncertainty_threshold, self.predictive_uses_uncertainty,
                               run_auxiliary=w_aux > 0.0)  # fmt: skip
        p = out.probs_p
        if out.logits_a is None:
            return torch.log(p.clamp_min(self.eps))
        a = torch.softmax(out.logits_a.float(), dim=1)
        return torch.log((a if w_pred == 0.0 else w_pred * p + w_aux * a).clamp_min(self.eps))

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        """The ensemble's prediction and each net's, from one run of both nets.

        Args:
            x: image ``(B, C_in, H, W, D)``.

        Returns:
            ``(B, 3N, H, W, D)``: the log-probabilities of the ensemble, the predictive net and the auxiliary net,
            in that order (both nets always run); :func:`split_members` takes it apart.
        """
        w_pred, w_aux = self.weights
        out = forward_two_nets(*self._nets(), x, self.uncertainty_threshold, self.predictive_uses_uncertainty)
        p = out.probs_p
        a = torch.softmax(out.logits_a.float(), dim=1)
        return torch.log(torch.cat([w_pred * p + w_aux * a, p, a], dim=1).clamp_min(self.eps))


class EnsembleMembers(nn.Module):
    """A deployed :class:`DualNetworkEnsemble` seen through :meth:`~DualNetworkEnsemble.forward_members`.

    Validation scores the ensemble and each net in one sliding-window pass; wrapping the deployed network (the
    same module, the same weights) keeps the ensemble declared once in the configs.

    Args:
        ensemble: the deployed ensemble.
    """

    def __init__(self, ensemble: DualNetworkEnsemble) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``ensemble.forward_members(x)``: ``(B, 3N, H, W, D)`` log-probabilities (ensemble, predictive, auxiliary)."""
        return self.ensemble.forward_members(x)


def split_members(output: torch.Tensor, dim: int = 0) -> dict[str, torch.Tensor]:
    """Split a :meth:`DualNetworkEnsemble.forward_members` output into its ensemble, predictive, auxiliary parts.

    Args:
        output: ``(3N, *S)`` (one decollated case, ``dim=0``) or ``(B, 3N, *S)`` (``dim=1``).
        dim: the channel dimension.

    Returns:
        ``{"ensemble": ..., "predictive": ..., "auxiliary": ...}``, ``N`` channels each.

    Raises:
        ValueError: if the channel count is not a multiple of 3.
    """
    if output.shape[dim] % 3:
        raise ValueError(f"expected 3N channels along dim {dim}, got shape {tuple(output.shape)}.")
    return dict(zip(MEMBER_NAMES, torch.chunk(output, 3, dim=dim)))
