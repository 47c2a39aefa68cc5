"""Shared by the kernel tests in this folder: where they run, and how a kernel is compared with its reference.

These tests run the Triton kernels themselves. On CPU that needs Triton's interpreter, chosen when the kernels are
defined, so Python must start with TRITON_INTERPRET=1: `pytest tests/test_kernels_interpret.py` does that in a
subprocess. On a GPU, run `pytest tests/kernels_interpret -o python_files='interpret_*.py'` to test the compiled kernels.
"""
import os
import torch
from hypothesis import settings, HealthCheck
from peftlab.core.testing import tolerance, assert_close

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    raise RuntimeError("tests/kernels_interpret runs the Triton kernels: start Python with TRITON_INTERPRET=1 "
                       "(`pytest tests/test_kernels_interpret.py` does) or run it on a GPU")
DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# the interpreter runs each program in numpy: few, deterministic examples
settings.register_profile("kernels", max_examples=12, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("kernels")


def _is_float(t): return isinstance(t, torch.Tensor) and t.is_floating_point()

def run_with_grads(fn, inputs, wrt, dys=None, dtype=None, seed=0):
    """Run `fn(*inputs)` with gradients for the inputs at positions `wrt`, back-propagate `dys` (random if None).

    `dtype` converts the float inputs (and `dys`) first, e.g. to float64 for the ground truth.
    Returns (outputs, grads of `wrt`, dys)."""
    xs = [t.detach().to(dtype) if dtype is not None and _is_float(t) else t for t in inputs]
    xs = [t.clone().requires_grad_(i in wrt) if _is_float(t) else t for i, t in enumerate(xs)]
    out = fn(*xs)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    if dys is None:
        g = torch.Generator(device=outs[0].device).manual_seed(seed)
        dys = [torch.randn(o.shape, generator=g, device=o.device, dtype=o.dtype) for o in outs]
    if wrt: torch.autograd.backward(outs, [dy.to(o.dtype) for o, dy in zip(outs, dys)])
    grads = [xs[i].grad for i in wrt]
    return [o.detach() for o in outs], grads, dys


def _max_err(a, b): return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0

def check_kernel(kernel_fn, ref_fn, inputs, wrt, names, msg=''):
    """Outputs and every gradient of `kernel_fn` match the exact (float64) result of `ref_fn` on the same inputs.

    Tolerance: the default of the inputs' dtype (float32 1e-5), widened only to twice the error that `ref_fn`
    itself makes in that dtype: a kernel must be as accurate as PyTorch, not more exact than rounding allows."""
    dtype = next(t.dtype for t in inputs if _is_float(t))
    outs, grads, dys = run_with_grads(kernel_fn, inputs, wrt)
    ref_outs, ref_grads, _ = run_with_grads(ref_fn, inputs, wrt, dys)
    true_outs, true_grads, _ = run_with_grads(ref_fn, inputs, wrt, [d.double() for d in dys], dtype=torch.float64)
    rtol, atol = tolerance(dtype)
    for name, a, r, t in zip(names, outs + grads, ref_outs + ref_grads, true_outs + true_grads):
        assert a is not None and a.shape == t.shape, f"{msg} {name}: {None if a is None else tuple(a.shape)} vs {tuple(t.shape)}"
        assert a.dtype == r.dtype, f"{msg} {name}: dtype {a.dtype}, the reference gives {r.dtype}"
        assert_close(a, t, rtol=rtol, atol=max(atol, 2 * _max_err(r, t)), msg=f"{msg} {name} ({dtype})")
