"NF4 kernels vs their references: dequantisation bit for bit, `nf4_linear`'s output and gradients; bad inputs."
import math
import pytest, torch
import torch.nn.functional as F
import bitsandbytes.functional as bnbF
from hypothesis import given, example, settings, strategies as st
from kernel_checks import DEVICE, DTYPES, check_kernel
from peftlab.kernels.nf4 import nf4_dequantize, nf4_dequantize_ref, nf4_linear, nf4_linear_ref, NF4Weight

@pytest.fixture(autouse=True, scope="module")
def no_compile():
    "bitsandbytes wraps its CPU fallback in torch.compile (~10 s per shape); only its quantiser is used here, eagerly."
    with torch._dynamo.config.patch(disable=True): yield

def _quantize(shape, blocksize, double_quant, seed=0, scale=1.0):
    "bitsandbytes' NF4 of a random tensor: (packed, absmax, double-quantisation kwargs), on DEVICE."
    W = scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    qw, s = bnbF.quantize_4bit(W.reshape(-1, shape[-1]) if W.dim() else W, blocksize=blocksize, quant_type="nf4",
                               compress_statistics=double_quant)
    dq = dict(absmax_code=s.state2.code.to(DEVICE), absmax_scale=s.state2.absmax.to(DEVICE),
              absmax_offset=s.offset.to(DEVICE)) if double_quant else {}
    return qw.to(DEVICE), s.absmax.to(DEVICE), dq

# --- dequantisation: exactly the reference's bits ---

@given(shape=st.lists(st.integers(1, 300), min_size=1, max_size=3).filter(lambda s: math.prod(s) <= 40_000),
       blocksize=st.sampled_from([64, 128, 256]), double_quant=st.booleans(), dtype=st.sampled_from(DTYPES))
@example(shape=[5, 123, 123], blocksize=64, double_quant=True, dtype=torch.bfloat16)
@example(shape=[3, 1151], blocksize=64, double_quant=False, dtype=torch.float16)
@example(shape=[1], blocksize=64, double_quant=False, dtype=torch.float32)
@example(shape=[1025], blocksize=256, double_quant=True, dtype=torch.float32)   # one element into a second program
@example(shape=[300, 257], blocksize=64, double_quant=True, dtype=torch.bfloat16)  # > 256 blocks: two absmax scales
def test_dequantize_is_bit_identical(shape, blocksize, double_quant, dtype):
    qw, absmax, dq = _quantize(shape, blocksize, double_quant)
    ours = nf4_dequantize(qw, absmax, shape, blocksize, dtype, **dq)
    ref = nf4_dequantize_ref(qw, absmax, shape, blocksize, dtype, **dq)
    assert ours.dtype == dtype and ours.shape == tuple(shape)
    assert torch.equal(ours, ref), f"{shape} {blocksize} {double_quant} {dtype}: max diff {(ours.double() - ref.double()).abs().max()}"

def test_bfloat16_rounds_to_nearest_even():
    "Products exactly halfway between two bfloat16 values round as PyTorch rounds them (to even), not by truncation."
    packed = torch.full((128,), 0xFF, dtype=torch.uint8, device=DEVICE)          # 256 codes 15: level 1.0
    absmax = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-9, -(1 + 3 * 2**-8)], device=DEVICE)  # ties, a non-tie
    ours = nf4_dequantize(packed, absmax, (256,), 64, torch.bfloat16)
    assert torch.equal(ours, absmax.repeat_interleave(64).bfloat16())

def test_empty_tensor():
    out = nf4_dequantize(torch.empty(0, dtype=torch.uint8, device=DEVICE), torch.empty(0, device=DEVICE), (0, 5))
    assert out.shape == (0, 5) and out.dtype == torch.bfloat16

# --- nf4_linear: output, dL/dx and dL/db against float64 ---

def _linear_case(lead, N, K, blocksize, double_quant, dtype, bias=True, seed=0):
    "A kernel closure, its reference closure and the float inputs (x, bias) for `check_kernel`."
    qw, absmax, dq = _quantize((N, K), blocksize, double_quant, seed, scale=K ** -0.5)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((*lead, K), generator=g).to(DEVICE, dtype)
    b = torch.randn(N, generator=g).to(DEVICE, dtype)
    kernel = lambda x, *b: nf4_linear(x, qw, absmax, (N, K), blocksize, *b, **dq)
    ref = lambda x, *b: nf4_linear_ref(x, qw, absmax, (N, K), blocksize, *b, **dq)
    return kernel, ref, [x, b] if bias else [x]

@given(lead=st.lists(st.integers(0, 40), min_size=1, max_size=2).filter(lambda s: math.prod(s) <= 64),
       N=st.integers(1, 200), K=st.integers(1, 200), blocksize=st.sampled_from([64, 128]),
       double_quant=st.booleans(), bias=st.booleans(), dtype=st.sampled_from(DTYPES))
@settings(max_examples=10)
@example(lead=[5], N=123, K=123, blocksize=64, double_quant=False, bias=True, dtype=torch.float32)
@example(lead=[2, 3], N=1151, K=70, blocksize=64, double_quant=True, bias=True, dtype=torch.bfloat16)
@example(lead=[3], N=40, K=1151, blocksize=128, double_quant=False, bias=False, dtype=torch.float16)
@example(lead=[1], N=576, K=96, blocksize=64, double_quant=True, bias=True, dtype=torch.bfloat16)   # a single row
@example(lead=[0], N=64, K=33, blocksize=64, double_quant=False, bias=True, dtype=torch.float32)    # no rows
@example(lead=[70], N=65, K=65, blocksize=64, double_quant=True, bias=True, dtype=torch.float16)    # two row tiles
def test_nf4_linear_matches_reference(lead, N, K, blocksize, double_quant, bias, dtype):
    kernel, ref, inputs = _linear_case(lead, N, K, blocksize, double_quant, dtype, bias)
    check_kernel(kernel, ref, inputs, wrt=list(range(len(inputs))), names=["y", "dx", "db"][:len(inputs) + 1],
                 msg=f"x {(*lead, K)} W {(N, K)} bs {blocksize} dq {double_quant}")

def test_non_contiguous_input():
    kernel, ref, (x, b) = _linear_case([12], 30, 40, 64, False, torch.float32)
    xt = torch.randn(40, 12, device=DEVICE).t()                       # (12, 40), transposed
    for view in (xt, x[::2], torch.randn(12, 80, device=DEVICE)[:, ::2]):
        check_kernel(kernel, ref, [view, b], wrt=[0, 1], names=["y", "dx", "db"], msg="view")

def test_uses_the_kernel_and_the_weight_gets_no_gradient():
    qw, absmax, _ = _quantize((20, 33), 64, False)
    x = torch.randn(4, 33, device=DEVICE, requires_grad=True)
    y = nf4_linear(x, qw, absmax, (20, 33), 64)
    assert "NF4LinearFn" in type(y.grad_fn.next_functions[0][0]).__name__   # under the reshape to x's leading dims
    y.sum().backward(retain_graph=True); first = x.grad.clone()
    y.sum().backward()
    torch.testing.assert_close(x.grad, 2 * first)                     # the backward can run twice
    assert not qw.requires_grad and qw.grad is None

@pytest.mark.parametrize("change,err,exc", [
    (dict(x=lambda x: x[:, :32]), r"nf4_linear: x has shape \(4, 32\) but the weight is \(20, 33\)", ValueError),
    (dict(x=lambda x: x.long()), "nf4_linear: x has dtype torch.int64", TypeError),
    (dict(x=lambda x: x.to("meta")), "nf4_linear: x is on meta", ValueError),
    (dict(bias=lambda b: b[:19]), r"nf4_linear: bias has shape \(19,\); expected \(20\)", ValueError),
    (dict(bias=lambda b: b.double()), "nf4_linear: bias has dtype torch.float64", TypeError),
    (dict(packed=lambda p: p[:-1]), "nf4: packed has 329 elements; expected 330", ValueError),
    (dict(packed=lambda p: p.float()), "nf4: packed has dtype torch.float32", TypeError),
    (dict(packed=lambda p: torch.stack([p, p], 1)[:, 0]), "nf4: packed is not contiguous", ValueError),
    (dict(absmax=lambda a: a[:-1]), "nf4: absmax has 10 elements; expected 11", ValueError),
    (dict(absmax=lambda a: a.half()), "nf4: absmax has dtype torch.float16", TypeError),
    (dict(blocksize=lambda b: 32), "blocksize must be a power of two", ValueError),
    (dict(absmax=lambda a: a.to(torch.uint8)), "absmax_scale or absmax_offset is missing", ValueError),
])
def test_bad_inputs_raise_clear_errors(change, err, exc):
    qw, absmax, _ = _quantize((20, 33), 64, False)
    args = dict(x=torch.randn(4, 33, device=DEVICE), packed=qw, absmax=absmax, blocksize=64, bias=torch.randn(20, device=DEVICE))
    args.update({k: f(args[k]) for k, f in change.items()})
    with pytest.raises(exc, match=err):
        nf4_linear(args["x"], args["packed"], args["absmax"], (20, 33), args["blocksize"], args["bias"])

@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_layer_triton_backend_is_its_torch_backend(double_quant):
    "`NF4Linear(backend='triton')` calls `nf4_linear`; it agrees with the layer's own PyTorch path, gradient included."
    from peftlab.quant.qlora import NF4Linear
    lin = torch.nn.Linear(123, 37).to(DEVICE)
    layers = [NF4Linear.from_linear(lin, 64, double_quant, torch.float32, backend=b) for b in ("triton", "torch")]
    xs = [torch.randn(3, 5, 123, generator=torch.Generator().manual_seed(0)).to(DEVICE).requires_grad_() for _ in layers]
    ys = [layer(x) for layer, x in zip(layers, xs)]
    assert "NF4LinearFn" in type(ys[0].grad_fn.next_functions[0][0]).__name__
    for y in ys: y.backward(torch.ones_like(y))
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-5)
