"""The precision ``amp`` runs per device, and its logging."""

from __future__ import annotations

import logging

import pytest
import torch

from multicure_monai import precision
from multicure_monai.errors import BundleInputError
from multicure_monai.precision import (
    autocast,
    describe_precision,
    log_precision,
    needs_grad_scaler,
    parse_amp_dtype,
    resolve_amp_dtype,
)

BF16, FP16 = torch.bfloat16, torch.float16


@pytest.mark.parametrize(
    "device, amp_dtype, has_bf16, expected",
    [
        ("cpu", "auto", True, BF16),
        ("cpu", "auto", False, None),  # a CPU without bf16 runs float32
        ("cpu", "bfloat16", True, BF16),
        ("cpu", "bfloat16", False, None),
        ("cpu", BF16, True, BF16),
        ("cpu", "float16", True, FP16),  # explicit: honoured
        ("cpu", "float32", True, None),
        ("cuda", "auto", False, FP16),
        ("cuda", "bfloat16", False, BF16),
        ("cuda", "float32", True, None),
        ("meta", "auto", True, None),
    ],
)
def test_resolve_amp_dtype(monkeypatch, device, amp_dtype, has_bf16, expected) -> None:
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: has_bf16)
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda kind: kind in ("cpu", "cuda"))
    assert resolve_amp_dtype(device, amp_dtype) == expected


@pytest.mark.parametrize("bad", ["half", "fp16", "bf16", torch.float64, ""])
def test_bad_amp_dtype_names_the_key(bad) -> None:
    with pytest.raises(BundleInputError, match="amp_dtype"):
        parse_amp_dtype(bad)
    with pytest.raises(ValueError):  # BundleInputError is a ValueError
        resolve_amp_dtype("cpu", bad)


@pytest.mark.parametrize(
    "device, dtype, expected", [("cuda", FP16, True), ("cuda", BF16, False), ("cpu", FP16, False), ("cpu", None, False)]
)
def test_grad_scaler_only_for_cuda_float16(device, dtype, expected) -> None:
    assert needs_grad_scaler(device, dtype) is expected


@pytest.mark.parametrize("dtype", [BF16, None])
def test_autocast_context(dtype) -> None:
    conv = torch.nn.Conv3d(1, 2, 3)
    with autocast("cpu", dtype):
        out = conv(torch.randn(1, 1, 6, 6, 6))
    assert out.dtype == (dtype or torch.float32)


@pytest.mark.parametrize(
    "dtype, amp_dtype, words",
    [
        (BF16, "auto", ["bfloat16 autocast on cpu"]),
        (None, "auto", ["float32", "no bfloat16"]),
        (None, "float32", ["float32"]),
    ],
)
def test_log_says_which_precision_runs(caplog, dtype, amp_dtype, words) -> None:
    with caplog.at_level(logging.INFO, logger="multicure_monai.precision"):
        log_precision("cpu", dtype, amp_dtype, "training")
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert message.startswith("training precision:")
    assert all(w in message for w in words), message
    assert describe_precision("cpu", dtype, amp_dtype) in message


def test_cpu_supports_bf16_is_a_bool() -> None:
    assert isinstance(precision.cpu_supports_bf16(), bool)


def _weight_grad(conv: torch.nn.Module, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    conv.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = conv(x)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return conv.weight.grad.clone()


@pytest.mark.parametrize("shape", [(2, 16, 2, 4, 4), (2, 8, 2, 2, 2), (2, 8, 6, 5, 4)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_small_map_convolution_gets_a_correct_weight_gradient_under_bf16(shape, channels_last) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(shape[1], shape[1], 3, padding=1)
    x = torch.randn(shape)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last_3d), x.contiguous(memory_format=torch.channels_last_3d)
    state = {k: v.clone() for k, v in conv.state_dict().items()}
    assert precision.guard_small_convolutions(torch.nn.Sequential(conv), None) == 1
    assert isinstance(conv, precision.SmallMapSafeConv3d)
    assert all(torch.equal(v, conv.state_dict()[k]) for k, v in state.items())
    ref, low = _weight_grad(conv, x, False), _weight_grad(conv, x, True)
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low, ref, atol=0.02 * float(ref.abs().max()), rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # large maps still run in bfloat16
        assert conv(x).dtype == (torch.float32 if shape[2] < 3 else torch.bfloat16)
