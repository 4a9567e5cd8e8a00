from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from multicure_monai.networks.deform_conv import DeformConv3d, DeformConv3dPack, deform_conv3d
from multicure_monai.networks.deform_conv_extension import EXTENSION_ENV, load_cpu_extension

DT = torch.float64
#: the two chunked CPU paths (pure PyTorch and compiled kernels); grid_sample is compared separately
CPU_IMPLS = ["gather", "compiled"]


def _out_size(shape, k, s, p, d):
    return [(shape[a] + 2 * p[a] - d[a] * (k[a] - 1) - 1) // s[a] + 1 for a in range(3)]


def _t3(v):
    return (v, v, v) if isinstance(v, int) else tuple(v)


def _reference(x, offset, weight, bias, stride, padding, dilation, mask, og):
    """Independent reference: one grid_sample (zero padding, trilinear) per kernel point and offset group."""
    stride, padding, dilation = _t3(stride), _t3(padding), _t3(dilation)
    b, c, d, h, w = x.shape
    cout, cin_g = weight.shape[:2]
    ks = weight.shape[2:]
    K = ks[0] * ks[1] * ks[2]
    groups = c // cin_g
    osz = _out_size((d, h, w), ks, stride, padding, dilation)
    grids = torch.meshgrid(*[torch.arange(osz[a], dtype=x.dtype) * stride[a] - padding[a] for a in range(3)], indexing="ij")
    cols = []
    cg = c // og
    for k in range(K):
        kd, kh, kw = k // (ks[1] * ks[2]), (k // ks[2]) % ks[1], k % ks[2]
        per_g = []
        for g in range(og):
            o = offset[:, 3 * (g * K + k) : 3 * (g * K + k) + 3]
            pos = [grids[a] + (kd, kh, kw)[a] * dilation[a] + o[:, a] for a in range(3)]
            size = (d, h, w)
            norm = [2 * pos[a] / (size[a] - 1) - 1 if size[a] > 1 else pos[a] * 0 + 2 * (pos[a] != 0) for a in range(3)]
            grid = torch.stack([norm[2], norm[1], norm[0]], dim=-1)
            s = F.grid_sample(x[:, g * cg : (g + 1) * cg], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            if mask is not None:
                s = s * mask[:, g * K + k][:, None]
            per_g.append(s)
        cols.append(torch.cat(per_g, 1))
    cols = torch.stack(cols, 2)  # (B, C, K, D', H', W')
    cols = cols.view(b, groups, cin_g, K, *osz)
    wv = weight.view(groups, cout // groups, cin_g, K)
    y = torch.einsum("bgckdhw,gock->bgodhw", cols, wv).reshape(b, cout, *osz)
    return y if bias is None else y + bias.view(1, -1, 1, 1, 1)


def _non_integer(o: torch.Tensor) -> torch.Tensor:
    """Move values away from the integer grid (trilinear sampling is not differentiable there)."""
    frac = o - torch.floor(o)
    return torch.where((frac < 0.15) | (frac > 0.85), o + 0.4, o)


CONV_CASES = [
    # (in, out, kernel, stride, padding, dilation, groups, offset_groups, shape)
    (3, 4, 3, 1, 1, 1, 1, 1, (5, 6, 4)),
    (3, 4, 3, 1, 0, 1, 1, 1, (5, 6, 4)),
    (4, 6, 3, 2, 1, 1, 1, 1, (7, 6, 5)),
    (4, 4, 3, 1, 2, 2, 1, 1, (6, 5, 6)),
    (4, 6, 3, 1, 1, 1, 2, 1, (5, 4, 4)),
    (4, 4, 3, 1, 1, 1, 1, 2, (5, 4, 4)),
    (6, 6, 3, 1, 1, 1, 3, 2, (4, 5, 4)),
    (2, 3, (1, 3, 2), (2, 1, 1), (0, 1, 1), (1, 2, 1), 1, 1, (5, 6, 5)),
]


@pytest.mark.parametrize("cin,cout,k,s,p,d,groups,og,shape", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_zero_offsets_equal_conv3d(cin, cout, k, s, p, d, groups, og, shape, bias):
    torch.manual_seed(0)
    k3, s3, p3, d3 = _t3(k), _t3(s), _t3(p), _t3(d)
    x = torch.randn(2, cin, *shape, dtype=DT)
    w = torch.randn(cout, cin // groups, *k3, dtype=DT)
    bvec = torch.randn(cout, dtype=DT) if bias else None
    ref = F.conv3d(x, w, bvec, s3, p3, d3, groups)
    K = k3[0] * k3[1] * k3[2]
    off = torch.zeros(2, 3 * og * K, *ref.shape[2:], dtype=DT)
    y = deform_conv3d(x, off, w, bvec, s, p, d, offset_groups=og)
    assert y.shape == ref.shape
    assert (y - ref).abs().max().item() < 1e-10
    ones = torch.ones(2, og * K, *ref.shape[2:], dtype=DT)
    ym = deform_conv3d(x, off, w, bvec, s, p, d, mask=ones, offset_groups=og, chunk_size=7)
    assert (ym - ref).abs().max().item() < 1e-10


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shift", [1, -1, 2])
def test_integer_offset_equals_shifted_conv(axis, shift):
    torch.manual_seed(1)
    x = torch.randn(1, 3, 8, 7, 9, dtype=DT)
    w = torch.randn(2, 3, 3, 3, 3, dtype=DT)
    ref = F.conv3d(x, w, padding=1)
    off = torch.zeros(1, 81, 8, 7, 9, dtype=DT)
    off.view(1, 27, 3, 8, 7, 9)[:, :, axis] = shift
    y = deform_conv3d(x, off, w, padding=1)
    n = x.shape[2 + axis]
    lo, hi = max(0, -shift), n - max(0, shift)  # output positions whose shifted position exists
    y_in = y.narrow(2 + axis, lo, hi - lo)
    ref_in = ref.narrow(2 + axis, lo + shift, hi - lo)
    assert (y_in - ref_in).abs().max().item() < 1e-10
    # samples fully outside the volume read zeros
    if abs(shift) >= 2:
        xe = F.pad(x, (2, 2, 2, 2, 2, 2))
        off_e = torch.zeros(1, 81, *[s + 4 for s in x.shape[2:]], dtype=DT)
        off_e.view(1, 27, 3, *off_e.shape[2:])[:, :, axis] = shift
        ye = deform_conv3d(xe, off_e, w, padding=1)[:, :, 2:-2, 2:-2, 2:-2]
        assert (ye - y).abs().max().item() < 1e-10


@pytest.mark.parametrize(
    "cin,cout,k,s,p,d,groups,og,scale",
    [(2, 3, 3, 1, 1, 1, 1, 1, 0.8), (4, 4, 3, 2, 1, 1, 2, 2, 1.5), (2, 2, (2, 3, 2), 1, (0, 1, 1), (2, 1, 1), 1, 2, 4.0)],
)
@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_random_offsets_match_grid_sample_reference(cin, cout, k, s, p, d, groups, og, scale, modulated, impl):
    torch.manual_seed(2)
    k3 = _t3(k)
    K = k3[0] * k3[1] * k3[2]
    x = torch.randn(2, cin, 5, 6, 4, dtype=DT)
    w = torch.randn(cout, cin // groups, *k3, dtype=DT)
    bvec = torch.randn(cout, dtype=DT)
    osz = _out_size((5, 6, 4), k3, _t3(s), _t3(p), _t3(d))
    off = scale * torch.randn(2, 3 * og * K, *osz, dtype=DT)
    mask = torch.rand(2, og * K, *osz, dtype=DT) if modulated else None
    y = deform_conv3d(x, off, w, bvec, s, p, d, mask=mask, offset_groups=og, chunk_size=11, implementation=impl)
    ref = _reference(x, off, w, bvec, s, p, d, mask, og)
    assert (y - ref).abs().max().item() < 1e-10


@pytest.mark.parametrize("stride,groups,og", [(1, 1, 1), (2, 2, 2), ((1, 2, 1), 1, 2)])
@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_gradcheck(stride, groups, og, modulated, impl):
    torch.manual_seed(3)
    x = torch.randn(1, 4, 4, 4, 3, dtype=DT, requires_grad=True)
    w = torch.randn(2, 4 // groups, 3, 3, 3, dtype=DT, requires_grad=True)
    b = torch.randn(2, dtype=DT, requires_grad=True)
    osz = _out_size((4, 4, 3), (3, 3, 3), _t3(stride), (1, 1, 1), (1, 1, 1))
    off = _non_integer(0.7 * torch.randn(1, 81 * og, *osz, dtype=DT)).requires_grad_()
    inputs = [x, off, w, b]
    if modulated:
        inputs.append(torch.rand(1, 27 * og, *osz, dtype=DT, requires_grad=True))

    def fn(*a):
        m = a[4] if modulated else None
        return deform_conv3d(
            a[0], a[1], a[2], a[3], stride, 1, 1, mask=m, offset_groups=og, chunk_size=5, implementation=impl
        )

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("scale", [0.6, 3.0])
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_chunked_equals_unchunked(modulated, scale, impl):
    torch.manual_seed(4)
    x = torch.randn(2, 4, 5, 6, 7, dtype=DT, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, 3, dtype=DT, requires_grad=True)
    off = (scale * torch.randn(2, 162, 5, 6, 7, dtype=DT)).requires_grad_()
    mask = torch.rand(2, 54, 5, 6, 7, dtype=DT, requires_grad=True) if modulated else None
    g = torch.randn(2, 3, 5, 6, 7, dtype=DT)
    results = []
    for chunk in (1, 13, 10**9):
        y = deform_conv3d(x, off, w, None, 1, 1, 1, mask=mask, offset_groups=2, chunk_size=chunk, implementation=impl)
        leaves = [x, off, w] + ([mask] if modulated else [])
        grads = torch.autograd.grad(y, leaves, g)
        results.append([y, *grads])
    for other in results[:-1]:
        for a, b in zip(other, results[-1]):
            assert (a - b).abs().max().item() < 1e-10
    # memory budget derives a chunk size and gives the same result
    y_b = deform_conv3d(x, off, w, None, 1, 1, 1, mask=mask, offset_groups=2, memory_budget=1, implementation=impl)
    assert (y_b - results[-1][0]).abs().max().item() < 1e-10


@pytest.mark.parametrize("x_cl, grad_cl", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_channels_last_matches_contiguous(x_cl, grad_cl, bias, groups, impl):
    """A channels-last input gives a channels-last output; values and all gradients equal the contiguous run's,
    whatever the layout of the incoming gradient and of the weight (``module.to(memory_format=...)``)."""
    torch.manual_seed(6)
    cl = torch.channels_last_3d
    x = torch.randn(2, 4, 5, 6, 7, dtype=DT)
    w = torch.randn(groups * 3, 4 // groups, 3, 3, 3, dtype=DT)
    b = torch.randn(groups * 3, dtype=DT, requires_grad=True) if bias else None
    off = 1.5 * torch.randn(2, 81, 5, 6, 7, dtype=DT)
    mask = torch.rand(2, 27, 5, 6, 7, dtype=DT)
    g = torch.randn(2, groups * 3, 5, 6, 7, dtype=DT)
    runs = []
    # the channels-last run: offsets and mask as a channels-last conv would give them, weight as .to(channels_last)
    second = [t.contiguous(memory_format=cl) if x_cl else t for t in (x, w, off, mask)]
    second.append(g.contiguous(memory_format=cl) if grad_cl else g)
    for xin, win, oin, min_, gin in ((x, w, off, mask, g), second):
        xl, wl, ol, ml = (t.clone().requires_grad_() for t in (xin, win, oin, min_))
        y = deform_conv3d(xl, ol, wl, b, 1, 1, 1, mask=ml, chunk_size=37, implementation=impl)
        runs.append((y, *torch.autograd.grad(y, [xl, wl, ol, ml] + ([b] if bias else []), gin)))
    y_cl = runs[1][0]
    assert y_cl.is_contiguous(memory_format=cl) == x_cl
    for a, c in zip(runs[0], runs[1]):
        assert (a - c).abs().max().item() < 1e-12


@pytest.mark.parametrize("modulated", [False, True])
@pytest.mark.parametrize("stride,padding,og", [(1, 1, 1), (2, 1, 2)])
def test_pack_equals_conv_at_init_and_learns_offsets(modulated, stride, padding, og):
    torch.manual_seed(5)
    layer = DeformConv3dPack(4, 3, 3, stride, padding, offset_groups=og, modulated=modulated).double()
    conv = torch.nn.Conv3d(4, 3, 3, stride, padding).double()
    conv.load_state_dict({"weight": layer.weight.data, "bias": layer.bias.data})
    x = torch.randn(2, 4, 6, 5, 6, dtype=DT)
    y = layer(x)
    assert (y - conv(x)).abs().max().item() < 1e-10
    (y * torch.randn_like(y)).sum().backward()
    assert layer.conv_offset.weight.grad is not None
    n_off = 81 * og
    assert layer.conv_offset.weight.grad[:n_off].abs().sum().item() > 0
    assert layer.conv_offset.bias.grad[:n_off].abs().sum().item() > 0
    if modulated:
        assert layer.conv_offset.weight.grad[n_off:].abs().sum().item() > 0
    assert layer.weight.grad.abs().sum().item() > 0


def test_module_explicit_offsets_and_shapes():
    torch.manual_seed(6)
    m = DeformConv3d(4, 6, kernel_size=(3, 1, 3), stride=2, padding=(1, 0, 1), groups=2, offset_groups=2)
    x = torch.randn(2, 4, 8, 7, 6)
    off = torch.zeros(2, 3 * 2 * 9, 4, 4, 3)
    y = m(x, off)
    ref = F.conv3d(x, m.weight, m.bias, 2, (1, 0, 1), 1, 2)
    assert y.shape == (2, 6, 4, 4, 3)
    assert torch.allclose(y, ref, atol=1e-5)
    with pytest.raises(ValueError):
        m(x, torch.zeros(2, 5, 4, 4, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_low_precision_and_autocast(dtype, impl):
    torch.manual_seed(7)
    x, w = torch.randn(1, 3, 5, 5, 4).to(dtype), torch.randn(2, 3, 3, 3, 3).to(dtype)
    off = (0.7 * torch.randn(1, 81, 5, 5, 4)).to(dtype)
    # reference from the same (rounded) inputs in float64: only the output rounding differs
    ref = deform_conv3d(x.double(), off.double(), w.double(), padding=1, implementation=impl)
    y = deform_conv3d(x, off, w, padding=1, implementation=impl)
    assert y.dtype == dtype
    rel = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert (y.double() - ref).abs().max().item() <= rel * ref.abs().max().item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = deform_conv3d(x.float(), off.float(), w.float(), padding=1, implementation=impl)
    assert (ya.double() - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()


@pytest.mark.parametrize("cin,cout,k,s,p,d,groups,og,shape", CONV_CASES)
@pytest.mark.parametrize("modulated", [False, True])
def test_implementations_agree(cin, cout, k, s, p, d, groups, og, shape, modulated):
    """gather, grid_sample and the compiled kernels compute the same function and the same gradients (float64)."""
    torch.manual_seed(8)
    k3 = _t3(k)
    K = k3[0] * k3[1] * k3[2]
    x = torch.randn(2, cin, *shape, dtype=DT, requires_grad=True)
    w = torch.randn(cout, cin // groups, *k3, dtype=DT, requires_grad=True)
    bvec = torch.randn(cout, dtype=DT, requires_grad=True)
    osz = _out_size(shape, k3, _t3(s), _t3(p), _t3(d))
    off = _non_integer(1.3 * torch.randn(2, 3 * og * K, *osz, dtype=DT)).requires_grad_()
    mask = torch.rand(2, og * K, *osz, dtype=DT, requires_grad=True) if modulated else None
    leaves = [x, off, w, bvec] + ([mask] if modulated else [])
    outs = []
    for impl in ("gather", "grid_sample", "compiled"):
        y = deform_conv3d(x, off, w, bvec, s, p, d, mask=mask, offset_groups=og, implementation=impl)
        g = torch.autograd.grad(y, leaves, torch.linspace(-1, 1, y.numel(), dtype=DT).view_as(y))
        outs.append([y, *g])
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert a.shape == b.shape
            assert (a - b).abs().max().item() < 1e-9
    zero = torch.zeros_like(off)
    y0 = deform_conv3d(x, zero, w, bvec, s, p, d, offset_groups=og, implementation="grid_sample")
    assert (y0 - F.conv3d(x, w, bvec, _t3(s), _t3(p), _t3(d), groups)).abs().max().item() < 1e-10


@pytest.mark.parametrize(
    "batch,threads,cin,modulated",
    [(1, 2, 4, False), (2, 2, 4, False), (3, 2, 4, True), (4, 3, 4, False), (2, 1, 4, False), (2, 2, 16, False),
     (3, 2, 32, False), (2, 2, 32, True), (1, 2, 64, True), (2, 3, 8, False)],
)
def test_compiled_gradients_for_any_batch_threads_and_width(batch, threads, cin, modulated):
    """The fused kernels (threads scatter into private input-gradient copies; channel loops of width 16, 32 and 64
    compiled for that width) give the output and gradients of the pure PyTorch path."""
    torch.manual_seed(9)
    x = torch.randn(batch, cin, 5, 6, 4, dtype=DT, requires_grad=True)
    w = torch.randn(3, cin, 3, 3, 3, dtype=DT, requires_grad=True)
    off = _non_integer(2.0 * torch.randn(batch, 81, 5, 6, 4, dtype=DT)).requires_grad_()
    mask = torch.rand(batch, 27, 5, 6, 4, dtype=DT, requires_grad=True) if modulated else None
    leaves = [x, off, w] + ([mask] if modulated else [])
    g = torch.randn(batch, 3, 5, 6, 4, dtype=DT)
    before = torch.get_num_threads()
    grads = {}
    try:
        torch.set_num_threads(threads)
        for impl in ("gather", "compiled"):
            y = deform_conv3d(x, off, w, None, 1, 1, 1, mask=mask, chunk_size=16, implementation=impl)
            grads[impl] = (y, *torch.autograd.grad(y, leaves, g))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(grads["gather"], grads["compiled"]):
        assert (a - b).abs().max().item() < 1e-10


@pytest.mark.parametrize("cin,modulated", [(8, False), (16, True), (32, False), (40, True), (64, False)])
def test_compiled_float32_gradients_match_float64(cin, modulated):
    """In float32 the fused kernels (lane-wise offset-gradient sums over whole registers plus a scalar tail) give
    the float64 output and gradients to float32 rounding."""
    torch.manual_seed(10)
    x = torch.randn(2, cin, 5, 6, 4, dtype=DT)
    w = torch.randn(3, cin, 3, 3, 3, dtype=DT)
    off = _non_integer(2.0 * torch.randn(2, 81, 5, 6, 4, dtype=DT))
    mask = torch.rand(2, 27, 5, 6, 4, dtype=DT) if modulated else None
    g = torch.randn(2, 3, 5, 6, 4, dtype=DT)
    results = {}
    for dtype in (DT, torch.float32):
        leaves = [t.to(dtype).requires_grad_() for t in [x, off, w] + ([mask] if modulated else [])]
        y = deform_conv3d(*leaves[:3], None, 1, 1, 1, mask=leaves[3] if modulated else None, implementation="compiled")
        results[dtype] = (y, *torch.autograd.grad(y, leaves, g.to(dtype)))
    for a, b in zip(results[DT], results[torch.float32]):
        assert b.dtype == torch.float32
        assert (a - b.double()).abs().max().item() <= 1e-5 * a.abs().max().item()


def test_grid_sample_gradcheck_and_bad_implementation():
    torch.manual_seed(9)
    x = torch.randn(1, 2, 4, 3, 3, dtype=DT, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, 3, dtype=DT, requires_grad=True)
    off = _non_integer(0.7 * torch.randn(1, 81, 4, 3, 3, dtype=DT)).requires_grad_()
    mask = torch.rand(1, 27, 4, 3, 3, dtype=DT, requires_grad=True)

    def fn(a, o, ww, m):
        return deform_conv3d(a, o, ww, None, 1, 1, 1, mask=m, implementation="grid_sample")

    assert torch.autograd.gradcheck(fn, [x, off, w, mask], fast_mode=True)
    with pytest.raises(ValueError, match="implementation"):
        deform_conv3d(x, off, w, padding=1, implementation="cuda")
    with pytest.raises(ValueError, match="implementation"):
        DeformConv3dPack(2, 2, 3, padding=1, implementation="fast")
    assert DeformConv3dPack(2, 2, 3, padding=1).implementation == "auto"


def test_compiled_kernels_build_and_auto_uses_them():
    """The CPU kernels build here (CI has a compiler); ``auto`` on CPU runs them; ``compiled`` is CPU only."""
    if os.environ.get(EXTENSION_ENV, "1") == "0":
        pytest.skip(f"{EXTENSION_ENV}=0")
    ext = load_cpu_extension()
    assert ext is not None and hasattr(ext, "columns") and hasattr(ext, "backward")
    torch.manual_seed(10)
    x = torch.randn(1, 2, 4, 4, 3, dtype=DT)
    off = 0.7 * torch.randn(1, 81, 4, 4, 3, dtype=DT)
    w = torch.randn(3, 2, 3, 3, 3, dtype=DT)
    y_auto = deform_conv3d(x, off, w, padding=1)
    assert torch.equal(y_auto, deform_conv3d(x, off, w, padding=1, implementation="compiled"))
    with pytest.raises(ValueError, match="CPU"):
        deform_conv3d(x.to("meta"), off.to("meta"), w.to("meta"), padding=1, implementation="compiled")


def test_disabled_extension_falls_back_to_gather(monkeypatch):
    """``MULTICURE_DEFORM_CONV_EXTENSION=0``: no build, ``auto`` gives the gather result, ``compiled`` refuses."""
    torch.manual_seed(11)
    x = torch.randn(1, 2, 4, 4, 3, dtype=DT)
    off = 0.7 * torch.randn(1, 81, 4, 4, 3, dtype=DT)
    w = torch.randn(3, 2, 3, 3, 3, dtype=DT)
    monkeypatch.setenv(EXTENSION_ENV, "0")
    load_cpu_extension.cache_clear()
    try:
        assert load_cpu_extension() is None
        y = deform_conv3d(x, off, w, padding=1)
        assert torch.equal(y, deform_conv3d(x, off, w, padding=1, implementation="gather"))
        with pytest.raises(RuntimeError, match=EXTENSION_ENV):
            deform_conv3d(x, off, w, padding=1, implementation="compiled")
    finally:
        monkeypatch.delenv(EXTENSION_ENV)
        load_cpu_extension.cache_clear()
