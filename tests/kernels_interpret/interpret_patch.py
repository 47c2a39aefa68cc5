"A patched tiny-llama (kernels running) gives the unpatched model's logits, loss and gradients; with LoRA and QLoRA."
import pytest, torch
from kernel_checks import DEVICE
from peftlab.quant.qlora import quantize_model
from transformers.models.llama import modeling_llama
from peftlab.core.models import tiny_llama
from peftlab.kernels.patching import patch, unpatch, patched, same_as_unpatched, lora_tiny_llama, KINDS

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

QLORA = dict(rms_norm=5, swiglu=2, loss=1, lora=14, nf4=14, rope=1)

def test_qlora_matches_unpatched():
    assert same_as_unpatched(lambda: lora_tiny_llama("qlora", double_quant=True).to(DEVICE)) == QLORA

def test_qlora_bfloat16_compute_matches_unpatched():
    "NF4 layers computing in bfloat16: the patched LoRA path runs its adapters in bfloat16 too (unpatched: float32)."
    make = lambda: lora_tiny_llama("qlora", compute_dtype="bfloat16").to(DEVICE)
    assert same_as_unpatched(make, rtol=2e-2, atol=2e-2) == QLORA   # bfloat16's tolerance: the adapters round there

@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_under_autocast(method):
    "Mixed precision as `fit` uses it: rope gets bfloat16 q with float32 cos, the loss casts as autocast, LoRA/NF4 step aside."
    make = lambda: lora_tiny_llama(method).to(DEVICE)
    counts = same_as_unpatched(make, autocast=torch.bfloat16, rtol=2e-2, atol=2e-2)   # bfloat16 matmuls on both sides
    assert counts["lora"] == 14

def test_nf4_layers_without_lora():
    "Quantised layers alone (no adapters): each NF4Linear goes to nf4_linear."
    make = lambda: quantize_model(tiny_llama(), blocksize=128).to(DEVICE).train()
    assert same_as_unpatched(make) == dict(rms_norm=5, swiglu=2, loss=1, nf4=14, rope=1)

def test_patched_forward_calls_the_kernels(monkeypatch):
    "The functions the patch installs really reach the Triton autograd Functions (not the references)."
    seen = set()
    from peftlab.kernels import rms_norm_kernel as rms_norm, rope_kernel as rope, swiglu_kernel as swiglu, fused_linear_cross_entropy_kernel as flce
    for mod, fn in [(rms_norm, "RMSNormFunction"), (rope, "RoPEFunction"), (swiglu, "SwiGLUFunction"), (flce, "FusedLinearCrossEntropyFunction")]:
        cls = getattr(mod, fn)
        monkeypatch.setattr(cls, "apply", classmethod(lambda c, *a, _n=fn, _f=cls.apply: seen.add(_n) or _f(*a)))
    m = patch(tiny_llama().to(DEVICE).train())
    ids = torch.randint(0, 1000, (1, 6), device=DEVICE)
    m(ids, labels=ids).loss.backward()
    unpatch(m)
    assert seen == {"RMSNormFunction", "RoPEFunction", "SwiGLUFunction", "FusedLinearCrossEntropyFunction"}
