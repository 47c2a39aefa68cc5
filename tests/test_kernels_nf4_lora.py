"""NF4 and LoRA-linear kernels (`peftlab.kernels.nf4`, `peftlab.kernels.lora_linear_kernel`): the checks that need no Triton.

The Triton kernels run on CPU only under Triton's interpreter, chosen when the kernels are defined, so they are tested
in `tests/kernels_interpret/interpret_nf4.py` and `interpret_lora_linear.py`, which `tests/test_kernels_interpret.py`
runs in a fresh Python with TRITON_INTERPRET=1 together with the other kernels' tests (to run only these:
`TRITON_INTERPRET=1 pytest tests/kernels_interpret/interpret_nf4.py tests/kernels_interpret/interpret_lora_linear.py`).
Here, in-process: the references against bitsandbytes and PEFT, the hand-written LoRA backward (whose dense path has
no Triton in it) against autograd, and the dispatch rule.
"""
import pytest, torch
from torch import nn
import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
from peftlab.core.testing import assert_close
from peftlab.kernels.nf4 import nf4_dequantize, nf4_dequantize_ref, nf4_linear, NF4Weight, as_nf4_weight
from peftlab.kernels.lora_linear_kernel import lora_linear, lora_linear_ref, LoraLinearFn

@pytest.fixture(autouse=True)
def no_compile():
    "bitsandbytes wraps its CPU fallback in torch.compile (~10 s per shape); run it eagerly."
    with torch._dynamo.config.patch(disable=True): yield

def _bnb(shape, blocksize, double_quant, seed=0):
    W = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    qw, st = bnbF.quantize_4bit(W, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    dq = dict(absmax_code=st.state2.code, absmax_scale=st.state2.absmax, absmax_offset=st.offset) if double_quant else {}
    return qw, st, dq

# every last dimension is odd: for those bitsandbytes' CPU path is its exact PyTorch reference (its AVX-512 kernel
# mis-indexes blocks that straddle rows of even length, see tests/test_bnb_nf4.py)
@pytest.mark.parametrize("shape,blocksize,double_quant", [
    ((37, 123), 64, False), ((37, 123), 64, True), ((5, 1151), 128, True), ((300, 257), 64, True), ((1, 1), 64, True),
    ((3, 5, 67), 256, True), ((4097,), 64, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_ref_is_bitsandbytes(shape, blocksize, double_quant, dtype):
    qw, st, dq = _bnb(shape, blocksize, double_quant)
    theirs = bnbF.dequantize_4bit(qw, st).to(dtype)
    assert torch.equal(nf4_dequantize_ref(qw, st.absmax, shape, blocksize, dtype, **dq), theirs)
    assert torch.equal(nf4_dequantize(qw, st.absmax, shape, blocksize, dtype, **dq), theirs)  # CPU: the reference

@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_linear_is_bitsandbytes_matmul_4bit(double_quant):
    qw, st, dq = _bnb((37, 123), 64, double_quant)
    x, b = torch.randn(2, 5, 123), torch.randn(37)
    assert_close(nf4_linear(x, qw, st.absmax, (37, 123), 64, b, **dq), bnb.matmul_4bit(x, qw.t(), quant_state=st, bias=b))

def test_lora_ref_is_peft_lora_on_bitsandbytes_linear4bit():
    "PEFT's LoRA layer over a double-quantised bitsandbytes Linear4bit computes `lora_linear_ref` of its parts."
    import peft
    torch.manual_seed(0)
    class Net(nn.Module):
        def __init__(self): super().__init__(); self.proj = nn.Linear(123, 37)
        def forward(self, x): return self.proj(x)
    net = Net()
    q = bnb.nn.Linear4bit(123, 37, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(net.proj.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True, blocksize=64)
    q.bias, net.proj = nn.Parameter(net.proj.bias.data), q.to("cpu")
    model = peft.get_peft_model(net, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=False))
    layer, st = model.base_model.model.proj, q.weight.quant_state
    w = NF4Weight(q.weight.data, st.absmax, tuple(st.shape), st.blocksize, st.state2.code, st.state2.absmax, st.offset)
    x = torch.randn(3, 7, 123)
    ours = lora_linear_ref(x, w, layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"], q.bias)
    assert_close(ours, model(x))

# the dense path of LoraLinearFn is PyTorch matmuls: its hand-written backward is checked here in float64
@pytest.mark.parametrize("M,N,K,r,bias", [(7, 37, 123, 5, True), (1, 1151, 40, 1, False), (0, 16, 9, 3, True),
                                          (64, 9, 1151, 16, True), (5, 123, 123, 123, False)])
def test_hand_written_backward_is_autograd_of_the_reference(M, N, K, r, bias):
    g = torch.Generator().manual_seed(M + N)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    x, W, A, B, b = mk(M, K), mk(N, K), mk(r, K), mk(N, r), (mk(N) if bias else None)
    ins = [t.requires_grad_() for t in (x, A, B, b) if t is not None]
    dy = mk(M, N)
    ours = LoraLinearFn.apply(x, W, A, B, 0.75, b)
    ref = lora_linear_ref(x, W, A, B, 0.75, b)
    assert_close(ours, ref, msg="y")
    for name, o, t in zip(["dx", "dA", "dB", "db"], torch.autograd.grad(ours, ins, dy), torch.autograd.grad(ref, ins, dy)):
        assert_close(o, t, msg=name)

def test_cpu_without_interpreter_takes_the_reference():
    qw, st, _ = _bnb((20, 33), 64, False)
    x = torch.randn(4, 33, requires_grad=True)
    assert "NF4LinearFn" not in str(nf4_linear(x, qw, st.absmax, (20, 33), 64).grad_fn.next_functions)
    y = lora_linear(x, NF4Weight(qw, st.absmax, (20, 33), 64), torch.randn(3, 33), torch.randn(20, 3), 1.0)
    assert "LoraLinearFn" not in str(y.grad_fn.next_functions)

def test_as_nf4_weight_reads_tuples_and_layers():
    qw, st, dq = _bnb((20, 33), 64, True)
    class Layer: packed, absmax, blocksize, out_features, in_features = qw, st.absmax, 64, 20, 33
    layer = Layer(); layer.absmax_scale, layer.absmax_offset = dq["absmax_scale"], dq["absmax_offset"]
    assert as_nf4_weight(layer).shape == (20, 33) and as_nf4_weight(layer).absmax_offset is st.offset
    assert as_nf4_weight((qw, st.absmax, (20, 33), 64)).blocksize == 64
    assert as_nf4_weight(torch.zeros(3)) is None
    x = torch.randn(2, 33)
    assert_close(lora_linear(x, layer, torch.zeros(1, 33), torch.zeros(20, 1), 1.0), bnb.matmul_4bit(x, qw.t(), quant_state=st))
