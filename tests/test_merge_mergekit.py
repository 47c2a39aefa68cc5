"""peftlab's merge rules (`peftlab.merge.tensors.merge_tensors`) against mergekit 0.1.5's own functions, to 1e-5.

mergekit is installed by the Makefile (its `--no-deps` oracle line, with `immutables`), so it is imported plainly: a
missing oracle fails here rather than skipping. Whole rules go through mergekit's tensor-level entry point
`mergekit.merge_methods.merge_tensors` (the base's and the models' weights of one tensor) against ours with `base=`
and `variant="mergekit"`; the parts through mergekit's sparsifiers (`mergekit.sparsify`), its sign consensus
(`get_mask`), `karcher_merge_tensors`, `slerp`, `nuslerp`, `sce_mask` and `sce_weight`; mergekit's own rules
(NearSwap, Arcee Fusion, RAM, RAM+ and passthrough) through their merge-method objects (`nearswap_merge`,
`arcee_fusion_merge_method`, `ram_merge`, `ramplus_tl_merge`, `passthrough_merge_method`), and Arcee Fusion's parts
(`_compute_importance`, `DynamicThresholdFusion`). The random rules (DARE, DELLA, and Arcee Fusion's quantile sample)
seed torch's global generator identically before each call, so both draw the same masks.
"""
import itertools
import pytest
import torch
import mergekit.merge_methods as mk
from mergekit import sparsify as mks
from mergekit.merge_methods.generalized_task_arithmetic import get_mask
from mergekit.merge_methods.karcher import karcher_merge_tensors
from mergekit.merge_methods.slerp import slerp as mk_slerp
from mergekit.merge_methods.nuslerp import nuslerp as mk_nuslerp
from mergekit.merge_methods.sce import sce_mask, sce_weight
from mergekit.merge_methods.nearswap import nearswap_merge
from mergekit.merge_methods import arcee_fusion as mk_arcee
from mergekit.merge_methods.arcee_fusion import DynamicThresholdFusion, _compute_importance, arcee_fusion_merge_method
from mergekit.merge_methods.ram import ram_merge, ramplus_tl_merge
from mergekit.merge_methods.passthrough import passthrough_merge_method
from peftlab.core.registry import METHODS, apply, canonical_name, get_method, methods
from peftlab.merge.tensors import (MERGE_RULES, merge_tensors, magnitude_prune_tensor, dare_prune_tensor,
                                   breadcrumbs_prune_tensor, della_prune_tensor, majority_sign_mask, slerp, nuslerp,
                                   karcher_mean, sce_select_mask, sce_weights, arcee_fusion_importance, outlier_fence)

SHAPES = [(7,), (16, 24), (3, 5, 11)]
WEIGHTS = [[1.0, 1.0], [0.7, 0.3], [2.0, 1.0, 1.0], [1.0, -0.5, 0.25]]
DENSITIES = [0.2, 0.5, 0.9, 1.0]
TOL = dict(rtol=1e-5, atol=1e-5)


def close(actual, expected, **tol):
    torch.testing.assert_close(actual.float(), expected.float(), **(tol or TOL))


def weights_of(shape, n, seed, spread=1.0):
    "A base weight and `n` fine-tuned ones around it (updates of different scales, so elections are not trivial)."
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + spread * (1 + i) * torch.randn(shape, generator=g) for i in range(n)]


def theirs(method, base, thetas, per_model=None, **shared):
    "mergekit's merge of one tensor: per-model parameters as lists in model order, the others shared."
    params = {k: {i + 1: v for i, v in enumerate(vals)} for k, vals in (per_model or {}).items()}
    ids = list(range(len(thetas) + 1))
    if base is None: return mk.merge_tensors(thetas, method, parameters={**params, **shared}, ids=ids[1:])
    return mk.merge_tensors([base, *thetas], method, parameters={**params, **shared}, ids=ids, base_index=0)


def della_epsilon(d): return round(min(0.15, d / 2, (1 - d) / 2), 4) if d < 1 else 0.15


# ---- generalized task arithmetic: every rule both have, over shapes, weights and densities
GTA = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]
CASES = [(m, s, w, None) for m, s, w in itertools.product(GTA[:1], SHAPES, WEIGHTS)]
CASES += [(m, s, w, d) for m, s, w, d in itertools.product(GTA[1:], SHAPES, WEIGHTS, DENSITIES)]


def gta_options(method, n, density):
    "(our options, mergekit's per-model parameters) for one case."
    ours, per = {}, {}
    if density is not None: ours["density"], per["density"] = density, [density] * n
    if method.startswith("breadcrumbs"): ours["gamma"], per["gamma"] = 0.05, [0.05] * n
    if method.startswith("della"):
        eps = della_epsilon(density)
        ours["epsilon"], per["epsilon"] = eps, [eps] * n
    return ours, per


@pytest.mark.parametrize("method,shape,weights,density", CASES)
def test_rule_equals_mergekit(method, shape, weights, density):
    base, thetas = weights_of(shape, len(weights), seed=len(shape) + 10 * len(weights))
    ours, per = gta_options(method, len(weights), density)
    torch.manual_seed(123); expected = theirs(method, base, thetas, dict(per, weight=weights))
    torch.manual_seed(123); actual = merge_tensors(thetas, weights, method, base=base, variant="mergekit", **ours)
    close(actual, expected)
    torch.manual_seed(123)   # the same rule on task tensors is the merged update
    close(merge_tensors([t - base for t in thetas], weights, method, variant="mergekit", **ours), expected - base)


OPTIONS = [  # mergekit's shared options: normalize, rescale and lambda, flipped from each rule's default
    ("ties", dict(normalize=False)), ("ties", dict(scale=0.7)), ("dare_ties", dict(normalize=True)),
    ("dare_ties", dict(rescale=False)), ("dare_linear", dict(rescale=False, normalize=True)),
    ("dare_linear", dict(scale=1.5)), ("breadcrumbs", dict(normalize=True)), ("breadcrumbs_ties", dict(normalize=True, scale=0.5)),
    ("della", dict(normalize=False)), ("della", dict(rescale=False)), ("della_linear", dict(rescale=False, scale=2.0)),
    ("della_linear", dict(normalize=True)), ("task_arithmetic", dict(normalize=True, scale=0.5)),
]


@pytest.mark.parametrize("method,flip", OPTIONS)
@pytest.mark.parametrize("weights", [[0.6, 0.4], [2.0, 1.0, 1.0]])
def test_options_equal_mergekit(method, flip, weights):
    base, thetas = weights_of((24, 40), len(weights), seed=5)
    density = None if method == "task_arithmetic" else 0.4
    ours, per = gta_options(method, len(weights), density)
    shared = {"lambda" if k == "scale" else k: v for k, v in flip.items()}
    torch.manual_seed(7); expected = theirs(method, base, thetas, dict(per, weight=weights), **shared)
    torch.manual_seed(7); close(merge_tensors(thetas, weights, method, base=base, variant="mergekit", **ours, **flip), expected)


def test_dare_and_della_draw_like_mergekit():
    "A sequence of merges stays in step: after each, torch's generator is where mergekit leaves it."
    base, thetas = weights_of((16, 24), 3, 0)
    for method, ours in [("dare_ties", dict(density=0.4)), ("della", dict(density=0.4, epsilon=0.1))]:
        per = {k: [v] * 3 for k, v in ours.items()}
        torch.manual_seed(5); theirs(method, base, thetas, dict(per, weight=[1.0] * 3)); after_theirs = torch.rand(3)
        torch.manual_seed(5); merge_tensors(thetas, None, method, base=base, variant="mergekit", **ours); after_ours = torch.rand(3)
        assert torch.equal(after_theirs, after_ours)


# ---- the parts: sparsifiers and the sign consensus
@pytest.mark.parametrize("shape,density", list(itertools.product(SHAPES, [0.05, 0.2, 0.5, 0.9, 1.0])))
def test_magnitude_equals_mergekit(shape, density):
    t = weights_of(shape, 1, 1)[1][0]
    close(magnitude_prune_tensor(t, density, at_least_one=True), mks.magnitude(t, density))   # (7,) at 0.05: one kept


@pytest.mark.parametrize("shape,density,gamma", list(itertools.product(SHAPES, [0.1, 0.3, 0.66, 0.9], [0.0, 0.01, 0.1, 0.3])))
def test_breadcrumbs_equals_mergekit(shape, density, gamma):
    t = weights_of(shape, 1, 2)[1][0]
    close(breadcrumbs_prune_tensor(t, density, gamma), mks.magnitude_outliers(t, density, gamma=gamma))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,density,rescale", list(itertools.product(SHAPES, [0.1, 0.5, 0.9], [True, False])))
def test_dare_equals_mergekit(shape, density, rescale, dtype):
    t = weights_of(shape, 1, 3)[1][0].to(dtype)
    torch.manual_seed(11); expected = mks.bernoulli(t, density, mks.RescaleNorm.l1 if rescale else None)
    torch.manual_seed(11); actual = dare_prune_tensor(t, density, rescale, variant="mergekit")
    assert actual.dtype == expected.dtype
    close(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,density,epsilon,rescale",
                         list(itertools.product(SHAPES, [0.2, 0.5, 0.8], [0.0, 0.05, 0.15], [True, False])))
def test_della_equals_mergekit(shape, density, epsilon, rescale, dtype):
    t = weights_of(shape, 1, 4)[1][0].to(dtype)
    torch.manual_seed(13); expected = mks.della_magprune(t, density, epsilon, mks.RescaleNorm.l1 if rescale else None)
    torch.manual_seed(13); actual = della_prune_tensor(t, density, epsilon, rescale)
    assert actual.dtype == expected.dtype
    close(actual, expected)


@pytest.mark.parametrize("density,epsilon", list(itertools.product([0.1, 0.3, 0.5, 0.85, 1.0], [0.0, 0.1, 0.15, 0.3, 0.5, 1.35])))
def test_della_refuses_what_mergekit_refuses(density, epsilon):
    t = torch.randn(8, 8)
    def refuses(call):
        try: call(); return False
        except ValueError: return True
    assert refuses(lambda: della_prune_tensor(t, density, epsilon)) == refuses(lambda: mks.della_magprune(t, density, epsilon))


@pytest.mark.parametrize("shape,n", list(itertools.product(SHAPES, [2, 3, 5])))
def test_sign_consensus_equals_mergekit(shape, n):
    g = torch.Generator().manual_seed(n)
    deltas = torch.randn((n, *shape), generator=g) * torch.rand((n,) + (1,) * len(shape), generator=g)
    deltas[0].view(-1)[::3] = 0                                         # pruned entries never agree
    assert torch.equal(majority_sign_mask(deltas, "total"), get_mask(deltas, "sum"))
    assert torch.equal(majority_sign_mask(deltas, "frequency"), get_mask(deltas, "count"))


# ---- the rules outside the pipeline
@pytest.mark.parametrize("shape,n,filter_wise", list(itertools.product(SHAPES, [2, 3, 4], [False, True])))
def test_model_stock_equals_mergekit(shape, n, filter_wise):
    base, thetas = weights_of(shape, n, seed=n, spread=0.1)
    expected = theirs("model_stock", base, thetas, filter_wise=filter_wise)
    close(merge_tensors(thetas, None, "model_stock", base=base, filter_wise=filter_wise), expected)


def test_model_stock_opposite_updates_keep_the_base():
    base, (theta,) = weights_of((6, 9), 1, 0)
    opposite = [theta, 2 * base - theta]                                # τ and -τ: 1 + (N-1) cos θ = 0
    expected = theirs("model_stock", base, opposite)
    close(expected, base)
    close(merge_tensors(opposite, None, "model_stock", base=base), expected)


@pytest.mark.parametrize("shape,n,select_topk", list(itertools.product(SHAPES, [2, 3], [1.0, 0.5, 0.1])))
def test_sce_equals_mergekit(shape, n, select_topk):
    base, thetas = weights_of(shape, n, seed=20 + n)
    close(merge_tensors(thetas, None, "sce", base=base, select_topk=select_topk), theirs("sce", base, thetas, select_topk=select_topk))
    tvs = torch.stack([t - base for t in thetas])
    close(sce_select_mask(tvs, select_topk), sce_mask(tvs, select_topk, tvs.dtype))
    close(sce_weights(tvs), sce_weight(tvs))


@pytest.mark.parametrize("shape,n,max_iter,tol", list(itertools.product(SHAPES, [2, 3, 5], [1, 10, 50], [1e-5, 1e-7])))
def test_karcher_equals_mergekit(shape, n, max_iter, tol):
    _, thetas = weights_of(shape, n, seed=30 + n)
    close(merge_tensors(thetas, None, "karcher", max_iter=max_iter, tol=tol), theirs("karcher", None, thetas, max_iter=max_iter, tol=tol))
    alphas = [0.5 + i for i in range(n)]                                # the weighted mean, mergekit's function
    close(merge_tensors(thetas, alphas, "karcher", max_iter=max_iter, tol=tol), karcher_merge_tensors(thetas, alphas, max_iter, tol))


def test_karcher_edge_cases_equal_mergekit():
    a = torch.randn(5, 4)
    for tensors in ([a, torch.zeros_like(a)], [a, 2 * a], [a, -a, a + 0.1], [torch.zeros_like(a)] * 2):
        close(karcher_mean(tensors, [0.5] * len(tensors)), karcher_merge_tensors(tensors, [0.5] * len(tensors)))


SLERP_PAIRS = ["random", "parallel", "antiparallel", "zero"]


def pair(kind, shape):
    g = torch.Generator().manual_seed(41)
    a = torch.randn(shape, generator=g)
    b = {"random": torch.randn(shape, generator=g), "parallel": 2 * a + 1e-6, "antiparallel": -a, "zero": torch.zeros(shape)}[kind]
    return a, b


@pytest.mark.parametrize("shape,kind,t", list(itertools.product(SHAPES, SLERP_PAIRS, [0.0, 0.3, 0.5, 1.0])))
def test_slerp_equals_mergekit(shape, kind, t):
    a, b = pair(kind, shape)
    expected = theirs("slerp", a, [b], t=t)                             # mergekit: from the base (t=0) to the other
    close(merge_tensors([a, b], None, "slerp", t=t), expected)
    close(slerp(t, a, b), mk_slerp(torch.tensor(t), a.unsqueeze(0), b.unsqueeze(0))[0])


@pytest.mark.parametrize("shape,weights,flatten,row_wise",
                         list(itertools.product(SHAPES, [[1.0, 1.0], [0.3, 0.7], [1.0, -1.0]], [True, False], [False, True])))
def test_nuslerp_equals_mergekit(shape, weights, flatten, row_wise):
    base, thetas = weights_of(shape, 2, seed=50)
    opts = dict(nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    ours = dict(flatten=flatten, row_wise=row_wise)
    close(merge_tensors(thetas, weights, "nuslerp", **ours), theirs("nuslerp", None, thetas, dict(weight=weights), **opts))
    close(merge_tensors(thetas, weights, "nuslerp", base=base, **ours), theirs("nuslerp", base, thetas, dict(weight=weights), **opts))
    for kind in SLERP_PAIRS[1:]:
        a, b = pair(kind, shape)
        t = 0.3
        close(nuslerp(t, a, b, dim=0 if row_wise else -1, flatten=flatten), mk_nuslerp(t, a, b, dim=0 if row_wise else -1, flatten=flatten))


@pytest.mark.parametrize("shape,weights,normalize",
                         list(itertools.product(SHAPES, [[1.0, 1.0], [0.2, 0.8], [2.0, 1.0, 1.0], [1.0, -0.5, 0.25]], [True, False])))
def test_multislerp_equals_mergekit(shape, weights, normalize):
    base, thetas = weights_of(shape, len(weights), seed=60)
    opts = dict(normalize_weights=normalize)
    close(merge_tensors(thetas, weights, "multislerp", **opts), theirs("multislerp", None, thetas, dict(weight=weights), **opts))
    close(merge_tensors(thetas, weights, "multislerp", base=base, **opts), theirs("multislerp", base, thetas, dict(weight=weights), **opts))


def test_multislerp_antipodal_pair_is_lerp_like_mergekit():
    a = torch.randn(4, 6)
    close(merge_tensors([a, -a], [1.0, 1.0], "multislerp"), theirs("multislerp", None, [a, -a], dict(weight=[1.0, 1.0])))


# ---- mergekit's own rules: NearSwap, Arcee Fusion, RAM, RAM+ and passthrough
@pytest.mark.parametrize("shape,t", list(itertools.product(SHAPES, [0.0, 1e-4, 0.1, 0.5, 3.0])))
def test_nearswap_equals_mergekit(shape, t):
    base, (theta,) = weights_of(shape, 1, seed=70)
    theta.view(-1)[::4] = base.view(-1)[::4] + 1e-5                    # entries where the two nearly agree: swapped whole
    expected = theirs(nearswap_merge, base, [theta], t=t)
    close(merge_tensors([theta], None, "nearswap", base=base, t=t), expected)
    close(merge_tensors([theta - base], None, "nearswap", t=t), expected - base)


@pytest.mark.parametrize("shape,spread,seed", list(itertools.product(SHAPES + [(64, 128)], [0.01, 1.0], [0, 1, 2])))
def test_arcee_fusion_equals_mergekit(shape, spread, seed):
    base, (theta,) = weights_of(shape, 1, seed=100 + seed, spread=spread)
    close(merge_tensors([theta], None, "arcee_fusion", base=base), theirs(arcee_fusion_merge_method, base, [theta]))
    importance = arcee_fusion_importance(theta, base)
    close(importance, _compute_importance(theta, base))
    close(outlier_fence(importance), DynamicThresholdFusion().calculate_dynamic_threshold(importance))


def test_arcee_fusion_samples_like_mergekit(monkeypatch):
    "Past the sample size both draw the same quartile sample from torch's generator (the size lowered to keep this small)."
    monkeypatch.setattr(mk_arcee, "_QUANTILE_SAMPLE_SIZE", 50)
    base, (theta,) = weights_of((16, 24), 1, seed=7)
    importance = arcee_fusion_importance(theta, base)
    torch.manual_seed(3); expected = DynamicThresholdFusion().calculate_dynamic_threshold(importance)
    torch.manual_seed(3); close(outlier_fence(importance, sample=50), expected)
    torch.manual_seed(4); whole = outlier_fence(importance)
    assert not torch.equal(whole, expected)                             # the sample's fence is not the whole tensor's


def sparse_weights_of(shape, n, seed, moved):
    "A base and `n` fine-tuned weights, each moving a random `moved` fraction of the entries (sparse updates, as RL's)."
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < moved) for _ in range(n)]


@pytest.mark.parametrize("shape,n,moved,epsilon", list(itertools.product(SHAPES, [1, 2, 3, 5], [0.2, 0.6, 1.0], [1e-5, 0.5])))
def test_ram_equals_mergekit(shape, n, moved, epsilon):
    base, thetas = sparse_weights_of(shape, n, seed=80 + n, moved=moved)
    expected = theirs(ram_merge, base, thetas, epsilon=epsilon)
    close(merge_tensors(thetas, None, "ram", base=base, epsilon=epsilon), expected)
    close(merge_tensors([t - base for t in thetas], None, "ram", epsilon=epsilon), expected - base)


@pytest.mark.parametrize("shape,n,moved,r,alpha",
                         list(itertools.product(SHAPES, [2, 3, 5], [0.2, 0.6, 1.0], [0.1, 1.0], [0.2, 5.0])))
def test_ramplus_tl_equals_mergekit(shape, n, moved, r, alpha):
    base, thetas = sparse_weights_of(shape, n, seed=90 + n, moved=moved)
    expected = theirs(ramplus_tl_merge, base, thetas, r=r, alpha=alpha)
    close(merge_tensors(thetas, None, "ramplus_tl", base=base, r=r, alpha=alpha), expected)
    close(merge_tensors([t - base for t in thetas], None, "ramplus_tl", r=r, alpha=alpha), expected - base)


@pytest.mark.parametrize("shape,scale", list(itertools.product(SHAPES, [None, 0.0, 0.5, -2.0])))
def test_passthrough_equals_mergekit(shape, scale):
    _, (theta,) = weights_of(shape, 1, seed=95)
    ours = {} if scale is None else dict(scale=scale)
    expected = theirs(passthrough_merge_method, None, [theta], None if scale is None else dict(scale=[scale]))
    close(merge_tensors([theta], None, "passthrough", **ours), expected)


# ---- the registry
def test_every_rule_is_registered_as_merge():
    table = methods().set_index("name")
    for name, rule in MERGE_RULES.items():
        key = canonical_name(name)
        assert key in table.index, name
        assert table.loc[key, "category"] == "merge" and table.loc[key, "paper"] == rule.paper
        assert get_method(name).config is rule.config                 # the class merge_tensors validates with
    assert set(methods("merge").name) >= {canonical_name(n) for n in MERGE_RULES}   # other merge notebooks register theirs too


@pytest.mark.parametrize("name", ["ties", "dare_ties", "della", "model_stock", "karcher", "slerp", "arcee_fusion", "passthrough"])
def test_apply_refuses_merge_rules(name):
    from peftlab.core.models import tiny_llama
    with pytest.raises(ValueError, match=f"'{canonical_name(name)}' is a merge rule: pass it to merge_tensors"):
        apply(tiny_llama(), name)
