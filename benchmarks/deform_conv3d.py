"""Benchmark: ``DeformConv3d`` vs ``nn.Conv3d`` forward+backward time and peak memory.

Usage::

    python3 benchmarks/deform_conv3d.py --shape 2 32 56 56 40 --repeats 5 [--device cpu] [--naive]

Time: median of ``--repeats`` runs (after ``--warmup`` runs) of forward + backward (input, weights and,
for the deformable conv, offsets all require grad), measured with ``time.perf_counter`` (CUDA synchronised).

Peak memory:
    * CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak, minus the memory held by the
      inputs.
    * CPU: ``tracemalloc`` does not see torch allocations, so every variant runs in a fresh subprocess that
      creates the inputs (x, offsets, module; after a tiny warm-up step that loads the kernels) and, in one
      of two runs, does one forward+backward; it prints its peak resident set size ``ru_maxrss``
      (``resource.getrusage(RUSAGE_SELF)``). The reported number is the difference of the two peaks, i.e.
      the extra peak memory caused by forward+backward over a baseline process that only holds the torch
      runtime and the inputs. Allocator caching makes it a comparable, not exact, measure.

Variants: ``conv`` (nn.Conv3d), ``deform`` (``DeformConv3d`` of this package), optionally ``naive`` (one
``grid_sample`` into a (B, C, K, D, H, W) tensor, then einsum) as a reference.
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
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from multicure_monai.networks.deform_conv import DeformConv3d  # noqa: E402

__all__ = ["main"]


def _naive_deform(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, padding: int) -> torch.Tensor:
    """Reference: all K kernel points sampled with one grid_sample, then einsum (stride 1, 1 offset group)."""
    b, c, d, h, w = x.shape
    kd, kh, kw = weight.shape[2:]
    dev, dt = x.device, x.dtype
    kk = torch.stack(torch.meshgrid(*[torch.arange(k, device=dev, dtype=dt) for k in (kd, kh, kw)], indexing="ij"), -1)
    kk = kk.reshape(-1, 3)  # (K, 3)
    g = torch.stack(torch.meshgrid(*[torch.arange(s, device=dev, dtype=dt) for s in (d, h, w)], indexing="ij"), -1)
    pos = g[None, None] - padding + kk[None, :, None, None, None] + offset.view(b, -1, 3, d, h, w).permute(0, 1, 3, 4, 5, 2)
    size = torch.tensor([d, h, w], device=dev, dtype=dt)
    grid = (2 * pos / (size - 1) - 1).flip(-1)  # (B, K, D, H, W, 3) as (x=w, y=h, z=d)
    k = grid.shape[1]
    s = F.grid_sample(x, grid.reshape(b, k * d, h, w, 3), align_corners=True, padding_mode="zeros")
    s = s.view(b, c, k, d, h, w)
    return torch.einsum("bckdhw,ock->bodhw", s, weight.reshape(weight.shape[0], c, k))


def _make(variant: str, shape, cout: int, device: str, seed: int = 0):
    torch.manual_seed(seed)
    b, c, d, h, w = shape
    x = torch.randn(b, c, d, h, w, device=device, requires_grad=True)
    if variant == "conv":
        mod = torch.nn.Conv3d(c, cout, 3, padding=1).to(device)
        return (lambda: mod(x)), [x]
    offset = (0.5 * torch.randn(b, 81, d, h, w, device=device)).requires_grad_()
    if variant == "deform":
        mod = DeformConv3d(c, cout, 3, padding=1).to(device)
        return (lambda: mod(x, offset)), [x, offset]
    weight = (0.05 * torch.randn(cout, c, 3, 3, 3, device=device)).requires_grad_()
    return (lambda: _naive_deform(x, offset, weight, 1)), [x, offset]


def _step(fn) -> None:
    y = fn()
    y.sum().backward()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_variant(variant: str, shape, cout: int, device: str, repeats: int, warmup: int) -> float:
    fn, _ = _make(variant, shape, cout, device)
    for _ in range(warmup):
        _step(fn)
    _sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _step(fn)
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


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
    p.add_argument("--naive", action="store_true", help="also run the naive grid_sample reference")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    args = p.parse_args()
    variants = ["conv", "deform"] + (["naive"] if args.naive else [])
    res = {}
    # memory first (fresh subprocesses on CPU), then timing in this process
    mem = {v: float("nan") if args.no_memory else memory_variant(v, args.shape, args.out_channels, args.device) for v in variants}
    for v in variants:
        t = time_variant(v, args.shape, args.out_channels, args.device, args.repeats, args.warmup)
        m = mem[v]
        res[v] = (t, m)
        print(f"{v:>7s}: fwd+bwd median {t * 1e3:9.1f} ms   peak extra memory {m:8.1f} MiB", flush=True)
    t0, m0 = res["conv"]
    for v in variants[1:]:
        t, m = res[v]
        print(f"{v:>7s} / conv: time x{t / t0:.2f}   memory x{m / m0 if m0 > 0 else float('nan'):.2f}")
    print(f"(shape {args.shape}, C_out {args.out_channels}, device {args.device}, threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
