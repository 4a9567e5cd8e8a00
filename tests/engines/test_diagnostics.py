"""Tests for multicure_monai/engines/diagnostics.py: per-loss gradient norms."""

from __future__ import annotations

import torch
from torch import nn

from multicure_monai.engines.diagnostics import loss_gradient_norms


def test_gradient_norms_match_backward_per_term_and_net() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    x = torch.randn(5, 3)
    terms = {"only_a": a(x).pow(2).sum(), "both": (a(x) * b(x)).sum(), "detached": b(x).sum().detach()}
    norms = loss_gradient_norms(terms, {"a": a, "b": b}, prefix="g_")
    for name, term in terms.items():
        for net_name, net in (("a", a), ("b", b)):
            net.zero_grad()
            if term.requires_grad:
                term.backward(retain_graph=True)
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            expected = torch.cat([g.flatten() for g in grads]).norm() if grads else torch.zeros(())
            torch.testing.assert_close(norms[f"g_{name}_{net_name}"], expected)
    assert float(norms["g_only_a_b"]) == 0.0 and float(norms["g_detached_b"]) == 0.0
