"""Evaluator handler that draws where the model is unsure: a reliability diagram and Figure-4-style panels.

At the end of an evaluation it writes, under ``output_dir``:

* ``reliability_<name>.png``: the foreground probability's reliability diagram over every voxel of every case
  (observed foreground frequency against mean predicted probability per bin, with the bin counts and the
  expected calibration error);
* ``uncertainty_<case>.png`` for the first ``num_cases`` cases: three orthogonal slices through the centre of
  the ground-truth structure, each showing the image, the ground truth, the prediction and the binary
  uncertainty map (confidence below the threshold of training), as the paper's Figure 4.

MONAI has no such handler (its ``TensorBoardImageHandler`` logs image slices, not calibration); matplotlib
renders headless (Agg backend).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.metrics import calibration_binning

__all__ = ["UncertaintyFigures"]


def _pyplot() -> Any:
    """matplotlib's pyplot on the headless Agg backend (imported when a figure is drawn, not at import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _case_name(item: dict, index: int) -> str:
    meta = getattr(item.get("image"), "meta", {}) or {}
    path = str(meta.get("filename_or_obj", f"case{index:03d}"))
    return os.path.basename(path).split(".")[0]


class UncertaintyFigures:
    """Write a reliability diagram and per-case uncertainty panels at the end of an evaluation.

    Args:
        output_dir: folder of the PNGs (created).
        prob_key: item holding the softmax probabilities ``(C, *S)`` of a decollated case.
        label_key: item holding the label map ``(1, *S)`` or its one-hot form ``(C, *S)``.
        image_key: item holding the image ``(C_in, *S)``.
        name: model name in the reliability diagram's file name and title.
        threshold: confidence below which a voxel is uncertain.
        num_bins: bins of the reliability diagram.
        num_cases: cases drawn as panels.
        output_transform: maps ``engine.state.output`` to the list of decollated case dicts.
    """

    def __init__(
        self,
        output_dir: str,
        prob_key: str = "prob",
        label_key: str = "label",
        image_key: str = "image",
        name: str = "ensemble",
        threshold: float = 0.7,
        num_bins: int = 15,
        num_cases: int = 3,
        output_transform: Callable[[Any], list] = lambda output: output,
    ) -> None:
        self.output_dir = output_dir
        self.prob_key, self.label_key, self.image_key = prob_key, label_key, image_key
        self.name = name
        self.threshold = float(threshold)
        self.num_bins = int(num_bins)
        self.num_cases = int(num_cases)
        self.output_transform = output_transform
        self._reset()

    def _reset(self) -> None:
        self._sum_p = np.zeros(self.num_bins)
        self._sum_y = np.zeros(self.num_bins)
        self._count = np.zeros(self.num_bins)
        self._cases = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self._reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def iteration_completed(self, engine: Engine) -> None:
        items = self.output_transform(engine.state.output)
        for item in items if isinstance(items, (list, tuple)) else [items]:
            probs = torch.as_tensor(item[self.prob_key]).detach().float().cpu()
            label = torch.as_tensor(item[self.label_key]).detach().cpu()
            label = label.argmax(0, keepdim=True) if label.shape[0] > 1 else label
            fg_prob, fg = 1.0 - probs[:1], (label > 0).float()
            mean_p, mean_y, counts = calibration_binning(fg_prob.view(1, 1, -1), fg.view(1, 1, -1), self.num_bins)
            counts = counts.view(-1).numpy()
            self._sum_p += np.nan_to_num(mean_p.view(-1).numpy()) * counts
            self._sum_y += np.nan_to_num(mean_y.view(-1).numpy()) * counts
            self._count += counts
            if self._cases < self.num_cases:
                image = torch.as_tensor(item[self.image_key]).detach().float().cpu()[0]
                self._panel(_case_name(item, self._cases), image, label[0], probs)
            self._cases += 1

    def completed(self, engine: Engine) -> None:
        if self._count.sum() == 0:
            return
        plt = _pyplot()
        os.makedirs(self.output_dir, exist_ok=True)
        used = self._count > 0
        mean_p = self._sum_p[used] / self._count[used]
        mean_y = self._sum_y[used] / self._count[used]
        ece = float(np.sum(self._count[used] * np.abs(mean_p - mean_y)) / self._count.sum())
        edges = np.linspace(0.0, 1.0, self.num_bins + 1)
        fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.5, 6), height_ratios=(3, 1), sharex=True)
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.plot(mean_p, mean_y, "o-", color="tab:blue", label=f"{self.name} (ECE {ece:.3f})")
        ax.set_ylabel("observed foreground frequency")
        ax.set_title(f"foreground probability, {self._cases} cases", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
        hist.bar(edges[:-1], self._count / self._count.sum(), width=1.0 / self.num_bins, align="edge", log=True)
        hist.set_xlabel("predicted foreground probability")
        hist.set_ylabel("voxel share")
        fig.tight_layout()
        fig.savefig(os.path.join(self.output_dir, f"reliability_{self.name}.png"), dpi=100)
        plt.close(fig)

    def _panel(self, case: str, image: torch.Tensor, label: torch.Tensor, probs: torch.Tensor) -> None:
        plt = _pyplot()
        os.makedirs(self.output_dir, exist_ok=True)
        pred = probs.argmax(0)
        uncertain = probs.amax(0) < self.threshold
        fg = label > 0
        centre = [int(i.float().mean()) for i in fg.nonzero(as_tuple=True)] if fg.any() else [s // 2 for s in fg.shape]
        columns = (("image", image, "gray"), ("ground truth", fg, "Reds"), ("prediction", pred, "Blues"),
                   ("uncertain (conf < %.1f)" % self.threshold, uncertain, "Oranges"))  # fmt: skip
        fig, axes = plt.subplots(3, 4, figsize=(10, 7.5))
        for row, axis in enumerate(range(3)):
            for col, (title, volume, cmap) in enumerate(columns):
                section = volume.select(axis, centre[axis]).float().numpy()
                ax = axes[row, col]
                ax.imshow(section.T, cmap=cmap, origin="lower", interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(title, fontsize=9)
            axes[row, 0].set_ylabel(f"axis {axis}, slice {centre[axis]}", fontsize=8)
        fig.suptitle(f"{case}: where the deployed model is unsure", fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(self.output_dir, f"uncertainty_{case}.png"), dpi=80)
        plt.close(fig)
