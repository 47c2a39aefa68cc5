"FourierFT, LN tuning and trainable tokens against PEFT: files both ways with the same logits (1e-5) for randomised configs, merging keeps the outputs, and a PEFT option peftlab does not support is refused by name with the base unchanged."
import random, re
import peft, pytest, torch
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply
from peftlab.core.io import save_adapter, load_adapter
from peftlab.core.adapter import adapters, merge, unmerge
from peftlab.core.testing import assert_close
from peft_roundtrip import perturb, inputs

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

def fourierft_case(seed):
    "(our options, PEFT config) for a random FourierFT configuration."
    rng = random.Random(seed)
    targets = rng.sample(LINEAR, rng.randint(1, 4))
    n, scaling, loc, init = rng.randint(1, 2048), rng.choice([1.0, 150.0, 300.0]), rng.randint(0, 10**6), rng.choice(["gaussian", "zeros"])
    pattern = {rng.choice(targets): rng.randint(1, 300)}
    ours = dict(targets=targets, n_frequency=n, scaling=scaling, random_loc_seed=loc, n_frequency_pattern=pattern, init=init)
    theirs = lambda: peft.FourierFTConfig(target_modules=targets, n_frequency=n, scaling=scaling, random_loc_seed=loc,
                                          n_frequency_pattern=pattern, init_weights=init == "zeros")
    return "fourierft", ours, theirs

def tokens_case(seed):
    "(our options, PEFT config) for random trainable tokens on tiny-llama's tied embedding."
    rng = random.Random(seed)
    ids = rng.sample(range(49152), rng.randint(1, 12))
    init = rng.random() < 0.7
    return "trainable-tokens", dict(token_indices=ids, init_weights=init), lambda: peft.TrainableTokensConfig(token_indices=ids, init_weights=init)

NORMS = ["input_layernorm", "post_attention_layernorm", "norm"]

def ln_case(seed):
    "(our options, PEFT config) for LN tuning on a random set of norms (a regex in one of them)."
    rng = random.Random(seed)
    targets = rng.sample(NORMS, rng.randint(1, 3)) if seed else r"model\.layers\.1\..*layernorm"
    return "ln-tuning", dict(targets=targets), lambda: peft.LNTuningConfig(target_modules=targets)

CASES = [fourierft_case(s) for s in range(4)] + [tokens_case(s) for s in range(3)] + [ln_case(s) for s in range(3)]
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]

def logits(model): return model(**inputs()).logits

@pytest.mark.parametrize("name,kw,peft_cfg", CASES, ids=IDS)
def test_peft_loads_ours(name, kw, peft_cfg, tmp_path):
    torch.manual_seed(0)
    ours = perturb(apply(tiny_llama(), name, **kw))
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert_close(logits(theirs), logits(ours))

@pytest.mark.parametrize("name,kw,peft_cfg", CASES, ids=IDS)
def test_we_load_peft(name, kw, peft_cfg, tmp_path):
    torch.manual_seed(0)
    theirs = perturb(peft.get_peft_model(tiny_llama(), peft_cfg()))
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(tiny_llama(), tmp_path)
    assert ours.peftlab_method[0] == name
    assert_close(logits(ours), logits(theirs))

@pytest.mark.parametrize("name,kw,peft_cfg", CASES, ids=IDS)
def test_merge_equals_unmerged(name, kw, peft_cfg):
    torch.manual_seed(0)
    m = perturb(apply(tiny_llama(), name, **kw))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    out = logits(m)
    merge(m); assert_close(logits(m), out, rtol=1e-4, atol=1e-4)  # float32 sums in another order
    unmerge(m)
    after = m.state_dict()
    for k, v in before.items(): assert_close(after[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert_close(logits(m), out, rtol=1e-4, atol=1e-4)

def untied(): return tiny_llama(tie_word_embeddings=False)

@pytest.mark.parametrize("targets", [["embed_tokens", "lm_head"], ["lm_head"]])
def test_trainable_tokens_untied_head_both_ways(targets, tmp_path):
    "An untied output head targeted as well trains rows of its own, as in PEFT."
    ids = [4, 77, 4000]
    theirs = perturb(peft.get_peft_model(untied(), peft.TrainableTokensConfig(token_indices=ids, target_modules=targets)))
    theirs.save_pretrained(tmp_path/"theirs")
    ours = load_adapter(untied(), tmp_path/"theirs")
    assert_close(logits(ours), logits(theirs))
    ours = perturb(apply(untied(), "trainable-tokens", token_indices=ids, targets=targets), seed=3)
    save_adapter(ours, tmp_path/"ours")
    assert_close(logits(peft.PeftModel.from_pretrained(untied(), tmp_path/"ours")), logits(ours))

UNSUPPORTED = [  # (PEFT config with an option peftlab does not support, the option as the error names it)
    (lambda: peft.FourierFTConfig(n_frequency=10, target_modules=["q_proj"], bias="all"), "bias='all'"),
    (lambda: peft.FourierFTConfig(n_frequency=10, target_modules=["q_proj"], layers_to_transform=[0]), "layers_to_transform=[0]"),
    (lambda: peft.FourierFTConfig(n_frequency=10, target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"]), "exclude_modules"),
    (lambda: peft.FourierFTConfig(n_frequency=10, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
    (lambda: peft.LNTuningConfig(target_modules=NORMS, exclude_modules=["model.norm"]), "exclude_modules=['model.norm']"),
    (lambda: peft.LNTuningConfig(target_modules=NORMS, modules_to_save=["lm_head"]), "modules_to_save"),
]

@pytest.mark.parametrize("peft_cfg,option", UNSUPPORTED, ids=[o.split("=")[0] + f"-{i}" for i, (_, o) in enumerate(UNSUPPORTED)])
def test_unsupported_peft_option_is_refused(peft_cfg, option, tmp_path):
    cfg = peft_cfg()
    peft.get_peft_model(tiny_llama(), cfg).save_pretrained(tmp_path)
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    modules = [(n, type(m)) for n, m in base.named_modules()]
    with pytest.raises(ValueError, match=re.escape(f"{cfg.peft_type.value} option {option}") + ".*" + re.escape(f"written by PEFT {peft.__version__}")):
        load_adapter(base, tmp_path)
    assert [(n, type(m)) for n, m in base.named_modules()] == modules and not hasattr(base, "peftlab_method")
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())

def test_unknown_option_from_a_newer_peft_is_refused(tmp_path):
    "An option peftlab does not know (as a later PEFT might write) is refused by name, not ignored."
    import json
    peft.get_peft_model(tiny_llama(), peft.TrainableTokensConfig(token_indices=[5])).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path/"adapter_config.json").read_text()); cfg["train_in_fp32"] = True
    (tmp_path/"adapter_config.json").write_text(json.dumps(cfg))
    base = tiny_llama()
    with pytest.raises(ValueError, match=re.escape(f"TRAINABLE_TOKENS option train_in_fp32=True (written by PEFT {peft.__version__})")):
        load_adapter(base, tmp_path)
    assert not hasattr(base, "peftlab_method") and type(base.model.embed_tokens) is torch.nn.Embedding
