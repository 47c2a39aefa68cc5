"`lora_linear` vs `lora_linear_ref`, dense and NF4 bases: output, dL/dx, dL/dA, dL/dB, dL/db; bad inputs."
import math
import pytest, torch
from hypothesis import given, example, settings, strategies as st
from kernel_checks import DEVICE, DTYPES, check_kernel
from peftlab.kernels.lora_linear_kernel import lora_linear, lora_linear_ref
from peftlab.kernels.nf4 import NF4Weight
from peftlab.quant.nf4 import quantize_nf4

NAMES = ["y", "dx", "dA", "dB", "db"]

def _case(lead, N, K, r, nf4, dtype, bias=True, scale=0.5, seed=0):
    "Kernel and reference closures over the frozen weight, and the float inputs (x, A, B[, bias]) for `check_kernel`."
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) / K ** 0.5
    weight = NF4Weight(*[t.to(DEVICE) for t in quantize_nf4(W, 64)], (N, K), 64) if nf4 else W.to(DEVICE, dtype)
    x = torch.randn((*lead, K), generator=g).to(DEVICE, dtype)
    A = (torch.randn(r, K, generator=g) / K ** 0.5).to(DEVICE, dtype)
    B = (torch.randn(N, r, generator=g) / r ** 0.5).to(DEVICE, dtype)
    b = torch.randn(N, generator=g).to(DEVICE, dtype)
    if nf4:
        kernel = lambda x, A, B, *b: lora_linear(x, weight, A, B, scale, *b)
        ref = lambda x, A, B, *b: lora_linear_ref(x, weight, A, B, scale, *b)
        return kernel, ref, [x, A, B, b] if bias else [x, A, B]
    # the dense weight is an input (the float64 ground truth converts it too) but gets no gradient
    kernel = lambda x, W, A, B, *b: lora_linear(x, W, A, B, scale, *b)
    ref = lambda x, W, A, B, *b: lora_linear_ref(x, W, A, B, scale, *b)
    return kernel, ref, [x, weight, A, B, b] if bias else [x, weight, A, B]

def _check(lead, N, K, r, nf4, dtype, bias=True, scale=0.5):
    kernel, ref, inputs = _case(lead, N, K, r, nf4, dtype, bias, scale)
    wrt = [i for i in range(len(inputs)) if nf4 or i != 1]                     # not the frozen weight
    check_kernel(kernel, ref, inputs, wrt=wrt, names=NAMES[:len(wrt) + 1],
                 msg=f"x {(*lead, K)} W {(N, K)} r {r} {'nf4' if nf4 else 'dense'}")

@given(lead=st.lists(st.integers(0, 40), min_size=1, max_size=2).filter(lambda s: math.prod(s) <= 64),
       N=st.integers(1, 160), K=st.integers(1, 160), r=st.integers(1, 24), nf4=st.booleans(), bias=st.booleans(),
       scale=st.sampled_from([0.25, 2.0]), dtype=st.sampled_from(DTYPES))
@settings(max_examples=10)
@example(lead=[5], N=123, K=123, r=8, nf4=True, bias=True, scale=2.0, dtype=torch.float32)
@example(lead=[5], N=123, K=123, r=8, nf4=False, bias=True, scale=2.0, dtype=torch.bfloat16)
@example(lead=[2, 3], N=1151, K=40, r=16, nf4=True, bias=False, scale=0.5, dtype=torch.bfloat16)
@example(lead=[3], N=33, K=1151, r=4, nf4=True, bias=True, scale=0.5, dtype=torch.float16)
@example(lead=[1], N=96, K=64, r=1, nf4=True, bias=True, scale=2.0, dtype=torch.float32)     # one row, rank 1
@example(lead=[0], N=64, K=33, r=8, nf4=True, bias=True, scale=2.0, dtype=torch.float32)     # no rows
@example(lead=[0], N=64, K=33, r=8, nf4=False, bias=True, scale=2.0, dtype=torch.float16)
@example(lead=[6], N=40, K=70, r=80, nf4=True, bias=True, scale=0.5, dtype=torch.float32)    # r > BLOCK_R: two chunks
def test_lora_linear_matches_reference(lead, N, K, r, nf4, bias, scale, dtype):
    _check(lead, N, K, r, nf4, dtype, bias, scale)

def test_uses_the_function_and_freezes_the_weight():
    for nf4 in (False, True):
        kernel, _, inputs = _case([4], 20, 33, 3, nf4, torch.float32)
        inputs = [t.requires_grad_(nf4 or i != 1) for i, t in enumerate(inputs)]
        y = kernel(*inputs)
        assert "LoraLinearFn" in type(y.grad_fn.next_functions[0][0]).__name__
        y.sum().backward()
        assert all(t.grad is not None for i, t in enumerate(inputs) if nf4 or i != 1)
        if not nf4: assert inputs[1].grad is None

def test_no_grad_and_adapters_without_grad():
    "Inference (no_grad) and a frozen adapter (only B trains) take the same path."
    kernel, ref, (x, A, B, b) = _case([5], 30, 40, 4, True, torch.float32)
    with torch.no_grad(): torch.testing.assert_close(kernel(x, A, B, b), ref(x, A, B, b), rtol=1e-5, atol=1e-5)
    B.requires_grad_(); kernel(x, A, B, b).sum().backward()
    Br = B.detach().clone().requires_grad_(); ref(x, A, Br, b).sum().backward()
    torch.testing.assert_close(B.grad, Br.grad, rtol=1e-5, atol=1e-5)

@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("change,err,exc", [
    (dict(x=lambda x: x[:, :32]), r"x has shape \(4, 32\) but the weight is \(20, 33\)", ValueError),
    (dict(A=lambda A: A[:, :32]), r"lora_linear: A has shape \(3, 32\); expected \(\*, 33\)", ValueError),
    (dict(B=lambda B: B[:, :2]), r"lora_linear: B has shape \(20, 2\); expected \(20, 3\)", ValueError),
    (dict(B=lambda B: B.double()), "lora_linear: B has dtype torch.float64", TypeError),
    (dict(A=lambda A: A.to("meta")), "lora_linear: A is on meta", ValueError),
    (dict(scale=lambda s: torch.tensor(s)), "scale must be a number", TypeError),
])
def test_bad_inputs_raise_clear_errors(nf4, change, err, exc):
    weight = (NF4Weight(*[t.to(DEVICE) for t in quantize_nf4(torch.randn(20, 33), 64)], (20, 33), 64) if nf4
              else torch.randn(20, 33, device=DEVICE))
    args = dict(x=torch.randn(4, 33, device=DEVICE), A=torch.randn(3, 33, device=DEVICE), B=torch.randn(20, 3, device=DEVICE), scale=0.5)
    args.update({k: f(args[k]) for k, f in change.items()})
    with pytest.raises(exc, match=err): lora_linear(args["x"], weight, args["A"], args["B"], args["scale"])

def test_trainable_dense_weight_is_refused():
    W = torch.randn(20, 33, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="base weight must be frozen"):
        lora_linear(torch.randn(4, 33, device=DEVICE), W, torch.randn(3, 33, device=DEVICE), torch.randn(20, 3, device=DEVICE), 1.0)

def test_weight_given_as_a_qlora_layer():
    "The NF4 weight can be a `peftlab.quant.qlora.NF4Linear` (double-quantised here): its buffers are read in place."
    from peftlab.quant.qlora import NF4Linear
    layer = NF4Linear.from_linear(torch.nn.Linear(70, 30), 64, double_quant=True).to(DEVICE)
    kernel = lambda x, A, B, b: lora_linear(x, layer, A, B, 0.5, b)
    ref = lambda x, A, B, b: lora_linear_ref(x, layer, A, B, 0.5, b)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(*s, generator=g).to(DEVICE) for s in [(6, 70), (4, 70), (30, 4), (30,)]]
    check_kernel(kernel, ref, inputs, wrt=[0, 1, 2, 3], names=NAMES, msg="NF4Linear")
