"Fused linear cross-entropy kernel vs `F.cross_entropy(hidden @ W.T, labels)`: loss, dL/dhidden, dL/dW; bad inputs."
import pytest, torch
import torch.nn.functional as F
from hypothesis import given, example, strategies as st
from kernel_checks import DEVICE, DTYPES, check_kernel
from peftlab.kernels import fused_linear_cross_entropy_kernel as flce_mod
from peftlab.kernels.fused_linear_cross_entropy_kernel import (fused_linear_cross_entropy, fused_linear_cross_entropy_ref,
    FusedLinearCrossEntropyFunction, cross_entropy_chunk, cross_entropy_chunk_ref)

names = ["loss", "dhidden", "dweight"]

def _inputs(N, H, V, dtype, ignored=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * 2 / H**0.5).to(DEVICE, dtype)
    W = torch.randn(V, H, generator=g).to(DEVICE, dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < ignored] = -100
    if N and (y == -100).all(): y[0] = 0                   # at least one counted token (all ignored: see below)
    return h, W, y.to(DEVICE)

def _check(N, H, V, dtype, reduction="mean", chunk_size=None, ignored=0.2, seed=0):
    h, W, y = _inputs(N, H, V, dtype, ignored, seed)
    kernel = lambda h, W: FusedLinearCrossEntropyFunction.apply(h, W, y, -100, reduction, chunk_size)
    ref = lambda h, W: F.cross_entropy((h @ W.T).to(torch.promote_types(h.dtype, torch.float32)), y, ignore_index=-100, reduction=reduction)
    check_kernel(kernel, ref, [h, W], wrt=[0, 1], names=names, msg=f"N={N} H={H} V={V} {reduction} chunk={chunk_size}")

@given(N=st.integers(1, 70), H=st.integers(1, 80), V=st.integers(1, 3000), dtype=st.sampled_from(DTYPES),
       reduction=st.sampled_from(["mean", "sum"]), chunk_size=st.sampled_from([None, 1, 3, 16, 64]))
@example(N=123, H=64, V=1151, dtype=torch.float32, reduction="mean", chunk_size=None)
@example(N=5, H=123, V=1151, dtype=torch.bfloat16, reduction="mean", chunk_size=2)
@example(N=9, H=16, V=40000, dtype=torch.float16, reduction="mean", chunk_size=None)   # a row longer than one block
@example(N=1, H=7, V=2, dtype=torch.float32, reduction="sum", chunk_size=None)
def test_matches_cross_entropy_of_the_logits(N, H, V, dtype, reduction, chunk_size):
    _check(N, H, V, dtype, reduction, chunk_size)

def test_chunk_kernel_matches_its_pytorch_specification():
    g = torch.Generator().manual_seed(0)
    z = (5 * torch.randn(13, 1151, generator=g)).to(DEVICE)
    y = torch.randint(0, 1151, (13,), generator=g).to(DEVICE); y[[0, 4]] = -100
    scale = torch.tensor([0.25], device=DEVICE)
    zk, zr = z.clone(), z.clone()
    torch.testing.assert_close(cross_entropy_chunk(zk, y, scale, -100), cross_entropy_chunk_ref(zr, y, scale, -100), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zk, zr, rtol=1e-5, atol=1e-6)
    assert (zk[[0, 4]] == 0).all()

def test_extreme_logits_do_not_overflow():
    "logits of ±1e4 (exp overflows float32): the online log-sum-exp must stay finite."
    h = torch.tensor([[100.0], [-100.0], [0.0]], device=DEVICE)
    W = torch.tensor([[100.0], [-100.0], [1.0], [0.0]], device=DEVICE)
    y = torch.tensor([0, 2, 3], device=DEVICE)
    kernel = lambda h, W: FusedLinearCrossEntropyFunction.apply(h, W, y, -100, "mean", None)
    check_kernel(kernel, lambda h, W: F.cross_entropy(h @ W.T, y), [h, W], wrt=[0, 1], names=names)

def test_all_tokens_ignored_gives_nan_and_zero_gradients_like_pytorch():
    h, W, _ = _inputs(6, 8, 20, torch.float32)
    y = torch.full((6,), -100, device=DEVICE)
    h.requires_grad_(); W.requires_grad_()
    loss = fused_linear_cross_entropy(h, W, y)
    loss.backward()
    assert loss.isnan() and (h.grad == 0).all() and (W.grad == 0).all()

def test_no_tokens():
    h, W, y = _inputs(0, 8, 20, torch.float32)
    h.requires_grad_(); W.requires_grad_()
    loss = fused_linear_cross_entropy(h, W, y); loss.backward()
    assert loss.isnan() and h.grad.shape == (0, 8) and (W.grad == 0).all()

def test_frozen_head_skips_its_gradient(monkeypatch):
    "LoRA freezes lm_head: the V x H product for dW must not be computed."
    calls = []
    fwd = flce_mod.fused_linear_cross_entropy_fwd
    monkeypatch.setattr(flce_mod, "fused_linear_cross_entropy_fwd", lambda *a, **k: calls.append(k) or fwd(*a, **k))
    h, W, y = _inputs(10, 8, 50, torch.float32)
    h.requires_grad_()
    fused_linear_cross_entropy(h, W, y).backward()
    assert calls == [dict(need_dh=True, need_dw=False)] and W.grad is None and h.grad is not None
    with torch.no_grad(): loss = fused_linear_cross_entropy(h, W, y)
    assert calls[-1] == dict(need_dh=False, need_dw=False)
    torch.testing.assert_close(loss, fused_linear_cross_entropy_ref(h.detach(), W, y))

def test_batched_hidden_and_scaled_gradient():
    "(B, T, H) hidden states, a loss multiplied before backward (gradient accumulation divides it)."
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 9, 16, generator=g).to(DEVICE); W = torch.randn(40, 16, generator=g).to(DEVICE)
    y = torch.randint(0, 40, (2, 9), generator=g).to(DEVICE)
    check_kernel(lambda h, W: 0.25 * fused_linear_cross_entropy(h, W, y), lambda h, W: 0.25 * fused_linear_cross_entropy_ref(h, W, y),
                 [h, W], wrt=[0, 1], names=names)

@pytest.mark.parametrize("make,err,exc", [
    (lambda h, W, y: (h, W[:, :7], y), r"lm_head_weight has shape \(50, 7\); expected \(\*, 8\)", ValueError),
    (lambda h, W, y: (h, W, y[:9]), r"labels has shape \(9,\); expected \(10\)", ValueError),
    (lambda h, W, y: (h, W.half(), y), "lm_head_weight has dtype torch.float16", TypeError),
    (lambda h, W, y: (h, W, y.int()), "labels has dtype torch.int32", TypeError),
    (lambda h, W, y: (h.long(), W, y), "hidden has dtype torch.int64", TypeError),
    (lambda h, W, y: (h, W.to("meta"), y), "lm_head_weight is on meta", ValueError),
    (lambda h, W, y: (h, W, y + 50), r"is outside the vocabulary \[0, 50\)", ValueError),
    (lambda h, W, y: (h, W, torch.where(y == -100, -1, y)), r"label -1 is outside the vocabulary", ValueError),
])
def test_bad_inputs_raise_clear_errors(make, err, exc):
    h, W, y = _inputs(10, 8, 50, torch.float32, ignored=0.5)
    with pytest.raises(exc, match=err): fused_linear_cross_entropy(*make(h, W, y))

def test_under_autocast_matches_the_autocast_reference():
    "Mixed precision: float32 h and W, bfloat16 matmuls; gradients come back in float32."
    h, W, y = _inputs(12, 16, 300, torch.float32)
    grads = []
    for fn in (fused_linear_cross_entropy, fused_linear_cross_entropy_ref):
        hh, WW = h.clone().requires_grad_(), W.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16): loss = fn(hh, WW, y)
        loss.backward()
        grads.append((loss, hh.grad, WW.grad))
    for a, b in zip(*grads):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)   # both round the logits and their gradient to bfloat16
