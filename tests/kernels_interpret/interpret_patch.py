"A patched tiny-llama (kernels running) gives the unpatched model's logits, loss and gradients; with LoRA and QLoRA."
import pytest, torch
import torch.nn.functional as F
from torch import nn
from kernel_checks import DEVICE
from peftlab.core.surgery import replace_module
from peftlab.core.adapter import register_linear_type
from peftlab.quant.nf4 import quantize_nf4
from peftlab.kernels.nf4 import nf4_dequantize_ref
from transformers.models.llama import modeling_llama
from peftlab.core.models import tiny_llama
from peftlab.kernels.patch import patch, unpatch, patched, same_as_unpatched, lora_tiny_llama, KINDS

CASES = [  # name, make, kinds, expected counts
    ("float32", lambda: tiny_llama().to(DEVICE).train(), KINDS, dict(rms_norm=5, swiglu=2, loss=1, rope=1)),
    ("bfloat16", lambda: tiny_llama(dtype=torch.bfloat16).to(DEVICE).train(), KINDS, dict(rms_norm=5, swiglu=2, loss=1, rope=1)),
    ("lora", lambda: lora_tiny_llama().to(DEVICE), KINDS, dict(rms_norm=5, swiglu=2, loss=1, lora=14, rope=1)),
    ("loss only", lambda: lora_tiny_llama().to(DEVICE), ["loss"], dict(loss=1)),
]

@pytest.mark.parametrize("name,make,kinds,counts", CASES, ids=[c[0] for c in CASES])
def test_patched_model_matches_unpatched(name, make, kinds, counts):
    assert same_as_unpatched(make, kinds) == counts
    assert modeling_llama.apply_rotary_pos_emb.__module__ == "transformers.models.llama.modeling_llama"  # restored

class NF4Stub(nn.Module):
    "The smallest NF4 layer the patch recognises: packed codes, block scales, a forward that dequantises in x's dtype."
    def __init__(self, linear:nn.Linear, blocksize:int=64):
        super().__init__()
        packed, absmax = quantize_nf4(linear.weight.detach(), blocksize)
        self.register_buffer("packed", packed); self.register_buffer("absmax", absmax)
        self.blocksize, self.in_features, self.out_features, self.bias = blocksize, linear.in_features, linear.out_features, None
    def dequantize(self, dtype=torch.float32):
        return nf4_dequantize_ref(self.packed, self.absmax, (self.out_features, self.in_features), self.blocksize, dtype)
    def forward(self, x): return F.linear(x, self.dequantize(x.dtype), self.bias)

def nf4_tiny_llama(lora:bool):
    "tiny-llama with every decoder linear layer NF4-quantised (and LoRA on them, if `lora`)."
    m = tiny_llama()
    for name, mod in list(m.named_modules()):
        if isinstance(mod, nn.Linear) and ".layers." in name: replace_module(m, name, NF4Stub(mod))
    register_linear_type(NF4Stub)
    if not lora: return m.to(DEVICE).train()
    return lora_tiny_llama(base=m, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]).to(DEVICE)

@pytest.mark.parametrize("lora", [False, True])
def test_nf4_layers_and_lora_on_them(lora):
    counts = same_as_unpatched(lambda: nf4_tiny_llama(lora))
    assert counts == dict(rms_norm=5, swiglu=2, loss=1, nf4=14, rope=1, **(dict(lora=14) if lora else {}))

def test_patched_forward_calls_the_kernels(monkeypatch):
    "The functions the patch installs really reach the Triton autograd Functions (not the references)."
    seen = set()
    from peftlab.kernels import rms_norm, rope, swiglu, fused_linear_cross_entropy as flce
    for mod, fn in [(rms_norm, "RMSNormFunction"), (rope, "RoPEFunction"), (swiglu, "SwiGLUFunction"), (flce, "FusedLinearCrossEntropyFunction")]:
        cls = getattr(mod, fn)
        monkeypatch.setattr(cls, "apply", classmethod(lambda c, *a, _n=fn, _f=cls.apply: seen.add(_n) or _f(*a)))
    m = patch(tiny_llama().to(DEVICE).train())
    ids = torch.randint(0, 1000, (1, 6), device=DEVICE)
    m(ids, labels=ids).loss.backward()
    unpatch(m)
    assert seen == {"RMSNormFunction", "RoPEFunction", "SwiGLUFunction", "FusedLinearCrossEntropyFunction"}
