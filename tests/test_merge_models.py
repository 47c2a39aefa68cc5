"Whole-model merging (peftlab.merge.models) and soups, WiSE-FT, BANG, LiNeS (peftlab.merge.soups): identities by construction, the greedy-soup rule, LiNeS's scales, errors."
import copy
import pytest
import torch
from torch import nn
from peftlab.core.models import tiny_llama
from peftlab.core.testing import assert_close
from peftlab.core.adapter import adapters, merge as merge_adapters
from peftlab.core.registry import apply, methods
from peftlab.merge.task_vectors import task_vector, model_weights
from dataclasses import fields
from peftlab.merge.tensors import MERGE_RULES, merge_task_vectors, merge_tensors
from peftlab.merge.models import merge_models, dense_weights
from peftlab.merge.soups import (uniform_soup, greedy_soup, wise_ft, bang, lines, lines_scales, lines_alpha, layer_of,
                                 label_smoothing_objective)

def small(seed=0, **kw): return tiny_llama(seed=seed, vocab_size=500, **kw)

@pytest.fixture(scope="module")
def models():
    return small(0), [small(s) for s in (1, 2, 3)]

def weights_of(m): return {k: v.clone() for k, v in model_weights(m).items()}

def assert_same(a, b, exact=False):
    wa, wb = model_weights(a) if isinstance(a, nn.Module) else a, model_weights(b) if isinstance(b, nn.Module) else b
    assert list(wa) == list(wb)
    for k in wa: (torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0) if exact else assert_close(wa[k], wb[k]))

@pytest.mark.parametrize("method,weights,options", [
    ("task_arithmetic", None, {}), ("task_arithmetic", [0.5, 1.0, -0.25], dict(scale=0.7)),
    ("ties", [1.0, 0.5, 0.5], dict(density=0.3)), ("magnitude_prune", None, dict(density=0.5)),
    ("dare_linear", [1.0, 1.0, 1.0], dict(density=0.5)), ("dare_ties", None, dict(density=0.4, majority_sign_method="frequency")),
    ("breadcrumbs", None, dict(density=0.5, gamma=0.05)), ("ties", None, dict(density=0.3, variant="mergekit")),
])
def test_merge_models_is_merge_task_vectors_by_hand(models, method, weights, options):
    base, ft = models
    torch.manual_seed(0); got = merge_models(base, ft, method, weights=weights, **options)
    torch.manual_seed(0); tv = merge_task_vectors([task_vector(base, f) for f in ft], weights, method, **options)
    assert_same(got, tv.apply_to(copy.deepcopy(base)), exact=True)    # the same operations, the same DARE draws

def test_base_and_models_untouched(models):
    base, ft = models
    before = [weights_of(m) for m in (base, *ft)]
    for f in (lambda: merge_models(base, ft, "ties", density=0.5), lambda: uniform_soup(ft), lambda: wise_ft(base, ft[0], 0.3),
              lambda: lines(base, ft[0], alpha=0.2), lambda: lines(base, ft, beta=0.5), lambda: greedy_soup(ft, lambda m: 0.0)):
        out = f()
        assert out is not base and all(out is not m for m in ft)
    for m, w in zip((base, *ft), before): assert_same(m, w, exact=True)

def test_uniform_soup_is_task_arithmetic_with_weights_one_over_n(models):
    base, ft = models
    soup = uniform_soup(ft)
    assert_same(soup, merge_models(base, ft, "task_arithmetic", weights=[1 / 3] * 3))
    assert_same(soup, merge_models(base, ft, "task_arithmetic", scale=1 / 3))   # λ = 1/n with weights 1
    assert_same(soup, merge_models(ft[0], ft, "task_arithmetic", weights=[1 / 3] * 3))   # any base
    assert_same(soup, {k: sum(model_weights(f)[k] for f in ft) / 3 for k in model_weights(base)})

def test_wise_ft_and_bang_interpolate(models):
    base, ft = models
    for a in (0.0, 0.25, 1.0):
        expect = {k: (1 - a) * v + a * model_weights(ft[0])[k] for k, v in model_weights(base).items()}
        assert_same(wise_ft(base, ft[0], a), expect)
        assert_same(bang(base, ft[0], a), expect)
    assert_same(wise_ft(base, ft[0], 0.4), merge_models(base, [ft[0]], weights=[0.4]))

def test_adapter_models_merge_through_delta_weight(models):
    base, ft = models
    lora = apply(copy.deepcopy(base), "lora", r=4, targets=["q_proj", "down_proj"])
    with torch.no_grad():
        for a in adapters(lora).values(): a.lora_B.weight.normal_(0, 0.05)
    folded = merge_adapters(copy.deepcopy(lora), unload_adapters=True)
    assert_same(dense_weights(lora), model_weights(folded))
    assert_same(merge_models(base, [lora, ft[1]], "ties", density=0.5), merge_models(base, [folded, ft[1]], "ties", density=0.5))
    assert_same(wise_ft(base, lora, 0.5), wise_ft(base, folded, 0.5))
    assert adapters(merge_models(base, [lora])) == {}

class Const(nn.Module):
    "A model whose one weight vector is filled with `c`."
    def __init__(self, c): super().__init__(); self.w = nn.Parameter(torch.full((4,), float(c)))

def mean_of(m): return m.w.mean().item()

# (candidate values, target mean, chosen ingredients in the order added, candidates in the order tried)
GREEDY = [
    ([0.0, 1.0, 2.5, 3.5], 2.0, [2, 1], [2, 1, 3, 0]),      # 2.5; +1.0 -> 1.75 kept; +3.5 -> 2.33 dropped; +0 -> 1.17 dropped
    ([5.0, 1.0, 3.0], 2.0, [1, 2], [1, 2, 0]),              # 1.0 (ties with 3.0 keep the given order); +3.0 -> 2.0 kept; +5 -> 3 dropped
    ([2.0, 2.0, 2.0], 2.0, [0], [0, 1, 2]),                 # equal is not better: nothing is added
    ([4.0, 0.0], 2.0, [0, 1], [0, 1]),                      # a tie on the candidates' own scores: the given order; the mean hits 2
]

@pytest.mark.parametrize("values,target,chosen,tried", GREEDY)
def test_greedy_soup_order_and_strict_improvement(values, target, chosen, tried):
    calls = []
    def score(m): calls.append(mean_of(m)); return -abs(mean_of(m) - target)
    g = greedy_soup([Const(v) for v in values], score)
    assert g.ingredients == chosen
    assert [h["candidate"] for h in g.history] == tried
    assert len(calls) == 2 * len(values) - 1                 # each candidate alone once, then each soup trial once
    assert abs(mean_of(g.model) - sum(values[i] for i in chosen) / len(chosen)) < 1e-6
    best_alone = max(-abs(v - target) for v in values)
    assert -abs(mean_of(g.model) - target) >= best_alone     # never worse than the best ingredient on the held-out score
    loss = greedy_soup([Const(v) for v in values], lambda m: abs(mean_of(m) - target), higher_is_better=False)
    assert loss.ingredients == chosen

def test_greedy_soup_running_mean():
    "The third ingredient enters with weight 1/3, as model-soups' running mean."
    score = lambda m: {1.5: 4.0, 3.0: 5.0}.get(round(mean_of(m), 6), 0.0)   # only the right running means score: 1.5, then 3
    g = greedy_soup([Const(3.0), Const(0.0), Const(6.0)], score, scores=[3.0, 2.0, 1.0])
    assert g.ingredients == [0, 1, 2] and abs(mean_of(g.model) - 3.0) < 1e-6

def test_lines_scales_equal_the_formula_per_layer(models):
    base, ft = models
    L = base.config.num_hidden_layers
    for alpha, beta in [(0.0, 1.0), (0.3, 0.5), (1.0, 0.0)]:
        out, tv = lines(base, ft[0], alpha=alpha, beta=beta), task_vector(base, ft[0])
        for k, v in model_weights(out).items():
            i = layer_of(k)
            lam = alpha if i is None else alpha + beta * i / (L - 1)     # ℓ = i + 1: α + β (ℓ-1)/(L-1)
            assert_close(v, model_weights(base)[k] + lam * tv[k])
    keys = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(12)] + ["model.embed_tokens.weight", "lm_head.weight"]
    sc = lines_scales(keys, 0.1, 0.9, 12)
    assert [round(sc[k], 10) for k in keys[:12]] == [round(0.1 + 0.9 * i / 11, 10) for i in range(12)]
    assert sc["model.embed_tokens.weight"] == sc["lm_head.weight"] == 0.1
    assert lines(base, ft[0], alpha=0.25) is not None            # beta defaults to 1 - alpha
    assert_same(lines(base, ft[0], alpha=0.25), lines(base, ft[0], alpha=0.25, beta=0.75))

def test_lines_multi_task_alpha(models):
    base, ft = models
    tvs = [task_vector(base, f) for f in ft]
    assert abs(lines_alpha(tvs, merge_task_vectors(tvs, None, "task_arithmetic")) - 1 / 3) < 1e-9
    ties = merge_task_vectors(tvs, None, "ties", density=0.3)
    summed = sum(sum(tv[k] for tv in tvs).abs().sum().item() for k in ties.keys())
    alpha = summed / sum(v.abs().sum().item() for v in ties.deltas.values()) / 3
    assert abs(lines_alpha(tvs, ties) - alpha) < 1e-6 * alpha
    out, L = lines(base, ft, beta=0.6, method="ties", density=0.3), base.config.num_hidden_layers
    for k, v in model_weights(out).items():
        i = layer_of(k); lam = alpha if i is None else alpha + 0.6 * i / (L - 1)
        assert_close(v, model_weights(base)[k] + lam * ties[k], rtol=1e-4, atol=1e-6)

def test_label_smoothing_objective_zero_is_the_model_loss():
    m = small(0)
    batch = dict(input_ids=torch.randint(0, 500, (3, 7))); batch["labels"] = batch["input_ids"].clone(); batch["labels"][0, :4] = -100
    s, n = label_smoothing_objective(0.0)(m(**batch).logits, batch["labels"], batch)
    assert n == 3 * 6 - 3 and abs(s.item() / n - m(**batch).loss.item()) < 1e-5

ERRORS = [
    (lambda b, ft: merge_models(b, []), ValueError, "no models to merge"),
    (lambda b, ft: merge_models(b, ft[0]), TypeError, "models must be a list of models"),
    (lambda b, ft: merge_models(b, [ft[0], small(1, num_hidden_layers=3)]), ValueError, "'model.layers.2.self_attn.q_proj.weight' is in model 1 but not in the base"),
    (lambda b, ft: merge_models(b, [small(1, intermediate_size=96)]), ValueError, "'model.layers.0.mlp.gate_proj.weight' has shape (128, 64) in the base but (96, 64) in model 0"),
    (lambda b, ft: merge_models(b, ft, weights=[1.0]), ValueError, "weights has 1 entries for 3 models"),
    (lambda b, ft: merge_models(b, ft, "tie", density=0.5), ValueError, "did you mean 'ties'"),
    (lambda b, ft: merge_models(model_weights(b), ft), TypeError, "the base is a dict"),
    (lambda b, ft: uniform_soup([]), ValueError, "no models to merge"),
    (lambda b, ft: uniform_soup([ft[0], small(1, intermediate_size=96)]), ValueError, "in model 0 but (96, 64) in model 1"),
    (lambda b, ft: greedy_soup(ft, lambda m: 0.0, scores=[1.0]), ValueError, "scores has 1 entries for 3 candidates"),
    (lambda b, ft: greedy_soup(ft, lambda m: float("nan")), ValueError, "is nan"),
    (lambda b, ft: wise_ft(b, ft[0], -0.1), ValueError, "must be >= 0 and <= 1"),
    (lambda b, ft: wise_ft(b, small(1, num_hidden_layers=3)), ValueError, "give the pretrained model the same head"),
    (lambda b, ft: lines(b, ft[0]), ValueError, "needs alpha="),
    (lambda b, ft: lines(b, ft), ValueError, "needs beta="),
    (lambda b, ft: lines(b, ft, beta=0.5, weights=[1.0, 2.0]), ValueError, "weights has 2 entries for 3 models"),
    (lambda b, ft: lines(small(0, num_hidden_layers=1), small(1, num_hidden_layers=1), alpha=0.5), ValueError, "needs at least 2 layers"),
    (lambda b, ft: label_smoothing_objective(1.0), ValueError, "must be >= 0 and < 1"),
]

@pytest.mark.parametrize("call,error,message", ERRORS, ids=[m for *_, m in ERRORS])
def test_errors(models, call, error, message):
    with pytest.raises(error, match=None) as e: call(*models)
    assert message in str(e.value), str(e.value)

def test_non_float_parameters_refused_and_integer_buffers_from_base(models):
    base, ft = models
    q = copy.deepcopy(ft[0]); q.model.norm.weight = nn.Parameter(torch.ones(64, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="parameter 'model.norm.weight' of model 0 is torch.int8"): merge_models(base, [q])
    with pytest.raises(TypeError, match="of the base is torch.int8"): merge_models(q, ft)
    b2, t2 = copy.deepcopy(base), copy.deepcopy(ft[0])
    b2.model.register_buffer("steps", torch.tensor(7)); t2.model.register_buffer("steps", torch.tensor(99))
    assert merge_models(b2, [t2]).model.steps.item() == 7 and uniform_soup([b2, t2]).model.steps.item() == 7

def test_registered_with_papers():
    table = methods("merge").set_index("name")
    for name, words in [("uniform-soup", "Model soups"), ("greedy-soup", "Model soups"), ("wise-ft", "Robust fine-tuning"),
                        ("bang", "Spurious Feature Diversification"), ("lines", "LiNeS")]:
        assert words in table.loc[name, "paper"]

# the rules of one model, and the rules of the models' own weights: merge_models is merge_tensors(..., base=) key by key
@pytest.mark.parametrize("method,n,options", [("arcee_fusion", 1, {}), ("nearswap", 1, dict(t=0.05)), ("model_stock", 3, {}),
                                              ("model_stock", 2, dict(filter_wise=True))])
def test_merge_models_is_merge_tensors_with_base(models, method, n, options):
    base, ft = models
    got = model_weights(merge_models(base, ft[:n], method, **options))
    for k, v in model_weights(base).items():
        assert_close(got[k], merge_tensors([model_weights(f)[k] for f in ft[:n]], None, method, base=v, **options))

def test_passthrough_and_slerp_of_one_model_use_its_weights(models):
    base, ft = models
    half, sl = model_weights(merge_models(base, [ft[0]], "passthrough", scale=0.5)), model_weights(merge_models(base, [ft[0]], "slerp", t=0.7))
    for k, v in model_weights(base).items():
        assert_close(half[k], 0.5 * model_weights(ft[0])[k])                                   # mergekit's passthrough: the weights, scaled
        assert_close(sl[k], merge_tensors([v, model_weights(ft[0])[k]], None, "slerp", t=0.7))  # mergekit's slerp: from the base to the model
    assert_same(merge_models(base, [ft[0]], "passthrough"), ft[0])
    assert_same(merge_models(base, [ft[0]], "slerp", t=1.0), ft[0])

def fine_tunes(base, n):
    "`n` copies of `base` with small noise on every weight, as fine-tunes that change every weight."
    out = []
    for s in range(n):
        m, g = copy.deepcopy(base), torch.Generator().manual_seed(s)
        with torch.no_grad():
            for p in m.parameters(): p.add_(torch.randn(p.shape, generator=g) * 0.01)
        out.append(m)
    return out

def test_every_rule_merges_with_the_models_it_takes(models):
    "Each rule of MERGE_RULES runs through merge_models with as many models as it takes, and gives finite weights."
    base = models[0]
    ft, needs = fine_tunes(base, 3), dict(density=0.5, t=0.5)
    for name, rule in MERGE_RULES.items():
        n = {1: 1, 2: 2}.get(rule.n_tensors[1], 3)
        options = {f.name: needs[f.name] for f in fields(rule.config) if f.name in needs and f.default is None}
        out = merge_models(base, ft[:n], name, **options)
        assert all(torch.isfinite(v).all() for v in model_weights(out).values()), name

def test_multislerp_of_three_models_with_an_unchanged_weight(models):
    "A weight no model changed merges to no change (mergekit's multislerp raises on it)."
    base, ft = models
    out, before = model_weights(merge_models(base, ft, "multislerp")), model_weights(base)
    unchanged = [k for k in before if all(torch.equal(model_weights(m)[k], before[k]) for m in ft)]
    assert unchanged, "the fixture should leave some weight unchanged"
    for k in unchanged: assert torch.equal(out[k], before[k]), k

MORE_ERRORS = [   # (method, how many models, weights, options, what the message says)
    ("nearswap", 2, None, dict(t=0.1), "'nearswap' takes exactly 1 fine-tuned model besides the base, got 2: pass 1"),
    ("arcee_fusion", 3, None, {}, "'arcee_fusion' takes exactly 1 fine-tuned model besides the base, got 3"),
    ("passthrough", 2, None, {}, "'passthrough' takes exactly 1 fine-tuned model besides the base, got 2"),
    ("nuslerp", 1, None, {}, "'nuslerp' takes exactly 2 fine-tuned models besides the base, got 1: add another"),
    ("slerp", 3, None, dict(t=0.5), "'slerp' takes 1 or 2 fine-tuned models besides the base, got 3"),
    ("model_stock", 1, None, {}, "'model_stock' takes at least 2 fine-tuned models besides the base, got 1"),
    ("ties", 2, None, dict(density=0.0), "density=0.0 of merge method 'ties' must be > 0 and <= 1"),
    ("dare_linear", 2, None, dict(density=1.01), "density=1.01 of merge method 'dare_linear' must be > 0 and <= 1"),
    ("multislerp", 2, [1.0, -1.0], {}, "'multislerp' normalizes the weights by their sum, which is 0"),
    ("karcher", 2, [1.0, -1.0], {}, "'karcher' needs positive weights"),
    ("nearswap", 1, [1.0], dict(t=0.1), "'nearswap' takes no weights"),
]

@pytest.mark.parametrize("method,n,weights,options,message", MORE_ERRORS, ids=[m for *_, m in MORE_ERRORS])
def test_rule_errors_before_reading_weights(models, method, n, weights, options, message):
    base, ft = models
    state = torch.random.get_rng_state()
    with pytest.raises(ValueError) as e: merge_models(base, ft[:n], method, weights=weights, **options)
    assert message in str(e.value), str(e.value)
    assert torch.equal(torch.random.get_rng_state(), state)         # the probe leaves torch's generator as it was

def test_adapters_on_different_modules_refused(models):
    base, ft = models
    def lora(targets, seed):
        m = apply(copy.deepcopy(base), "lora", r=4, targets=targets)
        with torch.no_grad():
            for a in adapters(m).values(): a.lora_B.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
        return m
    q, v = lora(["q_proj"], 1), lora(["v_proj"], 2)
    with pytest.raises(ValueError, match=r"models 0 and 1 carry adapters on different modules \(e.g. \['model.layers.0.self_attn.q_proj'"):
        merge_models(base, [q, v], "ties", density=0.5)
    merge_models(base, [q, ft[1]], "ties", density=0.5)             # an adapter and a full fine-tune: every weight is the latter's update
    folded = [merge_adapters(copy.deepcopy(m), unload_adapters=True) for m in (q, v)]   # the fix the message names
    assert_same(merge_models(base, folded, "task_arithmetic"),
                {k: w + (model_weights(folded[0])[k] - w) + (model_weights(folded[1])[k] - w) for k, w in model_weights(base).items()})
