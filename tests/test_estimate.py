"The memory estimate against the measured peak of a training step on CPU, its exact parts, and its command."
import pytest, torch
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply
from peftlab.core.estimate import (estimate_memory, check_estimate, tensor_bytes, frozen_bytes, optimizer_state_bytes,
                                   MemoryEstimate, _optimizer)
from peftlab.core.cli import main

# (model overrides, method, optimizer, batch, seq, checkpointing): the real vocabulary makes the loss's gradient the
# largest term; a vocabulary of 256 leaves the decoder layers' activations to dominate
CASES = [
    ({}, "lora", "adamw", 4, 128, False),
    ({}, "qlora", "adamw8bit", 2, 64, False),
    (dict(vocab_size=256), "lora", "adamw", 4, 128, False),
    (dict(vocab_size=256), "lora", "sgd", 4, 128, False),
    (dict(vocab_size=256), "qlora", "adamw", 4, 128, False),
    (dict(vocab_size=256, num_hidden_layers=4), "lora", "adamw8bit", 4, 128, False),
    (dict(vocab_size=256, num_hidden_layers=4), "lora", "adamw", 4, 128, True),
    ({}, "lora", "adamw", 2, 128, True),
]

@pytest.mark.parametrize("overrides,method,optimizer,batch,seq,checkpointing", CASES)
def test_estimate_within_15_percent_of_measured_peak(overrides, method, optimizer, batch, seq, checkpointing):
    r = check_estimate(tiny_llama(**overrides), method, optimizer, batch, seq, checkpointing, r=8)
    assert 0.85 <= r["ratio"] <= 1.15, r

@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "sgd"])
def test_weights_adapter_and_optimizer_are_exact(method, optimizer):
    est = estimate_memory(tiny_llama(), method, optimizer, batch=1, seq=8, r=8)
    model = apply(tiny_llama(), method, r=8).train()
    opt = _optimizer(optimizer, model)
    ids = torch.randint(0, 100, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward(); opt.step()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert est.weights == frozen_bytes(model)
    assert est.adapter == est.gradients == tensor_bytes([p.grad for p in trainable])
    assert est.optimizer == tensor_bytes([v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)])

def test_dtype_and_names():
    f32, bf16 = estimate_memory("tiny-llama", "lora", batch=1, seq=8), estimate_memory("tiny-llama", "lora", batch=1, seq=8, dtype="bfloat16")
    assert bf16.weights * 2 == f32.weights
    assert bf16.adapter == f32.adapter                # LoRA keeps float32 adapters on a half-precision base
    assert estimate_memory(tiny_llama(), "lora", batch=1, seq=8).as_dict() == f32.as_dict()

@pytest.mark.parametrize("kwargs,message", [
    (dict(optimizer="adam"), "choose one of"),
    (dict(batch=0), "batch and seq must be >= 1"),
    (dict(rank=4), "valid options"),
    (dict(method="nope"), "unknown method"),
])
def test_bad_input(kwargs, message):
    with pytest.raises((ValueError, TypeError, KeyError), match=message): estimate_memory("tiny-llama", **{"method": "lora", **kwargs})

def test_already_adapted_model_is_refused():
    with pytest.raises(ValueError, match="already has 'lora' applied"): estimate_memory(apply(tiny_llama(), "lora"), "lora")

def test_command(capsys):
    e = main(["estimate", "--model", "tiny-llama", "--method", "qlora", "--set", "r=4", "--optimizer", "adamw8bit",
              "--batch", "2", "--seq", "64", "--checkpointing"])
    assert isinstance(e, MemoryEstimate)
    assert e.as_dict() == estimate_memory("tiny-llama", "qlora", "adamw8bit", 2, 64, checkpointing=True, r=4).as_dict()
    out = capsys.readouterr().out
    assert "qlora on tiny-llama, adamw8bit, batch 2 x 64 tokens, gradient checkpointing" in out and "total" in out
