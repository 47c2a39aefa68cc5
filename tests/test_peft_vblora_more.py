"VB-LoRA and GraLoRA: PEFT's files load into peftlab and ours into PEFT with the same logits (1e-5), for several seeded random configs; merging keeps the outputs; PEFT options peftlab lacks are refused by name, with nothing changed."
import random
import peft, pytest, torch
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply
from peftlab.core.adapter import adapters, merge, unmerge
from peftlab.core.testing import assert_close
from peft_roundtrip import perturb as _perturb, inputs, assert_peft_file_refused, assert_peft_loads_ours, assert_we_load_peft

TARGETS = [["q_proj", "v_proj"], ["k_proj", "down_proj"], "all-linear", ["o_proj", "gate_proj", "up_proj"]]

def vblora_case(rng):
    n = rng.choice([4, 16, 64])
    kw = dict(r=rng.choice([1, 2, 4, 8]), num_vectors=n, vector_length=rng.choice([8, 16, 32]), topk=rng.choice([1, 2, min(4, n)]),
              targets=rng.choice(TARGETS), dropout=rng.choice([0.0, 0.1]))
    return ("vblora", kw, lambda: peft.VBLoRAConfig(r=kw["r"], num_vectors=n, vector_length=kw["vector_length"], topk=kw["topk"],
                                                    target_modules=kw["targets"], vblora_dropout=kw["dropout"]))

def gralora_case(rng):
    k = rng.choice([1, 2, 4])
    kw = dict(r=k * rng.choice([1, 2, 4]), gralora_k=k, alpha=rng.choice([1.0, 8.0, 16.0]), hybrid_r=rng.choice([0, 0, 2]),
              targets=rng.choice(TARGETS), init=rng.choice(["zeros", "kaiming"]), dropout=rng.choice([0.0, 0.1]))
    return ("gralora", kw, lambda: peft.GraloraConfig(r=kw["r"], gralora_k=k, alpha=kw["alpha"], hybrid_r=kw["hybrid_r"], target_modules=kw["targets"],
                                                      init_weights=kw["init"] == "zeros", gralora_dropout=kw["dropout"]))

def seeded_cases(make, n, seed):
    rng = random.Random(seed)
    return [make(rng) for _ in range(n)]

CASES = seeded_cases(vblora_case, 4, seed=0) + seeded_cases(gralora_case, 4, seed=0)
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]

def perturb(model, seed=0): return _perturb(model, seed).eval()   # dropout off: the outputs are comparable

@pytest.mark.parametrize("name,kw,peft_cfg", CASES, ids=IDS)
def test_peft_loads_ours(name, kw, peft_cfg, tmp_path):
    assert_peft_loads_ours(tiny_llama, name, kw, tmp_path)

@pytest.mark.parametrize("name,kw,peft_cfg", CASES, ids=IDS)
def test_we_load_peft(name, kw, peft_cfg, tmp_path):
    assert_we_load_peft(tiny_llama, name, peft_cfg(), tmp_path)

@pytest.mark.parametrize("name,kw,peft_cfg", CASES, ids=IDS)
def test_merge_equals_unmerged(name, kw, peft_cfg):
    m = perturb(apply(tiny_llama(), name, **kw))
    out = m(**inputs()).logits
    weights = {n: a.base_layer.weight.detach().clone() for n, a in adapters(m).items()}
    merge(m); assert_close(m(**inputs()).logits, out, rtol=1e-4, atol=1e-4)  # float32 sums in another order
    unmerge(m)
    for n, a in adapters(m).items(): assert_close(a.base_layer.weight, weights[n], rtol=1e-5, atol=1e-6)
    assert_close(m(**inputs()).logits, out, rtol=1e-4, atol=1e-4)

def test_bank_is_shared_and_trained_once():
    m = apply(tiny_llama(), "vblora", r=2, num_vectors=8, vector_length=16)
    banks = {id(a.vblora_vector_bank) for a in adapters(m).values()}
    assert len(banks) == 1
    m(**inputs()).logits.sum().backward()
    assert next(iter(adapters(m).values())).vblora_vector_bank.grad.abs().sum() > 0

def test_conv_targets_are_refused():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 4))
    for method, kw in (("vblora", dict(r=1, vector_length=2)), ("gralora", dict(r=2))):
        with pytest.raises(TypeError, match=f"{method} cannot wrap 0 \\(Conv2d\\)"): apply(net, method, targets=["0"], **kw)

# (a PEFT config with an option peftlab does not support, the option's name in the error)
REFUSED = [
    (lambda: peft.VBLoRAConfig(r=2, num_vectors=8, vector_length=16, target_modules=["q_proj"], layers_to_transform=[1]), "layers_to_transform=[1]"),
    (lambda: peft.VBLoRAConfig(r=2, num_vectors=8, vector_length=16, target_modules=["q_proj"], bias="vblora_only"), "bias='vblora_only'"),
    (lambda: peft.GraloraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0]), "layers_to_transform=[0]"),
    (lambda: peft.GraloraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save=['lm_head']"),
]

@pytest.mark.parametrize("peft_cfg,option", REFUSED, ids=[o for _, o in REFUSED])
def test_unsupported_peft_option_is_refused(peft_cfg, option, tmp_path):
    assert_peft_file_refused(tiny_llama, peft_cfg(), option, tmp_path)
