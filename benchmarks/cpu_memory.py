"""glibc keeping freed memory in the process (``keep_freed_memory``, the bundle's default) against its default, CPU.

glibc's default cannot be restored inside a process once its heap has grown (freed chunks are reused whatever the
settings), so each measurement runs in a fresh subprocess, started with or without
:func:`multicure_monai.cpu_memory.keep_freed_memory`, and the two kinds alternate (``--repeats`` rounds; one command,
the same machine state for both). A subprocess times the predictive V-Net forward + backward, the auxiliary
ResNet-VNet + MultiCURE forward + backward (``--batch`` x 1 x ``--roi``, channels_last_3d, float32) and one training
step of the default method (``train_step.py``'s trainer, authors' form at level 2, half the crops labelled), each
``--passes`` times after one untimed pass, and reports its fastest and its peak resident memory. Prints the fastest
and the median over rounds per case and setting, and their ratios (kept / default).

    python benchmarks/cpu_memory.py                 # 4 x 1 x 56x56x40, 3 rounds of 2 processes
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_step import build, one_step  # noqa: E402

from multicure_monai.cpu_memory import keep_freed_memory  # noqa: E402
from multicure_monai.networks.resnet_vnet import ResNetVNet  # noqa: E402
from multicure_monai.networks.vnet import VNet  # noqa: E402


def child(setting: str, roi: list[int], batch: int, passes: int, step: bool) -> dict:
    """One subprocess's timings: ``{case: fastest seconds}`` and ``peak_rss_gb``."""
    if setting == "kept" and not keep_freed_memory():
        raise SystemExit("not Linux with glibc: nothing to compare")
    fmt = torch.channels_last_3d
    torch.manual_seed(0)
    x = torch.randn(batch, 1, *roi).contiguous(memory_format=fmt)
    unc = (torch.rand(batch, 1, *roi) > 0.8).float()
    y = (torch.rand(batch // 2, 1, *roi) > 0.7).float()
    vnet, aux = VNet().to(memory_format=fmt), ResNetVNet().to(memory_format=fmt)
    cases = {
        "V-Net fwd+bwd": lambda: vnet(x).mean().backward(),
        "ResNet-VNet+MultiCURE fwd+bwd": lambda: aux(x, unc).mean().backward(),
    }
    if step:
        trainer = build("authors", torch.device("cpu"), True)
        cases["training step (authors form)"] = lambda: one_step(trainer, x, y, batch // 2)
    out: dict = {}
    for name, run in cases.items():
        run()  # untimed: oneDNN set-up, the heap grows to its working size
        times = []
        for _ in range(passes):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        out[name] = min(times)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--roi", type=int, nargs=3, default=[56, 56, 40])
    p.add_argument("--batch", type=int, default=4, help="crops per net pass (the step: half labelled)")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds of the two subprocesses")
    p.add_argument("--passes", type=int, default=2, help="timed passes per case in a subprocess (fastest kept)")
    p.add_argument("--no-step", action="store_true", help="only the two nets")
    p.add_argument("--child", choices=["default", "kept"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.roi, args.batch, args.passes, not args.no_step)))
        return
    results: dict[str, list[dict]] = {"default": [], "kept": []}
    for _ in range(args.repeats):
        for setting in ("default", "kept"):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", setting, "--roi", *map(str, args.roi),
                   "--batch", str(args.batch), "--passes", str(args.passes)] + (["--no-step"] if args.no_step else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[setting].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, roi {tuple(args.roi)}, batch "
          f"{args.batch}, {args.repeats} rounds of a default and a kept subprocess, best of {args.passes} passes each")
    for name in [k for k in results["default"][0] if k != "peak_rss_gb"]:
        d = [r[name] for r in results["default"]]
        k = [r[name] for r in results["kept"]]
        print(f"{name}: default {min(d):.3f} / {statistics.median(d):.3f} s, kept {min(k):.3f} / "
              f"{statistics.median(k):.3f} s (fastest / median); kept / default {min(k) / min(d):.2f}x fastest, "
              f"{statistics.median(k) / statistics.median(d):.2f}x medians")
    rss = {s: statistics.median(r["peak_rss_gb"] for r in rows) for s, rows in results.items()}
    print(f"peak resident memory of a subprocess (median): default {rss['default']:.2f} GB, kept {rss['kept']:.2f} GB")


if __name__ == "__main__":
    main()
