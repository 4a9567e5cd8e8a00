"""Time sliding-window inference of the deployed model (predictive V-Net + auxiliary ResNet-VNet with MultiCURE,
:class:`~multicure_monai.networks.ensemble.DualNetworkEnsemble`) on one volume, across ``sw_batch_size``, memory
format and AMP.

Every configuration runs :class:`~multicure_monai.sliding_window.StridedSlidingWindowInferer` (MONAI's
``SlidingWindowInferer`` with the paper's stride) on the same random volume with the same random weights, in
``eval`` / ``inference_mode``, and prints the best and the median wall time of ``--repeats`` passes (the first
pass of a new window batch size also pays oneDNN / cuDNN set-up, so the best is the steady-state number), windows
per second, the maximum absolute difference of the output (log averaged probabilities) from the reference run
(``sw_batch_size=1``, contiguous, fp32), the fraction of voxels whose label (argmax) differs from it and the
foreground Dice of the labels with it. ``--amp`` adds each configuration under the inferer's own ``amp`` (what the
bundle runs): bf16 and fp16 on CUDA, bf16 on a CPU with bf16 support (float32 elsewhere, and it says so).

The paper's LA geometry is a ~190x140x88 volume, 112x112x80 windows, stride 18x18x4 (54 windows). On a CPU
that takes many minutes per configuration (a 56x56x40 window alone took ~3 s on one busy core), so the default is
CPU-sized: the bundle's 48x48x32 windows at half the paper's stride (9x9x2) over a 56x52x36 volume (12 windows,
the three-axis overlap pattern of the paper, a few minutes for the whole table).

``--la`` times what a user deploys on LA: the half-resolution volume (95x70x44, la_half.yaml: roi 56x56x40,
stride 9x9x2) and the full-resolution one (la.yaml), the deployed ensemble next to the predictive net alone
(``--models``), at the bundle's default settings for the device (CPU: 4 windows per call, channels_last_3d; CUDA:
8, contiguous) unless ``--sw-batch-sizes`` / the format comparison are asked for. Examples::

    python benchmarks/inference.py                                       # CPU-sized default
    python benchmarks/inference.py --la --repeats 1                      # LA half and full, ensemble vs V-Net
    python benchmarks/inference.py --la --amp --device cuda --repeats 3  # GPU, with bf16 / fp16 autocast
    python benchmarks/inference.py --la --amp --models ensemble          # CPU: fp32 and bf16 side by side
    python benchmarks/inference.py --sw-batch-sizes 1 2 4 --no-channels-last-compare

``--la`` also runs the peers' test loop (UA-MT / MCF ``test_single_case``, re-stated: one window at a time,
contiguous float32, probabilities accumulated in a numpy float32 map) with the same nets and prints each model's
fastest bundle time over it, with the labels' agreement (``--no-one-window-loop`` skips it). The bundle's ensemble
folds each BatchNorm into its convolution at inference (``DualNetworkEnsemble(fold_batch_norm=True)``, its
default); the loop runs the nets as the peers do, unfolded; ``--models ensemble ensemble-unfolded`` times the
folding itself, side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch

from multicure_monai.cpu_memory import keep_freed_memory
from multicure_monai.networks.ensemble import DualNetworkEnsemble
from multicure_monai.networks.multicure import MULTICURE_FORMS
from multicure_monai.networks.resnet_vnet import ResNetVNet
from multicure_monai.networks.vnet import VNet
from multicure_monai.precision import cpu_supports_bf16
from multicure_monai.sliding_window import StridedSlidingWindowInferer

LA_SHAPE, LA_ROI, LA_STRIDE = (190, 140, 88), (112, 112, 80), (18, 18, 4)
LA_HALF_SHAPE, LA_HALF_ROI, LA_HALF_STRIDE = (95, 70, 44), (56, 56, 40), (9, 9, 2)
CPU_SHAPE, CPU_ROI, CPU_STRIDE = (56, 52, 36), (48, 48, 32), (9, 9, 2)


class _CountingNet(torch.nn.Module):
    """Wraps the network to count the windows it is called on (``x``: ``(sw_batch, C, *roi)``)."""

    def __init__(self, net: torch.nn.Module, memory_format: torch.memory_format) -> None:
        super().__init__()
        self.net = net
        self.memory_format = memory_format
        self.windows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.windows += x.shape[0]
        return self.net(x.contiguous(memory_format=self.memory_format))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(
    device: torch.device,
    channels_last: bool,
    seed: int = 0,
    model: str = "ensemble",
    form: str = "authors",
    level: int = 2,
    fold_batch_norm: bool = True,
) -> torch.nn.Module:
    """The deployed ensemble with random weights, in eval mode (``model="predictive"``: weighted ``(1, 0)``, the
    predictive net alone); the auxiliary net's MultiCURE block in ``form`` at decoder ``level`` (the bundle's
    ``multicure#form`` / ``multicure#level``); ``fold_batch_norm`` as in the bundle (its default) unless it is
    False or ``model`` ends in ``-unfolded``."""
    torch.manual_seed(seed)
    aux = ResNetVNet(multicure=True, multicure_level=level, multicure_kwargs={"form": form})
    weights = (1.0, 0.0) if model.startswith("predictive") else (0.5, 0.5)
    fold = fold_batch_norm and not model.endswith("-unfolded")
    net = DualNetworkEnsemble(VNet(), aux, weights=weights, fold_batch_norm=fold)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    return net.to(device, memory_format=fmt).eval()


def run_config(
    image: torch.Tensor,
    net: torch.nn.Module,
    roi: Sequence[int],
    stride: Sequence[int],
    sw_batch_size: int,
    channels_last: bool,
    amp_dtype: torch.dtype | None,
    repeats: int,
) -> tuple[list[float], int, torch.Tensor]:
    """Time ``repeats`` sliding-window passes; returns the times, the windows per pass and the last output."""
    device = image.device
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    counting = _CountingNet(net, fmt)
    inferer = StridedSlidingWindowInferer(
        roi_size=roi, stride=stride, sw_batch_size=sw_batch_size, mode="constant",
        amp=amp_dtype is not None, amp_dtype=amp_dtype or "float32",
    )
    times, out = [], None
    for _ in range(repeats):
        counting.windows = 0
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = inferer(image, counting)
        _sync(device)
        times.append(time.perf_counter() - t0)
    assert out is not None
    return times, counting.windows, out.float()


def one_window_loop(image: torch.Tensor, net: torch.nn.Module, roi: Sequence[int], stride: Sequence[int]) -> np.ndarray:
    """The peers' sliding window (UA-MT / MCF ``test_single_case``): window corners ``min(stride * k, size - roi)``,
    one window per call, softmax accumulated in numpy float32 and divided by the window count; returns the
    ``(N, H, W, D)`` probabilities. ``net`` returns logits (or log-probabilities) of ``(1, C, *roi)``."""
    size = image.shape[2:]
    counts = [int(np.ceil((s - r) / st)) + 1 for s, r, st in zip(size, roi, stride)]
    score, seen = None, np.zeros(tuple(size), dtype=np.float32)
    with torch.inference_mode():
        for i in range(counts[0]):
            for j in range(counts[1]):
                for k in range(counts[2]):
                    a, b, c = (min(st * n, s - r) for st, n, s, r in zip(stride, (i, j, k), size, roi))
                    window = image[:, :, a : a + roi[0], b : b + roi[1], c : c + roi[2]].contiguous()
                    probs = torch.softmax(net(window).float(), dim=1)[0].cpu().numpy()
                    if score is None:
                        score = np.zeros((probs.shape[0], *size), dtype=np.float32)
                    score[:, a : a + roi[0], b : b + roi[1], c : c + roi[2]] += probs
                    seen[a : a + roi[0], b : b + roi[1], c : c + roi[2]] += 1
    assert score is not None
    return score / seen[None]


def _peer_comparison(device: torch.device, geometries: Sequence, models: Sequence[str], best_rows: Sequence,
                     form: str, level: int, repeats: int) -> None:  # fmt: skip
    """Time :func:`one_window_loop` with contiguous float32 nets as the peers run them (no BatchNorm folding) and
    print the bundle's ratio to it."""
    for (shape, roi, stride), rows in zip(geometries, best_rows):
        torch.manual_seed(1)
        image = torch.randn(1, 1, *shape, device=device)
        for model in models:
            net = build(device, False, model=model, form=form, level=level, fold_batch_norm=False)
            times = []
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                probs = one_window_loop(image, net, roi, stride)
                _sync(device)
                times.append(time.perf_counter() - t0)
            fastest = min((r for r in rows if r[5] == model), key=lambda r: r[0])
            fp32 = min((r for r in rows if r[5] == model and r[3] == "-"), key=lambda r: r[0])
            print(f"{model} on {'x'.join(map(str, shape))}: one-window loop {min(times):.2f} s (best of {repeats})")
            for name, ours in (("fastest", fastest), ("fastest float32", fp32)):
                agree = float((probs.argmax(0) == ours[7]).mean())
                fg, ref = probs.argmax(0) > 0, ours[7] > 0
                dice = 2 * float((fg & ref).sum()) / max(1, int(fg.sum() + ref.sum()))
                print(f"  bundle's {name} ({ours[1]} windows/call, {ours[2]}, amp={ours[3]}) {ours[0]:.2f} s = "
                      f"{ours[0] / min(times):.2f}x the loop; labels equal on {agree:.4%} of voxels, fg Dice {dice:.4f}")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--la", action="store_true", help="LA geometry: 190x140x88, roi 112x112x80, stride 18x18x4")
    p.add_argument("--shape", type=int, nargs=3, help="volume H W D (overrides the default / --la)")
    p.add_argument("--roi", type=int, nargs=3, help="window size")
    p.add_argument("--stride", type=int, nargs=3, help="window stride")
    p.add_argument("--sw-batch-sizes", type=int, nargs="+", help="windows per call (default 1 4 8; --la: the bundle's)")
    model_names = ["ensemble", "predictive", "ensemble-unfolded", "predictive-unfolded"]
    p.add_argument("--models", nargs="+", choices=model_names,
                   help="default: ensemble (--la: ensemble, predictive); -unfolded: without BatchNorm folding")
    p.add_argument("--amp", action="store_true", help="also bf16 / fp16 autocast (CUDA), bf16 (CPU with bf16)")
    p.add_argument("--no-channels-last-compare", action="store_true", help="only channels_last_3d")
    p.add_argument("--channels-last-compare", action="store_true", help="with --la: both memory formats")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per configuration (best, median reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--multicure-form", default="authors", choices=list(MULTICURE_FORMS), help="the bundle's default")
    p.add_argument("--multicure-level", type=int, default=2, help="decoder level of the block (the bundle's: 2)")
    p.add_argument("--no-one-window-loop", action="store_true", help="with --la: skip the peers' one-window loop")
    p.add_argument("--default-allocator", action="store_true",
                   help="leave glibc's allocator as it is (the bundle keeps freed memory: cpu_memory.py)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    keep_freed_memory(not args.default_allocator)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.la and not args.shape:
        geometries = [(LA_HALF_SHAPE, LA_HALF_ROI, LA_HALF_STRIDE), (LA_SHAPE, LA_ROI, LA_STRIDE)]
    else:
        shape, roi, stride = (LA_SHAPE, LA_ROI, LA_STRIDE) if args.la else (CPU_SHAPE, CPU_ROI, CPU_STRIDE)
        geometries = [(tuple(args.shape or shape), tuple(args.roi or roi), tuple(args.stride or stride))]
    cuda = device.type == "cuda"
    if args.la:  # the bundle's defaults (inference.yaml) unless asked otherwise
        batch_sizes = args.sw_batch_sizes or [8 if cuda else 4]
        formats = [False, True] if args.channels_last_compare else [not cuda]
        models = args.models or ["ensemble", "predictive"]
    else:
        batch_sizes = args.sw_batch_sizes or [1, 4, 8]
        formats = [True] if args.no_channels_last_compare else [False, True]
        models = args.models or ["ensemble"]
    form, level = args.multicure_form, args.multicure_level
    desc = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {desc}; torch {torch.__version__}; MultiCURE {form} form at level {level}")
    amp_dtypes: list[torch.dtype | None] = [None]
    if args.amp:
        if cuda:
            amp_dtypes += [torch.bfloat16, torch.float16]
        elif cpu_supports_bf16():
            amp_dtypes += [torch.bfloat16]
        else:
            print("AMP: skipped, this CPU has no bfloat16 support (the bundle's amp runs float32 here)")
    nets = {(m, cl): build(device, cl, model=m, form=form, level=level) for m in models for cl in formats}
    best_rows = []
    for shape, roi, stride in geometries:
        best_rows.append(_time_geometry(args, device, shape, roi, stride, nets, amp_dtypes, batch_sizes))
    for (shape, roi, stride), rows in zip(geometries, best_rows):
        geometry = f"{'x'.join(map(str, shape))} (roi {'x'.join(map(str, roi))}, stride {'x'.join(map(str, stride))})"
        for model in models:
            t, bs, fmt_name, amp_name, windows = min(r[:4] + (r[6],) for r in rows if r[5] == model)
            print(f"fastest {model} on {geometry}: sw_batch_size={bs}, {fmt_name}, amp={amp_name} "
                  f"({t:.2f} s, {windows / t:.2f} windows/s, best of {args.repeats})")
        fastest = {m: min(r[0] for r in rows if r[5] == m) for m in models}
        pairs = (("ensemble", "predictive"), ("ensemble", "ensemble-unfolded"), ("predictive", "predictive-unfolded"))
        for a, b in pairs:
            if a in fastest and b in fastest:
                print(f"{a} / {b} on {geometry}: {fastest[a] / fastest[b]:.2f}x time")
    if args.la and not args.no_one_window_loop:
        _peer_comparison(device, geometries, models, best_rows, form, level, args.repeats)


def _time_geometry(
    args: argparse.Namespace,
    device: torch.device,
    shape: Sequence[int],
    roi: Sequence[int],
    stride: Sequence[int],
    nets: dict[tuple[str, bool], torch.nn.Module],
    amp_dtypes: Sequence[torch.dtype | None],
    batch_sizes: Sequence[int],
) -> list[tuple]:
    """Print the table of one volume geometry; returns ``(best s, sw_batch, format, amp, diff, model, windows,
    labels)`` per configuration."""
    torch.manual_seed(1)
    image = torch.randn(1, 1, *shape, device=device)
    print(f"volume 1x1x{'x'.join(map(str, shape))}, roi {'x'.join(map(str, roi))}, stride {'x'.join(map(str, stride))}")
    # warm-up (oneDNN / cuDNN algorithm selection, allocator) on a single window
    with torch.inference_mode():
        for (_, cl), net in nets.items():
            warm = image[..., : roi[0], : roi[1], : roi[2]]
            net(warm.contiguous(memory_format=torch.channels_last_3d if cl else torch.contiguous_format))
    _sync(device)
    header = (
        f"{'model':>10} {'sw_batch':>8} {'format':>13} {'amp':>5} {'best s':>8} {'median s':>8} {'windows':>7} "
        f"{'win/s':>7} {'max|diff|':>10} {'label diff':>10} {'fg Dice':>7}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    references: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # each model's first configuration
    for (model, cl), net in nets.items():
        for amp_dtype in amp_dtypes:
            for bs in batch_sizes:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times, windows, out = run_config(image, net, roi, stride, bs, cl, amp_dtype, args.repeats)
                t, t_med = min(times), statistics.median(times)
                labels = out.argmax(dim=1)
                reference, ref_labels = references.setdefault(model, (out, labels))
                diff = float((out - reference).abs().max())
                label_diff = float((labels != ref_labels).float().mean())
                fg, ref_fg = labels > 0, ref_labels > 0
                dice = float(2 * (fg & ref_fg).sum() / (fg.sum() + ref_fg.sum()).clamp_min(1))
                amp_name = {None: "-", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
                fmt_name = "channels_last" if cl else "contiguous"
                mem = ""
                if device.type == "cuda":
                    mem = f"  peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
                print(
                    f"{model:>10} {bs:>8} {fmt_name:>13} {amp_name:>5} {t:>8.2f} {t_med:>8.2f} {windows:>7} "
                    f"{windows / t:>7.2f} {diff:>10.2e} {label_diff:>10.2e} {dice:>7.4f}{mem}",
                    flush=True,
                )
                rows.append((t, bs, fmt_name, amp_name, diff, model, windows, labels[0].cpu().numpy()))
    return rows


if __name__ == "__main__":
    main()
