"Merging named LoRA adapters: PEFT's add_weighted_adapter and ours give the same adapter (factors, scaling, logits to 1e-5) for every combination type; where PEFT is wrong (rsLoRA, DoRA) ours gives the weighted sum."
import math, pytest, torch
import peft
from peftlab.core.models import tiny_llama
from peftlab.core.registry import apply
from peftlab.core.adapter import adapters
from peftlab.core.io import save_adapter
from peftlab.core.named import adapter_names, set_adapter
from peftlab.core.testing import assert_close
from peftlab.merge.adapters import (add_weighted_adapter, merge_delta_weights, merge_dora, delta_weights, adapter_layers,
                                    COMBINATION_TYPES)

X = torch.randint(0, 49152, (3, 9))
ADAPTERS = dict(math=dict(r=4, alpha=8, targets=["q_proj", "v_proj"]),          # name -> our LoRA config
                code=dict(r=4, alpha=16, targets=["q_proj", "v_proj", "o_proj"]),  # partly other modules
                chat=dict(r=2, alpha=4, targets=["q_proj", "down_proj"], rslora=True),
                docs=dict(r=4, alpha=4, targets=["q_proj", "k_proj", "v_proj"]))

def _randomise(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for l in adapter_layers(model, name).values():
            for p in (l.lora_A.weight, l.lora_B.weight): p.copy_(torch.randn(p.shape, generator=g) * 0.1)

def _ours(configs=ADAPTERS):
    model = None
    for i, (name, cfg) in enumerate(configs.items()):
        model = apply(model or tiny_llama(), "lora", name=name, **cfg); _randomise(model, name, i)
    return model.eval()

def _peft_twin(ours, tmp_path):
    "PEFT's model with the same adapters; its new adapters' (overwritten) random init drawn in a forked generator, as ours."
    names = adapter_names(ours)
    for n in names: save_adapter(ours, tmp_path/n, name=n)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path/names[0], adapter_name=names[0])
    for n in names[1:]: theirs.load_adapter(tmp_path/n, adapter_name=n)
    inject = theirs.base_model.inject_adapter
    def forked(*args, **kw):
        with torch.random.fork_rng(devices=[]): return inject(*args, **kw)
    theirs.base_model.inject_adapter = forked
    return theirs.eval()

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ours = _ours(); return ours, _peft_twin(ours, tmp_path_factory.mktemp("twin"))

def _same(ours, theirs, name):
    layers = adapter_layers(ours, name)
    n = 0
    for pos, module in theirs.base_model.model.named_modules():
        if hasattr(module, "lora_A") and name in module.lora_A:
            l, n = layers[pos], n + 1
            assert_close(l.lora_A.weight, module.lora_A[name].weight, msg=f"{name} {pos} A")
            assert_close(l.lora_B.weight, module.lora_B[name].weight, msg=f"{name} {pos} B")
            assert l.scaling == module.scaling[name], (pos, l.scaling, module.scaling[name])
    assert n == len(layers) > 0
    set_adapter(ours, name); theirs.set_adapter(name)
    assert_close(ours(X).logits, theirs(X).logits, msg=name)

FACTOR_TYPES = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
SVD_TYPES = ["svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]
DENSE = {"linear", "svd", "cat"}   # the types without density
CASES = []   # (combination_type, adapters, weights, options)
for ct in FACTOR_TYPES:   # equal ranks; docs adapts k_proj, which neither other does
    for ads, w in [(["math", "code"], [1.5, -0.7]), (["math", "code", "docs"], [1.0, 1.0, 0.5])]:
        for opts in ([{}] if ct in DENSE else [dict(density=0.3), dict(density=0.7, majority_sign_method="frequency")]):
            if "majority_sign_method" in opts and ct not in ("ties", "dare_ties"): opts = dict(density=0.7)
            CASES.append((ct, ads, w, opts))
for ct in SVD_TYPES + ["cat"]:   # mixed ranks (chat: 2, rsLoRA)
    for opts in ([{}] if ct in DENSE else [dict(density=0.4), dict(density=1.0, majority_sign_method="frequency")]):
        if "majority_sign_method" in opts and ct not in ("ties_svd", "dare_ties_svd"): opts = dict(density=1.0)
        CASES.append((ct, ["math", "code", "chat"], [1.0, -0.5, 2.0], opts))
CASES += [("svd", ["math", "chat"], [1.0, 1.0], dict(svd_rank=3)), ("svd", ["math", "code"], [1.0, 1.0], dict(svd_clamp=0.9)),
          ("ties_svd", ["code", "chat"], [2.0, 1.0], dict(density=0.2, svd_full_matrices=False)),
          ("svd", ["code"], [-2.0], {}), ("dare_ties", ["docs"], [0.5], {})]   # one adapter: linear, as PEFT

def test_every_combination_type_is_covered():
    assert {c for c, *_ in CASES} == set(COMBINATION_TYPES)

@pytest.mark.parametrize("i,case", list(enumerate(CASES)), ids=[f"{c[0]}-{'+'.join(c[1])}-{c[3]}" for c in CASES])
def test_add_weighted_adapter_matches_peft(pair, i, case):
    ours, theirs = pair
    ct, ads, w, opts = case
    if len(ads) == 1: opts = {}   # PEFT takes the one-adapter case as linear, density and all ignored
    name = f"merged{i}"
    torch.manual_seed(i); theirs.add_weighted_adapter(ads, w, name, combination_type=ct, **opts)
    torch.manual_seed(i); add_weighted_adapter(ours, ads, w, name, combination_type=ct, **opts)
    _same(ours, theirs, name)

@pytest.mark.parametrize("rule,ct,opts", [("task_arithmetic", "svd", {}), ("ties", "ties_svd", dict(density=0.3)),
                                          ("dare_ties", "dare_ties_svd", dict(density=0.5)),
                                          ("magnitude_prune", "magnitude_prune_svd", dict(density=0.5))])
def test_merge_delta_weights_is_peft_svd_type(pair, rule, ct, opts):
    ours, theirs = pair
    ads, w, name = ["math", "code", "chat"], [1.0, 0.5, -1.0], f"delta-{rule}"
    torch.manual_seed(7); theirs.add_weighted_adapter(ads, w, name, combination_type=ct, **opts)
    torch.manual_seed(7); merge_delta_weights(ours, ads, w, name, method=rule, **opts)
    _same(ours, theirs, name)

def test_merged_adapter_saves_and_loads_in_peft(tmp_path):
    ours = _ours()
    add_weighted_adapter(ours, ["math", "code", "chat"], [1.0, 1.0, 1.0], "all", combination_type="cat")
    save_adapter(ours, tmp_path, name="all")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    set_adapter(ours, "all"); assert_close(ours(X).logits, theirs(X).logits)
    exact = {p: sum(delta_weights(ours, n).get(p, 0) for n in ["math", "code", "chat"]) for p in delta_weights(ours, "all")}
    for p, d in delta_weights(ours, "all").items(): assert_close(d, exact[p], rtol=1e-5, atol=1e-6, msg=p)

@pytest.mark.parametrize("ct,rank", [("linear", 4), ("cat", 8), ("svd", 8)])
def test_rslora_peft_scales_by_sqrt_rank_ours_by_one(tmp_path, ct, rank):
    "PEFT copies use_rslora into the merged adapter (r = alpha = new rank): its scaling is √r, where 1 is meant (peft#3761)."
    rs = dict(r=4, alpha=8, targets=["q_proj"], rslora=True)
    ours = _ours(dict(math=rs, code=rs)); theirs = _peft_twin(ours, tmp_path)
    opts = dict(svd_rank=8) if ct == "svd" else {}
    theirs.add_weighted_adapter(["math", "code"], [1.0, 1.0], ct, combination_type=ct, **opts)
    add_weighted_adapter(ours, ["math", "code"], [1.0, 1.0], ct, combination_type=ct, **opts)
    for pos, l in adapter_layers(ours, ct).items():
        p = theirs.base_model.model.get_submodule(pos)
        assert_close(l.lora_A.weight, p.lora_A[ct].weight); assert_close(l.lora_B.weight, p.lora_B[ct].weight)   # the same factors
        assert l.scaling == 1.0 and p.scaling[ct] == rank / math.sqrt(rank)
        if ct != "linear":   # linear on the factors is not the sum (cross terms), in either
            exact = delta_weights(ours, "math")[pos] + delta_weights(ours, "code")[pos]
            assert_close(l.delta_weight(), exact, rtol=1e-5, atol=1e-6)

def _dora(seed):
    d = apply(tiny_llama(), "dora", r=4, alpha=8, targets=["q_proj"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for l in adapters(d).values():
            for p in (l.lora_A.weight, l.lora_B.weight): p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            l.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(l.out_features, generator=g))
    return d.eval()

def test_dora_refused_by_factors_merged_exactly_by_merge_dora(tmp_path):
    d1, d2 = _dora(0), _dora(1)
    with pytest.raises(ValueError, match="is DoRA: .* merge_dora"): add_weighted_adapter(d1, ["default"], [1.0], "x")
    both = merge_dora(tiny_llama(), [d1, d2], [0.7, 1.2], "both")
    for p, d in delta_weights(both).items():
        assert_close(d, 0.7 * delta_weights(d1)[p] + 1.2 * delta_weights(d2)[p], rtol=1e-5, atol=1e-6, msg=p)
    save_adapter(both, tmp_path, name="both")
    assert_close(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()(X).logits, both(X).logits)
    full = merge_delta_weights(tiny_llama(), [delta_weights(d1), delta_weights(d2)], [0.7, 1.2], "lora", rank=64)
    for p, d in delta_weights(full).items(): assert_close(d, delta_weights(both)[p], rtol=1e-4, atol=1e-6, msg=p)

ERRORS = [  # add_weighted_adapter's arguments after the model, the error
    ((["math", "code"], [1.0], "x"), {}, "1 weights for 2 adapters"),
    ((["math", "code"], [1.0, 1.0], "x", "ties"), dict(density=0.0), "must be > 0 and <= 1"),
    ((["math", "code"], [1.0, 1.0], "x", "dare_linear_svd"), dict(density=1.01), "must be > 0 and <= 1"),
    ((["math", "code"], [1.0, 1.0], "x", "magnitude_prune"), {}, "needs density="),
    ((["math", "code"], [1.0, 1.0], "x", "cat"), dict(density=0.5), "takes no density"),
    ((["math", "code"], [1.0, 1.0], "x", "dare_ties"), dict(density=0.5, majority_sign_method="sum"), "one of 'total', 'frequency'"),
    ((["math", "code"], [1.0, 1.0], "x", "dare_linear_sdv"), {}, "did you mean 'dare_linear_svd'"),
    ((["math", "chat"], [1.0, 1.0], "x", "ties"), dict(density=0.5), r"ranks \[4, 2\]"),
    ((["math", "code"], [1.0, 1.0], "code"), {}, "already has an adapter named 'code'"),
    ((["math", "cod"], [1.0, 1.0], "x"), {}, r"no adapter named \['cod'\]"),
    ((["math", "code"], [1.0, float("inf")], "x"), {}, "weights must be finite"),
]

@pytest.mark.parametrize("args,kw,error", ERRORS)
def test_bad_input_is_refused_and_changes_nothing(args, kw, error):
    ours = _ours(); before = ours(X).logits
    with pytest.raises(ValueError, match=error): add_weighted_adapter(ours, *args, **kw)
    assert adapter_names(ours) == list(ADAPTERS)
    assert_close(ours(X).logits, before)

def test_adapters_of_other_methods_are_refused():
    model = apply(tiny_llama(), "lora", r=2, targets=["q_proj"]); apply(model, "loldu", name="x", r=2, targets=["v_proj"])
    with pytest.raises(ValueError, match="'x' is a loldu adapter"): add_weighted_adapter(model, ["default", "x"], [1.0, 1.0], "y")
    merge_delta_weights(model, ["default", "x"], [1.0, 1.0], "y", rank=4)   # the whole updates merge whatever the method
    assert adapter_names(model) == ["default", "x", "y"]
