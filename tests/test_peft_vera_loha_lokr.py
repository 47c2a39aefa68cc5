"VeRA, LoHa and LoKr: PEFT's files load into peftlab and ours into PEFT with the same logits (1e-5), for several seeded random configs; merging keeps the outputs; PEFT options peftlab lacks are refused by name, with nothing changed."
import random
import peft, pytest, torch
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply
from peftlab.core.io import save_adapter
from peftlab.core.adapter import adapters, merge, unmerge
from peftlab.core.testing import assert_close
from peft_roundtrip import perturb as _perturb, inputs, assert_peft_file_refused, assert_peft_loads_ours, assert_we_load_peft

TARGETS = [["q_proj", "v_proj"], ["k_proj", "down_proj"], "all-linear", ["o_proj", "gate_proj", "up_proj"]]

def vera_case(rng):
    kw = dict(r=rng.choice([4, 16, 64, 256]), targets=rng.choice(TARGETS), projection_prng_key=rng.randrange(100),
              save_projection=rng.random() < 0.5, d_initial=rng.choice([0.1, 0.05, 1.0]), dropout=rng.choice([0.0, 0.1]))
    return ("vera", kw, lambda: peft.VeraConfig(r=kw["r"], target_modules=kw["targets"], projection_prng_key=kw["projection_prng_key"],
                                                save_projection=kw["save_projection"], d_initial=kw["d_initial"], vera_dropout=kw["dropout"]))

def loha_case(rng):
    kw = dict(r=rng.choice([1, 2, 4, 8]), alpha=rng.choice([1.0, 4.0, 8.0, 12.0]), targets=rng.choice(TARGETS),
              rank_dropout=rng.choice([0.0, 0.2]), module_dropout=rng.choice([0.0, 0.1]), init_weights=rng.random() < 0.7)
    return ("loha", kw, lambda: peft.LoHaConfig(r=kw["r"], alpha=kw["alpha"], target_modules=kw["targets"], rank_dropout=kw["rank_dropout"],
                                                module_dropout=kw["module_dropout"], init_weights=kw["init_weights"]))

def lokr_case(rng):
    kw = dict(r=rng.choice([1, 2, 4, 8, 16]), alpha=rng.choice([1.0, 4.0, 8.0, 12.0]), targets=rng.choice(TARGETS),
              decompose_both=rng.random() < 0.5, decompose_factor=rng.choice([-1, -1, 2, 4]), rank_dropout=rng.choice([0.0, 0.2]),
              rank_dropout_scale=rng.random() < 0.5, init_weights=rng.choice([True, False, "lycoris"]))
    return ("lokr", kw, lambda: peft.LoKrConfig(r=kw["r"], alpha=kw["alpha"], target_modules=kw["targets"], decompose_both=kw["decompose_both"],
                                                decompose_factor=kw["decompose_factor"], rank_dropout=kw["rank_dropout"],
                                                rank_dropout_scale=kw["rank_dropout_scale"], init_weights=kw["init_weights"]))

def seeded_cases(make, n, seed):
    rng = random.Random(seed)
    return [make(rng) for _ in range(n)]

CASES = seeded_cases(vera_case, 4, seed=2) + seeded_cases(loha_case, 4, seed=0) + seeded_cases(lokr_case, 5, seed=0)
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

# (a PEFT config with an option peftlab does not support, the option's name in the error)
REFUSED = [
    (lambda: peft.VeraConfig(r=8, target_modules=["q_proj"], layers_to_transform=[0]), "layers_to_transform=[0]"),
    (lambda: peft.VeraConfig(r=8, target_modules=["q_proj"], bias="vera_only"), "bias='vera_only'"),
    (lambda: peft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}), "rank_pattern={'v_proj': 2}"),
    (lambda: peft.LoHaConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save=['lm_head']"),
    (lambda: peft.LoKrConfig(r=4, target_modules=["q_proj", "v_proj"], alpha_pattern={"q_proj": 2}), "alpha_pattern={'q_proj': 2}"),
    (lambda: peft.LoKrConfig(r=4, target_modules="all-linear", exclude_modules=["down_proj"]), "exclude_modules=['down_proj']"),
]

def test_lokr_scale_differs_from_peft_and_files_still_agree(tmp_path):
    "LyCORIS's scale 1 for whole factors (alpha != r): PEFT reads our file as the same update."
    ours = perturb(apply(tiny_llama(), "lokr", r=8, alpha=2, targets=["q_proj", "up_proj"]))
    assert {l.scaling for l in adapters(ours).values()} == {1.0}
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert_close(theirs(**inputs()).logits, ours(**inputs()).logits)

def test_conv_targets_are_refused():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 4))
    for method in ("vera", "loha", "lokr"):
        with pytest.raises(TypeError, match=f"{method} cannot wrap 0 \\(Conv2d\\)"): apply(net, method, targets=["0"])

@pytest.mark.parametrize("peft_cfg,option", REFUSED, ids=[o for _, o in REFUSED])
def test_unsupported_peft_option_is_refused(peft_cfg, option, tmp_path):
    assert_peft_file_refused(tiny_llama, peft_cfg(), option, tmp_path)
