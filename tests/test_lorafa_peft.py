"LoRA-FA takes the same steps as PEFT's create_lorafa_optimizer from the same weights, gradients and hyper-parameters, to 1e-5."
import pytest, torch
import peft
import peft.optimizers.lorafa as peft_lorafa
from peft.optimizers import create_lorafa_optimizer
from peftlab.core.models import tiny_llama
from peftlab.core.io import load_adapter
from peftlab.core.train import make_optimizer
from peftlab.core.testing import assert_close
from peft_roundtrip import perturb

X = torch.randint(3, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
R, ALPHA = 4, 8

def train(model, optimizer, steps=4):
    for _ in range(steps):
        model(input_ids=X, labels=X).loss.backward()
        optimizer.step(); optimizer.zero_grad()

def factors(model)->dict:
    "LoRA's A and B by one naming for both sides: `<module>.lora_A` / `<module>.lora_B`."
    out = {}
    for n, p in model.named_parameters():
        if ".lora_" not in n: continue
        n = n.removeprefix("base_model.model.").replace(".default", "").removesuffix(".weight")
        out[n] = p.detach().clone()
    return out

def pair(tmp_path, **lora):
    "A PEFT model with random A and B (B ≠ 0, so the projection matters), and ours loaded from its files, both trainable."
    theirs = perturb(peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", **lora)))
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(tiny_llama(), tmp_path)
    for n, p in ours.named_parameters(): p.requires_grad_("lora_" in n)
    return theirs.train(), ours.train()

@pytest.mark.parametrize("lora, weight_decay", [(dict(), 0.0), (dict(), 0.1), (dict(use_rslora=True), 0.0)])
def test_same_steps_as_peft(tmp_path, monkeypatch, lora, weight_decay):
    # PEFT computes (1/s²)·dB·(AAᵀ)⁻¹ under bfloat16 autocast wherever bfloat16 is available (on a CPU too), which
    # rounds it to bfloat16; we compute it in float32, so the comparison switches PEFT's autocast off
    monkeypatch.setattr(peft_lorafa, "is_bf16_available", lambda: False)
    theirs, ours = pair(tmp_path, **lora)
    before = factors(ours)
    assert before.keys() == factors(theirs).keys() and len(before) == 2 * 14
    train(theirs, create_lorafa_optimizer(theirs, r=R, lora_alpha=ALPHA, lr=1e-3, weight_decay=weight_decay))
    train(ours, make_optimizer(ours, "lora-fa", lr=1e-3, weight_decay=weight_decay))
    after_theirs, after_ours = factors(theirs), factors(ours)
    for n in before:
        assert_close(after_ours[n], after_theirs[n], atol=1e-5, rtol=1e-5)
        if n.endswith("lora_A"): assert torch.equal(after_ours[n], before[n])       # A never moves
        else: assert (after_ours[n] - before[n]).abs().max() > 1e-4               # B does
