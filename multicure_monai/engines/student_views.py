"""What the students see of an unlabelled crop (``unlabelled#student_view``): a harder view than the teacher's.

In the paper both nets see the same crop, so a net is asked to reproduce a label computed from its own input. The
peers' gains come from a student that sees a harder view: UA-MT adds noise, BCP (Bai et al., CVPR 2023) pastes a
labelled and an unlabelled crop into each other. A view here takes the labelled batch, the clean unlabelled batch
and the teachers' probabilities of the clean unlabelled batch, and returns the students' images and the targets,
transformed consistently. The trainer runs the teachers on the clean crops without gradient first, and sets the
batch's memory format after (:class:`~multicure_monai.engines.semi_supervised_trainer.SemiSupervisedTrainer`).
MONAI's random transforms work on one sample on the CPU and carry no paired target, so the views are written here
as batched tensor functions.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from monai.networks.utils import one_hot

__all__ = ["STUDENT_VIEWS", "PerturbedView", "CopyPasteView", "copy_paste_mask", "student_view"]

STUDENT_VIEWS = ("none", "perturb", "copy_paste")


class PerturbedView:
    """Noise, an intensity scale and flips on the student's crop; the targets flipped the same way.

    Args:
        noise_std: standard deviation of the Gaussian noise, clipped at ``2 * noise_std`` (UA-MT: 0.1, on
            normalised intensities).
        intensity_scale: each crop's intensities are scaled by a factor drawn from ``1 +- intensity_scale``.
        flip_prob: the probability of a flip along each spatial axis, drawn per crop.
    """

    def __init__(self, noise_std: float = 0.1, intensity_scale: float = 0.1, flip_prob: float = 0.5) -> None:
        if noise_std < 0 or not 0 <= intensity_scale < 1 or not 0 <= flip_prob <= 1:
            raise ValueError(
                f"need noise_std >= 0, 0 <= intensity_scale < 1, 0 <= flip_prob <= 1; "
                f"got {noise_std}, {intensity_scale}, {flip_prob}."
            )
        self.noise_std, self.intensity_scale, self.flip_prob = noise_std, intensity_scale, flip_prob

    def __call__(
        self, x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor, targets: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Args: see :class:`CopyPasteView`. Returns ``(x_u', targets')`` with the shapes of ``(x_u, targets)``."""
        b, spatial = x_u.shape[0], x_u.ndim - 2
        scale = 1.0 + (torch.rand(b, *[1] * (x_u.ndim - 1)) * 2 - 1) * self.intensity_scale
        noise = (torch.randn(x_u.shape) * self.noise_std).clamp(-2 * self.noise_std, 2 * self.noise_std)
        view = x_u * scale.to(x_u) + noise.to(x_u)
        flips = torch.rand(b, spatial) < self.flip_prob
        images, out = [], {k: [] for k in targets}
        for i in range(b):
            dims = [2 + d for d in range(spatial) if flips[i, d]]
            images.append(view[i : i + 1].flip(dims))
            for k, t in targets.items():
                out[k].append(t[i : i + 1].flip(dims))
        out = {k: torch.cat(v) for k, v in out.items()}
        return torch.cat(images), out


def copy_paste_mask(batch: int, spatial_size: tuple[int, ...], ratio: float, device: torch.device) -> torch.Tensor:
    """``(batch, 1, *spatial_size)`` float masks: 1 everywhere except one cube of ``ratio`` times each side, at a
    random place in each crop (BCP's mask)."""
    mask = torch.ones(batch, 1, *spatial_size, device=device)
    sides = [max(1, round(ratio * s)) for s in spatial_size]
    for i in range(batch):
        starts = [int(torch.randint(0, s - c + 1, ())) for s, c in zip(spatial_size, sides)]
        mask[(i, 0, *[slice(a, a + c) for a, c in zip(starts, sides)])] = 0.0
    return mask


class CopyPasteView:
    """BCP's bidirectional copy-paste (Bai et al., CVPR 2023) between the labelled and the unlabelled crops.

    Unlabelled crop ``i`` is paired with labelled crop ``i mod B_l``. Even ``i``: the unlabelled cube is pasted into
    the labelled crop; odd ``i``: the labelled cube into the unlabelled crop. The target of each mixed crop is the
    ground truth (one-hot, fully confident) where the labelled crop shows and the teacher's probabilities where the
    unlabelled one does, so every student learns from both sources in one image.

    Args:
        ratio: the side of the pasted cube as a fraction of the crop's (BCP: 2/3).
    """

    def __init__(self, ratio: float = 2.0 / 3.0) -> None:
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"copy-paste ratio must be in (0, 1), got {ratio}.")
        self.ratio = float(ratio)

    def __call__(
        self, x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor, targets: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mix each unlabelled crop with a labelled one.

        Args:
            x_l: labelled images ``(B_l, C, H, W, D)``.
            y_l: their labels ``(B_l, 1, H, W, D)``.
            x_u: unlabelled images ``(B_u, C, H, W, D)``, the same spatial size.
            targets: each teacher's probabilities of ``x_u``, ``(B_u, N, H, W, D)``.

        Returns:
            ``(mixed images (B_u, C, H, W, D), {teacher: mixed targets (B_u, N, H, W, D)})``.
        """
        if x_l.shape[1:] != x_u.shape[1:]:
            raise ValueError(f"copy-paste needs labelled and unlabelled crops of one shape, got "
                             f"{tuple(x_l.shape)} and {tuple(x_u.shape)}.")  # fmt: skip
        b_u, b_l = x_u.shape[0], x_l.shape[0]
        pair = torch.arange(b_u, device=x_u.device) % b_l
        # 1 where the labelled crop shows: outside the cube (even i) or inside it (odd i)
        mask = copy_paste_mask(b_u, tuple(x_u.shape[2:]), self.ratio, x_u.device)
        odd = (torch.arange(b_u, device=x_u.device) % 2 == 1).view(-1, *[1] * (x_u.ndim - 1))
        shows_l = torch.where(odd, 1.0 - mask, mask)
        images = x_l[pair] * shows_l.to(x_l) + x_u * (1.0 - shows_l.to(x_u))
        num_classes = next(iter(targets.values())).shape[1]
        truth = one_hot(y_l[pair].long(), num_classes, dim=1) * shows_l
        out = {name: truth.to(probs) + probs * (1.0 - shows_l) for name, probs in targets.items()}
        return images, out


def student_view(name: str = "copy_paste", **kwargs: float) -> PerturbedView | CopyPasteView | None:
    """The view called ``name`` (one of :data:`STUDENT_VIEWS`; ``"none"`` gives ``None``), built with ``kwargs``."""
    if name not in STUDENT_VIEWS:
        raise ValueError(f"student_view must be one of {STUDENT_VIEWS}, got {name!r}.")
    if name == "none":
        return None
    return (PerturbedView if name == "perturb" else CopyPasteView)(**kwargs)
