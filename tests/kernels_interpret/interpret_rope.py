"RoPE kernel vs transformers' `apply_rotary_pos_emb`: rotated q and k and both gradients; views, in place, bad inputs."
import pytest, torch
from hypothesis import given, example, strategies as st
from kernel_checks import DEVICE, DTYPES, check_kernel
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from peftlab.kernels.rope_kernel import rope, rope_ref, RoPEFunction

kernel = lambda q, k, cos, sin: RoPEFunction.apply(q, k, cos, sin, False)
names = ["q", "k", "dq", "dk"]

def _cos_sin(B, T, D, dtype, shared=True, seed=0):
    "cos, sin as LlamaRotaryEmbedding makes them: (1, T, D) for shared positions, else (B, T, D) from random ones."
    rot = LlamaRotaryEmbedding(LlamaConfig(hidden_size=2 * D, num_attention_heads=2))
    pos = torch.arange(T)[None] if shared else torch.randint(0, 4096, (B, T), generator=torch.Generator().manual_seed(seed))
    cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
    return cos.to(DEVICE, dtype), sin.to(DEVICE, dtype)

def _qk(B, H, HK, T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype), torch.randn(B, HK, T, D, generator=g).to(DEVICE, dtype)

@given(B=st.integers(1, 3), H=st.integers(1, 9), HK=st.integers(1, 9), T=st.integers(1, 24),
       half=st.integers(1, 70), shared=st.booleans(), dtype=st.sampled_from(DTYPES))
@example(B=2, H=9, HK=3, T=37, half=32, shared=True, dtype=torch.bfloat16)       # SmolLM2's attention
@example(B=1, H=32, HK=8, T=17, half=64, shared=False, dtype=torch.float16)       # Llama-3-8B's heads
@example(B=1, H=1, HK=1, T=1, half=1, shared=True, dtype=torch.float32)           # one position, D = 2
@example(B=3, H=5, HK=5, T=7, half=61, shared=False, dtype=torch.float32)         # D = 122
def test_rope_matches_transformers(B, H, HK, T, half, shared, dtype):
    q, k = _qk(B, H, HK, T, 2 * half, dtype)
    cos, sin = _cos_sin(B, T, 2 * half, dtype, shared)
    check_kernel(lambda q, k: kernel(q, k, cos, sin), lambda q, k: apply_rotary_pos_emb(q, k, cos, sin), [q, k],
                 wrt=[0, 1], names=names, msg=f"{(B, H, HK, T, 2 * half)} shared={shared}")

def test_cos_and_sin_halves_are_used_separately():
    "Arbitrary cos/sin (halves differ) and the exact reference: a mix-up of the halves or of the backward's signs fails."
    q, k = _qk(2, 3, 2, 5, 12, torch.float32)
    g = torch.Generator().manual_seed(1)
    cos, sin = (torch.randn(2, 5, 12, generator=g).to(DEVICE) for _ in range(2))
    check_kernel(lambda q, k: kernel(q, k, cos, sin), lambda q, k: rope_ref(q, k, cos, sin), [q, k], wrt=[0, 1], names=names)

def test_attention_layout_views_are_not_copied():
    "q and k as attention makes them: transposed views of the projections' outputs."
    B, T, H, HK, D = 2, 11, 4, 2, 16
    x = torch.randn(B, T, (H + HK) * D, device=DEVICE)
    q = x[..., :H * D].view(B, T, H, D).transpose(1, 2)
    k = x[..., H * D:].view(B, T, HK, D).transpose(1, 2)
    cos, sin = _cos_sin(B, T, D, torch.float32)
    qo, ko = rope(q, k, cos, sin)
    assert qo.stride() == q.stride() and ko.stride() == k.stride()
    check_kernel(lambda q, k: kernel(q, k, cos, sin), lambda q, k: rope_ref(q, k, cos, sin), [q, k], wrt=[0, 1], names=names)

@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_under_autograd(dtype):
    q0, k0 = _qk(2, 4, 2, 9, 16, dtype)
    cos, sin = _cos_sin(2, 9, 16, dtype)
    def in_place(q, k):
        q, k = q * 1, k * 1                       # non-leaf tensors, as a projection's output is
        qo, ko = rope(q, k, cos, sin, inplace=True)
        assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()
        return qo, ko
    check_kernel(in_place, lambda q, k: rope_ref(q, k, cos, sin), [q0, k0], wrt=[0, 1], names=names)

def test_in_place_refuses_to_corrupt_a_saved_tensor():
    q0, k0 = _qk(1, 2, 2, 3, 8, torch.float32)
    cos, sin = _cos_sin(1, 3, 8, torch.float32)
    q0.requires_grad_()
    q = q0.exp()                                  # exp saves its output for the backward
    qo, ko = rope(q, k0.clone(), cos, sin, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"): (qo.sum() + ko.sum()).backward()

def test_without_grad_in_place_and_not():
    q, k = _qk(1, 3, 1, 4, 8, torch.bfloat16)
    cos, sin = _cos_sin(1, 4, 8, torch.bfloat16)
    expected = rope_ref(q, k, cos, sin)
    with torch.no_grad(): out = rope(q.clone(), k.clone(), cos, sin, inplace=True)
    for a, b in zip(out, expected): torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)

@pytest.mark.parametrize("q_dtype,cos_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                               (torch.float32, torch.bfloat16)])
def test_mixed_dtypes_promote_like_pytorch(q_dtype, cos_dtype):
    "Under autocast q is bfloat16 and cos float32: the output is float32, dq comes back in q's dtype."
    q, k = _qk(2, 3, 1, 5, 12, q_dtype)
    cos, sin = _cos_sin(2, 5, 12, cos_dtype, shared=False)
    qo, _ = rope(q.requires_grad_(), k, cos, sin)
    assert qo.dtype == torch.promote_types(q_dtype, cos_dtype) and "RoPEFunction" in type(qo.grad_fn).__name__
    check_kernel(lambda q, k: kernel(q, k, cos, sin), lambda q, k: rope_ref(q, k, cos, sin), [q.detach(), k], wrt=[0, 1], names=names)

def test_dispatch_takes_the_reference_when_the_kernel_does_not_apply():
    q, k = _qk(1, 2, 2, 3, 8, torch.float32)
    cos, sin = _cos_sin(1, 3, 8, torch.float32)
    qo, _ = rope(q, k, cos.double(), sin.double())                # float64: reference, promoted as PyTorch does
    assert qo.dtype == torch.float64 and qo.grad_fn is None
    cos.requires_grad_()                                            # gradient for cos: only the reference gives it
    qo, _ = rope(q, k, cos, sin)
    qo.sum().backward()
    assert cos.grad is not None

@pytest.mark.parametrize("args,err", [
    (dict(q=(2, 4, 9, 15), k=(2, 2, 9, 15), cos=(1, 9, 15)), "head_dim 15 is odd"),
    (dict(q=(2, 4, 9, 16), k=(2, 2, 8, 16), cos=(1, 9, 16)), r"rope: k has shape \(2, 2, 8, 16\); expected \(2, \*, 9, 16\)"),
    (dict(q=(2, 4, 9, 16), k=(1, 2, 9, 16), cos=(1, 9, 16)), r"rope: k has shape \(1, 2, 9, 16\)"),
    (dict(q=(2, 4, 9, 16), k=(2, 2, 9, 16), cos=(3, 9, 16)), "cos has batch 3; expected 1 or 2"),
    (dict(q=(2, 4, 9, 16), k=(2, 2, 9, 16), cos=(1, 9, 8)), r"rope: cos has shape \(1, 9, 8\)"),
    (dict(q=(4, 9, 16), k=(2, 9, 16), cos=(1, 9, 16)), "expected \\(batch, heads, seq_len, head_dim\\)"),
])
def test_bad_shapes_raise_clear_errors(args, err):
    q, k, cos = (torch.randn(args[n], device=DEVICE) for n in ("q", "k", "cos"))
    with pytest.raises(ValueError, match=err): rope(q, k, cos, cos)

def test_bad_dtype_and_device_raise_clear_errors():
    q, k = _qk(1, 2, 2, 3, 8, torch.float32)
    cos, sin = _cos_sin(1, 3, 8, torch.float32)
    with pytest.raises(TypeError, match="rope: k has dtype torch.float16"): rope(q, k.half(), cos, sin)
    with pytest.raises(TypeError, match="rope: q has dtype torch.int64"): rope(q.long(), k.long(), cos, sin)
    with pytest.raises(ValueError, match="rope: sin is on meta"): rope(q, k, cos, sin.to("meta"))
