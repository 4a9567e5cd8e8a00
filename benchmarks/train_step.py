"""Time one full training iteration of the method, in each MultiCURE form, against a plain two-network step.

``paper`` / ``authors`` (``--forms``): predictive V-Net + auxiliary ResNet-VNet with MultiCURE in that form
(:data:`multicure_monai.networks.multicure.MULTICURE_FORMS`: the paper's dense 3x3x3 / 5x5x5 branches, or the
authors' grouped 3x3x3 / dilated 3x3x3 with the mixing convolution), supervised, pseudo-label, XOR and prototype
contrastive losses, backward and SGD step — exactly what :class:`~multicure_monai.engines.SemiSupervisedTrainer`
does per iteration (it calls the trainer's own ``student_batch`` and ``_compute_losses``), with the library's default
teacher and student view (the mutual teacher on BCP's copy-paste mix: the teachers' gradient-free pass on the clean
unlabelled crops is timed in ``forward_and_losses``); ``--teacher predictive --student-view none`` times the paper's.
``reference``: the same two networks without MultiCURE and without the contrastive loss (a straightforward
V-Net + ResNet-34 co-training step, supervised + pseudo-label + XOR losses).

All run in one process on the same random input, alternating, and the script prints medians of:

* the split of a step: ``forward_and_losses`` / ``backward`` / ``step`` / ``total``, and inside the forward the
  time of each network and of each loss (``fwd:`` line);
* each loss alone, forward + backward, re-run on the exact tensors it got in the step (``loss fwd+bwd:`` line);
* peak memory (CUDA: ``max_memory_allocated``; CPU: peak RSS read from ``/proc/self/status``, coarse);
* the ratio of each form to the reference, of the medians and of the fastest steps (on a shared machine, noise
  only adds time), and a floor for it: the forward + backward time of the dense convolutions the
  paper's MultiCURE block requires whatever the implementation (3x3x3 and 5x5x5 branches, the 3x3x3 offset
  convolution, and a plain 3x3x3 convolution standing for the deformable convolution's own product), timed on
  the block's real input. ``1 + floor / reference`` is the ratio a step would have if everything else the
  method adds (sampling, norms, attention, contrastive loss) were free.

Examples::

    python benchmarks/train_step.py                                   # half-resolution LA: 2+2 x 56x56x40
    python benchmarks/train_step.py --forms authors                   # the reference and one form only
    python benchmarks/train_step.py --split                           # + MultiCURE / contrastive path apart
    python benchmarks/train_step.py --roi 112 112 80 --repeats 2      # the paper's geometry
    python benchmarks/train_step.py --no-channels-last                # measure what channels_last_3d buys
    python benchmarks/train_step.py --forms authors --amp             # + each variant under amp, side by side
    python benchmarks/train_step.py --teacher predictive --student-view none   # the paper's teaching

``--amp`` adds each variant once more with the trainer's ``amp`` (``amp_dtype="auto"``: bfloat16 on a CPU with
bf16, float16 on CUDA; float32 losses), alternated with the float32 steps in the same process, and prints the
ratio of each amp step to its float32 twin (medians and fastest steps).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Any

import torch
from monai.losses import DiceCELoss

from multicure_monai.cpu_memory import keep_freed_memory
from multicure_monai.engines.loss_terms import method_loss_terms
from multicure_monai.engines.semi_supervised_trainer import SemiSupervisedTrainer
from multicure_monai.losses.prototype_contrastive import PrototypeContrastiveLoss
from multicure_monai.losses.pseudo_label import PseudoLabelLoss
from multicure_monai.losses.xor_regularization import XORRegularizationLoss
from multicure_monai.networks.multicure import MULTICURE_FORMS
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


class _Timed(torch.nn.Module):
    """Wraps a network or a loss: accumulates the wall time of its calls and keeps their arguments (``calls``)."""

    def __init__(self, inner: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.inner = inner
        self.device = device
        self.elapsed = 0.0
        self.calls: list[tuple[tuple, dict]] = []

    def reset(self) -> None:
        self.elapsed = 0.0
        self.calls = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        _sync(self.device)
        self.elapsed += time.perf_counter() - t0
        return out


_NETS = {"predictive": "network", "auxiliary": "aux_network"}  # report name -> trainer attribute
_LOSSES = ("sup", "pseudo", "reg", "contrastive")  # rows of the trainer's loss table


def instrument(trainer: SemiSupervisedTrainer) -> dict[str, _Timed]:
    """Replace the trainer's networks and the losses of its table rows by timing wrappers (the optimizer keeps the
    same parameters)."""
    timed = {}
    for name, attr in _NETS.items():
        timed[name] = _Timed(getattr(trainer, attr), trainer.state.device)
        setattr(trainer, attr, timed[name])
    for name in _LOSSES:
        if name in trainer.loss_terms:
            compute = trainer.loss_terms[name].compute
            timed[name] = compute.loss = _Timed(compute.loss, trainer.state.device)
    return timed


def _leaf(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone().requires_grad_(v.requires_grad)
    if isinstance(v, (list, tuple)):
        return type(v)(_leaf(e) for e in v)
    return v


def loss_alone(part: _Timed) -> float:
    """Forward + backward time of a loss re-run on leaf copies of the arguments of all its calls in the step."""
    calls = [(_leaf(args), _leaf(kwargs)) for args, kwargs in part.calls]
    part.calls = []
    _sync(part.device)
    t0 = time.perf_counter()
    for args, kwargs in calls:
        out = part.inner(*args, **kwargs).mean()
        if out.requires_grad:
            out.backward()
    _sync(part.device)
    return time.perf_counter() - t0


def _forward_backward_time(module: torch.nn.Module, z: torch.Tensor, repeats: int) -> float:
    """Median forward + backward time of ``module`` on the leaf ``z`` (one extra, discarded warm-up run)."""
    times = []
    for _ in range(repeats + 1):
        z.grad = None
        _sync(z.device)
        t0 = time.perf_counter()
        y = module(z)
        y.backward(torch.ones_like(y))  # a dense gradient in the output's memory format, as in the step
        _sync(z.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def dense_conv_floor(trainer: SemiSupervisedTrainer, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median forward + backward time of each dense convolution of the MultiCURE block, on its step input."""
    aux = trainer.aux_network.inner if isinstance(trainer.aux_network, _Timed) else trainer.aux_network
    block = aux.decoder.multicure
    seen: list[torch.Tensor] = []
    handle = block.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        aux(x, (x > 0).to(x.dtype))
    handle.remove()
    z = seen[0].clone().requires_grad_(True)
    deform = block.branch_deform[0] if block.deformable else block.branch_deform
    large = block.branch_large.conv
    convs = {
        "3x3x3": block.branch_small.conv,
        "x".join(str(k) for k in large.kernel_size) + ("" if max(large.dilation) == 1 else "_dilated"): large,
        "offset": getattr(deform, "conv_offset", None),
        "deform_product": block.branch_small.conv,  # same shape as the deformable conv's columns x weights
    }
    out = {name: _forward_backward_time(conv, z, repeats) for name, conv in convs.items() if conv is not None}
    conv_params = [p for c in convs.values() if c is not None for p in c.parameters()]
    for p in conv_params:
        p.grad = None
    return out


def build(
    form: str | None,
    device: torch.device,
    channels_last: bool,
    multicure_level: int = 2,
    contrastive: bool | None = None,
    amp: bool = False,
    **scheme: Any,
) -> SemiSupervisedTrainer:
    """The trainer of the full method with MultiCURE in ``form``; ``None``: no MultiCURE block.

    ``contrastive`` (default: whether ``form`` is given) adds the projection heads and the contrastive loss, so
    ``build(None, ...)`` is the plain two-network reference and ``build(form, ..., contrastive=False)`` /
    ``build(None, ..., contrastive=True)`` are the halves of the method that ``--split`` times.
    ``amp``: the trainer's autocast in the device's ``"auto"`` precision. ``scheme``: the trainer's ``teacher`` /
    ``student_view`` when given (else the library's defaults).
    """
    torch.manual_seed(0)
    full = form is not None
    contrastive = full if contrastive is None else contrastive
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    net = VNet().to(device, memory_format=fmt)
    aux = ResNetVNet(multicure=full, multicure_level=multicure_level, multicure_kwargs={"form": form} if full else None)
    aux = aux.to(device, memory_format=fmt)
    return SemiSupervisedTrainer(
        device=device,
        max_epochs=1,
        train_data_loader=[None],
        unlabeled_data_loader=[None],
        network=net,
        aux_network=aux,
        optimizer=torch.optim.SGD(list(net.parameters()) + list(aux.parameters()), lr=0.01, momentum=0.9),
        loss_terms=method_loss_terms(
            DiceCELoss(to_onehot_y=True, softmax=True),
            PseudoLabelLoss(),
            XORRegularizationLoss(),
            PrototypeContrastiveLoss(num_classes=2) if contrastive else None,
            contrastive_anchors="all",
        ),
        channels_last=channels_last,
        decollate=False,
        amp=amp,
        amp_kwargs={"dtype": "auto"},
        **scheme,
    )


def one_step(trainer: SemiSupervisedTrainer, x: torch.Tensor, y: torch.Tensor, n_l: int) -> dict[str, float]:
    """One iteration as the trainer runs it (its own autocast around the forward passes), timed in parts."""
    device = x.device
    weights = {name: row.weight_at(1) for name, row in trainer.loss_terms.items()}
    times: dict[str, float] = {}
    _sync(device)
    t0 = time.perf_counter()
    trainer.optimizer.zero_grad(set_to_none=True)
    batch, view_targets = trainer.student_batch(x[:n_l], y, x[n_l:])
    terms, _ = trainer._compute_losses(batch, y, n_l, weights, view_targets)
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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--amp", action="store_true", help="also every variant under amp (bf16 on CPU, fp16 on CUDA)")
    parser.add_argument("--multicure-level", type=int, default=2, help="decoder level of the block (the bundle's: 2)")
    parser.add_argument("--forms", nargs="+", default=list(MULTICURE_FORMS), choices=list(MULTICURE_FORMS))
    parser.add_argument("--split", action="store_true",
                        help="also time the first form without the contrastive loss and the contrastive loss without "
                             "MultiCURE: where the extra time goes")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's allocator as it is (the bundle keeps freed memory: cpu_memory.py)")
    parser.add_argument("--teacher", help="the trainer's teacher (default: the library's)")
    parser.add_argument("--student-view", help="the trainer's student view by name (default: the library's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    scheme = {k: v for k, v in (("teacher", args.teacher), ("student_view", args.student_view)) if v is not None}
    make = functools.partial(build, **scheme)  # every variant teaches alike
    keep_freed_memory(not args.default_allocator)
    channels_last = not args.no_channels_last
    n_l, n = args.labelled, args.labelled + args.unlabelled
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, *args.roi, generator=g).to(device)
    y = (torch.rand(args.labelled, 1, *args.roi, generator=g) > 0.7).float().to(device)

    trainers = {"reference": make(None, device, channels_last)}
    trainers.update({form: make(form, device, channels_last, args.multicure_level) for form in args.forms})
    if args.split:
        first = args.forms[0]
        trainers[f"{first}-multicure-only"] = make(first, device, channels_last, args.multicure_level, False)
        trainers["contrastive-only"] = make(None, device, channels_last, contrastive=True)
    if args.amp:
        for name in ["reference", *args.forms]:
            form = None if name == "reference" else name
            trainers[f"{name}+amp"] = make(form, device, channels_last, args.multicure_level, amp=True)
    timed = {name: instrument(trainer) for name, trainer in trainers.items()}
    results: dict[str, list[dict[str, float]]] = {k: [] for k in trainers}
    peaks: dict[str, float] = {}
    for name, trainer in trainers.items():  # warm-up, and the peak memory of each variant
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            one_step(trainer, x, y, n_l)
            for part in timed[name].values():
                part.reset()
        peaks[name] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_rss_mb()
    for _ in range(args.repeats):  # alternate so both see the same machine load
        for name, trainer in trainers.items():
            for part in timed[name].values():
                part.reset()
            row = one_step(trainer, x, y, n_l)
            row.update({f"fwd:{k}": part.elapsed for k, part in timed[name].items()})
            trainer.optimizer.zero_grad(set_to_none=True)
            row.update({f"alone:{k}": loss_alone(timed[name][k]) for k in _LOSSES if k in timed[name]})
            results[name].append(row)
    floors = {form: dense_conv_floor(trainers[form], x, args.repeats) for form in args.forms}

    amp_dtype = str(trainers[f"{args.forms[0]}+amp"].amp_dtype).removeprefix("torch.") if args.amp else None
    print(f"device={device} roi={tuple(args.roi)} batch={n_l}+{args.unlabelled} channels_last={channels_last} "
          f"amp={args.amp} ({amp_dtype or 'float32'}) multicure_level={args.multicure_level} threads={torch.get_num_threads()} repeats={args.repeats} "
          f"teacher={trainers['reference'].teacher} student_view={type(trainers['reference'].student_view).__name__}")
    med: dict[str, dict[str, Any]] = {}
    unit = "MiB allocated" if device.type == "cuda" else "MiB peak RSS (cumulative)"
    for name, rows in results.items():
        med[name] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        for prefix, label in (("", f"{name:>9}:"), ("fwd:", f"{'fwd:':>10}"), ("alone:", f"{'loss fwd+bwd:':>14}")):
            keys = [k for k in med[name] if (k.split(":")[0] + ":" if ":" in k else "") == prefix]
            parts = "  ".join(f"{k[len(prefix):]}={med[name][k]:.3f}s" for k in keys)
            tail = f"  peak={peaks[name]:.0f} {unit}" if not prefix else ""
            print(f"{label} {parts}{tail}")
    ref = med["reference"]["total"]
    # a busy or shared machine only ever adds time, so the fastest of the alternating steps is the estimate
    # least disturbed by it; both are printed, and both come from the same alternating runs
    fastest = {name: min(r["total"] for r in rows) for name, rows in results.items()}
    for form, floor in floors.items():
        floor_total = sum(floor.values())
        print(f"{form} MultiCURE convolutions, forward+backward on the block input: "
              + "  ".join(f"{k}={v:.3f}s" for k, v in floor.items()) + f"  sum={floor_total:.3f}s")
        print(f"{form} floor of the ratio (reference + those convolutions only): {1 + floor_total / ref:.2f}x")
        print(f"ratio {form}/reference (total): {med[form]['total'] / ref:.2f}x (medians)")
        print(f"ratio {form}/reference (total, fastest steps): {fastest[form] / fastest['reference']:.2f}x "
              f"({fastest[form]:.2f}s / {fastest['reference']:.2f}s)")
    if args.amp:
        for name in ["reference", *args.forms]:
            print(f"ratio {name}+amp/{name} (total, {amp_dtype or 'float32'} / float32): "
                  f"{med[name + '+amp']['total'] / med[name]['total']:.2f}x (medians), "
                  f"{fastest[name + '+amp'] / fastest[name]:.2f}x (fastest steps: "
                  f"{fastest[name + '+amp']:.2f}s / {fastest[name]:.2f}s)")
    if args.split:
        first = args.forms[0]
        extra = {k: med[k]["total"] - ref for k in (first, f"{first}-multicure-only", "contrastive-only")}
        print(f"split of the {first} step's extra time over the reference (medians): whole {extra[first]:.3f}s = "
              f"MultiCURE {extra[f'{first}-multicure-only']:.3f}s + contrastive path {extra['contrastive-only']:.3f}s "
              f"+ interaction {extra[first] - extra[f'{first}-multicure-only'] - extra['contrastive-only']:.3f}s")


if __name__ == "__main__":
    main()
