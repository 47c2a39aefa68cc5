"Data selection: hand-checked cases (Sinkhorn against closed forms, vote-k on a graph scored by hand) and bad input."
import math
import pytest
import torch
from peftlab.data.core import select, budget_count, check_examples, noisy_pool, kind_shares, KINDS, check_same_shapes
from peftlab.data.got_d import sinkhorn, calibrated_gradient
from peftlab.data.vote_k import vote_k_order, knn_graph
from peftlab.data.diversify_conquer import cluster_budgets
from peftlab.data.uds import uds_pass
import peftlab.data.perplexity, peftlab.data.less   # register their selectors


def unit(deg): return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]

def by_angle(angles:dict):
    "An encoder for `select(encoder=...)`: each example's text maps to a unit vector at a given angle."
    return lambda texts: torch.tensor([unit(angles[t.split("\n")[0]]) for t in texts])


# Sinkhorn, two points a side: the plan has a closed form, p = 1 / (2 (1 + exp(Delta / 2 eps))).
@pytest.mark.parametrize("cost,eps", [([[0.0, 1.0], [2.0, 0.5]], 0.5), ([[1.0, 0.0], [0.0, 1.0]], 1.0),
                                      ([[0.3, 0.3], [0.3, 0.3]], 0.2), ([[0.0, 4.0], [4.0, 0.0]], 2.0)])
def test_sinkhorn_two_points(cost, eps):
    C, half = torch.tensor(cost, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64)
    t = sinkhorn(C, half, half, eps, tol=1e-12)
    delta = C[0, 0] + C[1, 1] - C[0, 1] - C[1, 0]
    p = 1 / (2 * (1 + torch.exp(delta / (2 * eps))))
    P = torch.stack([torch.stack([p, 0.5 - p]), torch.stack([0.5 - p, p])])
    torch.testing.assert_close(t.plan, P, atol=1e-7, rtol=0)
    torch.testing.assert_close(t.value, (C * P).sum() + eps * ((P * P.log()).sum() + math.log(4)), atol=1e-7, rtol=0)


def test_sinkhorn_one_point_and_marginals():
    "One target point: every candidate's mass goes to it, the distance is the mean cost."
    C = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64); b = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    t = sinkhorn(C, torch.ones(1, dtype=torch.float64), b, 0.1)
    torch.testing.assert_close(t.plan, b[None], atol=1e-9, rtol=0)
    torch.testing.assert_close(t.value, (C[0] * b).sum(), atol=1e-9, rtol=0)   # KL(P | a b^T) = 0: P = a b^T


def test_sinkhorn_potential_is_the_gradient():
    torch.manual_seed(1)
    C = torch.rand(4, 6, dtype=torch.float64)
    a, b = torch.full((4,), 0.25, dtype=torch.float64), torch.full((6,), 1 / 6, dtype=torch.float64)
    t0, h = sinkhorn(C, a, b, 0.3, tol=1e-13), 1e-5
    for j, k in [(0, 5), (2, 3)]:
        step = torch.zeros(6, dtype=torch.float64); step[j], step[k] = h, -h
        fd = (sinkhorn(C, a, b + step, 0.3, tol=1e-13).value - t0.value) / h
        assert abs(float(fd - (t0.g[j] - t0.g[k]))) < 1e-4


def test_calibration():
    torch.testing.assert_close(calibrated_gradient(torch.tensor([0.0, 3.0, 6.0, 3.0])), torch.tensor([-4.0, 0.0, 4.0, 0.0]))


# vote-k on two groups that point within themselves, scored by hand in the notebook's words.
def test_vote_k_two_groups():
    G = torch.zeros(7, 7, dtype=torch.bool)
    for group in ([0, 1, 2, 3], [4, 5, 6]):
        for v in group:
            for u in group: G[v, u] = u != v
    picks, scores = vote_k_order(G, 4)
    assert picks.tolist() == [0, 4, 1, 5]
    # round 3: 1 gets the votes of 2 and 3 at 1/10 each; round 4: 2 and 3 have two chosen neighbours (1/100), 6 one (1/10)
    torch.testing.assert_close(scores, torch.tensor([3.0, 2.0, 0.2, 0.1]))


def test_vote_k_through_select_covers_both_clusters():
    """Four points near 0 degrees and four near 120, each voting for its 3 nearest (its own cluster): after the first
    pick every voter of that cluster is discounted to 1/10, so the second pick is from the other cluster."""
    angles = {f"a{i}": d for i, d in enumerate([0, 1, 2, 3, 120, 121, 122, 123])}
    examples = [dict(prompt=p, answer="") for p in angles]
    s = select(examples, "vote-k", 2, encoder=by_angle(angles), k=3)
    torch.testing.assert_close(s.scores, torch.tensor([3.0, 3.0]))
    assert {angles[e["prompt"]] < 60 for e in s.examples} == {True, False}


def test_got_d_takes_the_missing_mass_first():
    angles = {**{f"near{i}": d for i, d in enumerate([0, 2, -2, 4, -4])}, "far": 88, "t0": 0, "t1": 90}
    pool = [dict(prompt=p, answer="") for p in angles if not p.startswith("t")]
    target = [dict(prompt="t0", answer=""), dict(prompt="t1", answer="")]
    s = select(pool, "got-d", 1, target=target, encoder=by_angle(angles))
    assert s.examples[0]["prompt"] == "far"


@pytest.mark.parametrize("budget,n,want", [(3, 10, 3), (0.3, 10, 3), (1.0, 10, 10), (0.01, 10, 1), (10, 10, 10)])
def test_budget(budget, n, want): assert budget_count(budget, n) == want


@pytest.mark.parametrize("budget,error,contains", [
    (11, ValueError, "larger than the pool of 10"), (0, ValueError, "at least 1"), (-0.5, ValueError, "must be in (0, 1]"),
    (1.5, ValueError, "must be in (0, 1]"), (True, TypeError, "must be a number of examples"), ("3", TypeError, "must be a number")])
def test_bad_budget(budget, error, contains):
    with pytest.raises(error, match=None) as e: budget_count(budget, 10)
    assert contains in str(e.value)


@pytest.mark.parametrize("examples,contains", [
    ([dict(prompt="a", answer="b"), dict(prompt="c")], "examples[1] has no 'answer'"),
    ([dict(answer="b")], "examples[0] has no 'prompt'"),
    ([dict(prompt="a", answer=3)], "has no 'answer' string"),
    (["just text"], "examples[0] has no 'prompt' or 'answer'"), ([], "non-empty list")])
def test_bad_examples(examples, contains):
    with pytest.raises(ValueError) as e: check_examples(examples)
    assert contains in str(e.value)


@pytest.mark.parametrize("method,kwargs,contains", [
    ("got-d", {}, "needs examples of the task to select for"),
    ("perplexity", {}, "needs a model to score the examples with"),
    ("less", dict(model="tiny-llama"), "needs examples of the task to select for"),
    ("vote-k", dict(k=0), "k=0 of method 'vote-k' must be >= 1"),
    ("uds", {}, "needs a model to score the examples with"),
    ("diversify-conquer", dict(quality="loss"), "needs a model to score the examples with"),
    ("diversify-conquer", dict(quality="best"), "must be one of 'loss', 'random'"),
    ("lora", {}, "not a data selector"),
    ("got-d", dict(target=[dict(prompt="x")]), "target[0] has no 'answer'"),
    ("random", dict(budget=50), "larger than the pool of 20")])
def test_select_errors(method, kwargs, contains):
    pool = [dict(prompt=f"p{i}", answer="a") for i in range(20)]
    kwargs = dict(kwargs); budget = kwargs.pop("budget", 5)
    with pytest.raises((ValueError, TypeError)) as e: select(pool, method, budget, **kwargs)
    assert contains in str(e.value)


def test_models_of_different_shapes():
    from peftlab.core.models import tiny_llama
    from peftlab.core.registry import apply
    with pytest.raises(ValueError) as e: check_same_shapes([apply(tiny_llama(), "lora", r=4), apply(tiny_llama(num_hidden_layers=3), "lora", r=4)])
    assert "differ at 'model.layers.2" in str(e.value)


def test_noisy_pool_rates():
    pool = noisy_pool("iso_date", 50, noise=dict(wrong=0.2, off_task=0.1), seed=3)
    assert kind_shares(pool) == dict(clean=0.7, wrong=0.2, duplicate=0.0, off_task=0.1)
    assert set(KINDS) == {"clean", "wrong", "duplicate", "off_task"}


@pytest.mark.parametrize("sizes,k,want", [([6, 4], 5, [3, 2]), ([5, 3, 2], 4, [2, 1, 1]), ([1, 1, 8], 3, [0, 0, 3]), ([7, 7, 7], 10, [4, 3, 3])])
def test_cluster_budgets(sizes, k, want):
    "Largest remainders: shares k * n_c / N floored, the rest to the largest fractional parts (ties to the first)."
    assert cluster_budgets(torch.tensor(sizes), k).tolist() == want


def test_uds_novelty_beats_a_repeat():
    "Second batch: the largest norm repeats the sketch just chosen; with weight 1 the novel candidate wins (hand-computed z-scores)."
    norms = torch.tensor([1.0, 2.0, 5.0, 1.5, 1.0, 4.0, 3.0, 0.5]); e = torch.eye(3)
    sk = torch.stack([e[1], e[1], e[0], e[1], e[2], e[0], e[2], e[1]])
    assert uds_pass(norms, sk, 2, torch.arange(8), batch=4, weight=1.0, memory=8)[0].tolist() == [2, 6]
    assert uds_pass(norms, sk, 2, torch.arange(8), batch=4, weight=0.0, memory=8)[0].tolist() == [2, 5]
