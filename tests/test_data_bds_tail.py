"BDS and tail-patch ranking: the Gibbs posterior against its variational problem, the weighted loss's gradient, tails on hand-made components, and bad input."
import copy
import pandas as pd
import pytest
import torch
from peftlab.core.models import tiny_llama, load_tokenizer
from peftlab.core.data import get_task
from peftlab.objectives.dpo import CompactTokenizer
from peftlab.data.core import select, noisy_pool
from peftlab.data.bds import gibbs_weights, example_weighted_loss, weighted_loader, check_trusted, bds_posterior, BdsConfig
from peftlab.data.tail_patch import tail_patch, fill_budget, check_components


@pytest.fixture(scope="module")
def world():
    pool = noisy_pool("sort_numbers", 24, seed=0)
    held = get_task("sort_numbers", n_train=0, n_test=8, seed=1).test
    tok = CompactTokenizer(load_tokenizer("tiny-llama"), pool + held)
    return pool, held, tok, lambda: tiny_llama(**tok.model_config())


def scheduler_objective(w, losses, tau):
    "The released scheduler's objective: mean_i w_i l_i - tau H(w / N), on weights of mean 1."
    p = w / len(w)
    return (p * losses).sum() + tau * (p * p.log()).sum()

@pytest.mark.parametrize("tau", [0.3, 1.0, 4.0])
def test_gibbs_weights_minimise_the_scheduler_objective(tau):
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(6, generator=g, dtype=torch.float64) * 5
    w = gibbs_weights(losses, tau).double()
    torch.testing.assert_close(w.sum(), torch.tensor(6.0, dtype=torch.float64))
    best = scheduler_objective(w, losses, tau)
    for _ in range(50):   # any other weights of mean 1 do worse
        other = 6 * torch.softmax(torch.randn(6, generator=g, dtype=torch.float64) * 2, 0)
        assert scheduler_objective(other, losses, tau) >= best - 1e-12


def test_weighted_loss_gradient_is_the_weighted_sum_of_row_gradients():
    torch.manual_seed(0)
    m = tiny_llama(vocab_size=40, pad_token_id=0, eos_token_id=1, bos_token_id=1).requires_grad_(True)
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, 9], [-100, 11, 12, -100, -100]])
    mask = (torch.arange(5) < torch.tensor([[5], [3]])).long()
    def grads(rows, w):
        m.zero_grad()
        b = dict(input_ids=ids[rows], labels=labels[rows], attention_mask=mask[rows], example_weight=torch.tensor(w))
        example_weighted_loss(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"], b)[0].backward()
        return torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
    both = grads([0, 1], [2.0, 0.5])
    torch.testing.assert_close(both, 2.0 * grads([0], [1.0]) + 0.5 * grads([1], [1.0]), atol=1e-6, rtol=1e-5)


def test_bds_downweights_off_task_examples(world):
    pool, held, tok, fresh = world
    w, losses = bds_posterior(fresh(), tok, pool, held, BdsConfig(rounds=2, steps=15))
    off = torch.tensor([e["kind"] == "off_task" for e in pool])
    assert w[off].max() < w[~off].mean()          # the answers of other tasks are the least likely under the aligned model
    torch.testing.assert_close(w, gibbs_weights(losses))


def test_tail_on_the_target_itself_helps_most(world):
    pool, held, tok, fresh = world
    ckpt = fresh()
    off = [e for e in pool if e["kind"] == "off_task"]
    effects = tail_patch(lambda: copy.deepcopy(ckpt), dict(target=held, other_tasks=off), held, steps=5, tokenizer=tok, lr=1e-2)
    assert list(effects.index) == ["target", "other_tasks"] and effects["target"] > 0


def test_fill_budget_takes_whole_components_best_first():
    idx, scores = fill_budget(dict(a=[0, 1, 2], b=[3], c=[4, 5]), pd.Series(dict(c=1.0, a=0.5, b=-1.0)), 3)
    assert sorted(idx[:2].tolist()) == [4, 5] and idx[2].item() in (0, 1, 2) and scores.tolist() == [1.0, 1.0, 0.5]
    with pytest.raises(ValueError, match="more than the 0 examples in the components that helped"):
        fill_budget(dict(a=[0]), pd.Series(dict(a=-0.1)), 1, helpful_only=True)


@pytest.mark.parametrize("call,message", [
    (lambda: check_trusted([]), "trusted alignment set is empty"),
    (lambda: check_trusted(None), "trusted alignment set is empty"),
    (lambda: check_components({}), "components must be a non-empty dict"),
    (lambda: check_components([dict(prompt="a", answer="b")]), "components must be a non-empty dict"),
    (lambda: check_components(dict(a=[dict(prompt="a", answer="b")], b=[])), "component 'b' is empty"),
    (lambda: check_components(dict(a="not a list")), "component 'a' is empty or not a list"),
    (lambda: gibbs_weights(torch.tensor([1.0, float("inf")])), "losses must be finite"),
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")): call()


def test_bad_input_through_select_and_loader(world):
    pool, held, tok, fresh = world
    with pytest.raises(ValueError, match="larger than the pool of 24"): select(pool, "bds", 25, model=fresh(), tokenizer=tok, target=held)
    with pytest.raises(ValueError, match="larger than the pool of 24"): select(pool, "tail-patch", 25, model=fresh(), tokenizer=tok, target=held)
    with pytest.raises(ValueError, match="target must be a non-empty list"): select(pool, "bds", 5, model=fresh(), tokenizer=tok, target=[])
    with pytest.raises(ValueError, match=r"\(3,\) weights for 24 examples"): weighted_loader(pool, [1.0, 1.0, 1.0], tok)
