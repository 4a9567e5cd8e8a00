"""Print the parameter counts of the predictive (VNet) and auxiliary (ResNetVNet) networks at default settings.

Usage: ``python3 benchmarks/param_count.py`` from the repository root (works without installing the package).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from multicure_monai.networks.resnet_vnet import ResNetVNet  # noqa: E402
from multicure_monai.networks.vnet import VNet  # noqa: E402

__all__ = ["count_parameters", "main"]


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters of ``net``."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def main() -> None:
    """Print a small table of parameter counts."""
    rows = [
        ("VNet (predictive, default)", VNet()),
        ("VNet + MultiCURE @ level 1", VNet(multicure=True)),
        ("ResNetVNet, the authors' MultiCURE @ 2 (bundle default)",
         ResNetVNet(multicure_level=2, multicure_kwargs={"form": "authors"})),
        ("ResNetVNet, the authors' MultiCURE @ 1", ResNetVNet(multicure_kwargs={"form": "authors"})),
        ("ResNetVNet, the paper's MultiCURE @ 1", ResNetVNet()),
        ("ResNetVNet without MultiCURE (ablation)", ResNetVNet(multicure=False)),
    ]
    for name, net in rows:
        heads = sum(count_parameters(p) for p in net.projections)
        mc = count_parameters(net.decoder.multicure) if net.decoder.multicure is not None else 0
        n = count_parameters(net)
        print(f"{name:57s} {n:>11,d} ({n / 1e6:.2f}M; projection heads {heads:,d}; MultiCURE {mc:,d})")


if __name__ == "__main__":
    main()
