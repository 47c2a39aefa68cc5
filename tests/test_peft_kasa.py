"KaSA files go both ways between peftlab and PEFT's KaSA LoRA variant, with the same outputs and regularisers (1e-5)."
import json
import pytest, torch
import peft
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply
from peftlab.core.adapter import adapters, applied_method, merge
from peftlab.core.io import save_adapter, load_adapter, read_adapter
from peftlab.core.testing import assert_close
from peftlab.adapters.kasa import kasa_penalty
from peft_roundtrip import perturb, inputs

CASES = [  # r, alpha (None: unscaled, saved as lora_alpha = r), targets
    (1, None, ["q_proj"]),
    (4, 8, ["q_proj", "v_proj"]),
    (8, 16, "all-linear"),
]
X = inputs()

def peft_kasa(r, alpha, targets, **kasa):
    "A PEFT model with KaSA on `targets` of tiny-llama."
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha or r, target_modules=targets, kasa_config=peft.KasaConfig(**kasa))
    return peft.get_peft_model(tiny_llama(), cfg).eval()

@pytest.mark.parametrize("r,alpha,targets", CASES)
def test_peftlab_to_peft_and_back(tmp_path, r, alpha, targets):
    ours = perturb(apply(tiny_llama(), "kasa", r=r, alpha=alpha, targets=targets), seed=r).eval()
    save_adapter(ours, tmp_path/"ours")
    assert not [k for k in read_adapter(tmp_path/"ours")[1] if ".base_layer." in k]   # the truncation is redone on load
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path/"ours").eval()
    assert_close(theirs(**X).logits, ours(**X).logits)
    theirs.save_pretrained(tmp_path/"theirs")
    assert_close(load_adapter(tiny_llama(), tmp_path/"theirs")(**X).logits, ours(**X).logits)

@pytest.mark.parametrize("r,alpha,targets", CASES)
def test_peft_to_peftlab(tmp_path, r, alpha, targets):
    theirs = perturb(peft_kasa(r, alpha, targets, beta=2e-3, gamma=5e-2), seed=r)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(tiny_llama(), tmp_path).eval()
    assert_close(ours(**X).logits, theirs(**X).logits)
    name, config = applied_method(ours)
    assert (name, config.r, config.beta, config.gamma) == ("kasa", r, 2e-3, 5e-2)
    assert len(adapters(ours)) == sum(n.endswith("lora_A") for n, _ in theirs.named_modules())
    assert_close(kasa_penalty(ours, config.beta, config.gamma), theirs.base_model._get_kasa_loss())   # the paper's L2 and L3 alike

def test_same_truncated_base_and_merge(tmp_path):
    theirs = perturb(peft_kasa(4, 8, "all-linear"), seed=5)
    ours = apply(tiny_llama(), "kasa", r=4, alpha=8)
    base = {n.replace("base_model.model.", ""): p for n, p in theirs.named_parameters() if "base_layer" in n}
    for n, p in ours.named_parameters():
        if "base_layer" in n: assert_close(p, base[n], msg=n)                 # W_world, weight for weight
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(tiny_llama(), tmp_path).eval()
    assert_close(merge(ours)(**X).logits, theirs.merge_and_unload()(**X).logits, rtol=1e-4, atol=1e-4)   # sums taken in another order

REFUSED = [  # PEFT option, value: KaSA here takes neither
    ("use_rslora", True),
    ("rank_pattern", {"q_proj": 2}),
]

@pytest.mark.parametrize("option,value", REFUSED)
def test_unsupported_peft_option_names_it_and_changes_nothing(tmp_path, option, value):
    peft_kasa(2, 4, ["q_proj"]).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path/"adapter_config.json").read_text()); cfg[option] = value
    (tmp_path/"adapter_config.json").write_text(json.dumps(cfg))
    base = tiny_llama(); before = {n: p.clone() for n, p in base.state_dict().items()}
    with pytest.raises(ValueError, match=rf"{option}=.*PEFT {peft.__version__}"): load_adapter(base, tmp_path)
    assert not adapters(base) and all(torch.equal(p, before[n]) for n, p in base.state_dict().items())

def test_plain_lora_files_still_load_as_lora(tmp_path):
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    assert applied_method(load_adapter(tiny_llama(), tmp_path))[0] == "lora"
