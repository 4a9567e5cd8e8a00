"""Forward + backward of each network alone in float32 and under CPU/CUDA autocast, alternating in one process.

The training step (``train_step.py --amp``) mixes the networks with losses, sampling and the optimizer; this
script isolates what autocast buys the two networks themselves: the predictive V-Net and the auxiliary
ResNet-VNet with the MultiCURE block (authors' form, level 2, fed a random uncertainty map), batch
``--batch`` x 1 x ``--roi``, channels_last_3d, a mean-square loss on the float32 logits. It prints the fastest and
the median time of each and the ratio autocast / float32 of both.

    python benchmarks/net_precision.py                  # 4 x 1 x 56x56x40, 5 alternating repeats
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from multicure_monai.cpu_memory import keep_freed_memory
from multicure_monai.networks.resnet_vnet import ResNetVNet
from multicure_monai.networks.vnet import VNet
from multicure_monai.precision import autocast, resolve_amp_dtype


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--roi", type=int, nargs=3, default=(56, 56, 40))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--default-allocator", action="store_true",
                   help="leave glibc's allocator as it is (the bundle keeps freed memory: cpu_memory.py)")
    args = p.parse_args()
    device = torch.device(args.device)
    keep_freed_memory(not args.default_allocator)
    dtype = resolve_amp_dtype(device, "auto")
    torch.manual_seed(0)
    fmt = torch.channels_last_3d
    x = torch.randn(args.batch, 1, *args.roi, device=device).contiguous(memory_format=fmt)
    unc = (torch.rand(args.batch, 1, *args.roi, device=device) > 0.8).float().contiguous(memory_format=fmt)
    aux = ResNetVNet(multicure=True, multicure_level=2, multicure_kwargs={"form": "authors"})
    nets = {"vnet": VNet().to(device, memory_format=fmt), "resnet_vnet+multicure": aux.to(device, memory_format=fmt)}

    def step(name: str, low: bool) -> float:
        net = nets[name]
        net.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        with autocast(device, dtype if low else None):
            y = net(x) if name == "vnet" else net(x, unc)
        y.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    for name in nets:  # warm-up
        for low in (False, True):
            step(name, low)
    times: dict[tuple[str, bool], list[float]] = {(n, low): [] for n in nets for low in (False, True)}
    for _ in range(args.repeats):
        for name in nets:
            for low in (False, True):
                times[(name, low)].append(step(name, low))
    low_name = str(dtype).removeprefix("torch.") if dtype is not None else "float32 (no autocast here)"
    print(f"device={device} batch={args.batch} roi={tuple(args.roi)} threads={torch.get_num_threads()} amp={low_name}")
    for name in nets:
        f, b = times[(name, False)], times[(name, True)]
        print(f"{name}: float32 fastest {min(f):.2f}s median {statistics.median(f):.2f}s | amp fastest {min(b):.2f}s "
              f"median {statistics.median(b):.2f}s | ratio amp/float32 {min(b) / min(f):.2f}x (fastest), "
              f"{statistics.median(b) / statistics.median(f):.2f}x (medians)")


if __name__ == "__main__":
    main()
