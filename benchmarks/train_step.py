"""Time one full training iteration of the method against a plain two-network reference, side by side.

``full``: predictive V-Net + auxiliary ResNet-VNet with MultiCURE (uncertainty map), supervised, pseudo-label,
XOR and prototype contrastive losses, backward and SGD step — exactly what
:class:`~multicure_monai.engines.SemiSupervisedTrainer` does per iteration (it calls the trainer's own
``_compute_losses``).
``reference``: the same two networks without MultiCURE and without the contrastive loss (a straightforward
V-Net + ResNet-34 co-training step, supervised + pseudo-label + XOR losses).

Both run in one process on the same random input, alternating, and the script prints medians, the split
between forward / losses / backward / step, peak memory (CUDA: ``max_memory_allocated``; CPU: peak RSS growth
read from ``/proc/self/status``, a coarse upper bound) and the ratio full / reference.

Examples::

    python benchmarks/train_step.py                                   # half-resolution LA: 2+2 x 56x56x40
    python benchmarks/train_step.py --roi 112 112 80 --repeats 2      # the paper's geometry
    python benchmarks/train_step.py --no-channels-last                # measure what channels_last_3d buys
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from monai.losses import DiceCELoss

from multicure_monai.engines.semi_supervised_trainer import SemiSupervisedTrainer
from multicure_monai.losses.prototype_contrastive import PrototypeContrastiveLoss
from multicure_monai.losses.pseudo_label import PseudoLabelLoss
from multicure_monai.losses.xor_regularization import XORRegularizationLoss
from multicure_monai.networks.resnet_vnet import ResNetVNet
from multicure_monai.networks.vnet import VNet


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(full: bool, device: torch.device, channels_last: bool, multicure_level: int = 1) -> SemiSupervisedTrainer:
    torch.manual_seed(0)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    net = VNet().to(device, memory_format=fmt)
    aux = ResNetVNet(multicure=full, multicure_level=multicure_level).to(device, memory_format=fmt)
    return SemiSupervisedTrainer(
        device=device,
        max_epochs=1,
        train_data_loader=[None],
        unlabeled_data_loader=[None],
        network=net,
        aux_network=aux,
        optimizer=torch.optim.SGD(list(net.parameters()) + list(aux.parameters()), lr=0.01, momentum=0.9),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        pseudo_label_loss=PseudoLabelLoss(),
        regularization_loss=XORRegularizationLoss(),
        contrastive_loss=PrototypeContrastiveLoss(num_classes=2) if full else None,
        contrastive_weight=0.1,
        channels_last=channels_last,
        decollate=False,
    )


def one_step(trainer: SemiSupervisedTrainer, x: torch.Tensor, y: torch.Tensor, n_l: int, amp: bool) -> dict[str, float]:
    device = x.device
    use_c = trainer.contrastive_loss is not None
    times: dict[str, float] = {}
    _sync(device)
    t0 = time.perf_counter()
    trainer.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        terms = trainer._compute_losses(x, y, n_l, lambda_c=0.1 if use_c else 0.0, use_contrastive=use_c)
    _sync(device)
    t1 = time.perf_counter()
    terms["loss"].backward()
    _sync(device)
    t2 = time.perf_counter()
    trainer.optimizer.step()
    _sync(device)
    t3 = time.perf_counter()
    times.update(forward_and_losses=t1 - t0, backward=t2 - t1, step=t3 - t2, total=t3 - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roi", type=int, nargs=3, default=(56, 56, 40))
    parser.add_argument("--labelled", type=int, default=2)
    parser.add_argument("--unlabelled", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--multicure-level", type=int, default=1, help="decoder level of the MultiCURE block")
    args = parser.parse_args()
    device = torch.device(args.device)
    channels_last = not args.no_channels_last
    n_l, n = args.labelled, args.labelled + args.unlabelled
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, *args.roi, generator=g).to(device)
    y = (torch.rand(args.labelled, 1, *args.roi, generator=g) > 0.7).float().to(device)

    trainers = {
        "reference": build(False, device, channels_last),
        "full": build(True, device, channels_last, args.multicure_level),
    }
    results: dict[str, list[dict[str, float]]] = {k: [] for k in trainers}
    peaks: dict[str, float] = {}
    for name, trainer in trainers.items():  # warm-up, and the peak memory of each variant
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            one_step(trainer, x, y, n_l, args.amp)
        peaks[name] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_rss_mb()
    for _ in range(args.repeats):  # alternate so both see the same machine load
        for name, trainer in trainers.items():
            results[name].append(one_step(trainer, x, y, n_l, args.amp))

    print(f"device={device} roi={tuple(args.roi)} batch={n_l}+{args.unlabelled} channels_last={channels_last} "
          f"amp={args.amp} multicure_level={args.multicure_level} threads={torch.get_num_threads()} repeats={args.repeats}")
    med: dict[str, dict[str, Any]] = {}
    for name, rows in results.items():
        med[name] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        parts = "  ".join(f"{k}={v:.2f}s" for k, v in med[name].items())
        unit = "MiB allocated" if device.type == "cuda" else "MiB peak RSS (cumulative)"
        print(f"{name:>9}: {parts}  peak={peaks[name]:.0f} {unit}")
    print(f"ratio full/reference (total): {med['full']['total'] / med['reference']['total']:.2f}x")


if __name__ == "__main__":
    main()
