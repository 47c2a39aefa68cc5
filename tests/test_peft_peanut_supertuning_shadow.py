"PEANuT, Super-Tuning and ShadowPEFT: PEFT's files load into peftlab and ours into PEFT with the same logits (1e-5), for several seeded random configs; merging keeps the outputs; PEFT options peftlab lacks are refused by name, with nothing changed."
import copy, json, random, shutil
import peft, pytest, torch
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply
from peftlab.core.io import save_adapter, load_adapter
from peftlab.core.adapter import adapters, merge, unmerge
from peftlab.adapters.shadow import shadow_blocks
from peftlab.core.testing import assert_close
from peft_roundtrip import perturb as _perturb, inputs, assert_peft_file_refused, snapshot, assert_peft_loads_ours, assert_we_load_peft

_BASE = tiny_llama()
def base_model(): return copy.deepcopy(_BASE)   # the same seeded tiny-llama, ten times cheaper than building it again

TARGETS = [["q_proj", "v_proj"], ["k_proj", "down_proj"], "all-linear", ["o_proj", "gate_proj", "up_proj"]]

def peanut_case(rng):
    kw = dict(r=rng.choice([1, 2, 4, 8]), depth=rng.choice([0, 1, 2]), act=rng.choice(["relu", "gelu", "tanh", "silu"]),
              scaling=rng.choice([0.5, 1.0, 2.0]), init_b=rng.choice(["zeros", "kaiming"]), targets=rng.choice(TARGETS))
    return ("peanut", kw, lambda: peft.PeanutConfig(r=kw["r"], depth=kw["depth"], act_fn=kw["act"], scaling=kw["scaling"],
                                                    init_weights=kw["init_b"] == "zeros", target_modules=kw["targets"]))

def supertuning_case(rng):
    r = rng.choice([0, 0, 2, 4])
    kw = dict(sparsity=rng.choice([0.5, 0.9, 0.99]), select_top=rng.choice([True, False]), r=r, alpha=rng.choice([None, 3.0]) if r else None,
              init_values=rng.choice(["zeros", "random"]), save_indices=rng.choice([True, False]), targets=rng.choice(TARGETS))
    return ("supertuning", kw, lambda: peft.SupertuningConfig(sparsity=kw["sparsity"], select_top=kw["select_top"], r=r or None,
                                                              lora_alpha=kw["alpha"], init_weights=kw["init_values"] == "zeros",
                                                              save_precomputed_indices=kw["save_indices"], target_modules=kw["targets"]))

def shadow_case(rng):
    narrow = rng.choice([False, True])   # a narrower shadow: its own embeddings and a projection to the base's width
    kw = dict(r=rng.choice([2, 4, 8]), alpha=rng.choice([0.1, 0.5, 1.0]), init="kaiming", dropout=rng.choice([0.0, 0.2]),
              shadow_layers=rng.choice([1, 2]), shadow_hidden_size=32 if narrow else None, shadow_attention_heads=2 if narrow else None,
              shadow_intermediate_size=rng.choice([None, 16]), update_hidden_size=rng.choice([None, 4]), aux_weight=rng.choice([0.0, 0.05, 0.5]),
              targets=rng.choice([None, ["model.layers.1"], ["model.layers.0", "model.layers.1"]]))
    return ("shadow", kw, lambda: peft.ShadowConfig(task_type="CAUSAL_LM", r=kw["r"], shadow_alpha=kw["alpha"], init_weights=False,
                                                    shadow_dropout=kw["dropout"], shadow_num_hidden_layers=kw["shadow_layers"],
                                                    shadow_hidden_size=kw["shadow_hidden_size"], shadow_num_attention_heads=kw["shadow_attention_heads"],
                                                    shadow_intermediate_size=kw["shadow_intermediate_size"], update_hidden_size=kw["update_hidden_size"],
                                                    auxiliary_loss_weight=kw["aux_weight"], target_modules=kw["targets"]))

def seeded_cases(make, n, seed):
    rng = random.Random(seed)
    return [make(rng) for _ in range(n)]

CASES = seeded_cases(peanut_case, 2, seed=0) + seeded_cases(supertuning_case, 2, seed=1) + seeded_cases(shadow_case, 2, seed=0)
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]
FIRST = [CASES[0], CASES[2], CASES[4]]        # one of each method from our side too (its to_peft from our own config)
MERGING = [CASES[1], CASES[3]]

def perturb(model, seed=0): return _perturb(model, seed).eval()   # dropout off: the outputs are comparable

@pytest.mark.parametrize("name,kw,peft_cfg", FIRST, ids=[c[0] for c in FIRST])
def test_peft_loads_ours(name, kw, peft_cfg, tmp_path):
    ours, theirs = assert_peft_loads_ours(base_model, name, kw, tmp_path)
    x = inputs()
    assert_close(theirs(**x, labels=x["input_ids"]).loss, ours(**x, labels=x["input_ids"]).loss)   # ShadowPEFT's auxiliary loss included

@pytest.mark.parametrize("name,kw,peft_cfg", CASES, ids=IDS)
def test_we_load_peft(name, kw, peft_cfg, tmp_path):
    assert_we_load_peft(base_model, name, peft_cfg(), tmp_path)

@pytest.mark.parametrize("name,kw,peft_cfg", MERGING, ids=[c[0] for c in MERGING])
def test_merge_equals_unmerged(name, kw, peft_cfg):
    m = perturb(apply(base_model(), name, **kw))
    out = m(**inputs()).logits
    weights = {n: a.base_layer.weight.detach().clone() for n, a in adapters(m).items()}
    merge(m); assert_close(m(**inputs()).logits, out, rtol=1e-4, atol=1e-4)  # float32 sums in another order
    unmerge(m)
    for n, a in adapters(m).items(): assert_close(a.base_layer.weight, weights[n], rtol=1e-5, atol=1e-6)
    assert_close(m(**inputs()).logits, out, rtol=1e-4, atol=1e-4)

def test_supertuning_trains_only_its_support():
    m = apply(base_model(), "supertuning", sparsity=0.9, targets=["q_proj"])
    m(**inputs()).logits.sum().backward()
    q = m.model.layers[0].self_attn.q_proj
    assert q.supertuning_values.grad.shape == (409,) and q.base_layer.weight.grad is None
    w = q.base_layer.weight.detach().abs().flatten()
    assert w[q.supertuning_indices.long()].min() >= w.kthvalue(4096 - 409).values   # the largest |W|

def test_peanut_update_follows_the_base_weight():
    m = perturb(apply(base_model(), "peanut", r=2, targets=["q_proj"]))
    q = m.model.layers[0].self_attn.q_proj
    before = q.delta_weight().detach().clone()
    with torch.no_grad(): q.base_layer.weight.mul_(2)
    assert not torch.allclose(q.delta_weight(), before)

def _greedy_by_hand(model, x, n):
    "Greedy decoding without a cache: the argmax of a full forward on every prefix."
    ids, mask = x["input_ids"], x["attention_mask"]
    for _ in range(n):
        with torch.no_grad(): nxt = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids

def test_shadow_generates_what_the_full_forward_gives(tmp_path):
    "Our cached generation equals a full forward on every prefix, ours and PEFT's (PEFT 0.21's own generate does not: see the notebook)."
    torch.manual_seed(0)
    ours = perturb(apply(base_model(), "shadow", r=4, alpha=3.0, init="kaiming"))
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad: p.mul_(5)   # a strong shadow, so that a stale shadow cache would change the tokens
    save_adapter(ours, tmp_path); theirs = peft.PeftModel.from_pretrained(base_model(), tmp_path).eval()
    x = inputs()
    out = ours.generate(**x, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out, _greedy_by_hand(ours, x, 5)) and torch.equal(out, _greedy_by_hand(theirs, x, 5))

def test_shadow_cache_follows_beam_reorder():
    m = perturb(apply(base_model(), "shadow", init="kaiming"))
    cache = m(**inputs(), use_cache=True).cache
    keys = m.shadow_network.cache.layers[0].keys.clone()
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(m.shadow_network.cache.layers[0].keys, keys[[1, 0]])

def test_shadow_is_refused_beside_others_and_cannot_merge():
    m = apply(base_model(), "lora", r=2, targets=["q_proj"])
    with pytest.raises(ValueError, match="cannot add shadow"): apply(m, "shadow", name="x")
    from peftlab.adapters.shadow import merge_shadow
    with pytest.raises(TypeError, match="cannot be merged"): merge_shadow(apply(base_model(), "shadow"))

# (a PEFT config with an option peftlab does not support, the option's name in the error)
REFUSED = [
    (lambda: peft.PeanutConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1]), "layers_to_transform=[1]"),
    (lambda: peft.SupertuningConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save=['lm_head']"),
]
SHADOW_REFUSED = [(dict(shadow_model="shadow-llm/Qwen3-0.6B-H8B"), "shadow_model='shadow-llm/Qwen3-0.6B-H8B'"),
                  (dict(task_type="SEQ_CLS"), "task_type='SEQ_CLS'")]

@pytest.fixture(scope="module")
def shadow_file(tmp_path_factory):
    "One PEFT ShadowPEFT file with its defaults, written once."
    d = tmp_path_factory.mktemp("shadow")
    peft.get_peft_model(base_model(), peft.ShadowConfig(task_type="CAUSAL_LM")).save_pretrained(d)
    return d

@pytest.mark.parametrize("peft_cfg,option", REFUSED, ids=[o for _, o in REFUSED])
def test_unsupported_peft_option_is_refused(peft_cfg, option, tmp_path):
    assert_peft_file_refused(base_model, peft_cfg(), option, tmp_path)

@pytest.mark.parametrize("change,option", SHADOW_REFUSED, ids=[o for _, o in SHADOW_REFUSED])
def test_unsupported_shadow_option_is_refused(change, option, shadow_file, tmp_path):
    "PEFT cannot build these here (no hub, no classifier), so its file is edited to set them."
    shutil.copytree(shadow_file, tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path/"adapter_config.json").read_text()); cfg.update(change)
    (tmp_path/"adapter_config.json").write_text(json.dumps(cfg))
    base = base_model()
    state, types = snapshot(base)
    with pytest.raises(ValueError) as e: load_adapter(base, tmp_path)
    assert option in str(e.value) and f"PEFT {cfg['peft_version']}" in str(e.value), str(e.value)
    assert snapshot(base)[1] == types and not hasattr(base, "shadow_network") and not hasattr(base, "peftlab_method")

def test_shadow_file_for_another_model_leaves_the_base_bare(shadow_file):
    base = tiny_llama(intermediate_size=96)
    with pytest.raises(ValueError, match="does not fit this model"): load_adapter(base, shadow_file)
    assert not shadow_blocks(base) and not hasattr(base, "shadow_network") and not hasattr(base, "peftlab_method")
