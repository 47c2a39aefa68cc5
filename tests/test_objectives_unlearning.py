"WHP, LfU and LiST: the authors' formulations written the long way, and the refusals that name what is missing."
import pytest
import torch
import torch.nn.functional as F
import peftlab as pl
from peftlab.core.models import tiny_llama
from peftlab.core.train import make_objective, trainable_parameters
from peftlab.objectives.unlearning import whp_generic_logits, undesirable_step, hidden_states, consistency_loss
from peftlab.objectives.list_self_training import meta_weights

def lora_model(seed=0):
    torch.manual_seed(seed)
    m = pl.apply(tiny_llama(vocab_size=24), "lora", r=2, targets="all-linear")
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad: p.add_(0.1 * torch.randn_like(p))
    return m

def sft_batch(seed=0):
    ids = torch.randint(3, 24, (2, 8), generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, labels=ids.masked_fill(torch.arange(8) < 4, -100))

@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 5.0])
def test_whp_generic_logits_elementwise(alpha):
    "v_b − α·max(v_r − v_b, 0), element by element."
    g = torch.Generator().manual_seed(int(alpha * 10))
    vb, vr = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    want = torch.tensor([b - alpha * max(r - b, 0.0) for b, r in zip(vb.flatten().tolist(), vr.flatten().tolist())]).view_as(vb)
    torch.testing.assert_close(whp_generic_logits(vb, vr, alpha), want, atol=1e-6, rtol=1e-6)

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lfu_step_and_consistency_as_the_authors_write_them(seed):
    "The authors' trainer moves param.data by α g/‖g‖ in place, reads output_hidden_states, and averages per-layer MSEs at labels != -100."
    m, b = lora_model(seed), sft_batch(seed)
    logits = m(input_ids=b["input_ids"]).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100)
    delta = undesirable_step(m, loss, 0.1)
    with torch.no_grad(): fixed = m(input_ids=b["input_ids"], output_hidden_states=True).hidden_states
    named = trainable_parameters(m)
    grads = torch.autograd.grad(loss, [p for _, p in named])
    norm = torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)
    with torch.no_grad():
        for (_, p), g in zip(named, grads): p.data += 0.1 * g / norm
        moved = m(input_ids=b["input_ids"], output_hidden_states=True).hidden_states
        for (_, p), g in zip(named, grads): p.data -= 0.1 * g / norm
    mask = b["labels"] != -100
    theirs = sum(F.mse_loss(h[mask], h0[mask]) for h, h0 in zip(moved, fixed)) / len(fixed)
    with torch.no_grad(): ours = consistency_loss(hidden_states(m, b, delta), fixed, mask)
    assert abs(ours.item() - theirs.item()) < 1e-5

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_meta_weights_are_learning_to_reweight(seed):
    "Ren et al.'s recipe: a virtual SGD step with ε in the graph, the clean loss after it, -∂/∂ε clipped and normalised."
    g = torch.Generator().manual_seed(seed)
    clf = torch.nn.Linear(5, 3)
    x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
    xc, yc = torch.randn(4, 5, generator=g), torch.randint(0, 3, (4,), generator=g)
    w = meta_weights(clf, F.cross_entropy(clf(x), y, reduction="none"), F.cross_entropy(clf(xc), yc))
    eps = torch.zeros(8, requires_grad=True)
    gW, gb = torch.autograd.grad((eps * F.cross_entropy(clf(x), y, reduction="none")).sum(), [clf.weight, clf.bias], create_graph=True)
    after = F.cross_entropy(xc @ (clf.weight - 0.01 * gW).T + (clf.bias - 0.01 * gb), yc)
    slope = F.relu(-torch.autograd.grad(after, eps)[0])
    want = slope / slope.sum() if slope.sum() > 0 else slope
    torch.testing.assert_close(w, want, atol=1e-6, rtol=1e-5)

REFUSALS = [  # (what, objective, message)
    ("whp without generic labels", "whp", "needs batch field(s) ['generic_labels']"),
    ("list without labelled rows", "list", "needs batch field(s) ['labelled_input_ids', 'labelled_labels']"),
]

@pytest.mark.parametrize("what,objective,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_name_what_is_missing(what, objective, message):
    with pytest.raises(ValueError) as e: pl.fit(lora_model(), [sft_batch()], 1, objective=objective, progress=False)
    assert message in str(e.value)

@pytest.mark.parametrize("name", ["lfu", "list"])
def test_own_forward_passes_refuse_data_parallel(name, monkeypatch):
    "Their own forward passes go around DDP's wrapper: under torchrun they refuse, naming the fix."
    m, b = lora_model(), sft_batch()
    b = dict(b, labelled_input_ids=b["input_ids"], labelled_labels=b["labels"])
    logits = m(input_ids=b["input_ids"]).logits
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="train it in one process"):
        make_objective(m, name)(logits, b["labels"], dict(b))

@pytest.mark.parametrize("name", ["whp", "lfu", "list"])
def test_registered_as_objectives(name):
    assert pl.methods("objective").set_index("name").loc[name, "paper"]
