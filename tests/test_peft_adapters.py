"Files go both ways between peftlab and PEFT for every adapter PEFT shares, with the same outputs."
import tempfile
import peft, pytest, torch
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply
from peftlab.core.io import save_adapter, load_adapter
from peftlab.core.adapter import adapters, merge, unmerge
from peftlab.core.testing import assert_close
from peft_roundtrip import perturb, inputs

# (peftlab method, its options, the equivalent PEFT config, mergeable)
CASES = [
    ("dora", dict(r=4, alpha=8, targets=["q_proj", "v_proj"]),
     lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True), True),
    ("dora", dict(r=2, alpha=4, rslora=True, targets="all-linear"),
     lambda: peft.LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules="all-linear", use_dora=True), True),
    ("ia3", dict(), lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), True),
    ("ia3", dict(targets=["q_proj", "up_proj", "down_proj"], feedforward=["up_proj"]),
     lambda: peft.IA3Config(target_modules=["q_proj", "up_proj", "down_proj"], feedforward_modules=["up_proj"]), True),
    ("prompt-tuning", dict(num_virtual_tokens=4),
     lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), False),
    ("adalora", dict(init_r=4, target_r=2, total_step=10, alpha=8, targets=["q_proj", "v_proj"]),
     lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=8, target_modules=["q_proj", "v_proj"]), True),
    ("adalora", dict(init_r=3, target_r=1, total_step=5, alpha=4, targets="all-linear"),
     lambda: peft.AdaLoraConfig(init_r=3, target_r=1, total_step=5, lora_alpha=4, target_modules="all-linear"), True),
    ("randlora", dict(r=8, alpha=64, targets=["q_proj", "v_proj", "down_proj"]),
     lambda: peft.RandLoraConfig(r=8, randlora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"]), True),
    ("randlora", dict(r=5, alpha=20, targets="all-linear", save_projection=False, projection_prng_key=3),
     lambda: peft.RandLoraConfig(r=5, randlora_alpha=20, target_modules="all-linear", save_projection=False, projection_prng_key=3), True),
    ("randlora", dict(r=16, alpha=32, targets=["k_proj", "up_proj"], very_sparse=True),
     lambda: peft.RandLoraConfig(r=16, randlora_alpha=32, target_modules=["k_proj", "up_proj"], very_sparse=True), True),
    ("bone", dict(r=16), lambda: peft.MissConfig(r=16, init_weights="bat", target_modules="all-linear"), True),
    ("bone", dict(r=8, targets=["q_proj", "v_proj"]), lambda: peft.MissConfig(r=8, init_weights="bat", target_modules=["q_proj", "v_proj"]), True),
    ("miss", dict(r=16), lambda: peft.MissConfig(r=16, target_modules="all-linear"), True),
    ("miss", dict(r=24, targets=["q_proj", "down_proj"]), lambda: peft.MissConfig(r=24, target_modules=["q_proj", "down_proj"]), True),
    ("prefix-tuning", dict(num_virtual_tokens=4),
     lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), False),
]
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]

@pytest.mark.parametrize("name,kw,peft_cfg,mergeable", CASES, ids=IDS)
def test_peft_loads_ours(name, kw, peft_cfg, mergeable):
    ours = perturb(apply(tiny_llama(), name, **kw))
    d = tempfile.mkdtemp(); save_adapter(ours, d)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), d)
    assert_close(theirs(**inputs()).logits, ours(**inputs()).logits)

@pytest.mark.parametrize("name,kw,peft_cfg,mergeable", CASES, ids=IDS)
def test_we_load_peft(name, kw, peft_cfg, mergeable):
    torch.manual_seed(0)
    theirs = perturb(peft.get_peft_model(tiny_llama(), peft_cfg()))
    d = tempfile.mkdtemp(); theirs.save_pretrained(d)
    ours = load_adapter(tiny_llama(), d)
    assert ours.peftlab_method[0] == name
    assert_close(ours(**inputs()).logits, theirs(**inputs()).logits)

@pytest.mark.parametrize("name,kw,peft_cfg,mergeable", [c for c in CASES if c[3]], ids=[i for i, c in zip(IDS, CASES) if c[3]])
def test_merge_unmerge(name, kw, peft_cfg, mergeable):
    m = perturb(apply(tiny_llama(), name, **kw))
    out = m(**inputs()).logits
    weights = {n: a.base_layer.weight.detach().clone() for n, a in adapters(m).items()}
    merge(m); assert_close(m(**inputs()).logits, out, rtol=1e-4, atol=1e-4)  # float32 sums in another order
    unmerge(m)
    for n, a in adapters(m).items(): assert_close(a.base_layer.weight, weights[n], rtol=1e-5, atol=1e-6)
    assert_close(m(**inputs()).logits, out, rtol=1e-4, atol=1e-4)

def test_prompt_tuning_cannot_merge():
    from peftlab.adapters.prompt_tuning import merge_prompt
    m = apply(tiny_llama(), "prompt-tuning", num_virtual_tokens=2)
    with pytest.raises(TypeError, match="cannot be merged"): merge_prompt(m)

def test_prefix_tuning_cannot_merge():
    "(Its generate equals decoding without a cache: tests/test_peft_mpt_cpt_cartridge.py. PEFT 0.21's generate drops the prefix under transformers 5.)"
    from peftlab.adapters.prefix_tuning import merge_prefix
    ours = perturb(apply(tiny_llama(), "prefix-tuning", num_virtual_tokens=3))
    with pytest.raises(TypeError, match="cannot be merged"): merge_prefix(ours)

@pytest.mark.parametrize("name,kw,msg", [
    ("dora", dict(r=100), "does not fit"),
    ("dora", dict(rank=4), "unknown option"),
    ("ia3", dict(targets=["k_proj"], feedforward=["down_proj"]), "must also be targets"),
    ("ia3", dict(targets=["nope"]), "no module matched"),
    ("prompt-tuning", dict(num_virtual_tokens=0), "must be >= 1"),
    ("prompt-tuning", dict(prompt_init="zeros"), "must be one of 'random', 'vocab', 'text'"),
    ("adalora", dict(target_r=2), "needs total_step"),
    ("adalora", dict(total_step=10, init_r=4, target_r=6), "target_r=6"),
    ("adalora", dict(total_step=10, tinit=6, tfinal=4), "leave no steps to prune"),
    ("adalora", dict(total_step=10, init_r=100, target_r=2), "does not fit"),
    ("randlora", dict(r=0), "must be >= 1"),
    ("randlora", dict(r=200), "choose r <= 128"),
    ("randlora", dict(sparse=True, very_sparse=True), "not both"),
    ("bone", dict(r=24), "must divide both"),
    ("bone", dict(dropout=0.1), "has no dropout"),
    ("bone", dict(mode="mini"), "must be one of 'bat', 'block'"),
    ("miss", dict(r=100), "choose 1 <= r <= 64"),
    ("prefix-tuning", dict(num_virtual_tokens=0), "must be >= 1"),
])
def test_config_errors(name, kw, msg):
    with pytest.raises((ValueError, TypeError, KeyError), match=msg): apply(tiny_llama(), name, **kw)


def test_adalora_rank_pattern_both_ways():
    "A pruned AdaLoRA saves only its kept triplets and `rank_pattern`; PEFT and peftlab load each other's files."
    from peftlab.adapters.adalora import adalora_layers, prune_to_budget, rank_pattern
    ours = perturb(apply(tiny_llama(), "adalora", init_r=4, target_r=2, total_step=10, targets=["q_proj", "v_proj"]))
    layers = adalora_layers(ours)
    scores = {n: torch.randn(4, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(layers)}
    prune_to_budget(layers, scores, budget=2 * len(layers))
    d = tempfile.mkdtemp(); save_adapter(ours, d)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), d)
    assert_close(theirs(**inputs()).logits, ours(**inputs()).logits)
    assert theirs.peft_config["default"].rank_pattern == rank_pattern(ours)
    d2 = tempfile.mkdtemp(); theirs.save_pretrained(d2)
    back = load_adapter(tiny_llama(), d2)
    assert sum(l.r for l in adalora_layers(back).values()) == 2 * len(layers)
    assert_close(back(**inputs()).logits, ours(**inputs()).logits)
