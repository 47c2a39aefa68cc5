"LoRA+ takes the same steps as PEFT's create_loraplus_optimizer from the same weights (grouping='peft'), to 1e-5."
import pytest, torch
import peft
from peft.optimizers import create_loraplus_optimizer
from peftlab.core.models import tiny_llama
from peftlab.core.io import load_adapter
from peftlab.core.train import make_optimizer
from peftlab.core.testing import assert_close
from peft_roundtrip import perturb

X = torch.randint(3, 1000, (2, 10), generator=torch.Generator().manual_seed(0))

def train(model, optimizer, steps=3):
    for _ in range(steps):
        model(input_ids=X, labels=X).loss.backward()
        optimizer.step(); optimizer.zero_grad()
    with torch.no_grad(): return model(input_ids=X).logits

def pair(tmp_path, **lora):
    "A PEFT model with random adapter weights, and ours loaded from its files, both trainable."
    theirs = perturb(peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **lora)))
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(tiny_llama(), tmp_path)
    for n, p in ours.named_parameters(): p.requires_grad_("lora_" in n)
    return theirs.train(), ours.train()

@pytest.mark.parametrize("dora", [False, True])
def test_peft_grouping_takes_peft_steps(tmp_path, dora):
    theirs, ours = pair(tmp_path, use_dora=dora)
    opt_theirs = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.1)
    opt_ours = make_optimizer(ours, "loraplus", lr=1e-3, weight_decay=0.1, lr_ratio=16, grouping="peft")
    assert_close(train(ours, opt_ours), train(theirs, opt_theirs), atol=1e-5, rtol=1e-5)

def test_paper_grouping_departs_from_peft_only_where_vectors_train(tmp_path):
    theirs, ours = pair(tmp_path, use_dora=True)
    opt_theirs = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    after_theirs, after_ours = train(theirs, opt_theirs), train(ours, make_optimizer(ours, "loraplus", lr=1e-3, lr_ratio=16))
    assert (after_ours - after_theirs).abs().max() > 1e-4   # DoRA's magnitudes learn at η (paper), not 16η (PEFT)
