"Multitask prompt tuning, CPT and cartridges against PEFT: files both ways with the same logits (1e-5) for seeded random configs, PEFT's source initialisation, CPT's loss and gradients, a cartridge's start from a KV cache and composition, and PEFT options peftlab does not support refused by name with the base unchanged."
import copy, json, random, re
import peft, pytest, torch
from peftlab.core.models import tiny_llama as _tiny_llama
from peftlab.core.registry import apply
from peftlab.core.io import save_adapter, load_adapter
from peftlab.core.testing import assert_close
from peftlab.adapters.multitask_prompt_cpt import cpt_context, set_task
from peftlab.adapters.cartridge import compose_cartridges
from peft_roundtrip import perturb, inputs

_BASE = _tiny_llama(vocab_size=1000)   # the inputs' ids are below 1000: a small vocabulary keeps every forward cheap
def tiny_llama(**overrides):
    "A fresh tiny-llama: a copy of one built once (building its random weights costs more than the tests themselves)."
    return _tiny_llama(**{"vocab_size": 1000, **overrides}) if overrides else copy.deepcopy(_BASE)

def logits(model, **kw): return model(**inputs(), **kw).logits

# ---- multitask prompt tuning: (n, tasks, ranks) drawn from a seed
def mpt_config(seed):
    rng = random.Random(seed)
    return dict(num_virtual_tokens=rng.randint(1, 6), num_tasks=rng.randint(1, 4), num_ranks=rng.randint(1, 3))

def task_ids(kw, seed): return torch.randint(0, kw["num_tasks"], (2,), generator=torch.Generator().manual_seed(seed))

@pytest.mark.parametrize("seed", range(3))
def test_mpt_both_ways(seed, tmp_path):
    kw, t = mpt_config(seed), task_ids(mpt_config(seed), seed)
    torch.manual_seed(seed)
    theirs = perturb(peft.get_peft_model(tiny_llama(), peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", **kw)), seed, std=1.0).eval()
    theirs.save_pretrained(tmp_path/"theirs")
    ours = load_adapter(tiny_llama(), tmp_path/"theirs")
    assert ours.peftlab_method[0] == "multitask-prompt-tuning"
    assert_close(logits(ours, task_ids=t), logits(theirs, task_ids=t))
    mine = perturb(apply(tiny_llama(), "multitask-prompt-tuning", **kw), seed + 10, std=1.0)
    save_adapter(mine, tmp_path/"ours")
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path/"ours")
    assert_close(logits(back, task_ids=t), logits(mine, task_ids=t))
    assert (logits(mine, task_ids=t)[:, -9:] - tiny_llama()(**inputs()).logits).abs().max() > 1e-3   # the prompt changes the outputs

GENERATING = [("prompt-tuning", dict(num_virtual_tokens=3)), ("p-tuning", dict(num_virtual_tokens=3, encoder_hidden_size=8)),
              ("prefix-tuning", dict(num_virtual_tokens=3)), ("multitask-prompt-tuning", dict(num_virtual_tokens=3, num_tasks=2)),
              ("cartridge", dict(num_virtual_tokens=3))]

@pytest.mark.parametrize("method,kw", GENERATING, ids=[g[0] for g in GENERATING])
def test_generate_equals_decoding_without_a_cache(method, kw):
    "generate's scores for every new token are the forward's logits at the last position with no cache (its cache is `cache=`, not `past_key_values=`)."
    m = perturb(apply(tiny_llama(), method, **kw), 0, std=1.0)
    if method == "multitask-prompt-tuning": set_task(m, 1)
    ids = inputs()["input_ids"][1:]
    out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    for i, scores in enumerate(out.logits):
        n = ids.shape[1] + i
        assert_close(scores, m(out.sequences[:, :n], attention_mask=torch.ones_like(out.sequences[:, :n])).logits[:, -1])

@pytest.mark.parametrize("peft_init,init", [("AVERAGE_SOURCE_TASKS", "average"), ("EXACT_SOURCE_TASK", "exact"), ("ONLY_SOURCE_SHARED", "shared")])
def test_mpt_starts_from_a_source_as_peft_does(peft_init, init, tmp_path):
    "PEFT's prompt_tuning_init from a source file and ours give the same prompt for a one-task target."
    torch.manual_seed(0)
    source = perturb(apply(tiny_llama(), "multitask-prompt-tuning", num_virtual_tokens=3, num_tasks=4, num_ranks=2), 0, std=1.0)
    save_adapter(source, tmp_path)
    extra = dict(source_task=2) if init == "exact" else {}
    ours = apply(tiny_llama(), "multitask-prompt-tuning", num_virtual_tokens=3, num_ranks=2, init=init, source=str(tmp_path), **extra)
    theirs = peft.get_peft_model(tiny_llama(), peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, num_ranks=2,
             prompt_tuning_init=peft_init, prompt_tuning_init_state_dict_path=str(tmp_path/"adapter_model.safetensors"), prompt_tuning_init_task=2))
    if init == "shared":   # fresh factors on both sides: compare the shared prompt alone
        assert_close(ours.prompt_tuning.prompt_embeddings, theirs.prompt_encoder["default"].embedding.weight)
    else:
        t = torch.zeros(2, dtype=torch.long)
        assert_close(logits(ours, task_ids=t), logits(theirs, task_ids=t))

# ---- CPT: a random context of K examples, random radii and weighting
def cpt_config(seed):
    rng = random.Random(seed)
    examples = [([rng.randint(3, 999) for _ in range(rng.randint(1, 3))], [rng.randint(3, 999) for _ in range(rng.randint(1, 2))]) for _ in range(rng.randint(1, 3))]
    ctx = cpt_context(examples, input_template=[rng.randint(3, 999)] * rng.randint(0, 1), output_template=[rng.randint(3, 999)] * rng.randint(0, 2))
    return dict(**ctx, input_epsilon=rng.choice([0.5, 2.0, 8.0]), format_epsilon=rng.choice([0.5, 2.0, 8.0]),
                loss_weighting=rng.choice(["none", "decay"]), decay_factor=rng.choice([0.5, 0.9, 1.0]))

def peft_cpt(kw):
    return peft.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=kw["token_ids"], cpt_tokens_type_mask=kw["type_mask"], cpt_mask=[1] * len(kw["token_ids"]),
                          opt_projection_epsilon=kw["input_epsilon"], opt_projection_format_epsilon=kw["format_epsilon"],
                          opt_weighted_loss_type=kw["loss_weighting"], opt_loss_decay_factor=kw["decay_factor"])

def random_delta(n, d, seed): return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))

@pytest.mark.parametrize("seed", range(3))
def test_cpt_both_ways(seed, tmp_path):
    kw = cpt_config(seed)
    theirs = peft.get_peft_model(tiny_llama(), peft_cpt(kw))
    with torch.no_grad(): theirs.prompt_encoder["default"].delta_embedding.weight.copy_(random_delta(len(kw["token_ids"]), 64, seed))
    theirs.save_pretrained(tmp_path/"theirs")
    ours = load_adapter(tiny_llama(), tmp_path/"theirs")
    assert ours.peftlab_method[0] == "cpt" and ours.peftlab_method[1].type_mask == kw["type_mask"]
    assert_close(logits(ours), logits(theirs))
    mine = apply(tiny_llama(), "cpt", **kw)
    with torch.no_grad(): mine.prompt_tuning.delta.copy_(random_delta(len(kw["token_ids"]), 64, seed + 10))
    save_adapter(mine, tmp_path/"ours")
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path/"ours")
    assert_close(logits(back), logits(mine))
    assert (logits(mine)[:, -9:] - tiny_llama()(**inputs()).logits).abs().max() > 1e-3

@pytest.mark.parametrize("seed", range(3))
def test_cpt_trains_as_peft_does(seed):
    "In training: the same projected context, the same CPT loss (context labels, decay) and the same masked gradient on δ."
    kw = cpt_config(seed)
    theirs, ours = peft.get_peft_model(tiny_llama(), peft_cpt(kw)), apply(tiny_llama(), "cpt", **kw)
    delta = random_delta(len(kw["token_ids"]), 64, seed)
    with torch.no_grad(): theirs.prompt_encoder["default"].delta_embedding.weight.copy_(delta); ours.prompt_tuning.delta.copy_(delta)
    labels = inputs()["input_ids"].masked_fill(torch.arange(9) < 5, -100)
    a, b = ours(**inputs(), labels=labels), theirs(**inputs(), labels=labels.clone())
    assert_close(a.logits, b.logits)
    assert_close(a.loss, b.loss)
    a.loss.backward(); b.loss.backward()
    assert_close(ours.prompt_tuning.delta.grad, theirs.prompt_encoder["default"].delta_embedding.weight.grad, rtol=1e-4, atol=1e-7)  # float32 backward

# ---- cartridge: (n, frozen) drawn from a seed
def cartridge_config(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 6)
    return dict(num_virtual_tokens=n, num_frozen_tokens=rng.randint(0, n))

@pytest.mark.parametrize("seed", range(3))
def test_cartridge_both_ways(seed, tmp_path):
    kw = cartridge_config(seed)
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(tiny_llama(), peft.CartridgeConfig(task_type="CAUSAL_LM", **kw)).eval()
    theirs.save_pretrained(tmp_path/"theirs")
    ours = load_adapter(tiny_llama(), tmp_path/"theirs")
    assert ours.peftlab_method[0] == "cartridge" and len(ours.prefix_tuning.frozen_embedding) == kw["num_frozen_tokens"]
    assert_close(logits(ours), logits(theirs))
    mine = perturb(apply(tiny_llama(), "cartridge", **kw), seed + 10, std=1.0)
    save_adapter(mine, tmp_path/"ours")
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path/"ours")
    assert_close(logits(back), logits(mine))

def test_cartridge_starts_from_a_kv_cache_as_peft_does():
    "init_ids gives the prefix PEFT's initialize_kv_prefix_from_past_key_values loads from the base's cache of those tokens."
    from peft.tuners.cartridge.utils import initialize_kv_prefix_from_past_key_values
    ids = list(range(10, 17))
    ours = apply(tiny_llama(), "cartridge", num_virtual_tokens=4, init_ids=ids)
    theirs = peft.get_peft_model(tiny_llama(), peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad(), theirs.disable_adapter(): cache = theirs(input_ids=torch.tensor([ids]), use_cache=True).past_key_values
    initialize_kv_prefix_from_past_key_values(theirs, past_key_values=cache)
    assert_close(ours.prefix_tuning.prompt_embeddings, theirs.prompt_encoder["default"].weight)
    assert_close(logits(ours), logits(theirs))

def test_composed_cartridges_match_peft(tmp_path):
    from peft.tuners.cartridge.utils import compose_cartridge_adapters
    for i, n in enumerate((2, 3)): save_adapter(perturb(apply(tiny_llama(), "cartridge", num_virtual_tokens=n), i, std=1.0), tmp_path/f"c{i}")
    compose_cartridges([tmp_path/"c0", tmp_path/"c1"], tmp_path/"ours")
    compose_cartridge_adapters([tmp_path/"c0", tmp_path/"c1"], output_path=tmp_path/"theirs")
    assert_close(logits(load_adapter(tiny_llama(), tmp_path/"ours")), logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path/"theirs")))
    assert_close(logits(load_adapter(tiny_llama(), tmp_path/"theirs")), logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path/"ours")))

UNSUPPORTED = [  # (PEFT config, a change to its adapter_config.json, the option as the error names it)
    ("MULTITASK_PROMPT_TUNING", lambda: peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), {"num_transformer_submodules": 2}, "num_transformer_submodules=2"),
    ("MULTITASK_PROMPT_TUNING", lambda: peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), {"modules_to_save": ["lm_head"]}, "modules_to_save=['lm_head']"),
    ("CPT", lambda: peft_cpt(cpt_config(0)), {"modules_to_save": ["lm_head"]}, "modules_to_save=['lm_head']"),
    ("CPT", lambda: peft_cpt(cpt_config(0)), {"cpt_future_option": True}, "cpt_future_option=True"),
    ("CARTRIDGE", lambda: peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), {"num_transformer_submodules": 2}, "num_transformer_submodules=2"),
    ("CARTRIDGE", lambda: peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), {"modules_to_save": ["lm_head"]}, "modules_to_save=['lm_head']"),
]

@pytest.mark.parametrize("peft_type,peft_cfg,change,option", UNSUPPORTED, ids=[f"{t}-{o.split('=')[0]}" for t, _, _, o in UNSUPPORTED])
def test_unsupported_peft_option_is_refused(peft_type, peft_cfg, change, option, tmp_path):
    "An option peftlab does not support (or does not know, as a later PEFT might write) is refused by name; nothing changes."
    peft.get_peft_model(tiny_llama(), peft_cfg()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path/"adapter_config.json").read_text())
    (tmp_path/"adapter_config.json").write_text(json.dumps({**cfg, **change}))
    base = tiny_llama()
    before, modules = {k: v.clone() for k, v in base.state_dict().items()}, [(n, type(m)) for n, m in base.named_modules()]
    with pytest.raises(ValueError, match=re.escape(f"{peft_type} option {option} (written by PEFT {peft.__version__})")):
        load_adapter(base, tmp_path)
    assert [(n, type(m)) for n, m in base.named_modules()] == modules and not hasattr(base, "peftlab_method")
    assert not hasattr(base, "prompt_tuning") and not hasattr(base, "prefix_tuning") and not base._forward_pre_hooks and not base._forward_hooks
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())

@pytest.mark.parametrize("name,kw,msg", [
    ("multitask-prompt-tuning", dict(num_tasks=0), "must be >= 1"),
    ("multitask-prompt-tuning", dict(init="exact"), "give source="),
    ("multitask-prompt-tuning", dict(init="average", source="/no/such/dir"), "no source prompt at /no/such/dir"),
    ("cpt", dict(), "give token_ids="),
    ("cpt", dict(token_ids=[5, 6], type_mask=[2]), "type_mask has 1 entries"),
    ("cpt", dict(token_ids=[5, 6000]), "vocabulary has 1000 tokens"),
    ("cpt", dict(token_ids=[5], input_epsilon=0), "input_epsilon"),
    ("cartridge", dict(num_virtual_tokens=2, num_frozen_tokens=3), "freeze at most all of them"),
    ("cartridge", dict(num_virtual_tokens=4, init_ids=[5, 6]), "give at least that many"),
])
def test_config_errors(name, kw, msg):
    base = tiny_llama()
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=re.escape(msg)): apply(base, name, **kw)
    assert not hasattr(base, "prompt_tuning") and not hasattr(base, "prefix_tuning") and all(p.requires_grad for p in base.parameters())

def test_a_file_for_another_model_changes_nothing(tmp_path):
    save_adapter(apply(tiny_llama(), "multitask-prompt-tuning", num_virtual_tokens=2, num_tasks=2), tmp_path/"mpt")
    save_adapter(apply(tiny_llama(), "cpt", **cpt_config(1)), tmp_path/"cpt")
    save_adapter(apply(tiny_llama(), "cartridge", num_virtual_tokens=2), tmp_path/"cartridge")
    for d in ("mpt", "cpt", "cartridge"):
        base = tiny_llama(hidden_size=32)
        with pytest.raises(ValueError, match="this model needs"): load_adapter(base, tmp_path/d)
        assert not hasattr(base, "peftlab_method") and not hasattr(base, "prompt_tuning") and not hasattr(base, "prefix_tuning")
        assert not base._forward_hooks and not base._forward_pre_hooks
