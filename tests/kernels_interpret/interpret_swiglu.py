"SwiGLU kernel vs `silu(gate) * up`: output and both gradients over random shapes and dtypes; bad inputs."
import pytest, torch
import torch.nn.functional as F
from hypothesis import given, example, strategies as st
from kernel_checks import DEVICE, DTYPES, check_kernel
from peftlab.kernels.swiglu_kernel import swiglu, SwiGLUFunction, BLOCK_SIZE

reference = lambda g, u: F.silu(g) * u
names = ["h", "dgate", "dup"]

def _inputs(shape, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(shape, generator=g)).to(DEVICE, dtype) for _ in range(2)]

@given(shape=st.lists(st.integers(0, 40), min_size=1, max_size=3), dtype=st.sampled_from(DTYPES))
@example(shape=[5, 123, 123], dtype=torch.bfloat16)
@example(shape=[1151], dtype=torch.float16)
@example(shape=[1], dtype=torch.float32)
@example(shape=[0, 7], dtype=torch.float32)
@example(shape=[BLOCK_SIZE + 1], dtype=torch.float32)   # one element into a second program
def test_swiglu_matches_reference(shape, dtype):
    check_kernel(SwiGLUFunction.apply, reference, _inputs(shape, dtype), wrt=[0, 1], names=names, msg=f"shape {shape}")

def test_large_and_small_gates():
    "sigmoid saturates for |g| of tens: the kernel must not overflow or lose the gradient's sign."
    g = torch.tensor([-80.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 80.0], device=DEVICE)
    check_kernel(SwiGLUFunction.apply, reference, [g, torch.randn(7, device=DEVICE)], wrt=[0, 1], names=names)

def test_non_contiguous_inputs():
    g, u = _inputs((8, 30), torch.float32)
    check_kernel(SwiGLUFunction.apply, reference, [g.t(), u.t()], wrt=[0, 1], names=names, msg="transposed")
    check_kernel(SwiGLUFunction.apply, reference, [g[:, ::3], u[:, ::3]], wrt=[0, 1], names=names, msg="strided")

def test_backward_twice_with_retained_graph():
    g, u = (t.requires_grad_() for t in _inputs((4, 9), torch.float32))
    h = SwiGLUFunction.apply(g, u)
    h.sum().backward(retain_graph=True); first = g.grad.clone()
    h.sum().backward()
    torch.testing.assert_close(g.grad, 2 * first)

def test_public_function_uses_the_kernel():
    g, u = (t.requires_grad_() for t in _inputs((3, 5), torch.float32))
    assert "SwiGLUFunction" in type(swiglu(g, u).grad_fn).__name__

@pytest.mark.parametrize("make,err,exc", [
    (lambda g, u: (g, u[:, :5]), r"swiglu: up has shape \(6, 5\); expected \(6, 7\)", ValueError),
    (lambda g, u: (g, u.half()), "swiglu: up has dtype torch.float16", TypeError),
    (lambda g, u: (g.long(), u.long()), "swiglu: gate has dtype torch.int64", TypeError),
    (lambda g, u: (g, u.to("meta")), "swiglu: up is on meta", ValueError),
    (lambda g, u: (g, u[None]), r"swiglu: up has shape \(1, 6, 7\)", ValueError),
])
def test_bad_inputs_raise_clear_errors(make, err, exc):
    with pytest.raises(exc, match=err): swiglu(*make(*_inputs((6, 7), torch.float32)))
