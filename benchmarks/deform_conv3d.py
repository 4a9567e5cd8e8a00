"""Benchmark: ``DeformConv3d`` vs ``nn.Conv3d`` forward+backward time and peak memory.

Usage::

    python3 benchmarks/deform_conv3d.py --shape 2 32 56 56 40 --repeats 5 [--device cpu] [--grid-sample]
    python3 benchmarks/deform_conv3d.py --shape 4 32 32 32 24   # MultiCURE's layer in the 2+2 x 56x56x40 LA step

Time: median of ``--repeats`` runs (after ``--warmup`` runs) of forward + backward (input, weights and,
for the deformable conv, offsets all require grad; their gradients are cleared before each run, as by
``zero_grad``; the output gradient is a dense tensor of ones, as a following layer would pass back), measured with
``time.perf_counter`` (CUDA synchronised).

Peak memory:
    * CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak, minus the memory held by the
      inputs.
    * CPU: ``tracemalloc`` does not see torch allocations, so every variant runs in a fresh subprocess that
      creates the inputs (x, offsets, module; after a tiny warm-up step that loads the kernels) and, in one
      of two runs, does one forward+backward; it prints its peak resident set size ``ru_maxrss``
      (``resource.getrusage(RUSAGE_SELF)``). The reported number is the difference of the two peaks, i.e.
      the extra peak memory caused by forward+backward over a baseline process that only holds the torch
      runtime and the inputs. Allocator caching makes it a comparable, not exact, measure.

Variants: ``conv`` (nn.Conv3d); ``DeformConv3d`` of this package with ``gather`` (pure PyTorch, chunked) and, on
CPU, ``compiled`` (the C++ kernels, the CPU default: sampling and weight products fused block by block for one
weight group, the same chunking as ``gather`` with C++ sampling otherwise); optionally
``grid_sample`` (one ``F.grid_sample`` into a (B, C, K*D, H, W) tensor, then one GEMM; the CUDA default).
Timings alternate between the variants (round robin), so a change in machine load hits all of them alike.
``--against REV`` adds ``compiled@REV``: the C++ kernels of git revision REV, built under their own name, so that
a kernel change is timed against its predecessor in one process (both with today's compiler flags).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import multicure_monai.networks.deform_conv as deform_conv_module  # noqa: E402
from multicure_monai.networks.deform_conv import DeformConv3d  # noqa: E402
from multicure_monai.networks.deform_conv_extension import COMPILE_FLAGS, ISA_ENV, SOURCE, _isa_flags  # noqa: E402

#: kernel modules of other revisions (``--against``), by variant name
_OTHER_KERNELS: dict = {}


def load_kernels_of(rev: str) -> str:
    """Builds the C++ kernel source of git revision ``rev`` under its own name; returns its variant name."""
    from torch.utils.cpp_extension import load

    repo = SOURCE.parents[3]
    src = subprocess.run(["git", "-C", str(repo), "show", f"{rev}:{SOURCE.relative_to(repo).as_posix()}"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    tag = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", rev], capture_output=True, text=True,
                         check=True).stdout.strip()  # fmt: skip
    folder = torch.utils.cpp_extension._get_build_directory(f"deform_conv_bench_{tag}", False)
    path = os.path.join(folder, "kernels.cpp")
    with open(path, "w") as f:
        f.write(src)
    name = f"compiled@{tag}"
    _OTHER_KERNELS[name] = load(name=f"deform_conv_bench_{tag}", sources=[path],
                                extra_cflags=[*COMPILE_FLAGS, *_isa_flags()[1]], extra_ldflags=["-fopenmp"])  # fmt: skip
    return name

__all__ = ["main"]


def _fresh_grads(fn, leaves: list, mod: torch.nn.Module):
    """``fn`` after clearing the gradients of its inputs and module: each step stores its gradients, as a training
    step after ``zero_grad()`` does, instead of adding them to the previous step's."""

    def run() -> torch.Tensor:
        for t in leaves:
            t.grad = None
        mod.zero_grad(set_to_none=True)
        return fn()

    return run


def _make(variant: str, shape, cout: int, device: str, seed: int = 0):
    torch.manual_seed(seed)
    b, c, d, h, w = shape
    x = torch.randn(b, c, d, h, w, device=device, requires_grad=True)
    if variant == "conv":
        mod = torch.nn.Conv3d(c, cout, 3, padding=1).to(device)
        return _fresh_grads(lambda: mod(x), [x], mod), [x]
    offset = (0.5 * torch.randn(b, 81, d, h, w, device=device)).requires_grad_()
    other = _OTHER_KERNELS.get(variant)
    mod = DeformConv3d(c, cout, 3, padding=1, implementation="compiled" if other else variant).to(device)

    def run() -> torch.Tensor:  # the module looks its kernels up at each forward
        if other is None:
            return mod(x, offset)
        current = deform_conv_module.load_cpu_extension
        deform_conv_module.load_cpu_extension = lambda: other
        try:
            return mod(x, offset)
        finally:
            deform_conv_module.load_cpu_extension = current

    return _fresh_grads(run, [x, offset], mod), [x, offset]


#: the output gradient of each output shape and layout: a dense tensor, as a following layer passes back
_OUTPUT_GRADS: dict = {}


def _step(fn) -> None:
    y = fn()
    key = (tuple(y.shape), y.stride(), y.dtype, y.device)
    if key not in _OUTPUT_GRADS:
        _OUTPUT_GRADS[key] = torch.ones_like(y)
    y.backward(_OUTPUT_GRADS[key])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_variants(variants: list[str], shape, cout: int, device: str, repeats: int, warmup: int) -> dict[str, float]:
    """Median forward+backward time per variant; the repeats alternate between the variants."""
    fns = {v: _make(v, shape, cout, device)[0] for v in variants}
    for v in variants:
        for _ in range(warmup):
            _step(fns[v])
    _sync(device)
    ts: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            t0 = time.perf_counter()
            _step(fns[v])
            _sync(device)
            ts[v].append(time.perf_counter() - t0)
    return {v: statistics.median(t) for v, t in ts.items()}


def memory_variant(variant: str, shape, cout: int, device: str) -> float:
    """Peak extra memory in MiB of one forward+backward (see module docstring)."""
    if device.startswith("cuda"):
        fn, _ = _make(variant, shape, cout, device)
        _step(fn)  # warm-up (kernels, workspaces)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(fn)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    def child(run_step: bool) -> float:
        code = (
            "import sys, json, resource, torch\n"
            f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
            "import deform_conv3d as bm\n"
            f"fn_small, _ = bm._make({variant!r}, (1, {shape[1]}, 6, 6, 6), {cout}, 'cpu')\n"
            "bm._step(fn_small)\n"
            f"fn, _ = bm._make({variant!r}, {tuple(shape)!r}, {cout}, 'cpu')\n"
            f"if {run_step}: bm._step(fn)\n"
            "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return float(json.loads(out.stdout.strip().splitlines()[-1]))

    return child(True) - child(False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=5, default=[2, 32, 56, 56, 40], metavar=("B", "C", "D", "H", "W"))
    p.add_argument("--out-channels", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--grid-sample", action="store_true", help="also run implementation='grid_sample'")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--no-gather", action="store_true", help="skip the (slow) pure PyTorch gather path")
    p.add_argument("--against", metavar="REV", help="also time the compiled kernels of git revision REV (CPU)")
    args = p.parse_args()
    variants = ["conv"] + ([] if args.no_gather else ["gather"]) + (["compiled"] if args.device == "cpu" else [])
    if args.against and args.device == "cpu":
        variants.append(load_kernels_of(args.against))
        args.no_memory = True  # the subprocesses of the memory measurement do not see the other build
    variants += ["grid_sample"] if args.grid_sample else []
    res = {}
    # memory first (fresh subprocesses on CPU), then timing in this process
    mem = {v: float("nan") if args.no_memory else memory_variant(v, args.shape, args.out_channels, args.device) for v in variants}
    times = time_variants(variants, args.shape, args.out_channels, args.device, args.repeats, args.warmup)
    for v in variants:
        t, m = times[v], mem[v]
        res[v] = (t, m)
        print(f"{v:>11s}: fwd+bwd median {t * 1e3:9.1f} ms   peak extra memory {m:8.1f} MiB", flush=True)
    t0, m0 = res["conv"]
    for v in variants[1:]:
        t, m = res[v]
        print(f"{v:>11s} / conv: time x{t / t0:.2f}   memory x{m / m0 if m0 > 0 else float('nan'):.2f}")
    if "compiled" in res and "gather" in res:
        print(f"   compiled / gather: time x{res['compiled'][0] / res['gather'][0]:.2f}")
    for v in _OTHER_KERNELS:
        print(f"   compiled / {v}: time x{res['compiled'][0] / res[v][0]:.2f}")
    isa = _isa_flags()[0] if args.device == "cpu" else "-"
    print(f"(shape {args.shape}, C_out {args.out_channels}, device {args.device}, threads {torch.get_num_threads()}, "
          f"kernels built for {isa}; {ISA_ENV}=avx2 builds and times the AVX2 kernels)")


if __name__ == "__main__":
    main()
