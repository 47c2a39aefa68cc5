"GLoRA, DEFT, PSOFT and OSF: PEFT's files load into peftlab and ours into PEFT with the same logits (1e-5), for several seeded random configs; merging keeps the outputs; PEFT options peftlab lacks are refused by name, with nothing changed."
import random
import peft, pytest, torch
from peftlab.core.models import tiny_llama as _tiny_llama
from peftlab.core.registry import apply
from peftlab.core.io import save_adapter, load_adapter
from peftlab.core.adapter import adapters, merge, unmerge
from peftlab.core.testing import assert_close
from peft_roundtrip import perturb as _perturb, inputs, assert_peft_file_refused

TARGETS = [["q_proj", "v_proj"], ["k_proj", "down_proj"], "all-linear", ["o_proj", "gate_proj", "up_proj"]]
def tiny_llama(**kw): return _tiny_llama(vocab_size=1000, **kw)   # the inputs use ids below 1000; a small head keeps the file fast

BIASED = dict(attention_bias=True, mlp_bias=True)   # GLoRA's C, D and E live on biased layers only

# Each case draws its options from a seeded rng; the options that change the layer's form cycle with the case's index,
# so every form PEFT has is covered once.
def glora_case(rng, i):
    kw = dict(r=rng.choice([1, 2, 4]), config_A_B=["lora", "vector", "constant", "none"][i], config_C=["lora", "vector", "none", "lora"][i],
              config_D_E=["vector", "constant", "none", "constant"][i], init=rng.choice(["zeros", "kaiming"]), targets=rng.choice(TARGETS))
    return ("glora", kw, BIASED if i < 3 else {},
            lambda: peft.GloraConfig(r=kw["r"], config_A_B=kw["config_A_B"], config_C=kw["config_C"], config_D_E=kw["config_D_E"],
                                     init_weights=kw["init"] == "zeros", target_modules=kw["targets"]))

def deft_case(rng, i):
    kw = dict(r=rng.choice([1, 2, 4, 8]), decomposition=["qr", "relu", "qr"][i], alpha=rng.choice([None, 4.0, 16.0]), para=i == 2,
              init=["identity", "random", "random"][i], init_scale=rng.choice([1.0, 3.0]), dropout=rng.choice([0.0, 0.1]), targets=rng.choice(TARGETS))
    return ("deft", kw, BIASED if i == 1 else {},
            lambda: peft.DeftConfig(r=kw["r"], decomposition_method=kw["decomposition"], alpha=kw["alpha"], para=kw["para"],
                                    init_weights=kw["init"] == "identity", init_scale=kw["init_scale"], deft_dropout=kw["dropout"],
                                    target_modules=kw["targets"]))

def psoft_case(rng, i):
    neumann = i == 1
    kw = dict(r=rng.choice([2, 4, 8, 16]), alpha=rng.choice([8.0, 32.0]), ab_init=["psoft", "pissa", "psoft"][i], svd=["full", "lowrank", "full"][i],
              seed=rng.choice([0, 3]), orth=i < 2, mag_a=i != 2, mag_b=rng.random() < 0.5, cayley_neumann=neumann,
              neumann_terms=rng.choice([2, 3, 5]) if neumann else 5, neumann_eps=0.5 if neumann else None,
              init=["identity", "random", "random"][i], dropout=rng.choice([0.0, 0.1]), targets=rng.choice(TARGETS))
    if kw["svd"] == "lowrank": kw["svd_niter"] = rng.choice([2, 10])
    return ("psoft", kw, {},
            lambda: peft.PsoftConfig(r=kw["r"], psoft_alpha=kw["alpha"], ab_svd_init=kw["ab_init"] + "_init", psoft_svd=kw["svd"],
                                     psoft_svd_lowrank_niter=kw.get("svd_niter", 10), random_seed=kw["seed"], psoft_orth=kw["orth"],
                                     psoft_mag_a=kw["mag_a"], psoft_mag_b=kw["mag_b"], use_cayley_neumann=kw["cayley_neumann"],
                                     num_cayley_neumann_terms=kw["neumann_terms"], cayley_neumann_eps=kw["neumann_eps"],
                                     init_weights=kw["init"] == "identity", psoft_dropout=kw["dropout"], target_modules=kw["targets"]))

def osf_case(rng, i):
    kw = dict(effective_rank=[None, 8, 0.875][i], rank_pattern=rng.choice([{}, {"k_proj": 4}, {"down_proj": 0.25}]),
              init=["svd", "random", "random"][i], targets=rng.choice(TARGETS))
    return ("osf", kw, BIASED if i == 2 else {},
            lambda: peft.OSFConfig(effective_rank=kw["effective_rank"], rank_pattern=kw["rank_pattern"] or None,
                                   init_weights=kw["init"] == "svd", target_modules=kw["targets"]))

def seeded_cases(make, n, seed):
    rng = random.Random(seed)
    return [make(rng, i) for i in range(n)]

CASES = seeded_cases(glora_case, 4, seed=0) + [c for make in (deft_case, psoft_case, osf_case) for c in seeded_cases(make, 3, seed=0)]
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]

def perturb(model, seed=0): return _perturb(model, seed).eval()   # dropout off: the outputs are comparable

@pytest.mark.parametrize("name,kw,base,peft_cfg", CASES, ids=IDS)
def test_roundtrips_and_merge(name, kw, base, peft_cfg, tmp_path):
    "Ours loads into PEFT; PEFT's loads into ours and back into PEFT; merging ours keeps its outputs and unmerging its weights."
    ours = perturb(apply(tiny_llama(**base), name, **kw))
    out = ours(**inputs()).logits
    save_adapter(ours, tmp_path/"ours")
    assert_close(peft.PeftModel.from_pretrained(tiny_llama(**base), tmp_path/"ours").eval()(**inputs()).logits, out)
    torch.manual_seed(0)
    theirs = perturb(peft.get_peft_model(tiny_llama(**base), peft_cfg()))
    theirs.save_pretrained(tmp_path/"theirs")
    loaded = load_adapter(tiny_llama(**base), tmp_path/"theirs").eval()
    assert loaded.peftlab_method[0] == name
    assert_close(loaded(**inputs()).logits, theirs(**inputs()).logits)
    save_adapter(loaded, tmp_path/"back")           # and PEFT reads our copy back: the same outputs again
    assert_close(peft.PeftModel.from_pretrained(tiny_llama(**base), tmp_path/"back").eval()(**inputs()).logits, theirs(**inputs()).logits)
    state = {k: v.clone() for k, v in ours.state_dict().items() if "base_layer" in k}
    merge(ours); assert_close(ours(**inputs()).logits, out, rtol=1e-4, atol=1e-4)  # float32 sums in another order
    unmerge(ours)
    after = ours.state_dict()
    for k, v in state.items(): assert_close(after[k], v, rtol=1e-5, atol=1e-5)

def test_deft_default_is_the_papers_orthogonal_projector():
    "DEFT's default removes exactly the span of P: (I - P P⁺) W0 is what stays of the weight."
    m = perturb(apply(tiny_llama(), "deft", r=3, targets=["q_proj"]))
    a = adapters(m)["model.layers.0.self_attn.q_proj"]
    P, W = a.deft_P.detach(), a.base_layer.weight.detach()
    keep = torch.eye(64) - P @ torch.linalg.pinv(P)
    assert_close(keep @ (W + a.delta_weight()), keep @ W, rtol=1e-4, atol=1e-5)

def test_conv_targets_are_refused():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 4))
    for method in ("glora", "deft", "psoft", "osf"):
        with pytest.raises(TypeError, match=f"{method} cannot wrap 0 \\(Conv2d\\)"): apply(net, method, targets=["0"])

# (a PEFT config with an option peftlab does not support, the option's name in the error)
REFUSED = [
    (lambda: peft.GloraConfig(r=2, target_modules=["q_proj"], bias="all"), "bias='all'"),
    (lambda: peft.GloraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save=['lm_head']"),
    (lambda: peft.DeftConfig(r=2, target_modules="all-linear", exclude_modules=["down_proj"]), "exclude_modules=['down_proj']"),
    (lambda: peft.DeftConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0]), "layers_to_transform=[0]"),
    (lambda: peft.PsoftConfig(r=4, target_modules=["q_proj"], layers_to_transform=[1]), "layers_to_transform=[1]"),
    (lambda: peft.OSFConfig(effective_rank=8, target_modules=["q_proj"], target_svd_config={"q_proj.weight": 8}), "target_svd_config={'q_proj.weight': 8}"),
]

@pytest.mark.parametrize("peft_cfg,option", REFUSED, ids=[o for _, o in REFUSED])
def test_unsupported_peft_option_is_refused(peft_cfg, option, tmp_path):
    assert_peft_file_refused(tiny_llama, peft_cfg(), option, tmp_path)
