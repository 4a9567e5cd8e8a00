"""The validation curves of a protocol table: the collapse check of each run and ``curves.png``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["collapse", "plot_curves"]


def collapse(points: list) -> tuple[float, float, float]:
    """(best, last, largest drop from the best so far) of a validation curve."""
    dice = np.array([v for _, v in points], dtype=float)
    return float(np.nanmax(dice)), float(dice[-1]), float(np.nanmax(np.fmax.accumulate(dice) - dice))


def plot_curves(curves: dict, arms: list[str], seeds: list[int], path: str, models: Sequence[str]) -> None:
    """One panel per net: each run's validation Dice over the iterations, written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), sharey=True)
    colours, styles = plt.get_cmap("tab10"), ["-", "--", ":", "-."]
    for ax, model in zip(axes, models):
        for (arm, seed), by_model in curves.items():
            if model in by_model:
                x, y = zip(*by_model[model])
                ax.plot(x, y, color=colours(arms.index(arm) % 10), linestyle=styles[seeds.index(seed) % 4],
                        marker=".", label=f"{arm} s{seed}")  # fmt: skip
        ax.set(title=f"{model} net" if model != "ensemble" else "ensemble", xlabel="iteration")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation Dice")
    legend = {lab: h for ax in axes for h, lab in zip(*ax.get_legend_handles_labels())}
    if legend:
        fig.legend(legend.values(), legend.keys(), fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.92 if legend else 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
