"""Which vector ISA the deformable-convolution kernels are built for, and under which cached name."""

from __future__ import annotations

import pytest
import torch

from multicure_monai.networks import deform_conv_extension as ext


@pytest.mark.parametrize(
    "machine, capability, asked, tag",
    [
        ("x86_64", "AVX512", "", "avx512"),
        ("x86_64", "AVX2", "", "avx2"),
        ("x86_64", "DEFAULT", "", "base"),
        ("aarch64", "AVX512", "", "base"),
        ("x86_64", "AVX512", "avx2", "avx2"),  # lowered on request, e.g. to compare builds
        ("x86_64", "AVX2", "avx512", "avx2"),  # never above what PyTorch detected
        ("x86_64", "AVX512", "nonsense", "avx512"),
    ],
)
def test_isa_follows_the_cpu(monkeypatch, machine, capability, asked, tag) -> None:
    monkeypatch.setattr(ext.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setenv(ext.ISA_ENV, asked)
    got, flags = ext._isa_flags()
    assert got == tag
    assert ("-mavx512f" in flags) is (tag == "avx512")
    assert ("-mavx2" in flags) is (tag != "base")
