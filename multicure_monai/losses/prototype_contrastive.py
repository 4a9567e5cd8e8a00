"""Deep (multi-level) prototype contrastive loss of section 2.2 (eqs. 4 and 5 plus prototype separation).

At every feature level ``l`` of a network (shapes ``(B, E_l, *S_l)``; deeper levels are smaller):

1. labels and the reliable / uncertain masks (full resolution ``(B, 1, *S)``) are resized to ``S_l`` with
   nearest-neighbour interpolation, and features are L2-normalised over ``E_l``;
2. prototypes (eq. 4): ``c_k = mean of the normalised features of the reliable voxels of class k``;
3. each uncertain voxel ``v`` of class ``k`` is pulled to ``c_k`` and pushed from the other prototypes (eq. 5),
   with ``s_j(v) = cos(v, c_j) / temperature``:

   * ``denominator="all"`` (default): ``l(v) = -s_k + log sum_{j} exp(s_j)``, InfoNCE / softmax cross-entropy
     over the prototypes with the positive included in the denominator. It is non-negative, bounded below by 0
     and its minimiser is well defined (maximal margin between ``s_k`` and the other ``s_j``).
   * ``denominator="negatives"``: the paper's literal eq. 5, ``l(v) = -s_k + log sum_{j != k} exp(s_j)``. It can
     be negative (down to ``-2 / temperature``), is not a log-probability (its optimum is not a normalised
     distribution) and, with a single negative (binary segmentation), reduces to the linear margin ``s_j - s_k``
     that never saturates; it is kept for faithfulness and ablation only.

   Per class, ``L_{c_k}`` is the mean of ``l(v)`` over its (sampled) uncertain voxels (the ``1/|S_k|`` of eq. 5);
   the level's contrastive term is the mean of ``L_{c_k}`` over the classes that have uncertain voxels;
4. separation term ("an additional term that considers the distance between class prototypes"):
   ``separation_weight * mean_{j<k} (1 + cos(c_j, c_k)) / 2`` over the present prototypes, in ``[0, 1]``,
   zero when prototypes are antipodal. It *pushes prototypes apart*;
5. the level loss is ``contrastive + separation`` and the total is ``sum_l level_weights[l] * level_loss_l``.

Gradients flow through both the uncertain features and the prototypes (hence into the reliable features).
Classes without reliable voxels at a level have no prototype, and their uncertain voxels are skipped. A level
with fewer than two prototypes or with no usable uncertain voxel contributes 0. If nothing contributes the result
is a zero still attached to the features' graph. Labels outside ``[0, num_classes)`` are ignored.

MONAI has no prototype / voxel contrastive loss (``monai.losses.ContrastiveLoss`` is the instance-level SimCLR
NT-Xent between two views), so this is written here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PrototypeContrastiveLoss"]

_DENOMINATORS = ("all", "negatives")


def _resize_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resize of a ``(B, 1, *S)`` label / mask tensor to spatial ``size`` (as float)."""
    xf = x.to(torch.float32)
    if tuple(xf.shape[2:]) == tuple(size):
        return xf
    return F.interpolate(xf, size=tuple(size), mode="nearest")


def _random_subset(indices: Tensor, cap: int | None) -> Tensor:
    """At most ``cap`` entries of the 1-D ``indices``, chosen uniformly with ``torch.randperm``."""
    if cap is None or indices.numel() <= cap:
        return indices
    perm = torch.randperm(indices.numel(), device=indices.device)[:cap]
    return indices[perm]


def _graph_zero(feat: Tensor) -> Tensor:
    """A zero attached to the graph of the features; float32, so that large half-precision features cannot
    overflow to ``inf * 0 = NaN``."""
    return feat.float().mean() * 0.0


def _class_feature_sums(feat: Tensor, cls: Tensor, num_slots: int, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-slot sums of the L2-normalised features, and the rows ``idx`` with their inverse norms (float32 or wider).

    Args:
        feat: ``(B, E, *S)`` features; voxels in ``(B, *S)`` row-major order, as ``labels.flatten()``.
        cls: ``(N,)`` slot per voxel in ``[0, num_slots]``; ``num_slots`` marks voxels left out.
        num_slots: number of slots ``P``.
        idx: ``(M,)`` voxel indices whose features are returned.

    Returns:
        ``sums`` ``(P, E)``, ``rows`` ``(M, E)`` (unnormalised) and ``inv_norm`` ``(M,)``. The sums are one matrix
        product with the ``(N, P)`` one-hot weights ``1 / ||f_v||``, so no normalised copy of the features is made.
    """
    f = feat.movedim(1, -1).reshape(-1, feat.shape[1])
    f = f.to(torch.promote_types(f.dtype, torch.float32))  # half precision features are summed in float32
    inv = 1.0 / torch.linalg.vector_norm(f, dim=1).clamp_min(1e-12)  # as F.normalize
    slots = torch.arange(num_slots, device=cls.device)
    weights = (cls.unsqueeze(1) == slots).to(inv.dtype) * inv.unsqueeze(1)
    return weights.t() @ f, f[idx], inv[idx]


class PrototypeContrastiveLoss(nn.Module):
    """Multi-level contrastive loss pulling uncertain voxel features to their class prototype (eqs. 4-5).

    See the module docstring for the exact formula.

    Args:
        num_classes: number of segmentation classes ``K`` (>= 2), background included.
        temperature: softmax temperature ``tau`` (> 0).
        max_uncertain_samples: at most this many uncertain voxels per level (over the whole batch) enter eq. 5,
            a uniform random subset drawn with ``torch.randperm`` (reproducible under ``torch.manual_seed``);
            ``None`` uses all.
        max_reliable_samples: optional cap of the same kind on the reliable voxels used for prototypes.
        separation_weight: weight of the prototype-separation term (>= 0).
        denominator: ``"all"`` (InfoNCE, default) or ``"negatives"`` (literal eq. 5).
        level_weights: one weight per feature level; ``None`` weighs all levels 1.

    ``forward(..., return_stats=True)`` also returns, for logging (the loss keeps no state between calls):
    ``num_uncertain`` (uncertain voxels used, summed over levels), ``num_prototypes`` (at the first level),
    ``level_stats`` (one dict per level: ``num_uncertain`` / ``num_prototypes`` / ``num_reliable``),
    ``contrast`` and ``separation`` (detached level-weighted sums of the eq. 5 and separation terms, ``None`` when
    no level contributed) and ``chance`` (the eq. 5 sum when every uncertain voxel is equally similar to all
    prototypes, ``sum_l w_l log P_l``, ``denominator="all"`` only): a learned loss falls below it.

    Example:
        >>> loss_fn = PrototypeContrastiveLoss(num_classes=2)
        >>> feats = [torch.randn(1, 8, 8, 8, 8, requires_grad=True), torch.randn(1, 16, 4, 4, 4)]
        >>> labels = torch.randint(0, 2, (1, 1, 8, 8, 8))
        >>> reliable = torch.rand(1, 1, 8, 8, 8) > 0.5
        >>> loss = loss_fn(feats, labels, reliable, ~reliable)
        >>> bool(torch.isfinite(loss))
        True
    """

    def __init__(
        self,
        num_classes: int,
        temperature: float = 0.1,
        max_uncertain_samples: int | None = 4096,
        max_reliable_samples: int | None = None,
        separation_weight: float = 1.0,
        denominator: str = "all",
        level_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        caps = {"max_uncertain_samples": max_uncertain_samples, "max_reliable_samples": max_reliable_samples}
        for name, cap in caps.items():
            if cap is not None and cap < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {cap}.")
        if separation_weight < 0:
            raise ValueError(f"separation_weight must be >= 0, got {separation_weight}.")
        if denominator not in _DENOMINATORS:
            raise ValueError(f"Unknown denominator {denominator!r}; choose one of {list(_DENOMINATORS)}.")
        self.num_classes = int(num_classes)
        self.temperature = float(temperature)
        self.max_uncertain_samples = max_uncertain_samples
        self.max_reliable_samples = max_reliable_samples
        self.separation_weight = float(separation_weight)
        self.denominator = denominator
        self.level_weights = None if level_weights is None else [float(w) for w in level_weights]

    def forward(
        self,
        features: Tensor | Sequence[Tensor],
        labels: Tensor,
        reliable: Tensor,
        uncertain: Tensor,
        return_stats: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Any]]:
        """Compute the summed multi-level loss.

        Args:
            features: one ``(B, E, *S_l)`` tensor or a sequence of them (one per level); ``S_l`` may be smaller
                than ``S``.
            labels: ``(B, 1, *S)`` integer class per voxel (ground truth / pseudo-label).
            reliable: ``(B, 1, *S)`` bool mask of voxels whose features build the prototypes.
            uncertain: ``(B, 1, *S)`` bool mask of voxels pulled to their class prototype.
            return_stats: also return the logging stats described in the class docstring.

        Returns:
            Scalar loss (float32), finite, attached to the features' graph (and the stats with ``return_stats``).

        Raises:
            ValueError: on inconsistent shapes or a wrong number of ``level_weights``.
        """
        feats = [features] if isinstance(features, Tensor) else list(features)
        if not feats:
            raise ValueError("features must contain at least one level.")
        if self.level_weights is not None and len(self.level_weights) != len(feats):
            raise ValueError(f"Got {len(feats)} feature levels but {len(self.level_weights)} level_weights.")
        if labels.ndim < 3 or labels.shape[1] != 1:
            raise ValueError(f"labels must be (B, 1, *S), got {tuple(labels.shape)}.")
        if reliable.shape != labels.shape or uncertain.shape != labels.shape:
            raise ValueError(
                f"labels, reliable and uncertain must share one shape, got {tuple(labels.shape)}, "
                f"{tuple(reliable.shape)}, {tuple(uncertain.shape)}."
            )
        for f in feats:
            if f.ndim != labels.ndim or f.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"Each feature level must be (B, E, *S_l) matching labels {tuple(labels.shape)}, "
                    f"got {tuple(f.shape)}."
                )

        total: Tensor | None = None
        stats: dict[str, Any] = {"num_uncertain": 0, "level_stats": [], "contrast": None, "separation": None}
        stats["chance"] = 0.0
        for level, feat in enumerate(feats):
            weight = 1.0 if self.level_weights is None else self.level_weights[level]
            terms, level_stats = self._level_loss(feat, labels, reliable, uncertain)
            stats["level_stats"].append(level_stats)
            stats["num_uncertain"] += level_stats["num_uncertain"]
            if terms is not None:
                contrast, separation = terms
                level_loss = contrast + self.separation_weight * separation
                total = weight * level_loss if total is None else total + weight * level_loss
                self._add_terms(stats, weight, contrast.detach(), separation.detach(), level_stats["num_prototypes"])
        stats["num_prototypes"] = stats["level_stats"][0]["num_prototypes"]
        if total is None:
            total = sum(_graph_zero(f) for f in feats)
        return (total, stats) if return_stats else total

    def _add_terms(self, stats: dict, weight: float, contrast: Tensor, separation: Tensor, num_protos: int) -> None:
        """Accumulate the level-weighted eq. 5 term, the separation term and the eq. 5 chance value."""
        stats["contrast"] = weight * contrast if stats["contrast"] is None else stats["contrast"] + weight * contrast
        sep = weight * separation
        stats["separation"] = sep if stats["separation"] is None else stats["separation"] + sep
        if self.denominator == "all":  # eq. 5 of a voxel equally similar to every prototype: log(P)
            stats["chance"] += weight * math.log(num_protos)

    def _level_loss(
        self, feat: Tensor, labels: Tensor, reliable: Tensor, uncertain: Tensor
    ) -> tuple[tuple[Tensor, Tensor] | None, dict[str, int]]:
        """Eq. 5 and separation terms of one level (``None`` when it contributes nothing), and logging stats."""
        size = feat.shape[2:]
        lab = _resize_to(labels, size).round().long().flatten()  # (N,)
        valid = (lab >= 0) & (lab < self.num_classes)
        rel = (_resize_to(reliable, size) > 0.5).flatten() & valid
        unc = (_resize_to(uncertain, size) > 0.5).flatten() & valid
        lab = lab.clamp(0, self.num_classes - 1)

        # Reliable voxels (a random subset when capped) and their class; K marks every other voxel.
        if self.max_reliable_samples is None:
            rel_w = rel
        else:
            rel_w = torch.zeros_like(rel)
            rel_w[_random_subset(rel.nonzero(as_tuple=False).squeeze(1), self.max_reliable_samples)] = True
        rel_lab = torch.where(rel_w, lab, self.num_classes)
        counts = torch.bincount(rel_lab, minlength=self.num_classes + 1)[: self.num_classes]  # (K,)
        present = counts > 0
        num_protos = int(present.sum())
        stats = {"num_reliable": int(counts.sum()), "num_prototypes": num_protos, "num_uncertain": 0}
        if num_protos < 2:
            return None, stats
        # Uncertain voxels whose class has a prototype; random subset (eq. 5 "resample candidates").
        unc = unc & present[lab]
        unc_idx = _random_subset(unc.nonzero(as_tuple=False).squeeze(1), self.max_uncertain_samples)
        stats["num_uncertain"] = int(unc_idx.numel())
        if unc_idx.numel() == 0:
            return None, stats

        # Prototypes (eq. 4): mean of the normalised reliable features per class, dense over the voxels (the
        # reliable ones are most of the volume).
        device = lab.device
        present_cls = present.nonzero(as_tuple=False).squeeze(1)  # (P,)
        slot = torch.full((self.num_classes + 1,), num_protos, dtype=torch.long, device=device)
        slot[present_cls] = torch.arange(num_protos, device=device)  # class -> prototype index, P = none
        sums, rows, inv_norm = _class_feature_sums(feat, slot[rel_lab], num_protos, unc_idx)
        protos = sums / counts[present_cls].unsqueeze(1).to(sums.dtype)  # (P, E)
        protos = F.normalize(protos, dim=1, eps=1e-8)  # cosine similarity is scale-free

        # Cosine similarity of the uncertain voxels to every prototype, (M, P).
        cos_unc = (rows @ protos.t()) * inv_norm.unsqueeze(1)
        target = slot[lab[unc_idx]]  # (M,) index into the present prototypes
        logits = cos_unc / self.temperature  # (M, P)
        positive = logits.gather(1, target.unsqueeze(1)).squeeze(1)
        if self.denominator == "all":
            log_denominator = torch.logsumexp(logits, dim=1)
        else:
            is_pos = F.one_hot(target, num_protos).bool()
            log_denominator = torch.logsumexp(logits.masked_fill(is_pos, float("-inf")), dim=1)
        per_voxel = log_denominator - positive  # (M,)

        # Mean per class (1/|S_k| of eq. 5), then mean over classes with uncertain voxels.
        class_sum = torch.zeros(num_protos, device=device, dtype=per_voxel.dtype).index_add(0, target, per_voxel)
        class_cnt = torch.bincount(target, minlength=num_protos)
        has = class_cnt > 0
        contrast = (class_sum[has] / class_cnt[has].to(class_sum.dtype)).mean()

        # Separation: mean over prototype pairs j < k of (1 + cos(c_j, c_k)) / 2, pushes prototypes apart.
        iu = torch.triu_indices(num_protos, num_protos, offset=1, device=device)
        cos_pairs = (protos @ protos.t())[iu[0], iu[1]]
        separation = ((1.0 + cos_pairs) / 2.0).mean()
        return (contrast, separation), stats
