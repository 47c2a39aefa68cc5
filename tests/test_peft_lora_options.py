"PEFT's LoRA options: lora_bias round-trips both ways (1e-5) and merges as PEFT merges; files with options or variants peftlab lacks are refused by name, with nothing changed; variants without lora_bias refuse it; the fused-kernel patch keeps the bias."
import json, random, shutil
import peft, pytest, torch
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply
from peftlab.core.io import save_adapter, load_adapter
from peftlab.core.adapter import adapters, merge, unmerge
from peftlab.core.testing import assert_close
from peftlab.adapters import lora
from peft_roundtrip import perturb as _perturb, inputs

SMALL = dict(vocab_size=1024)                                    # tiny-llama with a small head: the tests run in seconds
BIASED = dict(SMALL, attention_bias=True, mlp_bias=True)        # ... and a bias on every linear layer
TARGETS = [["q_proj", "v_proj"], ["k_proj", "down_proj"], "all-linear", ["o_proj", "gate_proj", "up_proj"]]

def perturb(model, seed=0): return _perturb(model, seed).eval()   # dropout off: the outputs are comparable

def bias_case(rng):
    kw = dict(r=rng.choice([1, 2, 4, 8]), alpha=rng.choice([4, 8, 16]), targets=rng.choice(TARGETS), rslora=rng.choice([False, True]),
              dropout=rng.choice([0.0, 0.1]), rank_pattern=rng.choice([{}, {"v_proj": 2}]), lora_bias=True)
    base = rng.choice([SMALL, BIASED])
    peft_cfg = lambda: peft.LoraConfig(r=kw["r"], lora_alpha=kw["alpha"], target_modules=kw["targets"], use_rslora=kw["rslora"],
                                       lora_dropout=kw["dropout"], rank_pattern=kw["rank_pattern"], lora_bias=True)
    return kw, base, peft_cfg

rng = random.Random(0)
BIAS_CASES = [bias_case(rng) for _ in range(2)]

@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kw,base,peft_cfg", BIAS_CASES)
def test_lora_bias_both_ways(kw, base, peft_cfg, tmp_path):
    ours = perturb(apply(tiny_llama(**base), "lora", **kw))
    save_adapter(ours, tmp_path/"ours")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(**base), tmp_path/"ours").eval()
    assert_close(theirs(**inputs()).logits, ours(**inputs()).logits)
    torch.manual_seed(0)
    theirs = perturb(peft.get_peft_model(tiny_llama(**base), peft_cfg()), seed=1)
    theirs.save_pretrained(tmp_path/"theirs")
    back = load_adapter(tiny_llama(**base), tmp_path/"theirs").eval()
    assert back.peftlab_method[1].lora_bias and all(a.lora_B.bias is not None for a in adapters(back).values())
    assert_close(back(**inputs()).logits, theirs(**inputs()).logits)

@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lora_bias_merges_as_peft_merges(tmp_path):
    ours = perturb(apply(tiny_llama(**BIASED), "lora", r=4, targets="all-linear", lora_bias=True))
    out = ours(**inputs()).logits
    save_adapter(ours, tmp_path)
    merged_peft = peft.PeftModel.from_pretrained(tiny_llama(**BIASED), tmp_path).merge_and_unload()
    merge(ours, unload_adapters=True)
    assert_close(ours(**inputs()).logits, out, rtol=1e-4, atol=1e-4)      # float32 sums in another order
    for (n, p), q in zip(ours.state_dict().items(), merged_peft.state_dict().values()): assert_close(p, q, msg=n)

def test_merge_without_base_bias_is_refused_and_changes_nothing():
    m = perturb(apply(tiny_llama(**SMALL), "lora", r=2, targets=["q_proj", "down_proj"], lora_bias=True))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match="without a bias: keep the adapter unmerged"): merge(m)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items()) and not any(a.merged for a in adapters(m).values())

@pytest.mark.parametrize("method", ["dora", "diffora", "flexora", "bayesian-lora"])
def test_variants_without_lora_bias_refuse_it(method):
    base = tiny_llama(**SMALL)
    with pytest.raises(ValueError, match=f"{method} does not support lora_bias=True"): apply(base, method, r=2, targets=["q_proj"], lora_bias=True)
    assert not adapters(base)

@pytest.mark.parametrize("init", ["gaussian", "pissa"])
def test_lora_bias_needs_the_default_init(init):
    with pytest.raises(ValueError, match="lora_bias=True works with init='kaiming' only"): apply(tiny_llama(**SMALL), "lora", r=2, init=init, lora_bias=True)

def test_kernel_patch_keeps_lora_bias():
    "The fused LoRA path adds (α/r)·b outside the kernel: the same logits, loss and gradients (the bias's included)."
    from peftlab.kernels.patching import same_as_unpatched
    def make():
        torch.manual_seed(0)   # A's init: the same model every call
        return _perturb(apply(tiny_llama(**BIASED), "lora", r=4, targets=["q_proj", "up_proj"], lora_bias=True))
    assert same_as_unpatched(make, kinds=("lora",))["lora"] == 4

# PEFT files setting an option peftlab's LoRA does not support: (extra adapter_config.json entries, the option named)
REFUSED = [
    (dict(layer_replication=[[0, 2], [1, 2]]), "layer_replication=[[0, 2], [1, 2]]"),
    (dict(target_parameters=["mlp.experts.gate_up_proj"]), "target_parameters=['mlp.experts.gate_up_proj']"),
    (dict(trainable_token_indices=[1, 2]), "trainable_token_indices=[1, 2]"),
    (dict(megatron_config={"tensor_model_parallel_size": 2}), "megatron_config="),
    (dict(bias="lora_only"), "bias='lora_only'"),
    (dict(layers_to_transform=[0], layers_pattern="layers"), "layers_to_transform=[0]"),
    (dict(ensure_weight_tying=True), "ensure_weight_tying=True"),
    (dict(new_option_of_a_later_peft=1), "new_option_of_a_later_peft=1"),
]

@pytest.fixture(scope="module")
def peft_lora(tmp_path_factory):
    "One plain LoRA file saved by PEFT, for the refusal tests to copy with an option added."
    d = tmp_path_factory.mktemp("peft_lora")
    peft.get_peft_model(tiny_llama(**SMALL), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(d)
    return d

def _peft_file(tmp_path, peft_lora, **extra):
    "PEFT's file with `extra` options written into its config; returns the PEFT version it records."
    cfg = json.loads((peft_lora/"adapter_config.json").read_text())
    shutil.copy(peft_lora/"adapter_model.safetensors", tmp_path)
    (tmp_path/"adapter_config.json").write_text(json.dumps({**cfg, **extra}))
    return cfg["peft_version"]

def _refused(tmp_path, option, version):
    base = tiny_llama(**SMALL)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError) as e: load_adapter(base, tmp_path)
    assert option in str(e.value) and f"PEFT {version}" in str(e.value) and "nothing was loaded" in str(e.value), str(e.value)
    assert not adapters(base) and not hasattr(base, "peftlab_method")
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())

@pytest.mark.parametrize("extra,option", REFUSED, ids=[o for _, o in REFUSED])
def test_unsupported_lora_option_is_refused(extra, option, tmp_path, peft_lora):
    _refused(tmp_path, option, _peft_file(tmp_path, peft_lora, **extra))

def test_variant_peftlab_lacks_is_refused_not_loaded_as_lora(tmp_path, monkeypatch, peft_lora):
    monkeypatch.setitem(lora.LORA_OPTION_METHODS, "velora_config", "no-such-variant")   # as if peftlab had no VeLoRA
    version = _peft_file(tmp_path, peft_lora, velora_config={"rank": 2})
    _refused(tmp_path, "velora_config={'rank': 2}", version)

def test_every_variant_option_of_peft_is_in_the_table():
    "PEFT marks its LoRA variants' options `is_lora_variant`: each has a row in LORA_OPTION_METHODS."
    import dataclasses
    variants = {f.name for f in dataclasses.fields(peft.LoraConfig) if f.metadata.get("is_lora_variant")}
    assert variants <= set(lora.LORA_OPTION_METHODS), variants - set(lora.LORA_OPTION_METHODS)

def test_every_peft_lora_option_is_read_or_refused():
    import dataclasses
    from peftlab.core.io import PEFT_COMMON_OPTIONS
    handled = {*lora.LORA_PEFT_READ, *lora.LORA_PEFT_UNSUPPORTED, *lora.LORA_OPTION_METHODS, *PEFT_COMMON_OPTIONS}
    assert {f.name for f in dataclasses.fields(peft.LoraConfig)} <= handled

# ---- the variants' round trips: (method, our options, PEFT's LoraConfig, the inputs)
def alora_inputs():
    "peft_roundtrip's batch with the invocation (3 tokens) planted in row 0 only."
    x = inputs(); x["input_ids"][0, 4:7] = torch.tensor(INVOCATION)
    return x

INVOCATION = [17, 18, 19]

def alora_case(rng):
    kw = dict(r=rng.choice([1, 2, 4, 8]), alpha=rng.choice([4, 8, 16]), targets=rng.choice(TARGETS), rslora=rng.choice([False, True]),
              dropout=rng.choice([0.0, 0.1]), lora_bias=rng.choice([False, True]), invocation_tokens=rng.choice([INVOCATION, INVOCATION[1:]]))
    peft_cfg = lambda: peft.LoraConfig(r=kw["r"], lora_alpha=kw["alpha"], target_modules=kw["targets"], use_rslora=kw["rslora"], task_type="CAUSAL_LM",
                                       lora_dropout=kw["dropout"], lora_bias=kw["lora_bias"], alora_invocation_tokens=kw["invocation_tokens"])
    return "alora", kw, peft_cfg, alora_inputs

def qalora_case(rng):
    kw = dict(r=rng.choice([1, 2, 4, 8]), alpha=rng.choice([4, 8, 16]), targets=rng.choice(TARGETS), rslora=rng.choice([False, True]),
              dropout=rng.choice([0.0, 0.1]), group_size=rng.choice([8, 16, 32]))
    peft_cfg = lambda: peft.LoraConfig(r=kw["r"], lora_alpha=kw["alpha"], target_modules=kw["targets"], use_rslora=kw["rslora"],
                                       lora_dropout=kw["dropout"], use_qalora=True, qalora_group_size=kw["group_size"])
    return "qalora", kw, peft_cfg, inputs

def bdlora_case(rng):
    a, b = rng.choice([(["o_proj", "down_proj"], ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]), (["q_proj", "up_proj"], ["o_proj", "down_proj"])])
    kw = dict(r=rng.choice([2, 4, 8]), alpha=rng.choice([4, 8, 16]), targets=rng.choice(TARGETS), rslora=rng.choice([False, True]),
              dropout=rng.choice([0.0, 0.1]), bd_a=a, bd_b=b, nblocks=2, match_strict=False)
    bd = peft.tuners.lora.config.BdLoraConfig(target_modules_bd_a=a, target_modules_bd_b=b, nblocks=2, match_strict=False)
    peft_cfg = lambda: peft.LoraConfig(r=kw["r"], lora_alpha=kw["alpha"], target_modules=kw["targets"], use_rslora=kw["rslora"],
                                       lora_dropout=kw["dropout"], use_bdlora=bd)
    return "bdlora", kw, peft_cfg, inputs

rng = random.Random(1)
VARIANT_CASES = [make(rng) for make in (alora_case, qalora_case, bdlora_case) for _ in range(2)]
VARIANT_IDS = [f"{c[0]}-{i}" for i, c in enumerate(VARIANT_CASES)]

def with_qalora(model, cfg):
    "PEFT applies QA-LoRA to GPTQ layers only: put its own QA-LoRA variant on the plain linear layers, so PEFT's forward is the oracle."
    from peft.tuners.lora import variants, Linear
    if not cfg.use_qalora: return model
    for m in model.modules():
        if isinstance(m, Linear): variants.QALoraLinearVariant.init(m, "default", cfg); m.lora_variant["default"] = variants.QALoraLinearVariant
    return model

def peft_from_file(path):
    "PEFT's model for a saved LoRA file (through `with_qalora` for QA-LoRA)."
    cfg = peft.PeftConfig.from_pretrained(path)
    model = with_qalora(peft.get_peft_model(tiny_llama(**BIASED), cfg), cfg)
    peft.set_peft_model_state_dict(model, peft.utils.load_peft_weights(str(path)))
    return model.eval()

@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name,kw,peft_cfg,batch", VARIANT_CASES, ids=VARIANT_IDS)
def test_variant_both_ways(name, kw, peft_cfg, batch, tmp_path):
    ours = perturb(apply(tiny_llama(**BIASED), name, **kw))
    save_adapter(ours, tmp_path/"ours")
    theirs = peft_from_file(tmp_path/"ours")
    assert_close(theirs(**batch()).logits, ours(**batch()).logits)
    torch.manual_seed(0)
    theirs = perturb(with_qalora(peft.get_peft_model(tiny_llama(**BIASED), peft_cfg()), peft_cfg()), seed=1)
    theirs.save_pretrained(tmp_path/"theirs")
    back = load_adapter(tiny_llama(**BIASED), tmp_path/"theirs").eval()
    assert back.peftlab_method[0] == name
    assert_close(back(**batch()).logits, theirs(**batch()).logits)

def test_alora_generates_as_peft_does(tmp_path):
    torch.manual_seed(0)
    ours = perturb(apply(tiny_llama(**SMALL), "alora", r=4, invocation_tokens=INVOCATION, targets="all-linear"))
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(**SMALL), tmp_path).eval()
    prompt = alora_inputs()["input_ids"][:, :7]      # row 0 ends in the invocation, row 1 has none
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, **kw), theirs.generate(input_ids=prompt, **kw))

@pytest.mark.parametrize("name,kw", [("qalora", dict(r=4, group_size=16)), ("bdlora", dict(r=4, nblocks=2)), ("lora", dict(r=4, lora_bias=True))])
def test_variant_merge_equals_unmerged(name, kw):
    m = perturb(apply(tiny_llama(**BIASED), name, **kw))
    out = m(**inputs()).logits
    before = {k: v.clone() for k, v in m.state_dict().items()}
    merge(m); assert_close(m(**inputs()).logits, out, rtol=1e-4, atol=1e-4)   # float32 sums in another order
    unmerge(m)
    for k, v in m.state_dict().items(): assert_close(v, before[k], rtol=1e-5, atol=1e-5, msg=k)

# PEFT files of a variant with an option that variant does not take: refused by the variant, naming the option
VARIANT_REFUSED = [
    (dict(alora_invocation_tokens=[5, 6], use_dora=True), "use_dora=True"),
    (dict(use_qalora=True, lora_bias=True), "lora_bias=True"),
    (dict(use_bdlora={"target_modules_bd_a": ["q_proj"], "nblocks": 2}, lora_bias=True), "lora_bias=True"),
    (dict(use_qalora=True, layer_replication=[[0, 1]]), "layer_replication=[[0, 1]]"),
]

@pytest.mark.parametrize("extra,option", VARIANT_REFUSED, ids=[f"{next(iter(e))}-{o}" for e, o in VARIANT_REFUSED])
def test_variant_refuses_what_it_lacks(extra, option, tmp_path, peft_lora):
    _refused(tmp_path, option, _peft_file(tmp_path, peft_lora, **extra))
