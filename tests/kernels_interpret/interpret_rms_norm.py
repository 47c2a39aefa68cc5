"RMSNorm kernel vs `rms_norm_ref`: outputs, dL/dx and dL/dw over random shapes and dtypes; bad inputs."
import pytest, torch
from hypothesis import given, example, strategies as st
from kernel_checks import DEVICE, DTYPES, check_kernel
from peftlab.kernels.rms_norm_kernel import rms_norm, rms_norm_ref, RMSNormFunction

kernel = lambda x, w: RMSNormFunction.apply(x, w, 1e-5)
reference = lambda x, w: rms_norm_ref(x, w, 1e-5)

def _inputs(shape, dtype, w_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(DEVICE, w_dtype or dtype)
    return x, w

@given(lead=st.lists(st.integers(0, 6), min_size=1, max_size=3), n=st.integers(1, 1200), dtype=st.sampled_from(DTYPES))
@example(lead=[5, 123], n=123, dtype=torch.float32)
@example(lead=[5, 123], n=123, dtype=torch.bfloat16)
@example(lead=[3], n=1151, dtype=torch.float16)
@example(lead=[1], n=576, dtype=torch.bfloat16)      # a single row
@example(lead=[0], n=64, dtype=torch.float32)        # no rows
def test_rms_norm_matches_reference(lead, n, dtype):
    x, w = _inputs((*lead, n), dtype)
    check_kernel(kernel, reference, [x, w], wrt=[0, 1], names=["y", "dx", "dw"], msg=f"shape {(*lead, n)}")

@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_mixed_dtypes_promote_like_pytorch(x_dtype, w_dtype):
    x, w = _inputs((4, 7, 96), x_dtype, w_dtype)
    check_kernel(kernel, reference, [x, w], wrt=[0, 1], names=["y", "dx", "dw"], msg="mixed")

def test_strided_rows_and_transposed_inputs():
    x, w = _inputs((6, 9, 40), torch.float32)
    for view in (x[::2], x.transpose(0, 1), x[..., :33]):
        check_kernel(kernel, reference, [view, w[:view.shape[-1]].contiguous()], wrt=[0, 1], names=["y", "dx", "dw"], msg="view")

def test_public_function_uses_the_kernel_and_weight_without_grad():
    x, w = _inputs((3, 50), torch.float32)
    y = rms_norm(x.requires_grad_(), w, 1e-5)
    assert y.grad_fn is not None and "RMSNormFunction" in type(y.grad_fn).__name__
    y.sum().backward()
    assert w.grad is None and x.grad is not None

@pytest.mark.parametrize("x,w,err", [
    (torch.randn(3, 8).long(), torch.randn(8), "rms_norm: x has dtype torch.int64"),
    (torch.randn(3, 8), torch.randn(7), "rms_norm: weight has shape (7,); expected (8)"),
    (torch.randn(3, 8), torch.randn(8, 1), "rms_norm: weight has shape (8, 1); expected (8)"),
    (torch.randn(3, 8), torch.randn(8).to("meta"), "rms_norm: weight is on meta"),
    (torch.tensor(1.0), torch.randn(1), "at least one dimension"),
])
def test_bad_inputs_raise_clear_errors(x, w, err):
    x = x.to(DEVICE); w = w if w.device.type == "meta" else w.to(DEVICE)
    with pytest.raises((TypeError, ValueError), match=err.replace("(", r"\(").replace(")", r"\)")):
        rms_norm(x, w)

def test_rows_longer_than_one_block_are_refused():
    x, w = _inputs((2, 65537), torch.float32)
    with pytest.raises(ValueError, match="longer than the 65536"): rms_norm(x, w)
