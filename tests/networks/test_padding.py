"""Tests for multicure_monai/networks/padding.py."""

from __future__ import annotations

import pytest
import torch

from multicure_monai.networks.padding import crop_to, pad_to_multiple


@pytest.mark.parametrize(
    "shape, target",
    [((2, 3, 9, 8, 7), (5, 8, 3)), ((1, 4, 16, 16, 16), (15, 9, 16)), ((2, 2, 7, 6), (4, 6))],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_crop_equals_slicing_with_one_backward_node(shape, target, channels_last: bool) -> None:
    x = torch.randn(*shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = crop_to(a, target)
    want = b[(slice(None), slice(None)) + tuple(slice(0, t) for t in target)]
    assert torch.equal(got, want)
    g = torch.randn_like(want)
    got.backward(g)
    want.backward(g)
    assert torch.equal(a.grad, b.grad)
    assert got.grad_fn.next_functions[0][0].variable is a  # one node between the crop and the input
    fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    assert got.is_contiguous(memory_format=fmt if channels_last else torch.contiguous_format)


def test_crop_identity_and_inverse_of_pad() -> None:
    x = torch.randn(1, 2, 9, 10, 11)
    assert crop_to(x, (9, 10, 11)) is x
    assert torch.equal(crop_to(pad_to_multiple(x, 8), (9, 10, 11)), x)


@pytest.mark.parametrize("target", [(10, 8, 7), (9, 8)])
def test_crop_rejects_growing_or_wrong_rank(target) -> None:
    with pytest.raises(ValueError, match="cannot crop"):
        crop_to(torch.randn(1, 1, 9, 8, 7), target)
