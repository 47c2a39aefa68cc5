"""peftlab's merge rules (`peftlab.merge.tensors.merge_tensors`) against PEFT's (`peft.utils.merge_utils`, peft 0.21.2).

Each row merges the same task tensors with the same weights by both; DARE rows seed torch's global generator
identically before each call, so both draw the same Bernoulli masks. PEFT's numbers must come out to 1e-6 (in
practice bit for bit: the same operations in the same order). The mergekit variant is checked on the properties
the anchor (shared/anchors/merging.md, mergekit @a6e4028) pins down; tests/test_merge_mergekit.py checks it against mergekit 0.1.5 itself.
"""
import itertools
import pytest
import torch
from peft.utils import merge_utils as mu
from peftlab.merge.tensors import merge_tensors, dare_prune_tensor

SHAPES = [(7,), (16, 24), (3, 5, 11)]
WEIGHTS = [[1.0, 1.0], [0.7, 0.3], [2.0, 1.0, 1.0], [1.0, -0.5, 0.25], [0.5]]
DENSITIES = [0.2, 0.5, 0.9, 1.0]
SIGN = ["total", "frequency"]
pytestmark = pytest.mark.filterwarnings("ignore:The density 1.0 is greater")   # PEFT warns at density 1


def task_tensors(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (1 + i) for i in range(n)]   # different scales: elections are not trivial


def peft_merge(method, tensors, w, density=None, sign="total"):
    if method == "task_arithmetic": return mu.task_arithmetic(tensors, w)
    if method in ("magnitude_prune", "dare_linear"): return getattr(mu, method)(tensors, w, density)
    return getattr(mu, method)(tensors, w, density, majority_sign_method=sign)


def ours(method, tensors, w, density=None, sign="total", **kw):
    opts = {} if method == "task_arithmetic" else dict(density=density)
    if method in ("ties", "dare_ties"): opts["majority_sign_method"] = sign
    return merge_tensors(tensors, w, method, **opts, **kw)


CASES = [("task_arithmetic", s, w, None, "total") for s, w in itertools.product(SHAPES, WEIGHTS)]
CASES += [("magnitude_prune", s, w, d, "total") for s, w, d in itertools.product(SHAPES, WEIGHTS, DENSITIES)]
CASES += [("dare_linear", s, w, d, "total") for s, w, d in itertools.product(SHAPES, WEIGHTS, DENSITIES)]
CASES += [(m, s, w, d, sg) for m, s, w, d, sg in itertools.product(["ties", "dare_ties"], SHAPES, WEIGHTS, DENSITIES, SIGN)]


@pytest.mark.parametrize("method,shape,weights,density,sign", CASES)
def test_equals_peft(method, shape, weights, density, sign):
    tensors = task_tensors(shape, len(weights), seed=len(shape) + 10 * len(weights))
    w = torch.tensor(weights)
    torch.manual_seed(123); expected = peft_merge(method, tensors, w, density, sign)
    torch.manual_seed(123); actual = ours(method, tensors, w, density, sign)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    torch.manual_seed(123); assert torch.equal(ours(method, tensors, weights, density, sign), expected)   # a list of weights too


def test_equals_peft_on_tiny_llama_weights():
    from peftlab.core.models import tiny_llama
    from peftlab.merge.task_vectors import task_vector
    base = tiny_llama(seed=0)
    tvs = [task_vector(base, tiny_llama(seed=s)) for s in (1, 2, 3)]
    w = torch.tensor([1.0, 0.5, 0.8])
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        ts = [tv[k] for tv in tvs]
        for method in ("ties", "dare_ties", "dare_linear", "magnitude_prune"):
            torch.manual_seed(7); expected = peft_merge(method, ts, w, 0.3)
            torch.manual_seed(7); torch.testing.assert_close(ours(method, ts, w, 0.3), expected, rtol=1e-6, atol=1e-6)


def test_dare_draws_like_peft():
    "After a merge, torch's generator is where PEFT leaves it: a sequence of merges stays in step."
    ts, w = task_tensors((16, 24), 3, 0), torch.tensor([1.0, 1.0, 1.0])
    torch.manual_seed(5); mu.dare_ties(ts, w, 0.4); after_peft = torch.rand(3)
    torch.manual_seed(5); ours("dare_ties", ts, w, 0.4); after_ours = torch.rand(3)
    assert torch.equal(after_peft, after_ours)


# ---- the mergekit variant: properties from the anchor's description of mergekit's code
@pytest.mark.parametrize("shape,density,sign", list(itertools.product(SHAPES[1:], DENSITIES, SIGN)))
def test_mergekit_ties_with_unit_weights_is_peft(shape, density, sign):
    "Weights of 1: electing on weighted or unweighted deltas is the same, and Σ w over agreeing entries is their count."
    ts = task_tensors(shape, 3, 1)
    w = torch.ones(3)
    torch.testing.assert_close(ours("ties", ts, w, density, sign, variant="mergekit"), ours("ties", ts, w, density, sign),
                               rtol=1e-6, atol=1e-6)


def test_mergekit_ties_differs_with_weights():
    ts = [torch.tensor([1.0, -1.0]), torch.tensor([-3.0, 2.0])]
    w = [2.0, 0.5]                                                    # weighted: 2·1 - 0.5·3 > 0; unweighted: 1 - 3 < 0
    peft_, mk = ours("ties", ts, w, 1.0), ours("ties", ts, w, 1.0, variant="mergekit")
    torch.testing.assert_close(peft_, torch.tensor([-1.5, 1.0]))      # PEFT: signs (−, +): 0.5·(−3) and 0.5·2, each over 1 entry
    torch.testing.assert_close(mk, torch.tensor([1.0, -1.0]))         # mergekit: signs (+, −): 2·1 / 2 and 2·(−1) / 2


@pytest.mark.parametrize("density", [0.1, 0.3, 0.7])
def test_mergekit_dare(density):
    ts, w = task_tensors((32, 16), 2, 3), torch.tensor([0.6, 0.4])
    for t in ts:   # the same mask as PEFT's draw, rescaled to the tensor's L1 norm
        torch.manual_seed(0); p = dare_prune_tensor(t, density)
        torch.manual_seed(0); m = dare_prune_tensor(t, density, variant="mergekit")
        assert torch.equal(p != 0, m != 0)
        torch.testing.assert_close(m.abs().sum(), t.abs().sum(), rtol=1e-5, atol=0)
    # dare_linear without rescale: PEFT's result times the density, in both variants
    torch.manual_seed(9); expected = mu.dare_linear(ts, w, density) * density
    for variant in ("peft", "mergekit"):
        torch.manual_seed(9)
        torch.testing.assert_close(merge_tensors(ts, w, "dare_linear", density=density, rescale=False, variant=variant), expected,
                                   rtol=1e-5, atol=1e-6)
    # mergekit's dare_ties does not normalize: the sum of the agreeing weighted entries; normalize=True gives their Σw-mean
    torch.manual_seed(9); s = merge_tensors(ts, w, "dare_ties", density=density, rescale=False, variant="mergekit")
    torch.manual_seed(9); pruned = torch.stack([dare_prune_tensor(t, density, rescale=False) for t in ts])
    weighted = pruned * w[:, None, None]
    agree = weighted.sign() == torch.where(weighted.sum(0) >= 0, 1, -1)
    torch.testing.assert_close(s, (weighted * agree).sum(0))
    torch.manual_seed(9); n = merge_tensors(ts, w, "dare_ties", density=density, rescale=False, variant="mergekit", normalize=True)
    div = (w[:, None, None] * agree).sum(0)
    torch.testing.assert_close(n, (weighted * agree).sum(0) / torch.where(div == 0, torch.ones_like(div), div))
