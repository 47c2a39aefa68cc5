"C3A, RoAd and DeLoRA: PEFT's files load into peftlab and ours into PEFT with the same logits (1e-5), for several seeded random configs; merging keeps the outputs; PEFT options peftlab lacks are refused by name, with nothing changed."
import json, random
import peft, pytest, torch
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply
from peftlab.core.io import save_adapter, load_adapter
from peftlab.core.adapter import adapters, merge, unmerge
from peftlab.core.testing import assert_close
from peft_roundtrip import perturb as _perturb, inputs, assert_peft_file_refused, assert_peft_loads_ours, assert_we_load_peft

TARGETS = [["q_proj", "v_proj"], ["k_proj", "down_proj"], "all-linear", ["o_proj", "gate_proj", "up_proj"]]

def c3a_case(rng):
    init = rng.choice(["xavier_uniform", "kaiming_uniform", "gaussian", "zeros"])
    kw = dict(block_size=rng.choice([8, 16, 32]), targets=rng.choice(TARGETS), init=init,
              block_size_pattern=rng.choice([{}, {"down_proj": 32}, {"q_proj": 4}]))
    return ("c3a", kw, lambda: peft.C3AConfig(block_size=kw["block_size"], target_modules=kw["targets"], block_size_pattern=kw["block_size_pattern"],
                                              init_weights=True if init == "zeros" else init))

def road_case(rng):
    kw = dict(variant=rng.choice(["road_1", "road_2", "road_4"]), group_size=rng.choice([2, 4, 16, 32]), targets=rng.choice(TARGETS),
              init=rng.choice(["identity", "random"]))
    return ("road", kw, lambda: peft.RoadConfig(variant=kw["variant"], group_size=kw["group_size"], target_modules=kw["targets"],
                                                init_weights=kw["init"] == "identity"))

def delora_case(rng):
    kw = dict(r=rng.choice([1, 2, 4, 8]), delora_lambda=rng.choice([1.0, 3.0, 15.0]), targets=rng.choice(TARGETS),
              init=rng.choice(["zeros", "kaiming"]), dropout=rng.choice([0.0, 0.1]),
              rank_pattern=rng.choice([{}, {"v_proj": 2}, {"down_proj": 3}]), lambda_pattern=rng.choice([{}, {"q_proj": 2.0}]))
    return ("delora", kw, lambda: peft.DeloraConfig(r=kw["r"], delora_lambda=kw["delora_lambda"], target_modules=kw["targets"],
                                                    init_weights=kw["init"] == "zeros", module_dropout=kw["dropout"],
                                                    rank_pattern=kw["rank_pattern"], lambda_pattern=kw["lambda_pattern"]))

def seeded_cases(make, n, seed):
    rng = random.Random(seed)
    return [make(rng) for _ in range(n)]

CASES = seeded_cases(c3a_case, 4, seed=0) + seeded_cases(road_case, 4, seed=0) + seeded_cases(delora_case, 4, seed=0)
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]

def perturb(model, seed=0): return _perturb(model, seed).eval()   # dropout off: the outputs are comparable

@pytest.mark.parametrize("name,kw,peft_cfg", CASES, ids=IDS)
def test_peft_loads_ours(name, kw, peft_cfg, tmp_path):
    assert_peft_loads_ours(tiny_llama, name, kw, tmp_path)

@pytest.mark.parametrize("name,kw,peft_cfg", CASES, ids=IDS)
def test_we_load_peft(name, kw, peft_cfg, tmp_path):
    assert_we_load_peft(tiny_llama, name, peft_cfg(), tmp_path)

MERGE_CASES = CASES + [("delora", dict(r=4, targets="all-linear"), None)]   # the paper's residual start too

@pytest.mark.parametrize("name,kw,peft_cfg", MERGE_CASES, ids=IDS + ["delora-residual"])
def test_merge_equals_unmerged(name, kw, peft_cfg):
    m = perturb(apply(tiny_llama(), name, **kw))
    out = m(**inputs()).logits
    weights = {n: a.base_layer.weight.detach().clone() for n, a in adapters(m).items()}
    merge(m); assert_close(m(**inputs()).logits, out, rtol=1e-4, atol=1e-4)  # float32 sums in another order
    unmerge(m)
    for n, a in adapters(m).items(): assert_close(a.base_layer.weight, weights[n], rtol=1e-5, atol=1e-5)
    assert_close(m(**inputs()).logits, out, rtol=1e-4, atol=1e-4)

def test_delora_residual_roundtrips_in_peftlab_layout(tmp_path):
    "The paper's start rewrites W, which PEFT's files cannot say: peftlab's layout keeps it, with the same outputs."
    fresh = apply(tiny_llama(), "delora", r=2, targets=["q_proj", "up_proj"])
    assert_close(fresh(**inputs()).logits, tiny_llama()(**inputs()).logits, rtol=1e-4, atol=1e-4)   # starts at the base
    ours = perturb(fresh)
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path/"adapter_config.json").read_text())["peftlab_method"] == "delora"
    assert_close(load_adapter(tiny_llama(), tmp_path).eval()(**inputs()).logits, ours(**inputs()).logits)

def test_road_paper_pairing_is_group_size_2():
    "RoAd's default pairs neighbouring features (the paper's block-diagonal R); PEFT's group_size=64 is the same form, another pairing."
    m = apply(tiny_llama(), "road", init="random", targets=["q_proj"])
    R = adapters(m)["model.layers.0.self_attn.q_proj"].rotation()
    blocks = torch.block_diag(*[R[i:i + 2, i:i + 2] for i in range(0, 64, 2)])
    assert torch.equal(R, blocks)

def test_conv_targets_are_refused():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 4))
    for method, kw in (("c3a", dict(block_size=2)), ("road", {}), ("delora", dict(r=1))):
        with pytest.raises(TypeError, match=f"{method} cannot wrap 0 \\(Conv2d\\)"): apply(net, method, targets=["0"], **kw)

# (a PEFT config with an option peftlab does not support, the option's name in the error)
REFUSED = [
    (lambda: peft.C3AConfig(block_size=16, target_modules=["q_proj"], bias="c3a_only"), "bias='c3a_only'"),
    (lambda: peft.C3AConfig(block_size=16, target_modules=["q_proj"], layers_to_transform=[0]), "layers_to_transform=[0]"),
    (lambda: peft.RoadConfig(group_size=8, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save=['lm_head']"),
    (lambda: peft.DeloraConfig(r=2, target_modules="all-linear", exclude_modules=["down_proj"]), "exclude_modules=['down_proj']"),
    (lambda: peft.DeloraConfig(r=2, target_modules=["q_proj"], bias="delora_only"), "bias='delora_only'"),
]

@pytest.mark.parametrize("peft_cfg,option", REFUSED, ids=[o for _, o in REFUSED])
def test_unsupported_peft_option_is_refused(peft_cfg, option, tmp_path):
    assert_peft_file_refused(tiny_llama, peft_cfg(), option, tmp_path)
