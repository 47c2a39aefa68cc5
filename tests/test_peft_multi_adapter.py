"Several named adapters on one base: the same logits as PEFT's (1e-5), files both ways, and every method either stacks correctly or refuses."
import json, pytest, torch
import peft
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply, METHODS, discover
from peftlab.core.adapter import adapters, adapter_chain, merge, unmerge, unload
from peftlab.core.io import save_adapter, load_adapter, hotswap_adapter, adapter_state
from peftlab.core.named import (adapter_names, active_adapters, set_adapter, disabled_adapters, delete_adapter,
                                adapter_parameters, adapter_param_groups)
from peftlab.core.testing import assert_close

X = torch.randint(0, 49152, (4, 9))
ROWS = ["math", "__base__", "default", "code"]
ADAPTERS = dict(default=dict(r=4, alpha=8, targets=["q_proj", "v_proj"]),       # name -> our LoRA config
                math=dict(r=2, alpha=16, targets=["q_proj", "o_proj", "down_proj"], rslora=True),
                code=dict(r=8, alpha=8, targets="all-linear"))

def _randomise(model, seed, name=None):
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_" in n and (name is None or any(p is q for q in adapter_parameters(model)[name])):
            with torch.no_grad(): p.copy_(torch.randn(p.shape, generator=g) * 0.05)

def _ours():
    model = None
    for i, (name, cfg) in enumerate(ADAPTERS.items()):
        model = apply(model or tiny_llama(), "lora", name=name, **cfg)
        _randomise(model, i, name)
    return model.eval()

def _peft_config(cfg):
    return peft.LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], target_modules=cfg["targets"], use_rslora=cfg.get("rslora", False))

def _theirs(tmp_path, ours):
    "PEFT's model with our three adapters, each loaded from its own directory."
    for name in ADAPTERS: save_adapter(ours, tmp_path/"single"/name, name=name)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path/"single"/"default")
    for name in ["math", "code"]: theirs.load_adapter(tmp_path/"single"/name, adapter_name=name)
    return theirs.eval()

@pytest.mark.parametrize("active", [["default"], ["math"], ["code"], ["math", "code"], ["default", "math", "code"]])
def test_set_adapter_matches_peft(tmp_path, active):
    ours = _ours(); theirs = _theirs(tmp_path, ours)
    set_adapter(ours, active); theirs.base_model.set_adapter(active)
    assert active_adapters(ours) == active
    assert_close(ours(X).logits, theirs(X).logits)

def test_mixed_batch_matches_peft(tmp_path):
    ours = _ours(); theirs = _theirs(tmp_path, ours)
    assert_close(ours(X, adapter_names=ROWS).logits, theirs(X, adapter_names=ROWS).logits)
    with disabled_adapters(ours), theirs.disable_adapter(): assert_close(ours(X).logits, theirs(X).logits)
    assert_close(ours(X).logits, theirs(X).logits)   # back after the block

def test_mixed_generate_matches_peft(tmp_path):
    ours = _ours(); theirs = _theirs(tmp_path, ours)
    prompt, gen = X[:, :4], dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, adapter_names=ROWS, **gen), theirs.generate(input_ids=prompt, adapter_names=ROWS, **gen))
    assert torch.equal(ours.generate(prompt, adapter_names=ROWS, num_beams=2, **gen),
                       theirs.generate(input_ids=prompt, adapter_names=ROWS, num_beams=2, **gen))

def test_peft_multi_adapter_directory_loads(tmp_path):
    "PEFT's save_pretrained with several adapters (default in dir, the others in dir/<name>) loads as all of them."
    theirs = peft.get_peft_model(tiny_llama(), _peft_config(ADAPTERS["default"]))
    for name in ["math", "code"]: theirs.add_adapter(name, _peft_config(ADAPTERS[name]))
    g = torch.Generator().manual_seed(0)
    for n, p in theirs.named_parameters():
        if "lora_" in n:
            with torch.no_grad(): p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    theirs.eval().save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["code", "math"]
    assert adapter_names(load_adapter(tiny_llama(), tmp_path)) == ["default"]   # the directory itself, as PEFT's from_pretrained
    ours = load_adapter(tiny_llama(), tmp_path, all_adapters=True).eval()
    assert adapter_names(ours) == ["default", "code", "math"]
    assert_close(ours(X, adapter_names=ROWS).logits, theirs(X, adapter_names=ROWS).logits)

def test_ours_saved_all_loads_in_peft(tmp_path):
    ours = _ours(); save_adapter(ours, tmp_path)
    assert json.loads((tmp_path/"math"/"adapter_config.json").read_text())["use_rslora"] is True
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    for name in ["math", "code"]: theirs.load_adapter(tmp_path/name, adapter_name=name)
    assert_close(ours(X, adapter_names=ROWS).logits, theirs.eval()(X, adapter_names=ROWS).logits)

def test_regex_targets_saved_beside_other_adapters(tmp_path):
    "LoRA writes regex targets as the list of its modules: that list names only its own, whatever else the model holds."
    ours = apply(tiny_llama(), "lora", r=4, targets=[r".*layers\.1\..*q_proj", "v_proj"]); _randomise(ours, 1)
    apply(ours, "lora", name="math", **ADAPTERS["math"]); _randomise(ours, 2, "math")
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path/"adapter_config.json").read_text())["target_modules"] == [
        "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    theirs.load_adapter(tmp_path/"math", adapter_name="math")
    assert_close(theirs(X, adapter_names=ROWS[:3] + ["math"]).logits, ours.eval()(X, adapter_names=ROWS[:3] + ["math"]).logits)

def test_default_keys_unchanged_by_stacking():
    single = apply(tiny_llama(), "lora", **ADAPTERS["default"])
    ours = _ours()
    assert sorted(adapter_state(ours)) == sorted(adapter_state(single))
    assert sorted(adapter_state(ours, "code")) == sorted(adapter_state(apply(tiny_llama(), "lora", **ADAPTERS["code"])))
    own = {n for n, _ in single.named_parameters() if "lora_" in n}
    assert own <= {n for n, _ in ours.named_parameters()}

def test_merge_unmerge_delete_stay_coherent():
    ours = _ours(); before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    set_adapter(ours, ["math", "code"]); out = ours(X).logits
    merge(ours); assert_close(ours(X).logits, out, rtol=1e-4, atol=1e-4)   # merged sums are taken in another order
    with pytest.raises(ValueError, match="unmerge"): set_adapter(ours, "default")
    unmerge(ours)
    for n, p in ours.named_parameters(): assert_close(p, before[n], rtol=1e-5, atol=1e-6, msg=n)
    merge(ours, names="default"); delete_adapter(ours, "default")   # deleting a merged adapter unmerges it first
    assert adapter_names(ours) == ["math", "code"]
    set_adapter(ours, ["math", "code"]); assert_close(ours(X).logits, out)
    unload(ours); assert adapters(ours) == {} and adapter_names(ours) == []
    assert_close(ours(X).logits, tiny_llama()(X).logits)

def test_hotswap_keeps_parameters_and_compiled_graph(tmp_path):
    model = apply(tiny_llama(), "lora", **ADAPTERS["default"]).eval(); _randomise(model, 1)
    other = apply(tiny_llama(), "lora", **ADAPTERS["default"]).eval(); _randomise(other, 2)
    save_adapter(other, tmp_path)
    graphs = []
    def backend(gm, example_inputs): graphs.append(gm); return gm.forward
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        first = compiled(X).logits; n_graphs = len(graphs)
        params = [id(p) for p in model.parameters()]
        hotswap_adapter(model, tmp_path)
        second = compiled(X).logits
    assert [id(p) for p in model.parameters()] == params
    assert_close(second, other(X).logits); assert not torch.allclose(first, second)
    assert n_graphs >= 1 and len(graphs) == n_graphs   # no recompilation
    torch._dynamo.reset()

HOTSWAP_BAD = [  # config of the saved adapter, the error
    (dict(r=2, alpha=8, targets=["q_proj", "v_proj"]), "differs from adapter 'default' in \\['r'\\]"),
    (dict(r=4, alpha=16, targets=["q_proj", "v_proj"]), "differs from adapter 'default' in \\['alpha'\\]"),
    (dict(r=4, alpha=8, targets=["q_proj"]), "the saved adapter lacks"),
    (dict(r=4, alpha=8, targets=["q_proj", "v_proj", "k_proj"]), "has tensors adapter 'default' lacks"),
]

@pytest.mark.parametrize("cfg,error", HOTSWAP_BAD)
def test_hotswap_refuses_other_shapes_and_changes_nothing(tmp_path, cfg, error):
    model = apply(tiny_llama(), "lora", **ADAPTERS["default"]); _randomise(model, 1)
    before = model(X).logits
    save_adapter(apply(tiny_llama(), "lora", **cfg), tmp_path)
    with pytest.raises((ValueError, KeyError), match=error): hotswap_adapter(model, tmp_path)
    assert_close(model(X).logits, before)

def test_two_adapters_train_at_once_in_their_own_groups():
    model = apply(tiny_llama(), "lora", r=2, targets=["q_proj", "v_proj"]); apply(model, "lora", name="code", r=2, targets=["q_proj", "v_proj"])
    opt = torch.optim.AdamW(adapter_param_groups(model, 1e-2, lrs={"code": 1e-3}))
    start = {n: [p.detach().clone() for p in ps] for n, ps in adapter_parameters(model).items()}
    ids = torch.randint(0, 49152, (4, 8))
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids, adapter_names=["default", "code", "default", "code"]).loss
        loss.backward(); opt.step(); opt.zero_grad(); losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, ps in adapter_parameters(model).items(): assert all(not torch.equal(p, q) for p, q in zip(ps, start[n])), n

def test_activation_checkpointing_needs_the_rows_held_open():
    "Backward recomputes checkpointed layers after the call: a per-call adapter_names would be gone, a mixed_batch block is not."
    from peftlab.core.named import mixed_batch
    rows = ["default", "code", "__base__", "code"]
    def grads(checkpointing):
        model = apply(tiny_llama(), "lora", r=2, targets=["q_proj", "v_proj"]); apply(model, "lora", name="code", r=2, targets=["q_proj", "v_proj"])
        _randomise(model, 3); model.train()
        if checkpointing: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with mixed_batch(model, rows): model(X, labels=X).loss.backward()
        if checkpointing:
            with pytest.raises(ValueError, match="activation checkpointing"): model(X, labels=X, adapter_names=rows)
        return [p.grad for ps in adapter_parameters(model).values() for p in ps]
    for a, b in zip(grads(False), grads(True)): assert_close(a, b)

def _perturb(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    for p in adapter_parameters(model)[name]:
        with torch.no_grad(): p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)

_IDS = torch.randint(0, 49152, (2, 8))
_DATA = [dict(input_ids=_IDS, attention_mask=torch.ones_like(_IDS), labels=_IDS)]
OPTIONS = dict(adalora=dict(total_step=10), bone=dict(r=4), shira=dict(r=4), **{"trainable-tokens": dict(token_indices=[5, 7])},
               pvera=dict(r=8), unilora=dict(r=2, theta_d_length=64), tinylora=dict(u=4), peanut=dict(r=2), supertuning=dict(sparsity=0.9),
               shadow=dict(r=4), frod=dict(sparse_rate=0.05), waveft=dict(n_frequency=100), glora=dict(r=2), deft=dict(r=2), psoft=dict(r=4),
               osf=dict(effective_rank=0.75), hira=dict(r=2), lily=dict(r=4, num_B=2), adamss=dict(r=8, num_subspaces=2, subspace_rank=1),
               qalora=dict(r=2, group_size=16), bdlora=dict(r=2, nblocks=2), velora=dict(r=4, num_groups=8),
               alora=dict(r=2, invocation_tokens=[5, 6]),
               **{m: dict(init_data=_DATA) for m in ("corda", "eva", "lora-sb", "lora-ga")})

def _applies_alone(method):
    try: apply(tiny_llama(), method, **OPTIONS.get(method, {}))(X); return True
    except Exception: return False   # a method that needs more than these options or inputs (task ids): not a question of stacking

def _adapter_methods():
    discover()
    return sorted(n for n, m in METHODS.items() if m.category in ("adapter", "init", "sparse"))

def test_every_method_stacks_correctly_or_refuses(tmp_path):
    "Beside a LoRA, each method either refuses with a clear error (nothing changed) or gives exactly what it gives alone."
    stacked, refused = [], []
    for method in _adapter_methods():
        if not _applies_alone(method): continue
        model = apply(tiny_llama(), "lora", r=4, targets=["q_proj", "v_proj", "down_proj"]); _randomise(model, 0)
        names, out, n_layers = adapter_names(model), model(X).logits, len(adapters(model))
        try: apply(model, method, name="x", **OPTIONS.get(method, {}))
        except ValueError as e:
            assert "cannot add" in str(e), (method, str(e))
            assert (adapter_names(model), len(adapters(model))) == (names, n_layers), method
            assert_close(model(X).logits, out, msg=method); refused.append(method); continue
        _perturb(model, "x", 1)
        save_adapter(model, tmp_path/method, name="x")
        alone = load_adapter(tiny_llama(), tmp_path/method)   # the same adapter with nothing beside it
        set_adapter(model, "x"); assert_close(model(X).logits, alone(X).logits, msg=method)
        mixed = model(X, adapter_names=["x", "default", "__base__", "x"]).logits
        assert_close(mixed[[0, 3]], alone(X).logits[[0, 3]], msg=method)
        set_adapter(model, "default"); assert_close(mixed[1], model(X).logits[1], msg=method)
        stacked.append(method)
    assert sorted(stacked) == ["bdlora", "fourierft", "gralora", "loha", "loldu", "lora", "miss", "monteclora", "qalora", "slora",
                              "supertuning", "velora", "waveft"], stacked   # each checked above against itself alone
    assert {"adalora", "bone", "corda", "dora", "eva", "hydra", "ia3", "kasa", "lora-sb", "lora-ga", "olora", "pissa",
            "prefix-tuning", "prompt-tuning", "randlora", "ssf", "tlora", "vera", "lokr", "oft", "boft", "hra", "ln-tuning",
            "trainable-tokens", "shira", "lt-sft", "p-tuning", "adaption-prompt", "snell", "snella", "pvera", "unilora", "tinylora",
            "peanut", "shadow", "beft", "frod", "glora", "deft", "psoft", "osf", "hira", "lily", "adamss", "alora", "loftq",
            "multitask-prompt-tuning", "cartridge"} <= set(refused), refused

FIRST_REFUSES = [  # a first adapter of this method, then a LoRA beside it: the error says why
    ("dora", dict(r=2, targets=["q_proj"]), "DoraLinear computes a forward of its own"),
    ("hydra", dict(r=2, targets=["q_proj"]), "HydraLinear's update reads the weight under it"),
    ("pissa", dict(r=2, targets=["q_proj"]), "rewrote its base weight"),
    ("adalora", dict(total_step=10), "trains with callbacks"),
    ("prompt-tuning", dict(num_virtual_tokens=2), "holds no layer adapter"),
    ("p-tuning", dict(num_virtual_tokens=2), "holds no layer adapter"),
    ("adaption-prompt", dict(adapter_len=2, adapter_layers=1), "holds no layer adapter"),
    ("loftq", dict(r=2, targets=["q_proj"]), "rewrote its base weight"),
    ("alora", dict(r=2, targets=["q_proj"], invocation_tokens=[5, 6]), "ALoraLinear merges in a way of its own"),
    ("multitask-prompt-tuning", dict(num_virtual_tokens=2, num_tasks=2), "holds no layer adapter"),
    ("cpt", dict(token_ids=[5, 6, 7], type_mask=[2, 3, 4]), "holds no layer adapter"),
    ("cartridge", dict(num_virtual_tokens=2), "holds no layer adapter"),
]

@pytest.mark.parametrize("method,cfg,error", FIRST_REFUSES)
def test_adapters_that_cannot_share_refuse_a_second(method, cfg, error):
    model = apply(tiny_llama(), method, **cfg)
    with pytest.raises(ValueError, match=error): apply(model, "lora", name="math", r=2, targets=["v_proj"])
    assert adapter_names(model) == ["default"]

def test_checkpoint_folders_are_not_loaded_as_adapters(tmp_path):
    "A trainer's output directory holds checkpoint-* adapters below the final one: loading it loads the final one only."
    model = apply(tiny_llama(), "lora", **ADAPTERS["default"]); _randomise(model, 1)
    save_adapter(model, tmp_path/"out"/"checkpoint-10")
    with pytest.raises(FileNotFoundError, match=r"\['checkpoint-10'\] below .* pass all_adapters=True"): load_adapter(tiny_llama(), tmp_path/"out")
    save_adapter(model, tmp_path/"out")
    assert adapter_names(load_adapter(tiny_llama(), tmp_path/"out")) == ["default"]

def test_unknown_names_and_bad_rows_are_errors():
    ours = _ours()
    with pytest.raises(ValueError, match=r"no adapter named \['nope'\]; the model has \['default', 'math', 'code'\]"): set_adapter(ours, "nope")
    with pytest.raises(ValueError, match="no adapter named"): delete_adapter(ours, "nope")
    with pytest.raises(ValueError, match="no adapter named"): ours(X, adapter_names=["nope"] * 4)
    with pytest.raises(ValueError, match="4 rows"): ours(X, adapter_names=["math"])
    assert adapter_names(ours) == ["default", "math", "code"] and active_adapters(ours) == ["default"]
    assert all(a.rows is None for a in adapters(ours).values())
