"""peftlab's APOLLO (`peftlab.optim.apollo`) step by step against `apollo_torch.APOLLOAdamW` on tiny-llama.

Each row is one configuration; both optimisers get the same groups (the `nn.Linear` weights projected with
`proj="random"`, `proj_type="std"`, everything else plain AdamW), the same seeds (apollo-torch seeds parameter k
with k; ours with `seed + k`, seed 0) and the same batches. After every one of 20 steps every parameter must agree
to 1e-5 (on this CPU they agree bit for bit). Also the registry's factory against the direct class.
"""
import pytest
import torch
from apollo_torch import APOLLOAdamW
from peftlab.core.models import tiny_llama, load_tokenizer
from peftlab.core.data import get_task, sft_loader
from peftlab.core.train import make_optimizer
from peftlab.optim.apollo import ApolloConfig, ApolloMiniConfig, apollo_groups, make_apollo

STEPS = 20
ROWS = [  # config, lr, weight decay
    (ApolloConfig(rank=8, update_proj_gap=5), 1e-3, 0.0),
    (ApolloConfig(rank=32, scale_type="tensor", update_proj_gap=7, scale=2.0), 1e-3, 0.0),
    (ApolloMiniConfig(update_proj_gap=4), 1e-3, 0.0),
    (ApolloConfig(rank=4, update_proj_gap=3, scale_front=True, scale=3.0), 5e-3, 0.1),
    (ApolloConfig(rank=16, norm_growth_limit=False, targets=["q_proj", "down_proj"]), 1e-2, 0.01),
    (ApolloConfig(rank=8, betas=(0.8, 0.99), eps=1e-8, update_proj_gap=1), 1e-3, 0.0),
]


@pytest.fixture(scope="module")
def batches():
    tok = load_tokenizer("tiny-llama")
    return list(sft_loader(get_task("record_format", n_train=16, n_test=2, seed=0).train, tok, batch_size=2, shuffle=False))


def reference(model, config, lr, weight_decay):
    groups = [{**g, "proj": "random", "proj_type": "std"} if "rank" in g else g for g in apollo_groups(model, config)]
    return APOLLOAdamW(groups, lr=lr, betas=config.betas, eps=config.eps, weight_decay=weight_decay,
                       scale_front=config.scale_front, disable_nl=not config.norm_growth_limit)


@pytest.mark.parametrize("config,lr,weight_decay", ROWS, ids=[f"row{i}" for i in range(len(ROWS))])
def test_equal_to_apollo_torch(batches, config, lr, weight_decay):
    ours, theirs = tiny_llama(), tiny_llama()
    opts = make_apollo(ours, config, lr, weight_decay), reference(theirs, config, lr, weight_decay)
    for t in range(STEPS):
        for model, opt in zip((ours, theirs), opts):
            opt.zero_grad(); model(**batches[t % len(batches)]).loss.backward(); opt.step()
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {t + 1}, {name}: {m}")
    moved = max((p - q).abs().max().item() for p, q in zip(ours.parameters(), tiny_llama().parameters()))
    assert moved > 1e-3  # the runs did train


def test_registry_builds_the_same_optimizer():
    m = tiny_llama()
    opt = make_optimizer(m, "apollo", lr=1e-3, rank=8, scale_type="tensor", update_proj_gap=3)
    direct = make_apollo(m, ApolloConfig(rank=8, scale_type="tensor", update_proj_gap=3), lr=1e-3)
    strip = lambda o: [{k: v for k, v in g.items() if k != "params"} | {"n": len(g["params"])} for g in o.param_groups]
    assert strip(opt) == strip(direct)


@pytest.mark.parametrize("options,message", [
    (dict(rank=33), "choose rank <= 32"),
    (dict(scale_type="row"), "scale_type"),
    (dict(rank=0), "rank"),
    (dict(scale=0.0), "scale"),
    (dict(update_proj_gap=0), "update_proj_gap"),
    (dict(targets=["nope"]), "no module matched"),
])
def test_wrong_use(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make_optimizer(tiny_llama(), "apollo", lr=1e-3, **options)
